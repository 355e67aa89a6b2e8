"""Serving configuration: one dataclass that validates itself.

Every `dlc serve` option is a field here under the same name (dashes become underscores), and a YAML
``--config`` file uses the same keys; command-line flags override the file. Generation defaults left as None
are taken from the model or engine directory (``generation_config.json`` or the engine manifest's
``generation`` section), then from ``GEN_DEFAULTS``."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

POLICIES = ("phase", "fcfs", "fcfs-continuous")   # phase-multiplexed batcher; FCFS static batching and
                                                  # iteration-level (continuous) FCFS, the baselines
TP_ALL_REDUCE = ("auto", "nccl", "symm")  # tensor parallelism's all-reduce (dlc.models.all_reduce.BACKENDS)
# a mixed iteration on the graph runner (runners/packed.py)
MIX_ITERATIONS = ("two", "eager", "compiled", "captured")
GRANULARITY = ("fixed", "elastic")      # fixed block size, or Optimus-style load-driven chunk size
GEN_DEFAULTS = dict(gen_length=128, block_length=32, steps=128, threshold=None, remasking="low_confidence",
                    kv_cache="dual")
GEN_KEYS = tuple(GEN_DEFAULTS)


@dataclass
class ServeConfig:
    model: str = "tiny-llada"
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 64            # most requests in one iteration (and running at once)
    # token budget of one iteration (Refresh costs the sequence, Reuse the block)
    max_num_tokens: int = 8192
    max_queue: int = 256                # waiting requests beyond this get HTTP 429
    api_key: str | None = None
    served_model_name: str | None = None
    device: str | None = None
    dtype: str = "auto"
    max_seq_len: int | None = None      # default: the model's
    kv_cache_mb: float | None = None    # KV slot pool budget [CUDA: from gpu_memory_utilization; CPU: 512]
    gpu_memory_utilization: float = 0.9  # CUDA: share of the device the server fills (runtime/memory.py)
    policy: str = "phase"
    granularity: str = "fixed"
    chunk_sizes: tuple = (4, 8, 16, 32, 64)   # elastic mode: the chunk sizes the controller picks from
    refresh_share: float = 0.5          # at most this share of the token budget goes to Refresh per iteration
    age_iters: int = 16                 # a request waiting this many iterations goes first (no starvation)
    # phase: while a request's first block runs, later blocks' Refresh rows wait up to this many iterations
    # (time to first token before the running requests' later blocks; 0: they never wait for it)
    ttft_defer_iters: int = 0
    # default seed of requests that send none (None: a fresh random seed each)
    seed: int | None = None
    drain_timeout_s: float = 60.0       # SIGTERM: in-flight requests get this long, then end with an error
    max_request_bytes: int = 2 ** 21    # larger request bodies get HTTP 413
    log_interval_s: float = 5.0         # a throughput / queue console line this often while busy (0: none)
    # Reuse steps as CUDA graphs at bucketed batch sizes [on with CUDA + eager]
    cuda_graphs: bool | None = None
    graph_decode: str | None = None     # "fused" (Triton logits, GPU default) or "exact" (float64 softmax)
    compile: bool | None = None         # torch.compile the graph runner's blocks (needs cuda_graphs; every
                                        # rank's with TP) or an export engine's programs [on on CUDA]
    # a mixed iteration (Refresh rows beside Reuse rows) on the CUDA-graph runner: "two" calls, one "eager"
    # ragged forward, or one packed forward through the "compiled" blocks (needs compile) [two with capture]
    mix_iterations: str | None = None
    lookahead_steps: int = 16           # fixed-schedule Reuse steps kept in flight on the device while
                                        # nothing waits: a window sliding over the block's schedule, the
                                        # next step launched as one lands (1: every step alone)
    lookahead_max_ms: float = 100.0     # the steps in flight last about this long at most (the window from
                                        # the measured step time of its batch size): a request that
                                        # arrives meanwhile waits that long at most (0: no bound)
    tensor_parallel_size: int = 1       # shard the model over this many GPUs / processes (CUDA graphs
                                    # per rank as on one GPU)
    # the ranks' all-reduce: nccl (default), auto (symmetric memory's one-shot for small messages on CUDA,
    # the copy engines for 4-64 MiB at TP=2, else NCCL / gloo) or symm (the same up to its buffers; CUDA
    # only): dlc.models.all_reduce. auto is opt-in: on 2 x H200 a process's second TP group hung after a
    # first one (bench/RESULTS.md)
    tp_all_reduce: str = "nccl"
    # two-micro-batch overlap of each TP rank's forward (models/overlap.py): a step feeding at least this many
    # tokens runs as two halves whose all-reduces overlap the other half's compute (0: off; None: the
    # library's default, dlc.models.overlap.MIN_TOKENS, the one place to flip it)
    tp_overlap_tokens: int | None = None
    # head-sparse Reuse of an eager model: each KV head attends over the fed block + this share of the
    # other cached keys (engines: built in)
    sparse_retention: float | None = None
    # a request's output does not depend on what else runs (fixed GEMM / reduction / attention / logits
    # splits on CUDA: runtime/batch_invariant.py); costs speed, keeps compile off
    batch_invariant: bool = False
    # an export engine compiled at load keeps Inductor's code in its directory and loads it at the next
    # open (runtime/compile_cache.py: a pickle written by this runtime; off where the directory is shared
    # with writers you do not trust)
    compile_cache: bool = True
    gen_length: int | None = None
    block_length: int | None = None
    steps: int | None = None
    threshold: float | None = None
    remasking: str | None = None
    kv_cache: str | None = None

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for name in ("port", "max_batch_size", "max_num_tokens", "max_queue", "age_iters",
                     "max_request_bytes", "lookahead_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"serve config: {name} must be a positive integer, got {v!r}")
        d = self.ttft_defer_iters
        if not isinstance(d, int) or isinstance(d, bool) or d < 0:
            raise ValueError(f"serve config: ttft_defer_iters must be an integer >= 0, got {d!r}")
        if self.port > 65535:
            raise ValueError(f"serve config: port must be <= 65535, got {self.port}")
        m = self.lookahead_max_ms
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not m >= 0:
            raise ValueError(f"serve config: lookahead_max_ms must be a number >= 0, got {m!r}")
        if self.drain_timeout_s < 0 or self.log_interval_s < 0:
            raise ValueError("serve config: drain_timeout_s and log_interval_s must be >= 0")
        if self.kv_cache_mb is not None and not self.kv_cache_mb > 0:
            raise ValueError(f"serve config: kv_cache_mb must be > 0, got {self.kv_cache_mb}")
        u = self.gpu_memory_utilization
        if isinstance(u, bool) or not isinstance(u, (int, float)) or not 0 < u <= 1:
            raise ValueError(f"serve config: gpu_memory_utilization must be in (0, 1], "
                             f"got {self.gpu_memory_utilization}")
        if self.policy not in POLICIES:
            raise ValueError(f"serve config: policy must be one of {POLICIES}, got {self.policy!r}")
        if self.granularity not in GRANULARITY:
            raise ValueError(f"serve config: granularity must be one of {GRANULARITY}, got "
                             f"{self.granularity!r}")
        if not 0 < self.refresh_share <= 1:
            raise ValueError(f"serve config: refresh_share must be in (0, 1], got {self.refresh_share}")
        self.chunk_sizes = tuple(sorted(int(c) for c in self.chunk_sizes))
        if not self.chunk_sizes or self.chunk_sizes[0] <= 0:
            raise ValueError(f"serve config: chunk_sizes must be positive integers, got {self.chunk_sizes}")
        if self.max_seq_len is not None and self.max_seq_len <= 0:
            raise ValueError(f"serve config: max_seq_len must be > 0, got {self.max_seq_len}")
        if self.graph_decode not in (None, "fused", "exact"):
            raise ValueError("serve config: graph_decode must be 'fused' or 'exact', got "
                             f"{self.graph_decode!r}")
        if self.mix_iterations not in (None, *MIX_ITERATIONS):
            raise ValueError(f"serve config: mix_iterations must be one of {MIX_ITERATIONS}, got "
                             f"{self.mix_iterations!r}")
        if self.mix_iterations == "compiled" and (self.compile is False or self.batch_invariant):
            raise ValueError("serve config: mix_iterations 'compiled' runs the compiled blocks; it needs "
                             "compile (and no batch_invariant)")
        if self.mix_iterations == "captured" and self.batch_invariant:
            raise ValueError("serve config: mix_iterations 'captured' packs rows of different requests into "
                             "one forward; it cannot run with batch_invariant")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed <= 2 ** 63 - 1):
            raise ValueError(f"serve config: seed must be an integer in [0, 2^63 - 1], got {self.seed!r}")
        if isinstance(self.tensor_parallel_size, bool) or not isinstance(self.tensor_parallel_size, int) \
                or self.tensor_parallel_size < 1:
            raise ValueError(f"serve config: tensor_parallel_size must be a positive integer, got "
                             f"{self.tensor_parallel_size!r}")
        if self.tp_all_reduce not in TP_ALL_REDUCE:
            raise ValueError(f"serve config: tp_all_reduce must be one of {TP_ALL_REDUCE}, got "
                             f"{self.tp_all_reduce!r}")
        n = self.tp_overlap_tokens
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise ValueError(f"serve config: tp_overlap_tokens must be an integer >= 0 (0: off), got {n!r}")
        r = self.sparse_retention
        if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1):
            raise ValueError(f"serve config: sparse_retention must be in (0, 1], got {r!r}")
        if not isinstance(self.compile_cache, bool):
            raise ValueError(f"serve config: compile_cache must be true or false, got {self.compile_cache!r}")
        if not isinstance(self.batch_invariant, bool):
            raise ValueError(f"serve config: batch_invariant must be true or false, got "
                             f"{self.batch_invariant!r}")
        if self.batch_invariant and self.compile:
            raise ValueError("serve config: batch_invariant keeps compile off (Inductor picks its GEMM and "
                             "reduction configs per shape); leave compile out")
        if self.batch_invariant and self.tensor_parallel_size > 1:
            raise ValueError("serve config: batch_invariant runs on one device (tensor_parallel_size 1)")
        if self.api_key == "":
            raise ValueError("serve config: api_key must not be empty (leave it out to disable auth)")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> "ServeConfig":
        import yaml
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"cannot read serve config {path}: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"serve config {path}: expected a mapping of option -> value")
        data = {k.replace("-", "_"): v for k, v in data.items()}
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, d: dict) -> "ServeConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"serve config: unknown options {unknown}; known: {sorted(names)}")
        return cls(**d)


# block-diffusion decoding's fields (requests, generation_config.json)
BLOCK_GEN_KEYS = ("decoder", "steps_per_block", "eos_early_stop", "edit_threshold", "max_post_edit_steps",
                  "tokens_per_step")


def family_generation_defaults(model_config) -> dict:
    """The family's own defaults over GEN_DEFAULTS: block-diffusion families decode with their reference's
    block length, steps per block, threshold and the exact block cache (models/llada2_moe.py,
    models/sdar.py)."""
    if model_config is None or not getattr(model_config, "block_diffusion", False):
        return {}
    from dlc.models import FAMILIES
    d = dict(getattr(FAMILIES[model_config.family]["module"], "GENERATION_DEFAULTS", {}))
    return {"kv_cache": "block", **d}


def model_generation_defaults(model: str, model_config=None) -> dict:
    """Generation defaults stored with a model or engine directory (dlc keys), else the family's
    (``family_generation_defaults``), else GEN_DEFAULTS."""
    out = {**GEN_DEFAULTS, **family_generation_defaults(model_config)}
    p = Path(model).expanduser()
    for f, section in ((p / "generation_config.json", None), (p / "dlc_engine.json", "generation")):
        if not f.is_file():
            continue
        try:
            d = json.loads(f.read_text())
        except json.JSONDecodeError:
            continue
        d = d.get(section) if section else d
        if isinstance(d, dict):
            out.update({k: d[k] for k in GEN_KEYS + BLOCK_GEN_KEYS if k in d})
    return out
