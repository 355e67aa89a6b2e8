"""Block-diffusion models (LLaDA2.x, SDAR) on the graph runner's fast path.

* A Reuse step over exactly one block (every step of a block after its first, with the exact block cache)
  replays the ordinary captured Reuse step over the prefix up to the block's end (``step.block_as_prefix``);
  a block's first step (the finished block and the new one: truly block-causal) stays eager.
* LLaDA2.0's / SDAR's block-threshold rule (``BlockThresholdRule``) runs its steps ahead of the host
  (``select_ahead``, ``DecodeState.lookahead`` for block decoders, bounded by ``ahead_horizon``).

On CPU the graph runner runs uncaptured over the same static buffers (``graph_decode="exact"``): tokens must
equal generate() on the eager runner exactly. The GPU tests capture (fp32, skipped without CUDA)."""
import dataclasses

import pytest
import torch

from dlc.models import build_model
from dlc.models.loading import TINY_INIT_STD, init_weights
from dlc.models.presets import preset_config
from dlc.runtime.config import ServeConfig
from dlc.runtime.engine import Engine
from dlc.runtime.generate import GenerationConfig, generate
from dlc.runtime.runners.eager import EagerRunner
from dlc.runtime.session import Session

# per model, a token it predicts now and then (test_block_decoding.py): stops happen on some prompts only
EOS_OF = {"tiny-llada2": 72, "tiny-sdar": 25}
PARAMS = dict(gen_length=24, block_length=8, steps_per_block=8, threshold=0.2, kv_cache="block")


def tiny(name: str, device: str = "cpu"):
    c = preset_config(name)
    c = dataclasses.replace(c, eos_id=EOS_OF[name], pad_id=EOS_OF[name], stop_ids=[EOS_OF[name]])
    torch.manual_seed(0)
    m = build_model(c)
    init_weights(m, 0, TINY_INIT_STD)
    return m.to(device).eval()


@pytest.fixture(scope="module", params=list(EOS_OF))
def model(request):
    return tiny(request.param)


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 250, (int(torch.randint(2, 14, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def engine(model, lookahead: int = 1, **kw) -> Engine:
    session = Session(EagerRunner(model), None, model.config, False, "test")
    return Engine(session, ServeConfig(max_seq_len=96, kv_cache_mb=8, max_batch_size=8, cuda_graphs=True,
                                       graph_decode=kw.pop("graph_decode", "exact"), lookahead_steps=lookahead,
                                       lookahead_max_ms=0.0, **kw))


def eager_tokens(model, ps, params):
    return [generate(model, [p], GenerationConfig(**params, stop_at_eos=True)).token_ids[0] for p in ps]


def test_later_steps_of_a_block_replay_the_ordinary_graph(model):
    """One request at a time: each block's first step (the finished block + the new one, or the prefill of
    the prompt's complete blocks + the first block) runs eagerly, every later step of the block replays the
    captured Reuse step, and so does a first block's first step that feeds that block alone (a prompt
    shorter than a block: keys [0, be) again); tokens are the eager runner's."""
    ps = prompts(3, seed=1) + [list(range(20, 31))]               # an 11-token prompt: a prefill + a block
    eng = engine(model)
    outs, forwards, blocks = [], 0, 0
    for p in ps:
        seen = set()
        r = eng.make_request(p, PARAMS)
        r.on_step = lambda req, off, *_: seen.add(off)          # the block each applied step decoded
        eng.add_request(r)
        eng.run_until_done()
        outs.append(r.output_ids)
        forwards, blocks = forwards + r.state.forwards, blocks + len(seen)
    assert outs == eager_tokens(model, ps, PARAMS)
    assert len({tuple(o) for o in outs}) > 1                     # decisive: outputs vary by prompt
    st = eng.runner.stats
    assert blocks >= 2 * len(ps) and forwards > blocks           # several blocks, several steps each
    one_block_prefill = sum(len(p) < PARAMS["block_length"] for p in ps)
    assert 0 < one_block_prefill < len(ps)
    assert st["eager_reuse"] == blocks - one_block_prefill
    assert st["replays"] == forwards - blocks + one_block_prefill


def test_a_batch_of_block_requests_replays_with_generate_tokens(model):
    """Several requests in one group (thresholds, the static schedule, an early stop), batched: tokens are
    generate()'s on the eager runner and the later steps replay."""
    ps = prompts(6, seed=2)
    kinds = [PARAMS, dict(PARAMS, threshold=None), dict(PARAMS, eos_early_stop=True)]
    eng = engine(model)
    items = [(p, kinds[i % 3]) for i, p in enumerate(ps)]
    got = [r.output_ids for r in eng.run_requests(items)]
    assert got == [eager_tokens(model, [p], kw)[0] for p, kw in items]
    assert len({tuple(o) for o in got}) > 1
    assert eng.runner.stats["replays"] > eng.runner.stats["eager_reuse"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(EOS_OF))
def test_captured_block_steps_give_the_eager_tokens(name):
    """On the GPU (captured graphs, fp32, exact decoding): block requests give the eager runner's tokens, the
    later steps of each block replayed from captured graphs."""
    m = tiny(name, "cuda")
    ps = prompts(5, seed=3)
    eng = engine(m, device="cuda", compile=False)
    got = [r.output_ids for r in eng.run_requests([(p, PARAMS) for p in ps])]
    assert got == eager_tokens(m, ps, PARAMS)
    assert eng.runner.stats["replays"] > 0
    assert any(g.graph is not None for g in eng.runner.graphs.values())
