"""Print the dlc-tiny quality table (docs/QUALITY.md): accuracy and TPF across decoders, KV modes, backends.

    python -m dlc.tiny.quality_table                        # eager rows (the gates in tests/tiny)
    python -m dlc.tiny.quality_table --backends eager,onnx  # plus compiled engines (dlc compile --target cpu)
    python -m dlc.tiny.quality_table --backends eager,onnx --sparse 1.0,0.5,0.25   # plus head-sparse rows

Rows are plain dicts, so a new backend is one entry in ``BACKENDS`` (name -> how to open the model) and a new
decoding setting one entry in ``SETTINGS``. Every row is compared with the exact reference: one token per
step, low-confidence remasking, no KV cache, eager."""
from __future__ import annotations

import contextlib
import sys
import tempfile

import click

from dlc.runtime.decoding import FieldError

from .evaluate import EvalResult, evaluate, generation_defaults, make_config

# name -> make_config kwargs. "exact" is the reference row the others are compared with.
SETTINGS: dict[str, dict] = {
    "exact": dict(decoder="low_confidence", kv_cache="none"),
    "low_confidence prefix": dict(decoder="low_confidence", kv_cache="prefix"),
    "low_confidence dual": dict(decoder="low_confidence", kv_cache="dual"),
    "low_confidence dual+vicinity": dict(decoder="low_confidence", kv_cache="dual", vicinity=2),
    "threshold 0.9": dict(decoder="threshold", threshold=0.9, kv_cache="none"),
    "threshold 0.9 prefix": dict(decoder="threshold", threshold=0.9, kv_cache="prefix"),
    "threshold 0.9 dual": dict(decoder="threshold", threshold=0.9, kv_cache="dual"),
    "threshold 0.9 dual+vicinity": dict(decoder="threshold", threshold=0.9, kv_cache="dual", vicinity=2),
    "factor 1.0": dict(decoder="factor", factor=1.0, kv_cache="none"),
    "factor 1.0 prefix": dict(decoder="factor", factor=1.0, kv_cache="prefix"),
    "factor 1.0 dual": dict(decoder="factor", factor=1.0, kv_cache="dual"),
    "factor 1.0 dual+vicinity": dict(decoder="factor", factor=1.0, kv_cache="dual", vicinity=2),
    "hierarchical 0.9/0.3": dict(decoder="hierarchical", kv_cache="none"),
    "hierarchical 0.9/0.3 dual": dict(decoder="hierarchical", kv_cache="dual"),
    "entropy_bound 0.1": dict(decoder="entropy_bound", kv_cache="none"),
    "entropy_bound 0.1 dual": dict(decoder="entropy_bound", kv_cache="dual"),
    "entropy_bound 1.0": dict(decoder="entropy_bound", entropy_bound=1.0, kv_cache="none"),
    "entropy_bound 1.0 dual": dict(decoder="entropy_bound", entropy_bound=1.0, kv_cache="dual"),
    "credit 0.9": dict(decoder="credit", kv_cache="none"),
    "credit 0.9 dual": dict(decoder="credit", kv_cache="dual"),
    "smoothing 0.9": dict(decoder="smoothing", kv_cache="none"),
    "smoothing 0.9 dual": dict(decoder="smoothing", kv_cache="dual"),
}
NEW_RULES = ("hierarchical", "entropy_bound", "credit", "smoothing")     # issue 18's decoders (gated in CI)
SPARSE_SETTINGS = ("low_confidence dual", "threshold 0.9 dual")   # head-sparse rows need cached Reuse steps
SPARSE_BACKENDS = ("export", "aoti", "onnx")    # head-sparse attention is a compiler pass: compiled rows only


def open_eager(model: str, sparse: float | None = None):
    from dlc.runtime.session import open_model
    return open_model(model, device="cpu", progress=False)


# one TemporaryDirectory, made on first use: compiled engines live there until exit
_WORKDIR: list = []


def _workdir() -> str:
    if not _WORKDIR:
        _WORKDIR.append(tempfile.TemporaryDirectory(prefix="dlc-quality-"))
    return _WORKDIR[0].name


def _open_compiled(model: str, backend: str, sparse: float | None = None):
    from dlc.compiler.build import compile_model
    from dlc.runtime.session import open_model

    out = tempfile.mkdtemp(prefix=f"{backend}-", dir=_workdir())
    with contextlib.redirect_stdout(sys.stderr):        # torch.onnx prints progress: keep stdout the table
        compile_model(model, "cpu", out, backend=backend, echo=lambda *a, **k: None,
                      **compiled_options(model, sparse))
    return open_model(out, device="cpu", progress=False)


