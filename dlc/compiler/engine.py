"""Engine directories: probe and open (filled in below)."""
from __future__ import annotations

from pathlib import Path


def is_engine_dir(path) -> bool:
    p = Path(path) / "config.json"
    if not p.exists():
        return False
    try:
        import json
        return json.loads(p.read_text()).get("format") == "dlc-engine"
    except Exception:
        return False


def open_engine(path, device="cpu", dtype=None):
    raise NotImplementedError
