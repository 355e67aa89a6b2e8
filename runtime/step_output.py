"""What a runner call returns through the one seam (runtime/step.py): ``StepOutput``.

Every runner's ``full`` / ``refresh`` / ``reuse`` returns either the plain pair (x0 [B, N] int64, conf [B, N]
float64), all a plain ``StepBatch`` needs, or a ``StepOutput`` carrying the extras its batch asked for
(``StepBatch.wants_extras``): entropy (entropy-bounded rule), the chosen token's logprob and top-k
alternatives (OpenAI ``logprobs``), the raw top-1 id / probability (credit decoding's update) and the soft
embedding ``softmax(l / tau) @ W_e`` (iteration smoothing). ``run_batch`` normalises both forms to a host
``StepOutput`` (the soft embedding excepted: it is the next step's input, so it stays on the runner's
device); the decoding core reads one row with ``row(i)``. This module imports nothing from the runtime
(decoding.py and step.py both use it)."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

EXTRA_KEYS = ("entropy", "logprob", "topk_ids", "topk_logprobs", "top1_ids", "top1_prob", "soft")


@dataclass
class StepOutput:
    x0: torch.Tensor                            # [B, N] int64 candidate tokens
    conf: torch.Tensor                          # [B, N] float64 confidence (the selection's score)
    entropy: torch.Tensor | None = None         # [B, N] float64 entropy (nats) of the model's distribution
    logprob: torch.Tensor | None = None         # [B, N] float64 log-probability of x0 under the model
    topk_ids: torch.Tensor | None = None        # [B, N, k] int64 most likely ids
    topk_logprobs: torch.Tensor | None = None   # [B, N, k] float64 their log-probabilities
    top1_ids: torch.Tensor | None = None        # [B, N] int64 raw argmax (credit)
    top1_prob: torch.Tensor | None = None       # [B, N] float64 its probability (credit)
    soft: torch.Tensor | None = None            # [B, N, d] float soft embedding (smoothing)

    @classmethod
    def from_decode(cls, res: dict) -> "StepOutput":
        """From ``dlc.kernels.sampling.decode_rows_ext``'s dict."""
        return cls(res["tokens"], res["confidence"], **{k: res.get(k) for k in EXTRA_KEYS})

    def to_host(self, pack: bool | None = None) -> "StepOutput":
        """Every field on the host, floats as float64, except ``soft`` (smoothing's next input: it stays on
        the runner's device, no round trip). ``pack`` (default: off the CPU) copies every field as ONE int64
        tensor, the floats as the bits of their float64 values (``view``, exact), however many extras there
        are: one device-to-host copy, so one wait for the device per step, plain or with extras."""
        pack = self.x0.device.type != "cpu" if pack is None else pack
        out = {"soft": self.soft}
        names = [f.name for f in fields(self) if f.name != "soft" and getattr(self, f.name) is not None]
        ts = [getattr(self, n) for n in names]
        if not pack or len(ts) < 2:
            out.update({n: t.to(_host_dtype(t)).cpu() for n, t in zip(names, ts)})
            return StepOutput(**out)
        out.update(zip(names, unpack_words(pack_words(ts).cpu(), ts)))                 # the one copy
        return StepOutput(**out)

    def map(self, fn) -> "StepOutput":
        """``fn`` applied to every field that is set (None stays None)."""
        return StepOutput(**{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                             for f in fields(self)})

    def row(self, i: int) -> "StepOutput":
        return self.map(lambda t: t[i])

    def take(self, idx: list[int]) -> "StepOutput":
        """Rows ``idx`` (a list of row numbers) as a StepOutput of ``len(idx)`` rows."""
        ix = torch.tensor(idx, dtype=torch.long)
        return self.map(lambda t: t[ix])


def _host_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.is_floating_point() else torch.int64


def pack_words(ts: list[torch.Tensor]) -> torch.Tensor:
    """Tensors as ONE flat int64 tensor (one copy moves them all): integers as int64, floats as the bits of
    their float64 values (``view``, exact). ``unpack_words`` undoes it."""
    return torch.cat([t.reshape(-1).to(torch.float64).view(torch.int64) if t.is_floating_point()
                      else t.reshape(-1).to(torch.int64) for t in ts])


def unpack_words(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """``pack_words(like)`` (wherever it was copied) -> the tensors, shaped as ``like``: int64 / float64."""
    return [part.view(t.shape).view(torch.float64) if t.is_floating_point() else part.view(t.shape)
            for t, part in zip(like, flat.split([t.numel() for t in like]))]


def to_device(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """A tensor on ``dev`` without the host waiting: a host tensor is pinned first for a GPU, then copied
    non-blocking; a tensor already on a device moves as it is (only host memory can be pinned; ``dev`` may
    name no index, ``cuda``, while the tensor says ``cuda:0``: the two compare unequal)."""
    if dev.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()
    return t.to(dev, non_blocking=True)
