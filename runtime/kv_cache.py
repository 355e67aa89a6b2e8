"""KV cache manager: a slot pool sized from a memory budget.

The pool holds K and V as ``[n_layers, n_slots, n_kv_heads, S_max, head_dim]`` (per-layer views ``k[l]``;
S_max = the server's max sequence). A running request with a prefix or dual cache owns one slot (one pool row)
from admission to finish or cancel; its sequence is laid out from column 0. Requests at any prompt length and
block batch together through ``KVCache(k, v, rows=slots)`` views. Requests without a cache (kv_cache none)
take no slot; requests with classifier-free guidance take two (their unconditional rows have K/V of their
own). With ``head_scores`` (head-sparse runners) the pool also keeps ``[n_layers, n_slots, Hkv, S_max]``
float32 key scores per head, written by each row's Refresh and read when its Reuse steps choose their columns
(``kept_columns``: chosen once per slot and block, then reused until the slot's next Refresh).

Policy: ``n_slots = budget // bytes_per_slot`` (capped by ``max_slots``); ``allocate`` hands out the lowest
free slot or None when the pool is full (the scheduler then waits or preempts); ``free`` returns a slot and
is idempotent-safe (freeing a free slot is a bug and raises)."""
from __future__ import annotations

import torch

from dlc.models.common import KVCache
from dlc.models.sparse_heads import keep_columns_rows, kept_counts


def slot_bytes(config, s_max: int, dtype: torch.dtype, head_scores: bool = False) -> int:
    """Bytes of one slot: K and V of every layer, plus the float32 key scores of head-sparse runners."""
    elem = torch.empty((), dtype=dtype).element_size()
    scores = head_scores * config.n_layers * config.n_kv_heads * s_max * 4
    return 2 * config.n_layers * config.n_kv_heads * s_max * config.head_dim * elem + scores


class KVCacheManager:
    def __init__(self, config, s_max: int, budget_bytes: int, dtype, device, max_slots: int | None = None,
                 head_scores: bool = False):
        per = slot_bytes(config, s_max, dtype, head_scores)
        n = int(budget_bytes // per)
        if max_slots is not None:
            n = min(n, max_slots)
        if n < 1:
            raise ValueError(f"KV cache budget {budget_bytes / 2**20:.1f} MiB is too small for one slot of "
                             f"{s_max} tokens ({per / 2**20:.2f} MiB); raise kv_cache_mb or lower "
                             "max_seq_len")
        self.n_slots, self.s_max, self.slot_bytes = n, s_max, per
        shape = (config.n_layers, n, config.n_kv_heads, s_max, config.head_dim)
        self.k_all = torch.zeros(shape, dtype=dtype, device=device)     # one tensor: compiled programs write
        self.v_all = torch.zeros(shape, dtype=dtype, device=device)     # into it in place
        self.k = [self.k_all[i] for i in range(config.n_layers)]      # per-layer views (one select
        self.v = [self.v_all[i] for i in range(config.n_layers)]      # each: writable in place)
        self.scores = None
        if head_scores:
            self.scores = torch.full((config.n_layers, n, config.n_kv_heads, s_max), float("-inf"),
                                     device=device)
        self._free = list(range(n))          # kept sorted: lowest slot first
        self.device = device
        # slot -> ((q_start, n_fed, length, retention), [nl, Hkv, n] cols)
        self._kept: dict[int, tuple] = {}
        self.kept_stats = {"chosen": 0, "reused": 0}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.n_slots - len(self._free)

    def usage(self) -> float:
        return self.num_used / self.n_slots

    def allocate(self) -> int | None:
        return self._free.pop(0) if self._free else None

    def allocate_n(self, n: int) -> tuple[int, ...] | None:
        """n slots at once (a guided request needs two), or None (nothing taken) when fewer are free."""
        if n > len(self._free):
            return None
        return tuple(self._free.pop(0) for _ in range(n))

    def free(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.n_slots:
            raise ValueError(f"KV slot {slot} is not allocated")
        self._free.append(slot)
        self._free.sort()
        self._kept.pop(slot, None)

    def scores_written(self, slots) -> None:
        """A Refresh of these slots is about to write their head scores: forget their kept columns."""
        for s in slots:
            self._kept.pop(int(s), None)

    def kept_columns(self, slots: list[int], q_start: list[int], n_fed: int, lengths: list[int],
                     retention: float) -> torch.Tensor:
        """The kept columns [n_layers, B, Hkv, K] of a head-sparse Reuse step over pool rows ``slots``
        (``keep_columns_rows`` of their scores: K = the largest row's count, shorter rows padded with column
        W - 1, W = the longest row). The choice depends only on the slot's scores (written by its last
        Refresh), its fed columns and its length, so it is made once per slot and block: later steps of the
        block copy it instead of a top-k over [n_layers, Hkv, S] scores per row."""
        keys = [(q, n_fed, L, retention) for q, L in zip(q_start, lengths)]
        miss = [b for b, (s, k) in enumerate(zip(slots, keys)) if self._kept.get(s, (None,))[0] != k]
        if miss:
            W = max(lengths[b] for b in miss)
            rows = torch.tensor([slots[b] for b in miss], device=self.scores.device)
            cols = torch.tensor([q_start[b] for b in miss], device=self.scores.device)[:, None] \
                + torch.arange(n_fed, device=self.scores.device)                       # [m, T]
            lens = [lengths[b] for b in miss]
            keep = keep_columns_rows(self.scores[:, rows, :, :W], cols, lens, retention)  # [nl, m, Hkv, K']
            n = kept_counts(lens, n_fed, retention)
            for i, b in enumerate(miss):
                self._kept[slots[b]] = (keys[b], keep[:, i, :, :n[i]])
        self.kept_stats["chosen"] += len(miss)
        self.kept_stats["reused"] += len(slots) - len(miss)
        rows = [self._kept[s][1] for s in slots]                                     # [nl, Hkv, n_b] each
        K, W = max(r.shape[-1] for r in rows), max(lengths)
        out = torch.full((rows[0].shape[0], len(slots), rows[0].shape[1], K), W - 1, dtype=torch.long,
                         device=self.scores.device)
        for b, r in enumerate(rows):
            out[:, b, :, :r.shape[-1]] = r
        return out

    def view(self, slots) -> KVCache:
        """A batch view on pool rows ``slots`` (a host list or LongTensor [B]; writes land in the pool)."""
        rows = torch.as_tensor(slots, dtype=torch.long)
        if self.device is not None and torch.device(self.device).type == "cuda":
            rows = rows.pin_memory()
        return KVCache(self.k, self.v, rows.to(self.device, non_blocking=True), scores=self.scores,
                       k_all=self.k_all, v_all=self.v_all)
