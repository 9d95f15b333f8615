"""/metrics in the Prometheus text format: the engine's load and the server's latencies."""

from __future__ import annotations

import bisect
import os
import threading

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.values: list[float] = []  # kept for percentiles (bounded)
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, value)] += 1
            self.sum += value
            self.values.append(value)
            if len(self.values) > 10_000:
                del self.values[:5_000]

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, count in zip(self.buckets, self.counts):
            total += count
            out.append(f'{name}_bucket{{le="{bound}"}} {total}')
        total += self.counts[-1]
        out += [f'{name}_bucket{{le="+Inf"}} {total}', f"{name}_sum {self.sum:.6f}", f"{name}_count {total}"]
        return out


class ServerMetrics:
    """Counters the HTTP layer keeps (the engine keeps its own in Engine.stats)."""

    def __init__(self):
        self.ttft = Histogram(TTFT_BUCKETS)
        self.requests: dict[str, int] = {}  # by finish: ok, cancelled, error
        self.errors: dict[int, int] = {}  # HTTP status of error answers
        self._lock = threading.Lock()

    def count(self, table: dict, key) -> None:
        with self._lock:
            table[key] = table.get(key, 0) + 1


def resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def render(runner, metrics: ServerMetrics) -> str:
    engine = runner.engine
    stats = engine.stats
    capacity = engine.num_slots * engine.max_len
    hit_rate = stats.reused_tokens / stats.prompt_tokens if stats.prompt_tokens else 0.0
    rows = [
        ("qwen15_requests_running", "gauge", "sequences holding a KV slot", engine.running()),
        ("qwen15_requests_waiting", "gauge", "sequences waiting for a slot", engine.waiting()),
        ("qwen15_kv_slots_total", "gauge", "KV slots (sequences that can run at once)", engine.num_slots),
        ("qwen15_kv_slots_used", "gauge", "KV slots held by running sequences", engine.cache.used()),
        (
            "qwen15_kv_cache_usage_ratio",
            "gauge",
            "positions in use / positions",
            engine.tokens_held() / capacity,
        ),
        ("qwen15_kv_cache_bytes", "gauge", "bytes allocated for keys and values", engine.cache.nbytes()),
        ("qwen15_prompt_tokens_total", "counter", "prompt tokens of admitted sequences", stats.prompt_tokens),
        ("qwen15_generation_tokens_total", "counter", "tokens generated", stats.generated_tokens),
        (
            "qwen15_prefix_cache_hit_tokens_total",
            "counter",
            "prompt tokens whose KV was reused",
            stats.reused_tokens,
        ),
        ("qwen15_prefix_cache_hit_rate", "gauge", "reused / prompt tokens since start", hit_rate),
        (
            "qwen15_tokens_per_second",
            "gauge",
            "generated tokens per second, last 10 s",
            runner.tokens_per_second(),
        ),
        ("qwen15_engine_steps_total", "counter", "engine steps that did work", stats.steps),
        (
            "qwen15_engine_busy_seconds_total",
            "counter",
            "seconds the engine spent in steps that did work (its share of the wall time: its load)",
            stats.busy_seconds,
        ),
        (
            "qwen15_sequences_cancelled_total",
            "counter",
            "sequences cancelled (disconnects, stop strings)",
            stats.cancelled,
        ),
        ("process_resident_memory_bytes", "gauge", "resident memory of the server process", resident_bytes()),
    ]
    out = []
    for name, kind, text, value in rows:
        out += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value}"]
    out += [
        "# HELP qwen15_requests_total requests answered, by outcome",
        "# TYPE qwen15_requests_total counter",
    ]
    out += [f'qwen15_requests_total{{outcome="{k}"}} {v}' for k, v in sorted(metrics.requests.items())]
    out += [
        "# HELP qwen15_http_errors_total error answers, by status",
        "# TYPE qwen15_http_errors_total counter",
    ]
    out += [f'qwen15_http_errors_total{{status="{k}"}} {v}' for k, v in sorted(metrics.errors.items())]
    out += [
        "# HELP qwen15_time_to_first_token_seconds request arrival to its first token",
        "# TYPE qwen15_time_to_first_token_seconds histogram",
        *metrics.ttft.lines("qwen15_time_to_first_token_seconds"),
    ]
    return "\n".join(out) + "\n"


def parse(text: str) -> dict[str, float]:
    """Sample name (labels included) -> value, for tests and the benchmark."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values
