"""ServeConfig validates itself; YAML keys and CLI options are the same names."""
import pytest

from dlc.runtime.config import ServeConfig, model_generation_defaults
from dlc.runtime.server_cli import build_config


@pytest.mark.parametrize("field,value,needle", [
    ("max_batch_size", 0, "max_batch_size"), ("max_num_tokens", -5, "max_num_tokens"),
    ("port", 70000, "port"), ("policy", "lifo", "policy"), ("granularity", "auto", "granularity"),
    ("refresh_share", 0.0, "refresh_share"), ("kv_cache_mb", 0, "kv_cache_mb"),
    ("max_queue", 1.5, "max_queue"), ("api_key", "", "api_key"),
    ("batch_invariant", "yes", "batch_invariant"), ("compile_cache", 1, "compile_cache"),
    ("ttft_defer_iters", -1, "ttft_defer_iters"),
    ("ttft_defer_iters", 2.5, "ttft_defer_iters"), ("lookahead_max_ms", -1, "lookahead_max_ms"),
    ("lookahead_max_ms", "x", "lookahead_max_ms")])
def test_bad_values(field, value, needle):
    with pytest.raises(ValueError, match=needle):
        ServeConfig(**{field: value})


def test_yaml_and_flags(tmp_path):
    y = tmp_path / "serve.yaml"
    y.write_text("max-batch-size: 4\nport: 9001\npolicy: fcfs\ngen_length: 64\n")
    cfg = build_config("tiny-llada", str(y), port=9002, max_queue=None)
    assert (cfg.max_batch_size, cfg.port, cfg.policy, cfg.gen_length, cfg.model) == \
        (4, 9002, "fcfs", 64, "tiny-llada")
    y.write_text("max_batch: 4\n")
    with pytest.raises(ValueError, match="unknown options"):
        build_config("tiny-llada", str(y))
    y.write_text("- 1\n")
    with pytest.raises(ValueError, match="mapping"):
        build_config("tiny-llada", str(y))


def test_batch_invariant_flag_yaml_and_conflicts(tmp_path):
    """``batch_invariant`` is a YAML key and a ``dlc serve`` flag; the mode keeps compile off and runs on one
    device, and says so (400-style one-liners naming the field)."""
    import click
    from dlc.runtime.server_cli import serve_command
    y = tmp_path / "serve.yaml"
    y.write_text("batch-invariant: true\n")
    assert build_config("tiny-llada", str(y)).batch_invariant is True
    assert build_config("tiny-llada", str(y), batch_invariant=False).batch_invariant is False
    assert ServeConfig().batch_invariant is False                               # off by default
    names = {o for p in serve_command.params if isinstance(p, click.Option)
             for o in p.opts + p.secondary_opts}
    assert {"--batch-invariant", "--no-batch-invariant"} <= names
    for kw, needle in ((dict(compile=True), "compile"), (dict(tensor_parallel_size=2), "one device")):
        with pytest.raises(ValueError, match=f"batch_invariant.*{needle}"):
            ServeConfig(batch_invariant=True, **kw)


def test_generation_defaults_from_model_dir(tmp_path):
    (tmp_path / "generation_config.json").write_text('{"gen_length": 64, "steps": 32, "other": 1}')
    d = model_generation_defaults(str(tmp_path))
    assert d["gen_length"] == 64 and d["steps"] == 32 and d["block_length"] == 32 and "other" not in d
    (tmp_path / "dlc_engine.json").write_text('{"generation": {"kv_cache": "prefix"}}')     # an engine's
    assert model_generation_defaults(str(tmp_path))["kv_cache"] == "prefix"
