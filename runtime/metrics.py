"""Engine metrics in Prometheus text format (no dependency: the GPU machine has no prometheus_client).

Every name starts with ``dlc_``. Gauges are set by the engine after each iteration; counters only grow;
histograms use fixed buckets. ``render()`` gives the text exposition served at ``/metrics``."""
from __future__ import annotations

import threading

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self, buckets):
        self.buckets, self.counts, self.sum, self.n = tuple(buckets), [0] * len(buckets), 0.0, 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.sum += v
        self.n += 1


class Metrics:
    GAUGES = {
        "queue_length": "Requests waiting for admission",
        "running_requests": "Requests admitted and decoding",
        "phase_refresh_share": "Share of the last iteration's tokens in the Refresh phase",
        "iteration_refresh_rows": "Rows in the Refresh phase in the last iteration",
        "iteration_reuse_rows": "Rows in the Reuse phase in the last iteration",
        "tokens_per_second": "Generated tokens per second (moving average over iterations)",
        "kv_cache_used_slots": "KV cache slots in use",
        "kv_cache_total_slots": "KV cache slots in the pool",
        "kv_cache_usage_ratio": "Share of KV cache slots in use",
        "granularity_chunk": "Block/chunk width chosen for the last started block",
        "saturation_tokens": "Measured saturation point (tokens per iteration) of the elastic controller",
        "lookahead_in_flight_max": "Most steps run ahead in flight at once in the last run (its window)",
    }
    COUNTERS = {
        "requests_total": "Requests finished, by status",
        "generated_tokens_total": "Tokens returned to clients",
        "phase_tokens_total": "Tokens fed to the model, by phase",
        "iterations_total": "Engine iterations",
        "preemptions_total": "Requests preempted by recompute",
        "rejected_total": "Requests rejected because the queue was full",
        "isolated_batches_total": "Runner calls that failed and were retried one request at a time",
        "lookahead_dropped_steps_total": "Steps run ahead on the device that the decoding core dropped",
        "lookahead_past_block_steps_total": "Of those, steps launched after the row's block had completed "
                                            "(variable-count rules: their step count is not known ahead)",
        "lookahead_runs_total": "Runs of steps ahead, by rule (schedule: low-confidence; rules: the core's "
                                "commit of threshold, factor, hierarchical, entropy-bound, credit, or of "
                                "rows with logprobs / smoothing)",
        "lookahead_refresh_prelaunched_total": "Refreshes launched behind a run's last steps, by status "
                                               "(used, or dropped: the core's state differed)",
        "mixed_iterations_total": "Iterations whose Refresh and Reuse rows ran as one forward",
        "phase_mixed_iterations_total": "Iterations with Refresh and Reuse rows (one forward or two calls)",
    }

    def __init__(self):
        self.lock = threading.Lock()
        self.gauges = {k: 0.0 for k in self.GAUGES}
        self.counters: dict[str, dict[tuple, float]] = {k: {} for k in self.COUNTERS}
        self.step_seconds = Histogram(STEP_BUCKETS)
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)

    def set(self, name: str, value: float) -> None:
        with self.lock:
            self.gauges[name] = float(value)

    def inc(self, name: str, value: float = 1.0, **labels) -> None:
        key = tuple(sorted(labels.items()))
        with self.lock:
            c = self.counters[name]
            c[key] = c.get(key, 0.0) + value

    def counter(self, name: str, **labels) -> float:
        return self.counters[name].get(tuple(sorted(labels.items())), 0.0)

    def observe(self, hist: str, value: float) -> None:
        with self.lock:
            getattr(self, hist).observe(value)

    def render(self) -> str:
        lines = []
        with self.lock:
            for k, help_ in self.GAUGES.items():
                lines += [f"# HELP dlc_{k} {help_}", f"# TYPE dlc_{k} gauge", f"dlc_{k} {self.gauges[k]:g}"]
            for k, help_ in self.COUNTERS.items():
                lines += [f"# HELP dlc_{k} {help_}", f"# TYPE dlc_{k} counter"]
                for key, v in sorted(self.counters[k].items()) or [((), 0.0)]:
                    lab = ",".join(f'{a}="{b}"' for a, b in key)
                    lines.append(f"dlc_{k}{{{lab}}} {v:g}" if lab else f"dlc_{k} {v:g}")
            for name, hist, help_ in (("step_seconds", self.step_seconds, "Engine iteration time"),
                                      ("time_to_first_token_seconds", self.ttft,
                                       "Arrival to first streamed block"),
                                      ("request_latency_seconds", self.latency, "Arrival to finish")):
                lines += [f"# HELP dlc_{name} {help_}", f"# TYPE dlc_{name} histogram"]
                for b, c in zip(hist.buckets, hist.counts):
                    lines.append(f'dlc_{name}_bucket{{le="{b:g}"}} {c}')
                lines += [f'dlc_{name}_bucket{{le="+Inf"}} {hist.n}', f"dlc_{name}_sum {hist.sum:g}",
                          f"dlc_{name}_count {hist.n}"]
        return "\n".join(lines) + "\n"