def compiled_options(model: str, sparse: float | None = None) -> dict:
    """``compile_model`` options of a compiled row (target cpu): the model's block length, the head-sparse
    retention, the rules' decoding extras. tests/tiny/test_backend_gates.py builds its engines with these
    (once per test run, shared with other tests), so the gates test what the table runs."""
    return dict(block_length=generation_defaults(_dir(model))["block_length"], sparse_retention=sparse,
                decode_extras=True)


def _dir(model: str) -> str:
    from dlc.models.loading import resolve_checkpoint_dir
    return str(resolve_checkpoint_dir(model) or "")


# backend name -> (model, sparse retention or None) -> Session
BACKENDS = {
    "eager": open_eager,
    "export": lambda model, sparse=None: _open_compiled(model, "export", sparse),
    "aoti": lambda model, sparse=None: _open_compiled(model, "aoti", sparse),
    "onnx": lambda model, sparse=None: _open_compiled(model, "onnx", sparse),
}


def run_rows(model: str, backends: list[str], sparse: list[float], n: int, settings: list[str] | None = None,
             log=None) -> list[dict]:
    gd = generation_defaults(_dir(model))
    names = settings or list(SETTINGS)
    rows: list[dict] = []
    exact = None
    for backend in backends:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
        for retention in [None] + (list(sparse) if backend in SPARSE_BACKENDS else []):
            session = BACKENDS[backend](model, retention)
            for name in (names if retention is None else [s for s in SPARSE_SETTINGS if s in names]):
                cfg = make_config(**SETTINGS[name], gen_length=gd["gen_length"],
                                  block_length=gd["block_length"], steps=gd["steps"])
                try:
                    res: EvalResult = evaluate(session, cfg, n=n)
                except FieldError as e:                 # a rule this backend cannot decode (e.g. smoothing)
                    if log:
                        log(f"skipped {backend} {name}: {e}")
                    continue
                if exact is None and name == "exact" and retention is None:
                    exact = res.accuracy
                row = {"backend": backend, "setting": name, "sparse": retention, "accuracy": res.accuracy,
                       "delta": None if exact is None else 100 * (res.accuracy - exact), "tpf": res.tpf,
                       "seconds": res.seconds, "n": res.n}
                rows.append(row)
                if log:
                    log(format_row(row))
    return rows


def best_rule(rows: list[dict], max_drop: float = 2.0) -> dict | None:
    """Among the new rules' rows (``NEW_RULES``) within ``max_drop`` points of exact, the one with the most
    tokens per forward (ties: the first in table order)."""
    ok = [r for r in rows if r["setting"].split()[0] in NEW_RULES and r["delta"] is not None
          and r["delta"] >= -max_drop]
    return max(ok, key=lambda r: r["tpf"], default=None)


HEADER = "| backend | setting | sparse retention | accuracy | Δ vs exact (points) | TPF | seconds |"


def format_row(r: dict) -> str:
    delta = "" if r["delta"] is None else f"{r['delta']:+.1f}"
    sparse = "dense" if r["sparse"] is None else f"{r['sparse']:g}"
    return (f"| {r['backend']} | {r['setting']} | {sparse} | {100 * r['accuracy']:.1f}% | {delta} | "
            f"{r['tpf']:.2f} | {r['seconds']:.2f} |")


def format_table(rows: list[dict]) -> str:
    sep = "|" + "---|" * HEADER.count(" | ") + "---|"
    return "\n".join([HEADER, sep] + [format_row(r) for r in rows])


@click.command()
@click.option("--model", default="dlc-tiny", show_default=True)
@click.option("--n", default=200, show_default=True, type=int)
@click.option("--backends", default="eager", show_default=True,
              help=f"comma-separated: {', '.join(BACKENDS)}")
@click.option("--sparse", default="", help="comma-separated sparse retentions (e.g. 1.0,0.5,0.25)")
def main(model, n, backends, sparse):
    """Print the quality table as Markdown."""
    import torch

    torch.set_num_threads(2)
    try:
        rows = run_rows(model, [b.strip() for b in backends.split(",") if b.strip()],
                        [float(s) for s in sparse.split(",") if s.strip()], n,
                        log=lambda line: click.echo(line, err=True))     # progress on stderr
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"model {model}, {n} held-out prompts, "
               f"gen/block/steps {'/'.join(str(v) for v in generation_defaults(_dir(model)).values())}")
    click.echo(format_table(rows))
    best = best_rule(rows)
    if best is not None:
        ties = [r["setting"] for r in rows if r["setting"].split()[0] in NEW_RULES and r["tpf"] == best["tpf"]
                and r["delta"] is not None and r["delta"] >= -2.0]
        click.echo("\nmost tokens per forward within 2 points of exact among the new rules: "
                   f"{best['setting']} ({best['backend']}, TPF {best['tpf']:.2f}"
                   + (f"; tied with {len(ties) - 1} other rows" if len(ties) > 1 else "") + ")")


if __name__ == "__main__":
    main()
