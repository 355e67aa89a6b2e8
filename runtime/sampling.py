"""Turning logits of the decoded rows into (candidate token, confidence), exactly as LLaDA's reference does.

Temperature 0 is argmax; temperature T > 0 is Gumbel-max in float64 (``exp(logits) / (-log u)^T``), because
low-precision Gumbel noise hurts generation quality (LLaDA, arXiv:2409.02908). ``low_confidence`` scores a
candidate by its float64 softmax probability, ``random`` by a uniform draw. Noise is drawn only for the rows
being decoded (the reference draws it for the whole sequence), so seeded samples at T > 0 differ from the
reference's while following the same distribution; at T = 0 tokens are identical."""
from __future__ import annotations

from dataclasses import dataclass

import torch

REMASKING = ("low_confidence", "random")


@dataclass
class Sampling:
    temperature: float = 0.0
    remasking: str = "low_confidence"
    cfg_scale: float = 0.0
    generator: torch.Generator | None = None   # or a list with one generator per row (per-request seeds)


def gumbel_argmax(logits: torch.Tensor, temperature: float, generator=None) -> torch.Tensor:
    """[..., V] -> [...] token ids."""
    if temperature == 0:
        return logits.argmax(-1)
    l64 = logits.to(torch.float64)
    u = _uniform(l64.shape, l64.device, generator)
    return (l64.exp() / (-torch.log(u)) ** temperature).argmax(-1)


def sample_tokens(logits: torch.Tensor, s: Sampling) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, N, V] -> (x0 [B, N] int64, confidence [B, N] float64)."""
    x0 = gumbel_argmax(logits, s.temperature, s.generator)
    if s.remasking == "low_confidence":
        p = torch.softmax(logits.to(torch.float64), dim=-1)
        conf = torch.gather(p, -1, x0[..., None])[..., 0]
    elif s.remasking == "random":
        conf = _uniform(x0.shape, x0.device, s.generator)
    else:
        raise ValueError(f"unknown remasking {s.remasking!r}; choose one of {REMASKING}")
    return x0, conf


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Classifier-free guidance as in LLaDA: un + (cfg + 1) * (cond - un)."""
    return uncond + (cfg_scale + 1) * (cond - uncond)


def _uniform(shape, device, generator) -> torch.Tensor:
    """U(0, 1) float64 noise; a list of generators draws row b from generator b (a request alone draws the
    same numbers as in any batch)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]} rows")
        return torch.stack([torch.rand(shape[1:], dtype=torch.float64, device=device, generator=g)
                            for g in generator])
    return torch.rand(shape, dtype=torch.float64, device=device, generator=generator)
