"""Build planning: size a build for a target.

Memory model (bytes): weights (parameters x dtype size) + KV cache (2 x layers x kv_heads x head_dim x dtype
size per token, for max_batch x max_seq tokens) + activations (the refresh forward's transients for
max_batch x max_seq tokens + the logit chunk budget) must fit in memory x utilisation. The planner reports
the largest batch x sequence the target supports, derives the logit chunk from the activation budget, and
refuses with the numbers when the model cannot fit."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

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


def act_bytes_per_token(config, dtype_bytes: int, moe_impl: str | None = None) -> int:
    """Refresh-forward transients per token, one layer live at a time: hidden + residual + q/k/v + attention
    out (6 d) and the MLP's gate/up/act (3 hidden), plus fp32 RoPE copies of q and k (2 d x 4 B). A MoE
    layer's hidden is its routed experts' (top k), except in a ``stacked`` program, whose wide GEMM holds
    every expert's hidden for every token (E / k times as much: 32x for LLaDA2's top 8 of 256)."""
    hidden = config.ffn_hidden(every_expert=moe_impl == "stacked")
    return (6 * config.d_model + 3 * hidden) * dtype_bytes + 2 * config.d_model * 4


@dataclass
class Layout:
    """One way to spread the model over ``gpus`` GPUs of a target, in bytes per GPU. Tensor parallel (TP)
    shards the attention heads (KV heads by head; one replicated KV head per GPU when there are fewer KV heads
    than GPUs), dense MLPs and shared experts (by hidden) and the LM head (by vocab); expert parallel (EP, MoE
    models) gives each GPU E / gpus routed experts; the embedding, norms and routers are on every GPU."""
    name: str                  # "TP 1", "TP 4", "TP/EP 4"
    gpus: int
    sharded: int               # tensor-parallel weights held by one GPU
    experts: int               # routed experts held by one GPU (expert parallel)
    replicated: int            # embedding, norms, routers: on every GPU
    kv_cache: int              # this GPU's KV heads at batch x seq
    activations: int           # per GPU (not divided: every GPU runs the full hidden size)
    budget: int
    invalid: str = ""          # why the model does not split this way ("" = it does)

    @property
    def weights(self) -> int:
        return self.sharded + self.experts + self.replicated

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations

    @property
    def fits(self) -> bool:
        return not self.invalid and self.total <= self.budget

    def to_dict(self) -> dict:
        return {**asdict(self), "weights": self.weights, "total": self.total, "fits": self.fits}

    def line(self) -> str:
        g = lambda b: f"{b / GIB:.2f}"  # noqa: E731
        if self.invalid:
            return f"  {self.name:<9} -: {self.invalid}"
        return (f"  {self.name:<9} {g(self.total):>7} GiB per GPU = sharded {g(self.sharded)} + experts "
                f"{g(self.experts)} + replicated {g(self.replicated)} + KV {g(self.kv_cache)} + activations "
                f"{g(self.activations)}: {'fits' if self.fits else 'does not fit'} {g(self.budget)} GiB")


@dataclass
class Plan:
    target: str
    dtype: str
    memory_budget: int         # memory x utilisation
    weights: int               # per GPU (the whole model at tensor_parallel 1)
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
    tensor_parallel: int = 1   # the layout planned (GPUs); the numbers above are per GPU
    layouts: list = field(default_factory=list)   # Layout.to_dict() of every degree 1, 2, 4, 8 at batch 1

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        g = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
        tp = self.tensor_parallel
        per = f" per GPU, {layout_name_for(self, tp)}" if tp > 1 else ""
        return [f"memory budget {g(self.memory_budget)} ({self.target}, {self.dtype}{per})",
                f"  weights      {g(self.weights)}",
                f"  KV cache     {g(self.kv_cache)} (batch {self.max_batch_size} x seq {self.max_seq_len})",
                f"  activations  {g(self.activations)} (incl. logit chunk budget {g(self.logit_budget)})",
                f"logit chunk    {self.logit_chunk} vocab rows x {self.max_batch_size * self.block_length} "
                "decoded rows",
                f"max batch x sequence supported: {self.max_tokens} tokens "
                f"(e.g. batch {self.max_tokens // self.max_seq_len} at seq {self.max_seq_len})"] \
            + ([self.moe_note] if self.moe_note else []) + self.layout_lines() \
            + ([self.parallel_note] if self.parallel_note else [])

    def layout_lines(self) -> list[str]:
        if not self.layouts or (self.parallel == 1 and self.tensor_parallel == 1):
            return []
        return [f"layouts        per GPU at batch 1 x seq {self.max_seq_len} on {self.target}:"] + \
            [Layout(**{k: v for k, v in d.items() if k not in ("weights", "total", "fits")}).line()
             for d in self.layouts]


def layout_name_for(plan_or_config, n: int) -> str:
    moe = plan_or_config.moe_note if isinstance(plan_or_config, Plan) else plan_or_config.is_moe
    return f"TP/EP {n}" if moe and n > 1 else f"TP {n}"


def moe_note(config, db: int) -> str:
    """MoE weights in the plan: experts' share of the weights and the parameters one token reads."""
    if not config.is_moe:
        return ""
    n_moe = config.n_layers - min(config.first_dense_layers, config.n_layers)
    experts = n_moe * config.n_experts * 3 * config.d_model * config.expert_hidden * db
    return (f"MoE            {config.n_experts} experts x {n_moe} layers = {experts / GIB:.2f} GiB of the "
            f"weights; {config.num_active_parameters() / 1e9:.2f}B of {config.num_parameters() / 1e9:.2f}B "
            f"parameters active per token (top-{config.n_experts_per_tok}"
            f"{f' + {config.n_shared_experts} shared' if config.n_shared_experts else ''})")


