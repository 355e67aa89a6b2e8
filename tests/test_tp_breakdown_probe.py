"""bench/probes/tp_step_breakdown.py --tiny (issue 16): the 2-GPU probe runs on the CPU (2 gloo ranks,
tiny-llada, uncaptured) and prints its summary, the in-process host costs and one phase table per path, in
which both ranks replayed every timed step from the frame (frame path) or none (batch path)."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tp_step_breakdown_probe_runs_on_the_cpu(tmp_path):
    out = tmp_path / "probe.json"
    r = subprocess.run([sys.executable, "-P", str(ROOT / "bench/probes/tp_step_breakdown.py"), "--tiny",
                        "--reps", "4", "--batches", "2", "--ahead", "2", "--ckpt", str(tmp_path / "ckpt"),
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"^\| 2 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+x \|", r.stdout, re.M), r.stdout
    assert "encode (host ids)" in r.stdout and "stage (frame)" in r.stdout
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| B=2 (\w+) path: rank.*\n.*\n((?:\|.*\n){2})",
                                                         r.stdout, re.M)}
    assert set(rows) == {"batch", "frame"}
    for path, body in rows.items():
        replays = [int(line.split("|")[3]) for line in body.strip().splitlines()]     # rank 0, rank 1
        assert replays == ([4, 4] if path == "frame" else [0, 0]), (path, body)
    assert out.exists()
