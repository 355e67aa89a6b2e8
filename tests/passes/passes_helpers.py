"""Helpers of the pass tests: tiny models of each family and their phase programs (built once)."""
import torch

from dlc.compiler.export import trace_forward
from dlc.models import build_model
from dlc.models.config import ModelConfig
from dlc.models.loading import init_weights, load_model
from dlc.passes.pipeline import PassContext, run_pipeline

FAMILIES = ["tiny-llada", "tiny-dream", "tiny-llada-moe"]
_CACHE: dict = {}


def tiny(name: str):
    """A tiny random model (the presets' decisive init, models/loading.py TINY_INIT_STD: predictions vary
    with the input, so token comparisons prove something)."""
    if name not in _CACHE:
        _CACHE[name] = load_model(name, seed=1).model
    return _CACHE[name]


def greedy(logits: torch.Tensor):
    """The T = 0 decoding oracle (LLaDA's reference): logits [..., V] -> (argmax [...] int64, float64 softmax
    probability of that token [...], LLaDA's ``low_confidence``)."""
    x0 = logits.argmax(-1)
    return x0, torch.softmax(logits.double(), -1).gather(-1, x0[..., None])[..., 0]


def guided(cond: torch.Tensor, un: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Classifier-free guidance as in LLaDA: un + (cfg + 1) * (cond - un)."""
    return un + (cfg_scale + 1) * (cond - un)


def traced(name: str):
    key = ("trace", name)
    if key not in _CACHE:
        _CACHE[key] = trace_forward(tiny(name))
    return _CACHE[key]


def kv_phases(name: str, inplace: bool = True):
    """refresh/reuse programs after cache_kv_reuse only: in place (outputs: hidden; K/V written into the pool
    inputs) or functional (outputs: hidden, k, v)."""
    key = ("kv", name, inplace)
    if key not in _CACHE:
        m = tiny(name)
        ctx = PassContext(config=m.config, kv_inplace=inplace)
        _CACHE[key] = (run_pipeline(traced(name), ctx, ["cache_kv_reuse"]), ctx)
    return _CACHE[key]


def token_state(config, B=3, L=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 250, (B, L), generator=g)
    ids[:, L // 2:] = torch.where(torch.rand(B, L - L // 2, generator=g) < 0.6, config.mask_id,
                                  ids[:, L // 2:])
    key_mask = torch.ones(B, L, dtype=torch.bool)
    key_mask[1, :3] = False                                        # a left-padded row
    pos = (key_mask.long().cumsum(-1) - 1).clamp(min=0)
    return ids, pos, key_mask



def wide_llada():
    """(model, traced forward): a tiny LLaDA with a 1000-token vocabulary (several logit chunks, recognisable
    vocab dims) and a sharpened head (confident, distinct tokens)."""
    cfg = ModelConfig(family="llada", d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden=96,
                      vocab_size=1000, embedding_size=1000, mask_id=999, eos_id=998, pad_id=998,
                      max_seq_len=256)
    torch.manual_seed(0)
    m = build_model(cfg)
    init_weights(m, 3)
    with torch.no_grad():
        m.model.transformer.ff_out.weight.mul_(20)
    m.eval()
    return m, trace_forward(m)


def decode_args(B, N, a, cfg=0.0, temp=0.0, seeds=None):
    """chunk_logits' decode inputs (out_index, cond_rows, un_rows, cfg_weight, temperature, seeds)."""
    C = B // 2 if cfg else B
    return [torch.arange(a, a + N)[None].repeat(B, 1), torch.arange(C), torch.arange(C) + (B - C),
            torch.tensor([cfg + 1.0]), torch.tensor([temp], dtype=torch.float64),
            torch.zeros(C, dtype=torch.long) if seeds is None else seeds]


def guided_refresh(m, refresh, B=2, L=20, N=5, a=12, cfg=1.5, k=5):
    """Run a refresh program with classifier-free guidance (prompt = the first 10 tokens) -> (its outputs, the
    eager guided logits [B, N, V], eager (tokens, confidence), eager top-k (logprobs, ids))."""
    ids, pos, km = token_state(m.config, B=B, L=L)
    un = ids.clone()
    un[:, :10] = m.config.mask_id
    ids2, pos2, km2 = torch.cat([ids, un]), torch.cat([pos, pos]), torch.cat([km, km])
    with torch.no_grad():
        outs = refresh(ids2, pos2, km2, *decode_args(2 * B, N, a, cfg=cfg))
        lg = m.logits(m(ids2, pos2, km2)[:, a:a + N])
        g = guided(*lg.chunk(2), cfg)
        ref = greedy(g)
        top = torch.log_softmax(g.double(), -1).topk(k, -1)
    return outs, lg, g, ref, top


def reuse_case(phases, m):
    """Refresh 2 rows of 16 tokens, then a reuse step feeding columns
    [6, 12) / [8, 14) and decoding rows 8..11 /
    9..12 -> (reuse tokens, confidence, eager logits of those rows [2, 4, V])."""
    ids, pos, km = token_state(m.config, B=2, L=16)
    with torch.no_grad():
        _, _, k, v = phases["refresh"](ids, pos, km, *decode_args(2, 4, 8))
        qs = torch.tensor([6, 8])
        cols = qs[:, None] + torch.arange(6)
        out = torch.tensor([[8, 9, 10, 11], [9, 10, 11, 12]])
        args = decode_args(2, 4, 0)
        args[0] = out
        tok, conf, _, _ = phases["reuse"](ids.gather(1, cols), pos.gather(1, cols), km, qs, k, v,
                                          torch.arange(k.shape[1]), *args)
        h = m(ids, pos, km)
        lg = m.logits(h.gather(1, out[..., None].expand(-1, -1, h.shape[-1])))
    return tok, conf, lg
