"""The block boundary of a run ahead: the next block's Refresh launched before the run's last steps land.

Without it, a block ends on the host's critical path: the run's last step lands, the host applies it and
closes the block, the next iteration builds the Refresh's batch and launches its forward (a Refresh is eager:
its launches are host work too), and only then does the device start it. But the fixed schedule knows when a
run ends its block (a variable-count rule knows it once a row has one mask left: the next step unmasks it),
and the block's final tokens are already on the device (the run's static fed ids hold the last commit). So
once the step that ends the block is launched, ``prelaunch`` builds the next block's Refresh from a copy of
each row's decoding state moved past the block (``DecodeState.advance`` on the copy, which a variable-count
rule's copy first closes: ``close_block``, its host tokens still hold the last mask; a sampled row's
seed: its generator's draw after the run's steps, which the engine draws as it takes the Refresh), writes the
device's final block into its fed ids, and launches the Refresh behind the steps in flight: the device goes
from the last Reuse step to the Refresh with no host round trip, and the host's launch work hides behind the
steps in flight.

The decoding core stays the judge: after the run's steps have been applied to the real states, ``take``
accepts the Refresh only where each row's real state is the one the copy predicted (same next block, every
token equal to the copy's with the device's final block in place: an early stop, a dropped step or a
different commit all differ); otherwise the launched Refresh is dropped (it wrote every column of its rows'
K/V, which the real Refresh writes again) and the row's Refresh runs the normal way. A dropped Refresh costs
its device time, so the engine pre-launches only for small groups (``PRELAUNCH_MAX_ROWS``), where the host's
share of a Refresh is large and the Refresh itself is short."""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch

from .decoding import DecodeState
from .step import StepBatch, make_batch, run_batch_result
from .step_output import StepOutput

PRELAUNCH_MAX_ROWS = 4          # a dropped B=32 Refresh would cost ~0.65 s of an H100 for ~1 ms of host time


@dataclass
class Prelaunched:
    """A Refresh launched ahead for ``rows`` (requests; ``index``: theirs in the run): each row's predicted
    state after its block (``states``, the old block's columns still the host's), the old blocks' bounds, the
    batch, the runner's (device) result."""
    rows: list
    index: list[int]              # each row's index in the run's rows (its row of the run's outputs)
    states: list[DecodeState]
    blocks: list[tuple[int, int]]
    batch: StepBatch
    result: object


def prelaunch(runner, rows: list, left: int, device_blocks: torch.Tensor, kv, width,
              close: bool = False) -> Prelaunched | None:
    """Launch the Refresh that follows a run ahead ending its block, for the rows (requests) whose next step
    is a new block's Refresh. ``left``: the run's steps the host has yet to apply before the block ends (all
    launched); ``device_blocks`` [B, N]: each row's block after the run's last commit, on the device;
    ``width(request)``: the width a block started now gets; ``close``: those steps end every row's block
    whatever the host's tokens say (a variable-count rule's block ends by its masks, and the host's copy
    still holds the masks the device unmasks). None where no row starts a new block."""
    keep, states, blocks, seeds = [], [], [], []
    for j, r in enumerate(rows):
        # smoothing's soft embedding (a view of a run's device buffer) is not copied: a new block drops it
        st = copy.deepcopy(r.state, {} if r.state.soft is None else {id(r.state.soft): None})
        bs, be = st.bs, st.be
        seed = st.peek_seeds(left + 1)[-1]                # sampled: the draw after the run's last steps
        st.step += left                                   # the run's steps, their tokens on the device only
        if close:
            st.close_block()
        st.advance(width(r))
        if st.phase == "refresh" and st.bs != bs:         # not: the last block, a stop, a mid-block refresh
            keep.append(j)
            states.append(st)
            blocks.append((bs, be))
            seeds.append(seed)
    if not keep:
        return None
    batch = make_batch(runner, states, [rows[j].slots for j in keep], kv, seeds)
    for i, (j, (bs, be)) in enumerate(zip(keep, blocks)):    # the device's final block in the fed ids
        batch.ids[i, bs:be] = device_blocks[j]
    batch = replace(batch, ids_host=None)                 # its host copy holds the old block
    return Prelaunched([rows[j] for j in keep], keep, states, blocks, batch, runner.refresh(batch))


def take(p: Prelaunched, runner, landed_blocks: list[torch.Tensor]) -> StepOutput | None:
    """The launched Refresh's outputs on the host if every row's real state (run's steps applied, advanced)
    is the predicted one with ``landed_blocks[j]`` [N] (the device's final block, landed on the host) in
    place; else None (the Refresh is dropped)."""
    for r, st, (bs, be), blk in zip(p.rows, p.states, p.blocks, landed_blocks):
        real = r.state
        want = st.x.clone()
        want[bs:be] = blk
        if (r.finished or real.phase != "refresh" or (real.bs, real.be) != (st.bs, st.be)
                or real.n_now != st.n_now or not torch.equal(real.x, want)):
            return None
    return run_batch_result(runner, p.batch, p.result)
