"""Batch invariance with staggered arrivals: one probe alone, then the probe with ONE other request arriving a
few iterations later (several kinds of other request). Per runner call the probe's row is found by its prompt
(ids prefix) and its confidences are compared bit for bit with the solo run's call of the same index; the
first differing call is printed with the batch it ran in. GPU diagnostic for issue 17 item 8."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import batch_invariance as bi  # noqa: E402
from invariance_variants import engine, small_model  # noqa: E402


TRACE = {}


def wrap(runner):
    """Record, per runner call, the traced probe's confidences (found by its prompt) and the batch."""
    for phase in ("refresh", "reuse", "full"):
        fn = getattr(runner, phase)

        def wrapped(batch, _fn=fn, _phase=phase, **kw):
            out = _fn(batch, **kw)
            ids = batch.ids.cpu()
            for pt, calls in TRACE["probes"]:
                n = len(pt)
                hit = [i for i in range(batch.n_seqs) if ids.shape[1] >= n and torch.equal(ids[i, :n], pt)]
                if hit:
                    conf = (out.confidence if hasattr(out, "confidence") else out[1])[hit[0]].cpu()
                    calls.append(dict(phase=_phase, rows=batch.n_seqs, width=batch.ids.shape[1],
                                      fed=batch.n_fed, row=hit[0], lengths=batch.lengths.tolist()[:6],
                                      bucket=getattr(runner, "bucket", lambda b: b)(batch.n_seqs)
                                      if _phase == "reuse" else None, conf=conf))
            return out
        setattr(runner, phase, wrapped)


def trace(eng, probe, params, others=()):
    """others: [(delay, prompt, params)]."""
    TRACE.update(probes=[(torch.tensor(probe), [])])
    r = eng.make_request(probe, params)
    eng.add_request(r)
    it, pending = 0, sorted(others, key=lambda o: o[0])
    while eng.has_work() or pending:
        while pending and pending[0][0] <= it:
            _, p, pr = pending.pop(0)
            eng.add_request(eng.make_request(p, pr))
        eng.step()
        it += 1
    return TRACE["probes"][0][1], r.output_ids


def first_difference(solo, calls):
    return next((i for i, (a, b) in enumerate(zip(solo, calls))
                 if a["conf"].shape != b["conf"].shape or not torch.equal(a["conf"], b["conf"])), None)


