"""bench/head_sparse.py --tiny on CPU: every (B, S, retention) row is timed through GraphRunner's static path
(no eager fallback), kept counts follow the retention, and the log and JSON land under $OUT."""
import importlib.util
import json
import math
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_tiny_run_writes_the_table(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("head_sparse_under_test", BENCH / "head_sparse.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setenv("OUT", str(tmp_path))
    assert mod.main(["--tiny", "--cached", "48", "--batches", "1,2", "--repeats", "1"]) == 0
    rows = json.loads((tmp_path / "head_sparse_tiny.json").read_text())
    assert {(r["B"], r["retention"]) for r in rows} == {(b, r) for b in (1, 2) for r in (None, 0.25, 0.5)}
    for r in rows:
        assert r["eager_fallbacks"] == 0 and r["step_ms"] > 0 and r["floor_ms"] > 0
        want = 48 if r["retention"] is None else 8 + math.ceil(r["retention"] * 40)
        assert r["kept"] == want
    dense = next(r for r in rows if r["B"] == 2 and r["retention"] is None)
    sparse = next(r for r in rows if r["B"] == 2 and r["retention"] == 0.25)
    assert sparse["floor_gb"] < dense["floor_gb"]                  # fewer K/V bytes to read
    log = (tmp_path / "head_sparse_tiny.log").read_text().splitlines()
    assert log[-1].startswith("| 2 | 48 | head-sparse r=0.5 |")     # the table is printed last
