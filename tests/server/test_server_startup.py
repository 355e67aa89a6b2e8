"""A real `dlc serve` prints its startup report before it listens: times, then the KV cache."""
import re

import httpx


def test_startup_lines_on_the_console(tiny_server):
    out = tiny_server.output()
    times = re.search(r"^dlc serve: ready in \d+\.\d s: load \d+\.\d s, compile off, capture off$", out, re.M)
    kv = re.search(r"^dlc serve: KV cache (\d+) slots x 128 tokens = (\d+) tokens, \d+(?:\.\d+)? MiB "
                   r"\(CPU default\)$", out, re.M)
    assert times and kv, out
    slots = int(kv.group(1))
    assert int(kv.group(2)) == slots * 128
    metrics = httpx.get(tiny_server.base + "/metrics", timeout=5).text
    assert re.search(rf"^dlc_kv_cache_total_slots {slots}(\.0)?$", metrics, re.M), metrics
    assert out.index("KV cache") < out.index("on http://127.0.0.1")
