"""Refresh tests/file_seconds.json (each test file's seconds on 2 cores) from a run's durations:

    python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --durations=0 > /tmp/durations.txt
    python .ci/file_seconds.py /tmp/durations.txt

tests/conftest.py hands the files to the xdist workers longest first (.ci/run passes
--no-loadscope-reorder, which keeps that order), so no long file starts last while the other worker idles.
A file missing from the table counts as 0 s: it runs after the measured ones."""
import collections
import json
import re
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "tests" / "file_seconds.json"
LINE = re.compile(r"^\s*([\d.]+)s (?:setup|call|teardown)\s+(\S+?\.py)::", re.M)


def file_seconds(text: str) -> dict[str, float]:
    per: dict[str, float] = collections.defaultdict(float)
    for sec, path in LINE.findall(text):
        per[path] += float(sec)
    return {p: round(s, 1) for p, s in sorted(per.items(), key=lambda kv: -kv[1])}


if __name__ == "__main__":
    table = file_seconds(Path(sys.argv[1]).read_text())
    if not table:
        sys.exit(f"{sys.argv[1]}: no '--durations=0' lines found")
    OUT.write_text(json.dumps(table, indent=1) + "\n")
    print(f"{OUT}: {len(table)} files, {sum(table.values()):.0f} s in all")
