"""Open a MODEL argument (preset, checkpoint dir or compiled engine dir) as a phase runner + tokenizer.

Engine directories (dlc_engine.json with ``"format": "dlc-engine"``)
open through runners/engine_dir.py; everything
else goes through dlc.models.loading."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dlc.models.config import ModelConfig
from dlc.models.loading import load_model

from .runners.eager import EagerRunner


@dataclass
class Session:
    runner: object
    tokenizer: object
    config: ModelConfig
    chat: bool
    source: str
    kind: str = "eager"          # "eager" or the engine backend


def open_model(model: str, weights: str | None = None, dtype=None, device: str = "cpu",
               progress: bool = True, tensor_parallel_size: int = 1, tp_all_reduce: str = "nccl",
               tp_overlap_tokens: int | None = None) -> Session:
    """``tensor_parallel_size`` > 1: this process becomes rank 0 of a tensor-parallel group it starts
    (``dlc.runtime.distributed``; eager checkpoints and presets only), its all-reduces as ``tp_all_reduce``
    says (``dlc.models.all_reduce``: auto, nccl, symm; symm is refused where it cannot run), its big steps
    split in two halves from ``tp_overlap_tokens`` fed tokens (``dlc.models.overlap``; None: its default, 0:
    off)."""
    from dlc.models.all_reduce import check_backend, refuse_symm
    from .runners.engine_dir import is_engine_dir, open_engine

    check_device(device)
    p = Path(model).expanduser()
    tp = check_tensor_parallel(tensor_parallel_size)
    refuse_symm(check_backend(tp_all_reduce), torch.device(device).type)
    if p.is_dir() and weights is None and is_engine_dir(p):
        if tp > 1:
            raise ValueError(f"tensor_parallel_size {tp}: compiled engine directories run on one device; "
                             f"pass the checkpoint directory or preset instead")
        return open_engine(p, device=device, dtype=dtype)
    if tp > 1:
        from .distributed import open_tp_model
        return open_tp_model(model, tp, weights=weights, dtype=dtype, device=device, progress=progress,
                             all_reduce=tp_all_reduce, overlap_tokens=tp_overlap_tokens)
    lm = load_model(model, weights=weights, dtype=dtype, device=device, progress=progress)
    return Session(EagerRunner(lm.model), lm.tokenizer, lm.config, lm.chat, lm.source)


def check_tensor_parallel(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {n!r}")
    return n


def check_device(device) -> None:
    """A CUDA device asked for where there is none: one line saying so (not torch's assertion)."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        why = ("this torch is built without CUDA" if not torch.backends.cuda.is_built()
               else "no GPU is visible")
        raise ValueError(f"--device {device}: CUDA is not available here ({why}); use --device cpu")


def encode_prompt(session: Session, prompt: str, chat: bool | None = None) -> list[int]:
    tok = session.tokenizer
    if tok is None:
        raise ValueError(f"{session.source} has no tokenizer files (tokenizer.json / tokenizer.model)")
    use_chat = session.chat if chat is None else chat
    if use_chat:
        if not getattr(tok, "chat_template", None):
            raise ValueError(f"{session.source}: the tokenizer has no chat template; use --no-chat")
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    return tok(prompt, add_special_tokens=False)["input_ids"] or tok(prompt)["input_ids"]


def decode_tokens(session: Session, ids: list[int]) -> str:
    return session.tokenizer.decode(ids, skip_special_tokens=True)
