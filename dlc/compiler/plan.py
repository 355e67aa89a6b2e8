"""Build planning: size a build for a target.

Memory model (bytes): weights (parameters x dtype size) + KV cache (2 x layers x kv_heads x head_dim x dtype
size per token, for max_batch x max_seq tokens) + activations (the refresh forward's transients for
max_batch x max_seq tokens + the logit chunk budget) must fit in memory x utilisation. The planner reports
the largest batch x sequence the target supports, derives the logit chunk from the activation budget, and
refuses with the numbers when the model cannot fit."""
from __future__ import annotations

from dataclasses import asdict, dataclass

GIB = 1 << 30
DEFAULT_LOGIT_BUDGET = 256 << 20      # bytes for the transient logit chunk when no target sizes it
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
LOGIT_BYTES_PER_ELEM = 36             # model-dtype logits + ~4 float64 temporaries (cast, score, exp, noise)


def logit_chunk_for(config, rows: int, budget_bytes: int) -> int:
    """Vocab rows per chunk so one chunk's transients [rows, chunk] fit the budget (multiple of 128)."""
    chunk = budget_bytes // (max(1, rows) * LOGIT_BYTES_PER_ELEM)
    if chunk >= config.vocab_size:
        return config.vocab_size
    return max(128, chunk // 128 * 128)


def default_logit_chunk(config, rows: int, batch: int = 1, budget: int = DEFAULT_LOGIT_BUDGET) -> int:
    return logit_chunk_for(config, batch * rows, budget)


def kv_bytes_per_token(config, dtype_bytes: int) -> int:
    return 2 * config.n_layers * config.n_kv_heads * config.head_dim * dtype_bytes


def act_bytes_per_token(config, dtype_bytes: int) -> int:
    """Refresh-forward transients per token, one layer live at a time: hidden + residual + q/k/v + attention
    out (6 d) and the MLP's gate/up/act (3 hidden), plus fp32 RoPE copies of q and k (2 d x 4 B)."""
    hidden = config.expert_hidden * config.n_experts_per_tok if config.is_moe else config.mlp_hidden
    return (6 * config.d_model + 3 * hidden) * dtype_bytes + 2 * config.d_model * 4


@dataclass
class Plan:
    target: str
    dtype: str
    memory_budget: int         # memory x utilisation
    weights: int
    kv_cache: int
    activations: int
    logit_budget: int
    logit_chunk: int
    max_batch_size: int
    max_seq_len: int
    block_length: int
    max_tokens: int            # the largest batch x sequence the memory supports
    fits: bool
    reason: str = ""
    parallel: int = 1          # GPUs of this target the model needs (tensor + expert parallel degree); 0: > 8
    parallel_note: str = ""
    moe_note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        g = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
        return [f"memory budget {g(self.memory_budget)} ({self.target}, {self.dtype})",
                f"  weights      {g(self.weights)}",
                f"  KV cache     {g(self.kv_cache)} (batch {self.max_batch_size} x seq {self.max_seq_len})",
                f"  activations  {g(self.activations)} (incl. logit chunk budget {g(self.logit_budget)})",
                f"logit chunk    {self.logit_chunk} vocab rows x {self.max_batch_size * self.block_length} decoded rows",
                f"max batch x sequence supported: {self.max_tokens} tokens "
                f"(e.g. batch {self.max_tokens // self.max_seq_len} at seq {self.max_seq_len})"] \
            + ([self.moe_note] if self.moe_note else []) + ([self.parallel_note] if self.parallel_note else [])


def moe_note(config, db: int) -> str:
    """MoE weights in the plan: experts' share of the weights and the parameters one token reads."""
    if not config.is_moe:
        return ""
    n_moe = config.n_layers - min(config.first_dense_layers, config.n_layers)
    experts = n_moe * config.n_experts * 3 * config.d_model * config.expert_hidden * db
    return (f"MoE            {config.n_experts} experts x {n_moe} layers = {experts / GIB:.2f} GiB of the weights; "
            f"{config.num_active_parameters() / 1e9:.2f}B of {config.num_parameters() / 1e9:.2f}B parameters "
            f"active per token (top-{config.n_experts_per_tok}"
            f"{f' + {config.n_shared_experts} shared' if config.n_shared_experts else ''})")


def parallel_degree(config, target, db: int, seq: int) -> tuple[int, str]:
    """The smallest number of these GPUs (1, 2, 4, 8) that holds the model at batch 1 x ``seq``: tensor
    parallel over attention heads, dense MLPs and the vocabulary, expert parallel over the routed experts (the
    degree both), so weights and KV divide by it (KV heads replicated when fewer than the degree); activations
    and the logit budget stay per GPU. Returns (degree, note); degree 0: more than 8 (multi-node)."""
    budget = int(target.memory_bytes * target.utilisation)
    weights = config.num_parameters() * db
    for n in (1, 2, 4, 8):
        kv_shards = n if config.n_kv_heads % n == 0 else max(1, config.n_kv_heads)
        kv = kv_bytes_per_token(config, db) * seq / min(n, kv_shards)
        need = weights / n + kv + act_bytes_per_token(config, db) * seq + (64 << 20)
        if need <= budget:
            if n == 1:
                return 1, ""
            ep = f" + expert parallel {n} ({config.n_experts // n} experts per GPU)" if config.is_moe else ""
            kvn = ("" if config.n_kv_heads % n == 0 else
                   f"; its {config.n_kv_heads} KV heads are replicated beyond tensor parallel {config.n_kv_heads}")
            return n, (f"parallel       does not fit one {target.name}: needs {n} x {target.name} with tensor "
                       f"parallel {n}{ep}: {weights / n / GIB:.2f} GiB of weights per GPU{kvn} (dlc engines are "
                       f"single-GPU today: serve it with a TP/EP engine, e.g. SGLang --tp-size {n}"
                       f"{f' --ep-size {n}' if config.is_moe else ''})")
    return 0, (f"parallel       does not fit 8 x {target.name} ({weights / 8 / GIB:.2f} GiB of weights per GPU at "
               f"degree 8): use a larger target or more than one node")


def plan_build(config, target, dtype: str, max_batch_size: int | None, max_seq_len: int | None,
               block_length: int) -> Plan:
    """Size the build. Unset limits are derived: seq = the model's max, batch = the most that fits (<= 256)."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPE_BYTES)}")
    if block_length <= 0:
        raise ValueError(f"--block-length must be > 0, got {block_length}")
    db = DTYPE_BYTES[dtype]
    seq = max_seq_len or config.max_seq_len
    if seq <= 0 or seq > config.max_seq_len:
        raise ValueError(f"--max-seq-len must be in 1..{config.max_seq_len} (the model's maximum), got {seq}")
    if max_batch_size is not None and max_batch_size <= 0:
        raise ValueError(f"--max-batch-size must be > 0, got {max_batch_size}")
    budget = int(target.memory_bytes * target.utilisation)
    weights = config.num_parameters() * db
    per_tok = kv_bytes_per_token(config, db) + act_bytes_per_token(config, db)
    free = budget - weights
    # the logit budget: 1/8 of what is left after the weights, between 64 MiB and 2 GiB
    logit_budget = int(min(2 * GIB, max(64 << 20, free // 8))) if free > 0 else 64 << 20
    max_tokens = max(0, (free - logit_budget) // per_tok) if free > 0 else 0
    batch = max_batch_size or max(1, min(256, max_tokens // seq))
    kv = kv_bytes_per_token(config, db) * batch * seq
    acts = act_bytes_per_token(config, db) * batch * seq + logit_budget
    chunk = logit_chunk_for(config, batch * block_length, logit_budget)
    fits, reason = True, ""
    if free <= 0:
        fits, reason = False, (f"the weights alone ({weights / GIB:.2f} GiB in {dtype}) exceed the memory budget "
                               f"{budget / GIB:.2f} GiB of {target.name} ({target.memory_gib} GiB x "
                               f"{target.utilisation}); use a smaller dtype or a larger target")
    elif weights + kv + acts > budget:
        fits, reason = False, (f"batch {batch} x seq {seq} needs {(weights + kv + acts) / GIB:.2f} GiB (weights "
                               f"{weights / GIB:.2f} + KV {kv / GIB:.2f} + activations {acts / GIB:.2f}) > budget "
                               f"{budget / GIB:.2f} GiB on {target.name}; the target supports at most "
                               f"{max_tokens} tokens (batch x seq): lower --max-batch-size or --max-seq-len")
    degree, note = parallel_degree(config, target, db, seq)
    if free <= 0 and degree > 1:
        reason = reason.replace("; use a smaller dtype or a larger target",
                                f"; it needs {degree} x {target.name} (tensor parallel {degree}"
                                f"{f' + expert parallel {degree}' if config.is_moe else ''}) or a larger target")
    return Plan(target.name, dtype, budget, weights, kv, acts, logit_budget, chunk, batch, seq, block_length,
                int(max_tokens), fits, reason, degree, note, moe_note(config, db))
