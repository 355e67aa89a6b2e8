"""The decoding core's commit of a run ahead (``decoding.AheadCommit``) as int64 words of the control frame,
so every rank runs the same commit on its device (issue 18 under tensor parallelism).

Design (lockstep without a collective): the vocab-parallel combine (``vocab.combine``) ends with the same
(token, confidence, entropy, logprobs) bits on every rank, so a commit rebuilt on a worker from the rows'
rules selects what rank 0's selects and writes the same block into its static fed ids; no rank broadcasts
committed ids, a run ahead costs no collective beyond the steps' own. The AHEAD frame carries the rules
(``encode_commit``, after the run-ahead counts): ``[flags, G, G x (kind, p0, p1), B row -> rule (G > 1
only)]``: 5 words for a batch of one rule whatever B, float parameters as their bits (None: NaN bits); with
credit (flag) ``B x next credit column, B x credit on``, with smoothing (flag) ``B x smoothing on,
B x forwards applied`` after them. A worker rebuilds the commit with ``decoding.rules_commit``
(``decode_commit``), the function rank 0's ``ahead_commit`` calls: each rank carries credit and smoothing's
soft input in its graph's static inputs from its step's extras, which the vocab-parallel decoding
(``shard_runner.rules_decode``) makes equal on every rank. What the words cannot say (a rule with fields
this registry does not know) is None: that batch runs one step at a time."""
from __future__ import annotations

import math
import struct

import torch

from ..decoding import (AheadCommit, BlockThresholdRule, EntropyBoundRule, FactorRule, HierarchicalRule,
                        ScheduleRule, ThresholdRule, rules_commit)

# kind -> (rule class, its fields as ``vars(rule)`` names them, in word order); at most two fields
RULES = {0: (ScheduleRule, ()), 1: (ThresholdRule, ("threshold",)), 2: (FactorRule, ("factor",)),
         3: (HierarchicalRule, ("low", "high")), 4: (EntropyBoundRule, ("gamma",)),
         5: (BlockThresholdRule, ("threshold",))}             # LLaDA2.0's / SDAR's (block decoders)
_KIND = {cls: (kind, fields) for kind, (cls, fields) in RULES.items()}
_LOGPROBS, _CREDIT, _SMOOTH = 1, 2, 4                  # flags word
_NONE = struct.unpack("<q", struct.pack("<d", math.nan))[0]


def _bits(v) -> int:
    return _NONE if v is None else struct.unpack("<q", struct.pack("<d", float(v)))[0]


def _value(b: int) -> float | None:
    v = struct.unpack("<d", struct.pack("<q", int(b)))[0]
    return None if math.isnan(v) else v


def _rule_words(rule) -> tuple[int, int, int] | None:
    known = _KIND.get(type(rule))
    if known is None or set(vars(rule)) != set(known[1]):
        return None
    vals = [_bits(getattr(rule, f)) for f in known[1]] + [0] * (2 - len(known[1]))
    return (known[0], *vals)


def encode_commit(commit: AheadCommit | None) -> torch.Tensor | None:
    """The commit's words (host int64), or None when they cannot carry it (a rule this registry does not
    know, or no commit: the low-confidence schedule's own ``commit_ahead``)."""
    if commit is None or commit.rules is None:
        return None
    distinct: dict[tuple, int] = {}
    rows = []
    for r in commit.rules:
        w = _rule_words(r)
        if w is None:
            return None
        rows.append(distinct.setdefault(w, len(distinct)))
    credit, smooth = commit.credit_on is not None, commit.smooth_on is not None
    flags = _LOGPROBS * bool(commit.logprobs) | _CREDIT * credit | _SMOOTH * smooth
    words = [flags, len(distinct)] + [v for w in distinct for v in w]
    if len(distinct) > 1:
        words += rows
    state = [t for on, ts in ((credit, (commit.credit_at, commit.credit_on)),
                              (smooth, (commit.smooth_on, commit.smooth_it))) if on for t in ts]
    head = torch.tensor(words, dtype=torch.int64)
    return torch.cat([head] + [t.to("cpu", torch.int64) for t in state]) if state else head


def decode_commit(words: torch.Tensor, B: int, mask_id: int, device) -> AheadCommit:
    """A worker's commit of rank 0's ``encode_commit`` words for a batch of B rows, on ``device``."""
    w = words.tolist()
    G = w[1]
    rules = []
    for g in range(G):
        kind, *vals = w[2 + 3 * g:5 + 3 * g]
        cls, fields = RULES[kind]
        rule = cls.__new__(cls)                          # the fields as rank 0's rule holds them (validated)
        for f, v in zip(fields, vals):
            setattr(rule, f, _value(v))
        rules.append(rule)
    at = 2 + 3 * G + (B if G > 1 else 0)
    per_row = [rules[i] for i in w[2 + 3 * G:at]] if G > 1 else rules * B
    state = {}
    for flag, names in ((_CREDIT, ("credit_at", "credit_on")), (_SMOOTH, ("smooth_on", "smooth_it"))):
        if w[0] & flag:
            for name in names:                           # [B] each, on the device as rank 0's
                t = words[at:at + B].to(device)
                state[name] = t.bool() if name.endswith("_on") else t
                at += B
    return rules_commit(per_row, mask_id, device, bool(w[0] & _LOGPROBS),
                        (state.get("credit_at"), state.get("credit_on")),
                        (state.get("smooth_on"), state.get("smooth_it")))
