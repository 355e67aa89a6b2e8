"""The one typed seam between decoding and every runner: ``StepBatch`` and the ``PhaseRunner`` protocol.

Decoding (runtime/decoding.py) decides what each sequence needs next; a runner runs the model. Between them
there is exactly this: ``make_batch`` turns the states of one group (same phase, decoded width, fed width,
temperature and guidance: ``DecodeState.group_key``) and their KV pool rows into a ``StepBatch``; a runner's
``full`` / ``refresh`` / ``reuse`` takes it and returns (x0 [B, N] int64, conf [B, N] float64) for the decoded
columns, or a ``StepOutput`` (runtime/step_output.py) with the extras a batch declares it wants (entropy,
logprobs, sampling filters, credit, smoothing: the fields after ``keep_idx``); ``run_batch`` copies them back
to the host once. Every runner (eager, CUDA graph, compiled engine)
implements the protocol over the same batch and nothing travels beside it.

Layout (one for the whole runtime): row b's tokens sit at columns [0, L_b), right-padded with the mask id to
the batch width W; positions are ``arange(W)``; ``key_mask`` marks the real tokens. With classifier-free
guidance the batch is fed twice: rows [0, B) are the sequences, rows [B, 2B) the same with the prompt masked
(``cond_rows`` / ``un_rows`` say which), and each sequence owns two KV pool rows. Dream's shifted logits
(predictions for columns [a, b) come from hidden rows [a - 1, b - 1)) are folded in here: ``hid_start`` is the
first hidden row to decode and the fed span of a Reuse step is widened to cover it."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

import torch

from dlc.models.common import KVCache, block_key_mask  # noqa: F401 (block_key_mask: re-exported)

from .decoding import PHASES, DecodeState, smoothing_delta
from .step_output import StepOutput, pack_words, to_device, unpack_words


@dataclass
class StepBatch:
    phase: str                          # "full" | "refresh" | "reuse"
    n_seqs: int                         # B sequences; fed rows = B, or 2B with guidance
    ids: torch.Tensor                   # [fed, W] int64 token states (device)
    pos: torch.Tensor                   # [fed, W] int64 positions (device; contiguous, as every field)
    key_mask: torch.Tensor              # [fed, W] bool real tokens (device)
    lengths: torch.Tensor               # [fed] int64 tokens per row: keys [0, L) are real (host)
    out_start: torch.Tensor             # [B] int64 first decoded column (host)
    n_out: int                          # decoded columns per row
    hid_start: torch.Tensor             # [fed] int64 first hidden row to decode, out_start - shift (device)
    q_start: torch.Tensor | None        # [fed] int64 first fed column of a Reuse step (host)
    q_start_dev: torch.Tensor | None    # the same on the device
    n_fed: int                          # fed columns per row (Reuse), W otherwise
    cache: KVCache | None               # refresh / reuse: the pool view, cache.rows = slots on the device
    slots: torch.Tensor | None          # [fed] int64 pool rows (host)
    temperature: float
    cfg_scale: float
    seeds: torch.Tensor                 # [B] int64 sampling seeds (device; zeros at T = 0)
    cond_rows: torch.Tensor             # [B] int64 fed rows of the sequences (device)
    un_rows: torch.Tensor               # [B] int64 fed rows of their unconditional twins
                                        # (cond_rows itself without CFG)
    keep_idx: torch.Tensor | None = None   # head-sparse Reuse: [n_layers, fed, Hkv, K] kept columns per head
    block_size: int = 0                 # attention: 0 bidirectional; > 0 block-causal (block diffusion) with
                                        # blocks of this many columns aligned to column 0 (``block_key_mask``)
    tempered_conf: bool = False         # confidence = probability under softmax(logits / T) (LLaDA2, SDAR)
                                        # instead of LLaDA's untempered softmax; tokens are the same
    ids_host: torch.Tensor | None = None   # [fed, W] ``ids`` on the host where the builder had them (the
                                           # tensor-parallel frame reads the fed ids without a device copy)
    # -- decoding extras (declared; a runner honours them or raises). Defaults: a plain (x0, conf) step. -----
    entropy: bool = False                  # return StepOutput.entropy (entropy-bounded rule)
    logprobs: int | None = None            # return the token's logprob and k top alternatives (None: off)
    top_k: torch.Tensor | None = None      # [B] int64 sampling filters at T > 0 (0 / 1.0 / 0.0: off), device
    top_p: torch.Tensor | None = None      # [B] float64
    min_p: torch.Tensor | None = None      # [B] float64
    credit_ids: torch.Tensor | None = None     # [B, N, M] int64 credit decoding: the block's credited ids
    credit_vals: torch.Tensor | None = None    # [B, N, M] float64 their credit, decayed for this step
    credit_alpha: torch.Tensor | None = None   # [B] float64 (0: the row takes no credit)
    soft_tau: float | None = None          # return StepOutput.soft = softmax(l / tau) @ W_e (smoothing)
    soft_top_k: int = 0                    # > 0: that softmax over each row's top-k logits only (truncated)
    embed_delta: torch.Tensor | None = None    # [fed, N, d] added to the input embedding of the decoded
                                               # columns [out_start, + N) (smoothing's soft inputs)

    def wants_extras(self, filters: bool = True) -> bool:
        """Whether the step needs more of its runner than (tokens, confidence) at T = 0: extra outputs,
        rule inputs, or (``filters``) sampling filters."""
        return (self.entropy or self.logprobs is not None or (filters and self.top_k is not None)
                or self.credit_ids is not None or self.soft_tau is not None or self.embed_delta is not None)

    def credit(self) -> tuple | None:
        """The credit inputs as the decoders take them: (ids, vals, alpha), or None without credit."""
        return None if self.credit_ids is None else (self.credit_ids, self.credit_vals, self.credit_alpha)

    @property
    def fed(self) -> int:
        return self.ids.shape[0]

    @property
    def width(self) -> int:
        return self.ids.shape[1]

    def unpadded(self) -> bool:
        """No row is padded: every row's keys fill the width (attention then needs no padding mask)."""
        return bool((self.lengths == self.width).all())

    def cfg_weight(self, dtype) -> torch.Tensor:
        """[1]: the guidance weight cfg_scale + 1 (1.0 without guidance: the rows pass through)."""
        w = self.cfg_scale + 1.0 if self.fed != self.n_seqs else 1.0
        return torch.full((1,), w, dtype=dtype, device=self.ids.device)      # a fill: no blocking host copy


