"""Build planning: size a build for a target (weights + KV cache + activations within memory x utilisation)."""
from __future__ import annotations

DEFAULT_LOGIT_BUDGET = 256 << 20      # bytes for the transient logit chunk when no target sizes it


def default_logit_chunk(config, rows: int, batch: int = 1, budget: int = DEFAULT_LOGIT_BUDGET) -> int:
    return logit_chunk_for(config, batch * rows, budget)


def logit_chunk_for(config, rows: int, budget_bytes: int) -> int:
    """Vocab rows per chunk so one chunk's transients fit the budget. Per element: the logits in the model
    dtype (<= 4 B) and ~4 float64 temporaries (cast, Gumbel score, exp, noise) = 36 bytes."""
    per_vocab_row = max(1, rows) * 36
    chunk = budget_bytes // per_vocab_row
    if chunk >= config.vocab_size:
        return config.vocab_size
    return max(128, chunk // 128 * 128)
