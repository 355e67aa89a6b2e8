"""Block-diffusion options shared by ``dlc generate`` and ``dlc eval`` (LLaDA2.0 / LLaDA2.1 / SDAR), under the
references' own names and meanings: LLaDA2's ``steps`` is per block (``--steps-per-block``), unlike LLaDA's
total ``--steps``; ``--threshold`` is LLaDA2's strict threshold with the schedule's minimum per step; LLaDA2.1
adds token editing (``--edit-threshold``, ``--max-post-edit-steps``, ``--tokens-per-step``)."""
from __future__ import annotations

import click

DECODER_CHOICES = ["llada", "llada2", "llada2.1", "llada2.1-speed", "llada2.1-quality"]


def block_diffusion_options(f):
    for opt in reversed([
        click.option("--steps-per-block", default=None, type=int,
                     help="block diffusion: denoising steps per block (LLaDA2's steps; default: the "
                          "family's)"),
        click.option("--eos-early-stop/--no-eos-early-stop", default=False, show_default=True,
                     help="block diffusion: stop mid-block once an end token is committed with no "
                          "mask before it"),
        click.option("--edit-threshold", default=None, type=float,
                     help="llada2.1: token-to-token edit threshold (default: the mode's; 1.0 = no edits)"),
        click.option("--max-post-edit-steps", default=16, show_default=True, type=int,
                     help="llada2.1: edit steps after a block's last mask"),
        click.option("--tokens-per-step", default=1, show_default=True, type=int,
                     help="llada2.1: masks committed per step at least"),
    ]):
        f = opt(f)
    return f


def block_fields(model_config, decoder: str | None, threshold: float | None, steps_per_block: int | None,
                 eos_early_stop: bool, edit_threshold: float | None, max_post_edit_steps: int,
                 tokens_per_step: int, preset_decoder: str | None = None) -> dict:
    """GenerationConfig fields of the block options for this model: for a block-diffusion model the decoder
    (given, the preset's, else the family's), its threshold / steps per block defaults and LLaDA2.1's mode;
    for other models only what was given (GenerationConfig refuses block-only fields there, naming them)."""
    from dlc.runtime.config import family_generation_defaults
    from dlc.runtime.decoding import resolve_decoder

    fam = family_generation_defaults(model_config)
    out = {"decoder": decoder, "threshold": threshold, "steps_per_block": steps_per_block,
           "eos_early_stop": eos_early_stop, "edit_threshold": edit_threshold}
    if max_post_edit_steps != 16:
        out["max_post_edit_steps"] = max_post_edit_steps
    if tokens_per_step != 1:
        out["tokens_per_step"] = tokens_per_step
    if fam:
        out["decoder"] = decoder or preset_decoder or fam["decoder"]
        if out["decoder"] == "llada2":
            out["threshold"] = fam.get("threshold") if threshold is None else threshold
            out["steps_per_block"] = steps_per_block or fam.get("steps_per_block")
    return resolve_decoder(out)
