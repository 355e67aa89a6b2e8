"""The runner of compiled phase programs (engine directories and in-memory builds) over a StepBatch.

A phase program is any callable taking its inputs positionally (in the order of its recorded input names) and
returning its outputs in order: an FX GraphModule (in-process), a loaded torch.export program, an AOTI package
or an onnxruntime session wrapper. The programs decode inside the graph
(``chunk_logits``: guidance, Gumbel-max
with the per-sequence step seeds, confidence); this class feeds them from the StepBatch: the runtime's KV slot
pool itself with the batch's rows (the programs write K/V into it in place; ONNX / TensorRT programs return
it and this runner writes it) and the engine's weights, one copy shared by the phases. A head-sparse Refresh
also returns per-head key scores, kept in the pool for the rows' Reuse steps.

Engines built with ``--decode-extras`` decode every rule of the core: the programs reduce entropy, logprobs
and credit per vocab chunk, take iteration smoothing's soft inputs (``embed_delta``, added to the decoded
columns' input embeddings in the graph) and return the decoded rows' hidden states (``hidden_rows``), from
which this runner decodes, over the engine's head and embedding weights, the batches that smooth (the next
soft embedding) or filter at T > 0 (passes/chunk_logits.py says why those two are not decoded in the graph),
and every extra of a GPU-lowered engine: at T = 0 on CUDA with the graph runner's kernels
(``graph.fused_extras_decode``, ``decoding`` "fused"), else with the eager runner's ``decode_step_extras``."""
from __future__ import annotations

from dataclasses import replace

import torch

import dlc.kernels  # noqa: F401  (registers torch.ops.dlc.*: GPU-lowered phase programs call them)

from dlc.manifest import EMBED_WEIGHT, HEAD_WEIGHT, is_weight_input
from dlc.models.common import KVCache

from ..decoding import FieldError
from ..step import StepBatch, take_cols
from ..step_output import StepOutput
from .eager import decode_step_extras, pad_keys
from .graph import fused_extras_decode, fuses_t0, t0_extras_key
from .ahead import decoded_cols
from .program_graphs import ProgramGraphs