def split_problem(config, n: int) -> str:
    """Why the model cannot be split over n GPUs (the runtime's tensor / expert parallel rules), or ""."""
    H, K = config.n_heads, config.n_kv_heads
    if H % n:
        return f"{H} attention heads do not split over {n}"
    if (K >= n and K % n) or (K < n and n % K):
        return f"{K} KV heads neither split over nor replicate evenly to {n}"
    n_dense = config.n_layers if not config.is_moe else min(config.first_dense_layers, config.n_layers)
    if n_dense and config.mlp_hidden % n:
        return f"MLP hidden {config.mlp_hidden} does not split over {n}"
    if config.is_moe and config.n_experts % n:
        return f"{config.n_experts} experts do not split over {n}"
    return ""


def kv_heads_per_gpu(config, n: int) -> int:
    """KV heads one GPU holds: K / n, or one replicated head when K < n."""
    return max(1, config.n_kv_heads // n)


def weights_per_gpu(config, n: int, db: int) -> tuple[int, int, int]:
    """(tensor-parallel, expert-parallel, replicated) weight bytes one GPU of n holds; at n = 1 they add up to
    ``config.num_parameters() * db``."""
    d, H, hd, L = config.d_model, config.n_heads, config.head_dim, config.n_layers
    kv = kv_heads_per_gpu(config, n) if n > 1 else config.n_kv_heads
    attn = 2 * d * H * hd // n + 2 * d * kv * hd + ((H * hd // n + 2 * kv * hd) if config.qkv_bias else 0)
    attn_rep = (2 * hd if config.qk_norm else 0) + 2 * d                          # QK-norms, the two norms
    n_dense = L if not config.is_moe else min(config.first_dense_layers, L)
    sharded = L * attn + n_dense * 3 * d * config.mlp_hidden // n
    experts, replicated = 0, L * attn_rep + d + config.embedding_size * d          # + final norm, embedding
    if config.is_moe:
        expert = 3 * d * config.expert_hidden
        sharded += (L - n_dense) * config.n_shared_experts * expert // n
        experts = (L - n_dense) * (config.n_experts // n) * expert
        replicated += (L - n_dense) * d * config.n_experts                          # the routers
    if not config.tie_embeddings:
        sharded += -(-config.vocab_size // n) * d                                   # vocab-parallel head
    return sharded * db, experts * db, replicated * db


def layout(config, target, db: int, n: int, batch: int, seq: int, extra: int = 64 << 20) -> Layout:
    """Per-GPU memory of the degree-n layout at batch x seq (``extra``: the logit chunk budget)."""
    budget = int(target.memory_bytes * target.utilisation)
    bad = split_problem(config, n) if n > 1 else ""
    sharded, experts, replicated = weights_per_gpu(config, n if not bad else 1, db)
    kv_share = (kv_heads_per_gpu(config, n) if n > 1 and not bad else config.n_kv_heads) / config.n_kv_heads
    kv = int(kv_bytes_per_token(config, db) * kv_share) * batch * seq
    acts = act_bytes_per_token(config, db) * batch * seq + extra
    return Layout(layout_name_for(config, n), n, sharded, experts, replicated, kv, acts, budget, bad)


def parallel_degree(config, target, db: int, seq: int) -> tuple[int, str, list[Layout]]:
    """The smallest number of these GPUs (1, 2, 4, 8) whose layout holds the model at batch 1 x ``seq``:
    tensor parallel over attention heads, dense MLPs, shared experts and the vocabulary, expert parallel over
    the routed experts (the degree both). Returns (degree, note, the layouts tried); degree 0: more than 8."""
    tried = [layout(config, target, db, n, 1, seq) for n in (1, 2, 4, 8)]
    ok = [lay for lay in tried if lay.fits]
    if ok and ok[0].gpus == 1:
        return 1, "", tried
    if not ok:
        return 0, (f"parallel       does not fit 8 x {target.name} ({tried[-1].weights / GIB:.2f} GiB of "
                   f"weights per GPU at degree 8): use a larger target or more than one node"), tried
    return ok[0].gpus, layout_note(config, target, ok[0]), tried


def layout_note(c, target, best: Layout) -> str:
    """The plan's line naming the layout picked, what it splits and the flag that runs it."""
    n = best.gpus
    kvn = f"{kv_heads_per_gpu(c, n)} of {c.n_kv_heads} KV heads per GPU" + (
        " (replicated)" if c.n_kv_heads < n else "")
    ep = (f" + expert parallel {n} ({c.n_experts // n} of {c.n_experts} experts per GPU, one all-reduce per "
          f"MoE layer)" if c.is_moe else "")
    shared = ", shared experts" if c.n_shared_experts else ""
    return (f"parallel       does not fit one {target.name}: layout {best.name} fits, needs {n} x "
            f"{target.name} with tensor parallel {n} (attention: {kvn}; MLPs{shared} and the LM head split)"
            f"{ep}: {best.weights / GIB:.2f} GiB of weights, {best.total / GIB:.2f} GiB in all per GPU of "
            f"{best.budget / GIB:.2f}. Run it with `--tensor-parallel-size {n}` on dlc serve / generate (the "
            f"runtime path; dlc engines are single-GPU today)")


def plan_build(config, target, dtype: str, max_batch_size: int | None, max_seq_len: int | None,
               block_length: int, tensor_parallel: int = 1, moe_impl: str | None = None) -> Plan:
    """Size the build. Unset limits are derived: seq = the model's max, batch = the most that fits (<= 256).
    ``tensor_parallel`` > 1 plans one GPU of that layout (``Layout``): weights, KV and the batch per GPU.
    ``moe_impl``: the MoE forward the programs trace (``act_bytes_per_token``)."""
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
    tp = tensor_parallel
    bad = split_problem(config, tp) if isinstance(tp, int) and tp >= 1 else "it must be a positive integer"
    if bad:
        raise ValueError(f"--tensor-parallel-size {tp}: {bad}")
    budget = int(target.memory_bytes * target.utilisation)
    weights = sum(weights_per_gpu(config, tp, db))
    kv_heads = kv_heads_per_gpu(config, tp) if tp > 1 else config.n_kv_heads
    kv_tok = kv_bytes_per_token(config, db) * kv_heads // config.n_kv_heads
    act_tok = act_bytes_per_token(config, db, moe_impl)
    per_tok = kv_tok + act_tok
    free = budget - weights
    # the logit budget: 1/8 of what is left after the weights, between 64 MiB and 2 GiB
    logit_budget = int(min(2 * GIB, max(64 << 20, free // 8))) if free > 0 else 64 << 20
    max_tokens = max(0, (free - logit_budget) // per_tok) if free > 0 else 0
    batch = max_batch_size or max(1, min(256, max_tokens // seq))
    kv = kv_tok * batch * seq
    acts = act_tok * batch * seq + logit_budget
    chunk = logit_chunk_for(config, batch * block_length, logit_budget)
    where = f"{target.name}" if tp == 1 else f"each of {tp} x {target.name} ({layout_name_for(config, tp)})"
    fits, reason = True, ""
    if free <= 0:
        fits, reason = False, (f"the weights alone ({weights / GIB:.2f} GiB in {dtype}) exceed the "
                               f"memory budget {budget / GIB:.2f} GiB of {where} ({target.memory_gib} GiB x "
                               f"{target.utilisation}); use a smaller dtype or a larger target")
    elif weights + kv + acts > budget:
        fits, reason = False, (f"batch {batch} x seq {seq} needs {(weights + kv + acts) / GIB:.2f} "
                               f"GiB (weights {weights / GIB:.2f} + KV {kv / GIB:.2f} + activations "
                               f"{acts / GIB:.2f}) > budget {budget / GIB:.2f} GiB on {where}; the target "
                               f"supports at most {max_tokens} tokens (batch x seq): lower --max-batch-size "
                               "or --max-seq-len")
    degree, note, tried = parallel_degree(config, target, db, seq)
    if free <= 0 and degree > tp:
        reason = reason.replace("; use a smaller dtype or a larger target",
                                f"; it needs {degree} x {target.name} (tensor parallel {degree}"
                                f"{f' + expert parallel {degree}' if config.is_moe else ''}: "
                                f"--tensor-parallel-size {degree}) or a larger target")
    if degree > 1 and tp == degree:
        note = ""                                                         # the layout asked for is the one
    return Plan(target.name, dtype, budget, weights, kv, acts, logit_budget, chunk, batch, seq, block_length,
                int(max_tokens), fits, reason, degree, note, moe_note(config, db), tp,
                [lay.to_dict() for lay in tried])