@runtime_checkable
class PhaseRunner(Protocol):
    """What every runner is. ``sparse_retention`` is None for dense runners; with a value, Reuse batches carry
    ``keep_idx`` chosen from the head scores its Refresh wrote into ``cache.scores``. ``max_seq_len`` and
    ``max_batch_size`` (sequences per call; None: any) are the limits the runner was built for (an engine's
    build limits): callers split groups and size KV pools by them."""
    config: object
    device: torch.device
    dtype: torch.dtype
    sparse_retention: float | None
    max_seq_len: int
    max_batch_size: int | None

    def full(self, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor]: ...

    def refresh(self, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor]: ...

    def reuse(self, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor]: ...


@runtime_checkable
class GraphedRunner(Protocol):
    """A runner that replays CUDA graphs over the serving KV pool (the eager model's ``GraphRunner``, an
    engine's ``CompiledRunner`` with graphs on): while ``graphed``, it needs one scratch slot of the pool for
    the padding rows of its batch buckets (``bind_pool``) and captures ahead of serving (``warmup`` over
    (fed width, decoded width) pairs)."""
    graphed: bool

    def bind_pool(self, kv) -> None: ...

    def warmup(self, widths: list[tuple[int, int]], max_batch: int) -> None: ...


@dataclass
class AheadSteps:
    """Steps a runner ran ahead of the host, landing on the host step by step: step s's tensors are valid
    once ``wait(s)`` returns, while the device still runs the steps after it."""
    x0: torch.Tensor                    # [n, B, N] int64 candidates of each step (host)
    conf: torch.Tensor                  # [n, B, N] float confidences
    blocks: torch.Tensor                # [n, B, N] int64 the block after step s's device-side commit
    events: list | None = None          # per step: a device event recorded after its copies (None: ready)
    run: object = None                  # the runner's handle of the run (``continue_ahead`` goes on from it)
    last_block: torch.Tensor | None = None   # [B, N] on the device: the block after the last step's commit
    extras: dict | None = None          # {name: [n, B, N, ...] host}: the step extras the core's apply
                                        # reads (entropy, credit's top-1 ids / probs, logprobs), landed with
                                        # each step; "soft" [n, B, N, d] stays on the device (smoothing)

    def __len__(self) -> int:
        return self.x0.shape[0]

    def wait(self, s: int) -> None:
        if self.events is not None:
            self.events[s].synchronize()

    def output(self, s: int, j: int) -> StepOutput:
        """Row j of landed step s as the core's apply takes it (x0 [N], conf [N] float64, the extras; as
        ``StepOutput.to_host``: floats as float64, the soft embedding as it is, on the device)."""
        ex = {k: v[s, j].to(torch.float64) if v.is_floating_point() and k != "soft" else v[s, j]
              for k, v in (self.extras or {}).items()}
        return StepOutput(self.x0[s, j], self.conf[s, j].to(torch.float64), **ex)


