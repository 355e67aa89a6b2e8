"""The startup report (runtime/startup.py): load, compile and capture times and the KV slots, in two lines."""
import re

import torch
from torch._dynamo.utils import counters

from dlc.runtime.config import ServeConfig
from dlc.runtime.engine import Engine
from dlc.runtime.runners.graph import GraphRunner
from dlc.runtime.session import Session, open_model
from dlc.runtime.startup import startup_lines

TIMES = re.compile(r"^dlc serve: ready in (\d+\.\d) s: load (?:(\d+\.\d) s|-), compile (off|\d+\.\d s), "
                   r"capture (off|\d+\.\d s \((\d+) CUDA graphs\)|off \((\d+) shapes warmed uncaptured\))$")
KV = re.compile(r"^dlc serve: KV cache (\d+) slots x (\d+) tokens = (\d+) tokens, "
                r"(\d+\.\d\d GiB|\d+(?:\.\d+)? MiB) \((.+)\)$")


def test_eager_engine_on_cpu():
    eng = Engine.from_config(ServeConfig(model="tiny-llada", max_seq_len=64, kv_cache_mb=1))
    eng.warmup()
    times, kv = startup_lines(eng)
    m = TIMES.match(times)
    assert m and m.group(3) == "off" and m.group(4) == "off", times
    assert m.group(2) is not None and float(m.group(1)) >= float(m.group(2))     # from_config timed the load
    k = KV.match(kv)
    assert k, kv
    slots, seq, tokens = map(int, k.group(1, 2, 3))
    assert (slots, seq, tokens) == (eng.kv.n_slots, 64, eng.kv.n_slots * 64) and slots > 1
    assert k.group(5) == "--kv-cache-mb 1"


def test_graphed_and_compiled_runner_reports_compile_and_capture():
    """A graph runner with compiled blocks (Dynamo's eager backend keeps it fast on CPU): compile time and the
    captured shapes are reported; the scratch slot of the padding rows is not counted as a KV slot."""
    torch._dynamo.reset()
    counters.clear()
    sess = open_model("tiny-llada", progress=False)
    gr = GraphRunner(sess.runner.model, decode="exact", compile="eager")
    eng = Engine(Session(gr, sess.tokenizer, sess.config, sess.chat, sess.source),
                 ServeConfig(max_seq_len=64, max_batch_size=4, gen_length=16, block_length=8, steps=8))
    eng.warmup()
    times, kv = startup_lines(eng)
    m = TIMES.match(times)
    assert m and m.group(2) is None, times                      # built from a session: no load time
    assert m.group(3) != "off" and int(m.group(6)) == len(gr.graphs) == 3       # buckets 1, 2, 4 (no CUDA)
    assert counters["stats"]["unique_graphs"] >= 1
    k = KV.match(kv)
    assert k and int(k.group(1)) == eng.kv.n_slots - 1 and k.group(5) == "CPU default", kv