class CompiledRunner:
    """``input_names[phase]``: the program's inputs in order (runtime inputs, then lifted weights);
    ``weights``: name -> tensor on the device, the one copy every phase reads. ``kv_inplace``: the programs
    write K/V into the pool inputs (torch artifacts); else they return it and this runner writes it (ONNX /
    TensorRT)."""

    def __init__(self, config, phases: dict, input_names: dict[str, list[str]], *, device="cpu",
                 dtype=torch.float32, sparse_retention: float | None = None, kind: str = "export",
                 max_seq_len: int | None = None, max_batch_size: int | None = None,
                 temperature_dtype: torch.dtype = torch.float64, weights: dict | None = None,
                 kv_inplace: bool = True, cuda_graphs: bool = False, compile: bool = False):
        missing = {"refresh", "reuse"} - set(phases)
        if missing:
            raise ValueError(f"compiled runner: missing phase program(s) {sorted(missing)}")
        self.config, self.phases = config, dict(phases)                  # the runner adds variants
        self.input_names = {ph: list(names) for ph, names in input_names.items()}
        self.weights = weights or {}
        absent = sorted({n for names in input_names.values() for n in names if is_weight_input(n)}
                        - set(self.weights))
        if absent:
            raise ValueError(f"compiled runner: no tensor for weight input(s) {absent[:3]}")
        self.device, self.dtype = torch.device(device), dtype
        self.sparse_retention = sparse_retention
        self.kind = kind
        self.kv_inplace = kv_inplace
        self.max_seq_len = min(max_seq_len or config.max_seq_len, config.max_seq_len)   # the build limits
        self.max_batch_size = max_batch_size
        self.temperature_dtype = temperature_dtype      # float32 in engines for runtimes without doubles
        self.extras = all("credit_ids" in names for names in input_names.values())   # chunk_logits' extras
        self.block = all("block_size" in names for names in input_names.values())     # block diffusion
        # smoothing's input and the hidden rows the runner decodes smoothing and filters from (GPU-lowered
        # --decode-extras engines: every extra, their programs have only these)
        self.row_decoding = all("embed_delta" in names for names in input_names.values())
        if self.row_decoding and not {HEAD_WEIGHT, EMBED_WEIGHT} <= set(self.weights):
            raise ValueError(f"compiled runner: no tensor for {HEAD_WEIGHT} / {EMBED_WEIGHT} (the head and "
                             "embedding the runner decodes smoothing and filters with)")
        # rows this runner decodes at T = 0: "fused" (the graph runner's kernels: ``fused_extras_decode``, the
        # default on CUDA) or "exact" (decode_rows_ext in float64: the eager runner's numbers)
        self.decoding = "fused" if self.device.type == "cuda" else "exact"
        self.stats_fused = 0               # calls decoded by ``fused_extras_decode`` (tests, benches)
        self._add_rows_program()
        self.graphs = None
        self.compiled = False
        self.enable_compile(compile)
        self.enable_graphs(cuda_graphs)

    def _add_rows_program(self) -> None:
        """``reuse_rows``: the Reuse program without its in-graph decode (``inductor.without_decode``), for
        the batches this runner decodes from the hidden rows (``_rows_only``), which would otherwise read the
        LM head twice a step (the program's decode, then the rows'). GPU-lowered ``--decode-extras`` programs
        in FX form (export engines, in-memory builds); other engines keep the one program."""
        import torch.fx as fx

        from .inductor import without_decode
        reuse = self.phases.get("reuse")
        if not self.row_decoding or not isinstance(reuse, fx.GraphModule):
            return
        rows = without_decode(reuse)
        if rows is not None:
            self.phases["reuse_rows"] = rows
            self.input_names["reuse_rows"] = self.input_names["reuse"]

    def _rows_only(self, batch: StepBatch) -> bool:
        """Does this Reuse batch run ``reuse_rows``? The batches whose every output the runner decodes from
        the hidden rows (``_decode_outputs``): extras on a GPU-lowered engine, smoothing and T > 0 filters."""
        return ("reuse_rows" in self.phases and batch.wants_extras()
                and (self._decodes_rows(batch) or not self.extras))

    # --- Inductor code generation at load (export engines) ------------------------------------------------
    def enable_compile(self, on: bool) -> None:
        """Compile each phase program with Inductor (``torch.compile``) on first use: the code generation
        AOTI runs ahead of time (fused pointwise chains, one kernel per norm / RoPE / gate), done at load for
        export engines, whose interpreted programs otherwise launch every aten op separately.

        Each program splits at its layer boundaries and every layer runs one shared compiled function (as
        the runtime's compiled blocks): warm-up compiles a prelude, one layer and an epilogue per phase, each
        static first and once more with the sizes that changed (batch buckets, widths, Refresh lengths)
        symbolic; the weights' sizes stay static (runners/inductor.py). Refresh batches with no padded row run
        ``refresh_unpadded``, the program without its key-padding mask (flash attention, as eager). The
        pool is fed as one input per layer so that Inductor writes it in place (runners/inductor.py says
        why). AOTI packages are Inductor code already, ONNX / TensorRT run their own compilers: for them
        ``on`` is refused."""
        if not on or self.compiled:
            return
        if self.kind != "export":
            raise ValueError(f"compile: the {self.kind} engine's programs are compiled code already; "
                             "--compile applies to export engines (leave it out)")
        import torch._dynamo

        from .inductor import CompiledProgram, without_padding_mask
        cfg = torch._dynamo.config
        if getattr(cfg, "recompile_limit", 32) < 32:          # a few size-1 specialisations per phase
            cfg.recompile_limit = 32
        bare = without_padding_mask(self.phases["refresh"]) if "refresh" in self.phases else None
        if bare is not None:                  # Refresh batches with no padded row: no mask, flash attention
            self.phases["refresh_unpadded"] = bare
            self.input_names["refresh_unpadded"] = self.input_names["refresh"]
        shared: dict = {}                     # pieces alike across programs compile once (reuse / reuse_rows)
        self.phases = {ph: CompiledProgram(fn, self.input_names[ph], self.config.n_layers, shared)
                       for ph, fn in self.phases.items()}
        self.compiled = True

    # --- CUDA graphs of the Reuse program (runtime/runners/program_graphs.py) ------------------------------
    @property
    def graphed(self) -> bool:
        return self.graphs is not None

    def enable_graphs(self, on: bool, capture: bool = True) -> None:
        """Replay the Reuse program as CUDA graphs at bucketed batch sizes (CUDA, programs that write the pool
        in place). Needs ``bind_pool`` before use. ``capture=False``: the same static-buffer path calling the
        program directly, on any device (tests)."""
        if not on:
            self.graphs = None
            return
        if (capture and self.device.type != "cuda") or not self.kv_inplace:
            raise ValueError("engine CUDA graphs need a CUDA device and a torch artifact (export / AOTI), "
                             "whose programs write the KV pool in place")
        names = [n for n in self.input_names["reuse"] if not is_weight_input(n)]
        self.graphs = ProgramGraphs(lambda feed, rows_only=False: self._call("reuse_rows" if rows_only
                                                                             else "reuse", feed),
                                    names, self.config.mask_id,
                                    capture=capture, embed=(self.config.d_model, self.dtype))

    def bind_pool(self, kv) -> None:
        if self.graphs is not None:
            self.graphs.bind_pool(kv)

    def warmup(self, widths: list[tuple[int, int]], max_batch: int) -> None:
        if self.graphs is not None:
            one = torch.ones(1, dtype=self.dtype, device=self.device)
            temp = torch.zeros(1, dtype=self.temperature_dtype, device=self.device)
            extra = {"cfg_weight": one, "temperature": temp}
            if self.block:                       # any block size: the graphs' key is the shapes
                extra["block_size"] = torch.ones(1, dtype=torch.long, device=self.device)
            with torch.no_grad():
                self.graphs.warmup(widths, max_batch, extra)

    def _decode_inputs(self, batch: StepBatch, hid_start: torch.Tensor) -> dict:
        """hid_start [fed]: the decoded rows' first index into the program's hidden states."""
        n = batch.n_out
        feed = {"out_index": hid_start[:, None] + torch.arange(n, device=hid_start.device),   # [fed, N]
                "cond_rows": batch.cond_rows, "un_rows": batch.un_rows,
                "cfg_weight": batch.cfg_weight(self.dtype),
                "temperature": torch.full((1,), batch.temperature, dtype=self.temperature_dtype,
                                          device=self.device),          # a fill: no blocking host copy
                "seeds": batch.seeds}
        if self.extras:                  # chunk_logits.EXTRA_INPUTS; no credit: one neutral entry (alpha 0)
            B, dt = batch.n_seqs, self.temperature_dtype
            if batch.credit_ids is None:
                feed.update(credit_ids=torch.zeros(B, n, 1, dtype=torch.long, device=self.device),
                            credit_vals=torch.zeros(B, n, 1, dtype=dt, device=self.device),
                            credit_alpha=torch.zeros(B, dtype=dt, device=self.device))
            else:
                feed.update(credit_ids=batch.credit_ids, credit_vals=batch.credit_vals.to(dt),
                            credit_alpha=batch.credit_alpha.to(dt))
        elif batch.wants_extras() and not self.row_decoding:
            raise ValueError("this compiled engine decodes (token, confidence) only: rebuild it with "
                             "`dlc compile --decode-extras` for entropy, logprobs and credit decoding")
        if self.row_decoding:            # smoothing's soft inputs; zeros: the plain embedding, bit for bit
            d = batch.embed_delta
            feed["embed_delta"] = (torch.zeros(batch.fed, n, self.config.d_model, dtype=self.dtype,
                                               device=self.device) if d is None else d.to(self.dtype))
        elif self._decodes_rows(batch):
            raise ValueError("this compiled engine takes no soft inputs and returns no hidden rows: rebuild "
                             "it with `dlc compile --decode-extras` for smoothing and T > 0 filters")
        return feed

    def _attention_inputs(self, batch: StepBatch) -> dict:
        """Block-diffusion engines take the batch's block size (their programs build the block-causal mask
        from it and the positions: passes/mask_blocks.py) and decode its confidence tempered (chunk_logits);
        other engines attend bidirectionally."""
        if not self.block:
            if batch.block_size:
                raise ValueError(f"this engine ({self.config.family}) attends bidirectionally; a "
                                 f"block-causal batch (block_size {batch.block_size}) needs a "
                                 "block-diffusion engine")
            return {}
        if not batch.block_size or not batch.tempered_conf:
            raise ValueError(f"this engine's model ({self.config.family}) is block diffusion: its batches "
                             "need the block decoders' block size and tempered confidence (decoder llada2 / "
                             "llada2.1)")
        return {"block_size": torch.full((1,), batch.block_size, dtype=torch.long, device=self.device)}

    @staticmethod
    def _decodes_rows(batch: StepBatch) -> bool:
        """Smoothing and T > 0 filters: decoded by this runner from the programs' hidden rows."""
        return batch.soft_tau is not None or batch.embed_delta is not None or batch.top_k is not None

    def _decode_outputs(self, res: list, batch: StepBatch):
        """(tokens, confidence), or a StepOutput with the extras the batch asked for (chunk_logits'
        EXTRA_OUTPUTS after the optional top-k pair)."""
        if not batch.wants_extras():
            return res[0], res[1]
        ext = 4 if res[2].dtype == torch.long and res[2].dim() == 3 else 2          # past the top-k pair
        if self.row_decoding and (self._decodes_rows(batch) or not self.extras):
            # decoded from the rows: smoothing, T > 0 filters, and every extra of a GPU-lowered engine (its
            # programs have no chunked extras, only the rows)
            return self._decode_rows(res[ext + 4] if self.extras else res[ext], batch)
        k = batch.logprobs or 0
        if k and ext == 2:
            raise ValueError("this engine was built without top-k logprobs (dlc compile --logprobs K)")
        if k > (res[2].shape[-1] if ext == 4 else 0):
            raise ValueError(f"logprobs {k}: this engine was built for at most {res[2].shape[-1]} "
                             "alternatives")
        ent, lp, t1, p1 = res[ext:ext + 4]
        return StepOutput(res[0], res[1], entropy=ent, logprob=lp, top1_ids=t1, top1_prob=p1,
                          topk_ids=res[2][..., :k] if k else None,
                          topk_logprobs=res[3][..., :k] if k else None)

    def _decode_rows(self, rows: torch.Tensor, batch: StepBatch) -> StepOutput:
        """The programs' hidden rows [fed, N, d] decoded with the engine's head and embedding: at T = 0
        without guidance or filters in ``fused`` mode by the graph runner's kernels (``fused_extras_decode``:
        one home for both runners), else by the eager runner's ``decode_step_extras``."""
        V = self.config.vocab_size
        head, embed = self.weights[HEAD_WEIGHT][:V], self.weights[EMBED_WEIGHT][:V]
        if self.decoding == "fused" and fuses_t0(batch):
            self.stats_fused += 1
            out = fused_extras_decode(rows, head, embed, t0_extras_key(batch), batch.credit())
            return StepOutput.from_decode(out)
        return decode_step_extras(rows, head, embed, V, batch)

    def check_generation(self, gen) -> None:
        """Refuse, naming the field, what this engine's programs cannot decode: every rule beyond (token,
        confidence) needs an engine built with ``--decode-extras`` (smoothing and T > 0 filters one built
        since its programs take ``embed_delta`` and return ``hidden_rows``)."""
        if not self.row_decoding and (gen.smoothing or gen.filters() is not None):
            field = ("smoothing" if gen.smoothing else "top_k" if gen.top_k else "top_p" if gen.top_p < 1
                     else "min_p")
            what = "iteration smoothing" if gen.smoothing else f"{field} at temperature > 0"
            raise FieldError(field, f"this compiled engine cannot decode {what} (its programs take no soft "
                                    "inputs and return no hidden rows); rebuild it with "
                                    "`dlc compile --decode-extras`")
        if not (self.extras or self.row_decoding) and (gen.logprobs is not None or gen.credit
                                                       or gen.rule().needs_entropy):
            raise FieldError("logprobs" if gen.logprobs is not None else "credit" if gen.credit
                             else "entropy_bound", "this compiled engine decodes (token, confidence) only; "
                                                   "rebuild it with `dlc compile --decode-extras`")

    def _pool_inputs(self, batch: StepBatch) -> dict:
        """The KV slot pool itself ([n_layers, P, Hkv, S, D], written in place by the program) and the
        rows."""
        c = batch.cache
        if c.k_all is None:
            raise ValueError("compiled runner: the KV cache must be a slot pool "
                             "(KVCacheManager / KVCache.empty)")
        if c.k_all.dtype != self.dtype:
            raise ValueError(f"compiled runner: the KV pool is {c.k_all.dtype}, the engine runs {self.dtype}")
        return {"k_pool": c.k_all, "v_pool": c.v_all, "rows": c.row_index(batch.fed, self.device)}

    def _call(self, phase: str, feed: dict):
        w = self.weights
        args = [w[n] if n in w else feed[n].contiguous() for n in self.input_names[phase]]   # dense buffers
        return list(self.phases[phase](*args))

    # --- the runner contract -------------------------------------------------------------------------
    @torch.no_grad()
    def full(self, batch: StepBatch):
        scratch = KVCache.empty(self.config, batch.fed, batch.width, self.dtype, self.device)
        return self.refresh(replace(batch, cache=scratch), scores=False)   # a Refresh whose K/V nobody keeps

    @torch.no_grad()
    def refresh(self, batch: StepBatch, scores: bool = True):
        c = batch.cache
        W = batch.width
        if c.seq_len < W:
            raise ValueError(f"refresh: the cache holds {c.seq_len} columns, the batch needs {W}")
        feed = {"input_ids": batch.ids, "position_ids": batch.pos, "key_mask": batch.key_mask,
                **self._pool_inputs(batch), **self._decode_inputs(batch, batch.hid_start),
                **self._attention_inputs(batch)}
        unpadded = "refresh_unpadded" in self.phases and batch.unpadded()
        res = self._call("refresh_unpadded" if unpadded else "refresh", feed)
        rows = feed["rows"]
        if not self.kv_inplace:             # outputs: decoding ..., k, v [nl, fed, Hkv, W, D] (, scores)
            k, v = res[-3:-1] if self.sparse_retention is not None else res[-2:]
            c.k_all[:, rows, :, :W] = k.to(c.k_all.dtype)
            c.v_all[:, rows, :, :W] = v.to(c.v_all.dtype)
        if self.sparse_retention is not None and scores:                            # [nl, fed, Hkv, W] scores
            if c.scores is None:
                raise ValueError("head-sparse refresh needs a KV pool with head scores (KVCacheManager("
                                 "head_scores=True))")
            c.scores[:, rows] = float("-inf")
            c.scores[:, rows, :, :W] = res[-1].to(c.scores.dtype)
        return self._decode_outputs(res, batch)

    def _reuse_feed(self, batch: StepBatch) -> dict:
        c, qs, T = batch.cache, batch.q_start_dev, batch.n_fed
        feed = {"q_ids": take_cols(batch.ids, qs, T), "q_pos": take_cols(batch.pos, qs, T), "q_start": qs,
                "key_mask": pad_keys(batch.key_mask, c.seq_len), **self._pool_inputs(batch),
                **self._decode_inputs(batch, batch.hid_start), **self._attention_inputs(batch)}
        if self.sparse_retention is not None:
            feed["keep_idx"] = batch.keep_idx
        return feed

    def _graphable(self, feed: dict, batch: StepBatch) -> bool:
        full = (self.sparse_retention is not None and batch.cache is not None      # host lengths; only a
                and int(batch.lengths.max()) >= batch.cache.seq_len)            # head-sparse step asks
        return self.graphs is not None and self.graphs.eligible(feed, batch.fed, batch.fed != batch.n_seqs,
                                                                self.sparse_retention is not None, full)

    # --- steps run ahead of the host (step.LookaheadRunner, runners/ahead.py) ------------------------------
    ahead_rules = True          # the core's commit of every T = 0 rule the programs decode (can_run_ahead)

    def can_run_ahead(self, batch: StepBatch, commit=None) -> bool:
        """A Reuse batch the graphs take (the pool is the only input that decides). Without extras, any rule
        (``commit``: the decoding core's ``AheadCommit``; None: low-confidence), sampled too (the programs
        draw with the static seeds, which ``reuse_ahead`` stages step by step). With extras, at T = 0, the
        core's commit and what it reads from programs that provide it (``_ahead_extras``); sampled extras and
        filters are decoded here from the batch's own seeds (one step's), so they stay synchronous."""
        if batch.phase != "reuse" or batch.top_k is not None:
            return False
        if batch.wants_extras() and (commit is None or batch.temperature != 0
                                     or not self._ahead_extras(batch)):
            return False
        return self._graphable({"k_pool": batch.cache.k_all}, batch)

    def _ahead_extras(self, batch: StepBatch) -> bool:
        """The extras of a run ahead, each step's on the device: entropy and logprobs (the programs' chunked
        outputs of ``--decode-extras`` engines, or decoded from their hidden rows), credit (carried N columns
        wide: in the programs' static credit inputs, float64 as the host keeps it; GPU-lowered engines, whose
        programs take none, in the run's own buffers their rows decode with) and smoothing (programs that
        take ``embed_delta`` and return the hidden rows the soft embedding is decoded from; the commit writes
        the next soft input into the static ``embed_delta``). Engines without ``--decode-extras`` refuse
        these rules (``check_generation``)."""
        if not (self.extras or self.row_decoding):
            return False
        if batch.credit_ids is not None and (batch.credit_ids.shape[-1] > batch.n_out or (
                self.extras and self.temperature_dtype != torch.float64)):
            return False
        return self.row_decoding or (batch.soft_tau is None and batch.embed_delta is None)

    @torch.no_grad()
    def reuse_ahead(self, batch: StepBatch, counts: torch.Tensor, commit=None, seeds=None):
        if not self.can_run_ahead(batch, commit):
            raise ValueError("compiled runner: this batch cannot run steps ahead (see can_run_ahead)")
        if (seeds is None) != (batch.temperature == 0):
            raise ValueError("compiled runner: a sampled run ahead takes each step's seeds (seeds [B, n]); "
                             "a T = 0 run none")
        feed, batch = self._credit_n(self._reuse_feed(batch), batch)
        decode = self._ahead_decode(batch) if batch.wants_extras() else None
        credit = batch.credit()          # programs without credit inputs: the run's buffers (the batch's)
        counts = counts.to(self.device, non_blocking=True)
        return self.graphs.run_ahead(feed, batch.fed, batch.n_fed, batch.n_out,
                                     decoded_cols(batch, self.device), counts, commit, decode, credit,
                                     None if seeds is None else seeds.to(self.device, non_blocking=True),
                                     rows_only=self._rows_only(batch))

    def _ahead_decode(self, batch: StepBatch):
        """``(outputs [bb, ...], credit) -> StepOutput`` of a step run ahead: ``_decode_outputs`` (no host
        reads at T = 0) over the batch's rows, its credit the run's carried credit (rows decoded here)."""
        B = batch.n_seqs

        def decode(outs: list, credit: tuple | None):
            b = batch if credit is None else replace(batch, credit_ids=credit[0][:B],
                                                     credit_vals=credit[1][:B].to(torch.float64),
                                                     credit_alpha=credit[2][:B].to(torch.float64))
            return self._decode_outputs([o[:B] for o in outs], b)
        return decode

    def _credit_n(self, feed: dict, batch: StepBatch) -> tuple[dict, StepBatch]:
        """Credit rows in the graphs: N columns wide, the rows' own first and zeros after (no credit), as the
        graph runner stages it, so one captured variant serves a block's every step and a run ahead carries
        it in place (a block's credit grows one id a step: at most N). The batch's credit padded alike (the
        rows a runner decodes read it)."""
        if batch.credit_ids is None or batch.credit_ids.shape[-1] == batch.n_out:
            return feed, batch
        B, N, M = batch.credit_ids.shape
        ids = batch.credit_ids.new_zeros(B, N, N)
        vals = batch.credit_vals.new_zeros(B, N, N)
        ids[..., :M], vals[..., :M] = batch.credit_ids, batch.credit_vals
        batch = replace(batch, credit_ids=ids, credit_vals=vals)
        if "credit_ids" in feed:
            feed = dict(feed, credit_ids=ids, credit_vals=vals.to(self.temperature_dtype))
        return feed, batch

    @torch.no_grad()
    def continue_ahead(self, steps, counts: torch.Tensor, seeds=None):
        """step.LookaheadRunner: more steps of the latest run (``ProgramGraphs.continue_ahead``)."""
        if self.graphs is None:
            raise ValueError("compiled runner: continue_ahead needs the Reuse program's graphs")
        return self.graphs.continue_ahead(steps, counts.to(self.device, non_blocking=True),
                                          None if seeds is None else seeds.to(self.device, non_blocking=True))

    @torch.no_grad()
    def reuse(self, batch: StepBatch):
        c, qs, T = batch.cache, batch.q_start_dev, batch.n_fed
        feed = self._reuse_feed(batch)
        if self._graphable(feed, batch):
            feed, batch = self._credit_n(feed, batch)
            return self._decode_outputs(self.graphs.run(feed, batch.fed, T, batch.n_out,
                                                        self._rows_only(batch)), batch)
        res = self._call("reuse_rows" if self._rows_only(batch) else "reuse", feed)
        if not self.kv_inplace:                     # outputs: decoding ..., k_new, v_new [nl, fed, Hkv, T, D]
            rows = feed["rows"]
            cols = qs[:, None] + torch.arange(T, device=qs.device)                # [fed, T]
            idx = (slice(None), rows[:, None], slice(None), cols)                 # view [fed, T, nl, Hkv, D]
            c.k_all[idx] = res[-2].permute(1, 3, 0, 2, 4).to(c.k_all.dtype)
            c.v_all[idx] = res[-1].permute(1, 3, 0, 2, 4).to(c.v_all.dtype)
        return self._decode_outputs(res, batch)