@runtime_checkable
class LookaheadRunner(Protocol):
    """A runner that runs several Reuse steps of one batch back to back on the device, committing each step's
    tokens there (``decoding.commit_ahead``) so that the host neither waits nor stages inputs between them:
    ``reuse_ahead(batch, counts [B, n] host int64, the rows' schedule counts from DecodeState.lookahead)`` ->
    ``AheadSteps`` (the host applies step s while the device runs the later ones). ``can_run_ahead(batch)``
    says whether this batch can.

    ``continue_ahead(steps, counts [B, n])`` launches n more steps of the same run from the device state its
    last launch left (the static fed ids hold its commits; nothing is staged again), so a caller keeps a
    window of steps in flight, launching one as each lands, instead of waiting for a whole run. ``steps`` must
    be the runner's latest run (``AheadSteps.run``): any other call of the runner in between may restage the
    static inputs, and ``continue_ahead`` then raises ValueError.

    Rules beyond low-confidence (issue 18): a runner that sets ``ahead_rules`` also takes the decoding core's
    commit, ``can_run_ahead(batch, commit=)`` and ``reuse_ahead(batch, counts, commit=)`` with
    ``decoding.AheadCommit`` (``decoding.ahead_commit(states)``; None: the low-confidence schedule), and runs
    its rows' rules ahead (with the entropy / credit extras the commit reads where it computes them; logprobs
    land with each step; smoothing's next soft input is written by the commit into the runner's static
    embedding delta). Others run only the low-confidence schedule ahead.

    Sampled batches (T > 0): a runner whose ``can_run_ahead`` takes them also takes ``seeds`` [B, n] host
    int64 (``ahead_seeds``: each row's seed of each step, from its generator; column 0 equals
    ``batch.seeds``) in ``reuse_ahead`` and ``continue_ahead``, and stages column s into its static seeds
    before launching step s; the batch's temperature and filters hold for the whole run."""

    def can_run_ahead(self, batch: "StepBatch") -> bool: ...

    def reuse_ahead(self, batch: "StepBatch", counts: torch.Tensor, commit=None,
                    seeds: torch.Tensor | None = None) -> AheadSteps: ...

    def continue_ahead(self, steps: AheadSteps, counts: torch.Tensor, seeds: torch.Tensor | None = None
                       ) -> AheadSteps: ...


def runs_ahead(runner) -> bool:
    return isinstance(runner, LookaheadRunner)


def is_graphed(runner) -> bool:
    return isinstance(runner, GraphedRunner) and runner.graphed


@dataclass
class MixedBatch:
    """The groups of one iteration run as ONE forward (``runner.mixed``): ``parts`` are ordinary StepBatches
    (typically a Refresh group and a Reuse group; any phases) whose rows use disjoint KV pool rows. The
    token-wise work reads the weights once for all parts' tokens; attention is per part."""
    parts: tuple[StepBatch, ...]

    @property
    def phases(self) -> tuple[str, ...]:
        return tuple(b.phase for b in self.parts)


