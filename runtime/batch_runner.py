"""Run one iteration's requests through a phase runner: group, pad, call, split.

Rows are laid out from column 0 (prompt, then the generated region) and right-padded to the group's longest
sequence; ``key_mask`` marks real tokens and positions are ``arange``, so a row sees exactly what it would see
alone. Requests are grouped into one runner call per (phase, block width, query width, sampling): the
runner contract needs one decoded width and one fed width per call. Refresh and Reuse calls get the KV slot
pool as ``KVCache(k, v, rows=slots)`` with per-row ``out``/``q`` bounds (LongTensor [B]).

Token states live on the host (runtime/request.py): a call copies the group's padded tokens to the runner's
device once (pinned, asynchronous on CUDA) and its (x0, conf) back once; masks and positions are built on the
device from the row lengths.

``run`` is the engine's one seam to the model: a CUDA-graph Reuse runner or any compiled runner slots in by
being the ``runner`` here."""
from __future__ import annotations

import torch

from .sampling import Sampling


def group_key(req) -> tuple:
    g = req.gen
    q = 0
    if req.phase == "reuse":
        qa, qb = req.q_span()
        q = qb - qa
    return (req.phase, req.be - req.bs, q, g.temperature, g.remasking, g.cfg_scale)


class BatchRunner:
    def __init__(self, runner, kv):
        self.runner, self.kv = runner, kv
        self.mc = runner.config

    def run(self, reqs: list) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One forward step for each request -> its (x0 [K], conf [K]) in the same order."""
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(reqs):
            groups.setdefault(group_key(r), []).append(i)
        out: list = [None] * len(reqs)
        for key, idx in groups.items():
            x0, conf = self._call([reqs[i] for i in idx])
            x0, conf = x0.cpu(), conf.cpu()                  # one copy back per call; bookkeeping on the host
            for j, i in enumerate(idx):
                out[i] = (x0[j], conf[j])
        return out

    def _inputs(self, reqs):
        dev = self.runner.device
        ids = torch.nn.utils.rnn.pad_sequence([r.x for r in reqs], batch_first=True,
                                              padding_value=self.mc.mask_id)                 # [B, W] host
        if dev.type == "cuda":
            ids = ids.pin_memory()
        ids = ids.to(dev, non_blocking=True)
        W = ids.shape[1]
        lp = torch.tensor([[r.L, r.P] for r in reqs], dtype=torch.long).to(dev, non_blocking=True)   # [B, 2]
        ar = torch.arange(W, device=dev)[None]                                               # [1, W]
        key_mask, prompt_mask = ar < lp[:, :1], ar < lp[:, 1:]
        key_mask.dlc_lengths = [r.L for r in reqs]          # a prefix mask: its lengths, for pool attention
        pos = ar.expand(len(reqs), W)
        return ids, pos, key_mask, prompt_mask

    def _call(self, reqs):
        r0 = reqs[0]
        ids, pos, key_mask, prompt_mask = self._inputs(reqs)
        dev = "cpu" if getattr(self.runner, "host_bounds", False) else ids.device   # GraphRunner: no H2D, no sync
        col = lambda v: torch.tensor(v, dtype=torch.long, device=dev)      # noqa: E731
        out = (col([r.bs for r in reqs]), col([r.be for r in reqs]))
        gens = [r.generator for r in reqs]
        s = Sampling(r0.gen.temperature, r0.gen.remasking, r0.gen.cfg_scale, None if gens[0] is None else gens)
        if r0.phase == "full":
            return self.runner.full(ids, pos, key_mask, out, s, prompt_mask)
        cache = self.kv.view([r.slot for r in reqs])
        if r0.phase == "refresh":
            x0, conf, _ = self.runner.refresh(ids, pos, key_mask, out, s, prompt_mask, cache=cache)
            return x0, conf
        spans = [r.q_span() for r in reqs]
        q = (col([a for a, _ in spans]), col([b for _, b in spans]))
        return self.runner.reuse(cache, ids, pos, key_mask, q, out, s, prompt_mask)