def main():
    cfg, model, _ = small_model(False)
    g = torch.Generator().manual_seed(3)
    top = min(cfg.vocab_size, cfg.mask_id, cfg.eos_id) - 1
    probe = torch.randint(0, top, (40,), generator=g).tolist()
    longer = torch.randint(0, top, (70,), generator=g).tolist()
    shorter = torch.randint(0, top, (20,), generator=g).tolist()
    params = dict(gen_length=32, block_length=16, steps=32, kv_cache="dual", temperature=0.0)
    others = {"same-longer": (longer, params), "same-shorter": (shorter, params),
              "gen64": (longer, {**params, "gen_length": 64, "steps": 64}),
              "block8": (longer, {**params, "block_length": 8}),
              "tps2": (longer, {**params, "steps": 16}),
              "prefix": (longer, {**params, "kv_cache": "prefix"}),
              "none": (longer, {**params, "kv_cache": "none"}),
              "T0.8": (longer, {**params, "temperature": 0.8, "seed": 5})}
    if "--bench" in sys.argv:           # the GPU test's traffic (run_mode, greedy-1), every probe traced
        scale = (8, 96, 32, 16, (16, 32, 64))
        gb = torch.Generator().manual_seed(0)
        probes = [(bi.prompt(cfg, gb, 8, 96), bi.probe_params(bi.MODES["greedy-1"], 32, 16, 1000 + i))
                  for i in range(12)]
        others = bi.background(cfg, gb, 12, scale)
        eng = engine(model, "cuda", 2 * 96 + 64, 16, cuda_graphs=True, lookahead_steps=1)
        wrap(eng.runner)
        solo = [trace(eng, p, pr) for p, pr in probes]
        TRACE.update(probes=[(torch.tensor(p), []) for p, _ in probes])
        outs, seen = bi.mixed(eng, probes, others, gb)
        for i, ((calls0, out0), (_, calls)) in enumerate(zip(solo, TRACE["probes"])):
            bad = first_difference(calls0, calls)
            if bad is None and outs[i] == out0:
                continue
            info = lambda c: {k: v for k, v in c.items() if k != "conf"}      # noqa: E731
            at = (info(calls[bad]), info(calls0[bad])) if bad is not None else ("-", "-")
            print(f"probe {i} (prompt {len(probes[i][0])}): tokens equal {outs[i] == out0}, calls "
                  f"{len(calls)} vs {len(calls0)}, first differing call {bad}: mixed {at[0]} solo {at[1]}; "
                  f"before: {info(calls[bad - 1]) if bad else '-'}", flush=True)
        print(f"bench traffic done: {seen['iterations']} iterations, eager_reuse "
              f"{eng.runner.stats['eager_reuse']}", flush=True)
        return
    if "--crowd" in sys.argv:           # the bench's background: many requests, staggered
        raw = bi.background(cfg, g, 24, (8, 96, 32, 16, (16, 32, 64)))
        kinds = {"plain": lambda pr: {**pr, "kv_cache": "dual", "temperature": 0.0},
                 "full-mix": lambda pr: pr,
                 "no-T": lambda pr: {**pr, "temperature": 0.0},
                 "dual-only": lambda pr: {**pr, "kv_cache": "dual"},
                 "no-none": lambda pr: {**pr, "kv_cache": "dual" if pr["kv_cache"] == "none"
                                        else pr["kv_cache"]},
                 "no-prefix": lambda pr: {**pr, "kv_cache": "dual" if pr["kv_cache"] == "prefix"
                                          else pr["kv_cache"]}}
        gaps = torch.randint(0, 3, (len(raw),), generator=g).cumsum(0).tolist()
        eng = engine(model, "cuda", 256, 16, cuda_graphs=True, lookahead_steps=1)
        wrap(eng.runner)
        solo, out0 = trace(eng, probe, params)
        for kind, edit in kinds.items():
            crowd = [(d, p, edit(pr)) for d, (p, pr) in zip(gaps, raw)]
            for start in (0, 3):
                calls, out = trace(eng, probe, params, [(max(0, d - start), p, pr) for d, p, pr in crowd])
                bad = first_difference(solo, calls)
                desc = "-" if bad is None else {k: v for k, v in calls[bad].items() if k != "conf"}
                prev = "-" if not bad else {k: v for k, v in calls[bad - 1].items() if k != "conf"}
                print(f"crowd {kind} start={start}: tokens equal {out == out0}, first differing call {bad}: "
                      f"{desc}; call before: {prev}; eager_reuse {eng.runner.stats.get('eager_reuse')}",
                      flush=True)
        return
    for graphs in (False, True):
        eng = engine(model, "cuda", 256, 8, cuda_graphs=graphs, lookahead_steps=1)
        wrap(eng.runner)
        solo, out0 = trace(eng, probe, params)
        for name, other in others.items():
            for delay in (0, 1, 3):
                calls, out = trace(eng, probe, params, [(delay, *other)])
                bad = first_difference(solo, calls)
                desc = "-" if bad is None else {k: v for k, v in calls[bad].items() if k != "conf"}
                sdesc = "-" if bad is None else {k: v for k, v in solo[bad].items() if k != "conf"}
                print(f"graphs={graphs} other={name} delay={delay}: tokens equal {out == out0}, calls "
                      f"{len(calls)} vs {len(solo)}, first differing call {bad}: mixed {desc} solo {sdesc}",
                      flush=True)


if __name__ == "__main__":
    main()