@runtime_checkable
class MixedRunner(Protocol):
    """A runner that runs a ``MixedBatch`` as one forward while ``mixes`` is set: ``mixed(batch)`` returns one
    result per part, each what the part's own phase call would return ((x0, conf) or a StepOutput)."""
    mixes: bool

    def mixed(self, batch: MixedBatch) -> list: ...


def supports_mixed(runner) -> bool:
    return isinstance(runner, MixedRunner) and runner.mixes


def is_mixed_iteration(phases) -> bool:
    """Whether groups of these phases gain from one forward: compute-bound rows (Refresh / full) beside
    bandwidth-bound Reuse rows."""
    return "reuse" in phases and any(p != "reuse" for p in phases)


def check_runner(runner) -> None:
    if not isinstance(runner, PhaseRunner):
        raise TypeError(f"{type(runner).__name__} is not a phase runner (config, device, dtype, "
                        "sparse_retention, max_seq_len, max_batch_size, "
                        "full/refresh/reuse over a StepBatch)")


def attention_keys(batch: "StepBatch", key_mask: torch.Tensor, qpos: torch.Tensor) -> torch.Tensor:
    """What a runner passes the model as ``key_mask``: [fed, S] as is, or [fed, T, S] block-causal."""
    return block_key_mask(key_mask, qpos, batch.block_size) if batch.block_size else key_mask


