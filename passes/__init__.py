"""FX graph passes of the dlc compiler (one pass per file; see pipeline.py)."""