def block_as_prefix(batch: "StepBatch") -> "StepBatch | None":
    """A block-causal Reuse batch whose every row feeds columns of ONE block (the exact block cache's steps
    of a block after its first: ``DecodeState.q_span`` = [bs, be) once ``kv_upto`` == bs; also a first
    block's prefill when the prompt is shorter than a block) as the ordinary Reuse step over the prefix
    [0, be): under the block-causal mask (``block_key_mask``) each of those queries sees keys [0, be), its
    own block bidirectionally and every finished block before it, which is what a bidirectional Reuse step
    attends with ``lengths`` be and the key mask cut there. The keys at or past be (the canvas's later
    blocks: masks, and whatever stale K/V their slot columns hold) are excluded. So a runner replays its
    ordinary captured Reuse step for it (runners/graph.py). None where some row's fed span crosses a block
    boundary (a block's first step feeds the finished block too, a prefill of complete blocks: truly
    block-causal, the eager path) or the batch is no block-causal Reuse step."""
    if batch.phase != "reuse" or not batch.block_size or batch.q_start is None:
        return None
    bsz = batch.block_size
    first = batch.q_start // bsz                                                 # [fed] host
    if bool(((batch.q_start + batch.n_fed - 1) // bsz != first).any()):
        return None
    ends = (batch.q_start_dev // bsz + 1) * bsz                                  # [fed] device, no copy
    keys = batch.key_mask & (torch.arange(batch.width, device=ends.device)[None] < ends[:, None])
    return replace(batch, lengths=torch.minimum((first + 1) * bsz, batch.lengths), key_mask=keys,
                   block_size=0)


ROW_FIELDS = ("top_k", "top_p", "min_p", "credit_ids", "credit_vals", "credit_alpha")   # [B, ...] inputs


def block_rows_as_prefix(batch: "StepBatch", max_rows: int, shift: int = 0) -> "list[StepBatch] | None":
    """A block-causal Reuse batch whose every row feeds k >= 2 whole blocks [q_start, q_start + k * bsz) (the
    exact block cache's first step of a block: the finished block and the new one; a prefill of the prompt's
    complete blocks and the first block) as ordinary Reuse steps over prefixes: one fed row per (sequence,
    block), block j's row attending keys [0, its block end) like ``block_as_prefix``'s, the rows of one
    sequence sharing its KV slot. Equal to the block-causal step: in every layer each row writes its block's
    K/V into the slot before any row attends, and block j's queries see blocks <= j (block-causal) through
    the slot. Views of at most ``max_rows`` rows run in order (every row of a view's blocks comes after the
    blocks it reads); the last view's first ``n_seqs`` rows are the sequences' decoded (last) blocks, each
    view decodes ``n_out`` columns of every row (those of finished blocks are discarded; sampling filters,
    seeds and credit follow each row's sequence; entropy, logprobs and smoothing's soft output are the
    batch's own). ``shift``: the model's logit shift. None where the batch is not such a step, guidance,
    smoothing's soft inputs (a block's first step has none: the rule's state is per block), or its decoded
    columns leave the last block."""
    bsz = batch.block_size
    if (batch.phase != "reuse" or not bsz or batch.q_start is None or batch.fed != batch.n_seqs
            or batch.keep_idx is not None or batch.embed_delta is not None or batch.n_fed % bsz
            or batch.n_fed < 2 * bsz or bool((batch.q_start % bsz).any())):
        return None
    B, k = batch.n_seqs, batch.n_fed // bsz
    last = batch.q_start + (k - 1) * bsz                                          # [B] host
    hid = batch.out_start - shift
    if bool(((hid < last) | (hid + batch.n_out > last + bsz) | (batch.lengths <= last)).any()):
        return None
    per_view = max_rows // B
    if per_view < 1:
        return None
    views, dev = [], batch.ids.device
    chunks = [list(range(i, min(k, i + per_view))) for i in range(0, k, per_view)]
    chunks[-1] = [k - 1] + chunks[-1][:-1]             # the decoded blocks: the last view's first rows
    for blocks in chunks:
        j = torch.tensor(blocks, dtype=torch.long).repeat_interleave(B)             # [R] block of each row
        src = torch.arange(B).repeat(len(blocks))                                   # [R] sequence of each row
        qs = batch.q_start[src] + j * bsz
        ends = torch.minimum(qs + bsz, batch.lengths[src])                          # keys [0, end)
        out = torch.where(j == k - 1, batch.out_start[src], qs + shift)     # finished: own columns
        src_d, ends_d, hid_d, qs_d = _to_device_many([src, ends, out - shift, qs], dev)   # one copy
        keys = batch.key_mask[src_d] & (torch.arange(batch.width, device=dev)[None] < ends_d[:, None])
        ar = torch.arange(len(src), device=dev)
        per_row = {f: getattr(batch, f)[src_d] for f in ROW_FIELDS
                   if getattr(batch, f) is not None}                   # [R, ...] by each row's sequence
        views.append(replace(
            batch, n_seqs=len(src), ids=batch.ids[src_d], pos=batch.pos[src_d], key_mask=keys, lengths=ends,
            out_start=out, hid_start=hid_d, q_start=qs, q_start_dev=qs_d, n_fed=bsz,
            cache=batch.cache.with_(rows=batch.cache.rows[src_d]),
            slots=batch.slots[src], seeds=batch.seeds[src_d], cond_rows=ar, un_rows=ar, block_size=0,
            ids_host=None if batch.ids_host is None else batch.ids_host[src], **per_row))
    return views


def take_rows(h: torch.Tensor, start: torch.Tensor, n: int) -> torch.Tensor:
    """Rows start[b] .. start[b] + n of h [B, T, d] (start [B] on h's device) -> [B, n, d]."""
    cols = start[:, None] + torch.arange(n, device=h.device)                    # [B, n]
    return h.gather(1, cols[..., None].expand(-1, -1, h.shape[-1]))


def take_cols(x: torch.Tensor, start: torch.Tensor, n: int) -> torch.Tensor:
    """Columns start[b] .. start[b] + n of x [B, W] -> [B, n]."""
    return x.gather(1, start[:, None] + torch.arange(n, device=x.device))


def _to_device_many(ts: list[torch.Tensor], dev: torch.device,
                    pack: bool | None = None) -> list[torch.Tensor]:
    """Host tensors on ``dev`` as int64 / float64, with ``pack`` (default: to a GPU) in ONE host-to-device
    copy: their words as one pinned int64 tensor (floats as the bits of their float64 values: ``view``,
    exact), split on the device. Unpacked: one copy each (on the CPU: the tensors themselves)."""
    if not (dev.type == "cuda" if pack is None else pack):
        return [to_device(t, dev) for t in ts]
    return unpack_words(to_device(pack_words(ts), dev), ts)                          # the one copy


def draw_seeds(states: list[DecodeState]) -> list[int]:
    """This step's sampling seed of each state (0 at T = 0); draws advance the states' generators."""
    return [s.draw_seed() if s.gen.temperature > 0 else 0 for s in states]


def ahead_seeds(states: list[DecodeState], n: int) -> torch.Tensor | None:
    """[B, n] host int64: each state's seeds of its next n steps (``DecodeState.peek_seeds``; 0 at T = 0),
    for a run ahead; None where no state samples (the runners stage no seed per step)."""
    if all(s.gen.temperature == 0 for s in states):
        return None
    return torch.tensor([s.peek_seeds(n) for s in states], dtype=torch.long)


def make_batch(runner, states: list[DecodeState], slots: list[tuple[int, ...]] | None = None,
               pool=None, seeds: list[int] | None = None) -> StepBatch:
    """One group's StepBatch. ``slots[i]``: state i's KV pool rows (1, or 2 with guidance); ``pool``: the
    ``KVCacheManager`` they index (refresh / reuse); ``seeds``: this step's sampling seeds (default: drawn
    here, ``draw_seeds``)."""
    s0 = states[0]
    if s0.phase not in PHASES or any(s.group_key() != s0.group_key() for s in states):
        raise ValueError("make_batch: the states must share one group key (phase, widths, sampling)")
    if seeds is None:
        seeds = draw_seeds(states)
    batch = build_batch(runner, s0.phase, [s.x for s in states], [s.P for s in states],
                        [s.bs for s in states], s0.be - s0.bs,
                        [s.q_span() for s in states] if s0.phase == "reuse" else None, slots, pool,
                        s0.gen.temperature, s0.gen.cfg_scale, seeds, block_size=s0.attn_block,
                        tempered_conf=s0.gen.block_decoding)
    _add_extras(batch, states, runner.device)
    return batch


def _add_extras(batch: StepBatch, states: list[DecodeState], dev) -> None:
    """The decoding extras the states need (``DecodeState.needs``), batched: per-row tensors for filters and
    credit, padded so rows without the feature are neutral (credit alpha 0; filters off)."""
    needs = [s.needs() for s in states]
    B, N = batch.n_seqs, batch.n_out
    batch.entropy = any(n["entropy"] for n in needs)
    ks = [n["logprobs"] for n in needs if n["logprobs"] is not None]
    batch.logprobs = max(ks) if ks else None
    if batch.temperature > 0 and any(n["filters"] is not None for n in needs):
        f = [n["filters"] or (0, 1.0, 0.0) for n in needs]
        batch.top_k = torch.tensor([x[0] for x in f], dtype=torch.long, device=dev)
        batch.top_p = torch.tensor([x[1] for x in f], dtype=torch.float64, device=dev)
        batch.min_p = torch.tensor([x[2] for x in f], dtype=torch.float64, device=dev)
    if any(n["credit"] is not None for n in needs):
        batch.credit_ids, batch.credit_vals, batch.credit_alpha = _to_device_many(
            _credit_rows([n["credit"] for n in needs], N), dev)                  # one copy, three tensors
    softs = [n["soft"] for n in needs if n["soft"] is not None]              # (tau, top k) each
    if softs:
        if batch.fed != B:
            raise ValueError("iteration smoothing does not combine with classifier-free guidance")
        batch.soft_tau, batch.soft_top_k = softs[0]               # (group_key: one top k per call)
        delta = smoothing_delta(states, dev)                                    # [B, N, d] or None
        if delta is not None:
            batch.embed_delta = to_device(delta, dev)                # on the device already: as it is


def _credit_rows(credit: list, N: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows' credit (``needs()["credit"]``: (ids [N, M_i], vals [N, M_i], alpha) or None) -> ids, vals
    [B, N, M] and alpha [B] on the host; a row without credit gets alpha 0 (neutral). Rows of one width (the
    usual batch: one step of its blocks) stack at once, else each row goes into a zero-padded tensor."""
    alpha = torch.tensor([0.0 if c is None else c[2] for c in credit], dtype=torch.float64)        # [B]
    widths = {None if c is None else c[0].shape[1] for c in credit}
    if len(widths) == 1 and None not in widths and widths != {0}:
        return torch.stack([c[0] for c in credit]), torch.stack([c[1] for c in credit]), alpha
    B, M = len(credit), max(1, max(w for w in widths if w is not None))
    ids = torch.zeros(B, N, M, dtype=torch.long)
    vals = torch.zeros(B, N, M, dtype=torch.float64)
    for i, c in enumerate(credit):
        if c is not None:
            ids[i, :, :c[0].shape[1]], vals[i, :, :c[1].shape[1]] = c[0], c[1]
    return ids, vals, alpha


def build_batch(runner, phase: str, seqs: list[torch.Tensor], prompt_lens: list[int], out_start: list[int],
                n_out: int, spans: list[tuple[int, int]] | None = None,
                slots: list[tuple[int, ...]] | None = None,
                pool=None, temperature: float = 0.0, cfg_scale: float = 0.0,
                seeds: list[int] | None = None, block_size: int = 0,
                tempered_conf: bool = False) -> StepBatch:
    """The StepBatch of token states ``seqs`` (host [L_i] each):
    decode columns [out_start_i, + n_out); a Reuse
    step feeds ``spans`` (qa, qb) per row. ``make_batch`` calls this from decoding states; tests call it
    directly to drive runners over hand-made states."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    dev, mc, B = runner.device, runner.config, len(seqs)
    cfg = cfg_scale > 0
    lengths = torch.tensor([x.shape[0] for x in seqs], dtype=torch.long)
    prompts = torch.tensor(prompt_lens, dtype=torch.long)
    W = int(lengths.max())
    ids = torch.full((B, W), mc.mask_id, dtype=torch.long)
    for i, x in enumerate(seqs):
        ids[i, :x.shape[0]] = x
    if cfg:                                       # the unconditional twins: prompt masked
        un = ids.clone()
        un[torch.arange(W)[None] < prompts[:, None]] = mc.mask_id
        ids, lengths = torch.cat([ids, un]), torch.cat([lengths, lengths])
    fed = ids.shape[0]
    shift = mc.logit_shift
    out_t = torch.tensor(out_start, dtype=torch.long)
    hid = out_t - shift
    hid = torch.cat([hid, hid]) if cfg else hid
    q_start, n_fed = None, W
    if phase == "reuse":
        sp = torch.tensor(spans, dtype=torch.long)                                # [B, 2]
        qa = torch.minimum(sp[:, 0], out_t - shift)                               # Dream: cover row a - 1
        n_fed = int(sp[0, 1] - qa[0])
        if bool(((sp[:, 1] - qa) != n_fed).any()):
            raise ValueError(f"build_batch: fed spans differ in width: {(sp[:, 1] - qa).tolist()}")
        q_start = torch.cat([qa, qa]) if cfg else qa
    seeds_t = torch.tensor(seeds if seeds is not None else [0] * B, dtype=torch.long)
    ar = torch.arange(W, device=dev)[None]                                       # [1, W]
    cache, slot_rows, keep = None, None, None
    if phase != "full":
        if pool is None or slots is None:
            raise ValueError(f"build_batch: a {phase} step needs the KV pool and the rows' slots")
        need = 2 if cfg else 1
        if any(len(sl) != need for sl in slots):
            raise ValueError(f"build_batch: each row needs {need} KV slot(s), got {slots}")
        slot_rows = torch.tensor([sl[0] for sl in slots] + ([sl[1] for sl in slots] if cfg else []),
                                 dtype=torch.long)
        cache = pool.view(slot_rows)
        if phase == "refresh" and pool.scores is not None:
            pool.scores_written(slot_rows.tolist())
        if phase == "reuse" and runner.sparse_retention is not None:
            keep = _keep_idx(pool, slot_rows, q_start, n_fed, lengths, runner.sparse_retention)
    arange_b = torch.arange(B, device=dev)
    return StepBatch(
        phase=phase, n_seqs=B, ids=to_device(ids, dev), pos=ar.expand(fed, W).contiguous(),
        key_mask=ar < to_device(lengths, dev)[:, None], lengths=lengths, out_start=out_t, n_out=n_out,
        hid_start=to_device(hid, dev), q_start=q_start,
        q_start_dev=None if q_start is None else to_device(q_start, dev), n_fed=n_fed, cache=cache,
        slots=slot_rows, temperature=float(temperature), cfg_scale=float(cfg_scale),
        seeds=to_device(seeds_t, dev), cond_rows=arange_b,
        un_rows=arange_b if fed == B else arange_b + (fed - B), keep_idx=keep,
        block_size=block_size, tempered_conf=tempered_conf, ids_host=ids)


def _keep_idx(pool, slots: torch.Tensor, q_start: torch.Tensor, n_fed: int, lengths: torch.Tensor,
              retention: float) -> torch.Tensor:
    """Per-head kept columns [n_layers, fed, Hkv, K]: the fed columns plus the top ``retention`` of each
    row's other cached keys (its length L, not the pool's width) by the head scores its Refresh stored in
    the pool (``KVCacheManager.kept_columns``: K = the largest row's count, shorter rows padded with a
    masked column; chosen once per slot and block)."""
    if pool.scores is None:
        raise ValueError("head-sparse reuse needs the KV pool's head scores (a pool made for this runner)")
    return pool.kept_columns(slots.tolist(), q_start.tolist(), n_fed, lengths.tolist(), retention)


def run_batch(runner, batch: StepBatch) -> StepOutput:
    """The runner's call for the batch's phase -> StepOutput on the host (x0 [B, N] int64, conf [B, N] float64
    and the extras the batch asked for). A runner answers a plain batch with (x0, conf) or a StepOutput, and a
    batch that ``wants_extras`` with a StepOutput holding them."""
    return _checked(runner, batch.phase, batch, getattr(runner, batch.phase)(batch))


def run_batch_result(runner, batch: StepBatch, res) -> StepOutput:
    """``run_batch`` of a call already made: the runner's result ``res`` for ``batch`` as a StepOutput on the
    host (the engine launches a Refresh early and reads it later: runtime/boundary.py)."""
    return _checked(runner, batch.phase, batch, res)


def run_mixed(runner, batch: MixedBatch) -> list[StepOutput]:
    """One forward for every part (``runner.mixed``) -> one StepOutput per part on the host; a runner that
    does not mix (``supports_mixed``) gets one call per part instead."""
    if not supports_mixed(runner):
        return [run_batch(runner, b) for b in batch.parts]
    res = runner.mixed(batch)
    if len(res) != len(batch.parts):
        raise RuntimeError(f"{type(runner).__name__}.mixed returned {len(res)} results for "
                           f"{len(batch.parts)} parts")
    return [_checked(runner, "mixed", b, r) for b, r in zip(batch.parts, res)]


def _checked(runner, call: str, batch: StepBatch, res) -> StepOutput:
    """A runner's result for ``batch`` as a StepOutput on the host, checked against what the batch asked."""
    name = f"{type(runner).__name__}.{call}"
    if not isinstance(res, StepOutput):
        if batch.wants_extras():
            raise RuntimeError(f"{name} cannot compute the decoding extras this "
                               f"batch asks for (entropy / logprobs / filters / credit / smoothing)")
        res = StepOutput(*res)
    if res.x0.shape != (batch.n_seqs, batch.n_out):
        raise RuntimeError(f"{name} returned x0 {tuple(res.x0.shape)}, expected "
                           f"{(batch.n_seqs, batch.n_out)}")
    missing = [k for k, on in (("entropy", batch.entropy), ("logprob", batch.logprobs is not None),
                               ("top1_ids", batch.credit_ids is not None),
                               ("soft", batch.soft_tau is not None))
               if on and getattr(res, k) is None]
    if missing:
        raise RuntimeError(f"{name} did not return {missing}")
    return res.to_host()


def group_states(states: list[DecodeState], max_batch: int | None = None,
                 split_extras: bool = False) -> list[list[int]]:
    """Indices of the states, grouped by their group key (one runner call each, at most ``max_batch`` states),
    in first-seen order. ``split_extras``: states that need decoding extras form their own groups (the
    CUDA-graph runner replays the others instead of running the whole group eagerly)."""
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(states):
        key = s.group_key() + ((_wants_extras(s),) if split_extras else ())
        groups.setdefault(key, []).append(i)
    n = max_batch or len(states) or 1
    return [g[k:k + n] for g in groups.values() for k in range(0, len(g), n)]


def _wants_extras(s: DecodeState) -> bool:
    n = s.needs()
    return bool(n["entropy"] or n["logprobs"] is not None or n["filters"] is not None
                or n["credit"] is not None
                or n["soft"] is not None)
