"""``/metrics``: the server's Prometheus text, from a registry of its own (several servers may share a process).

Two kinds of numbers. Counted by the HTTP side as requests come and go: requests by endpoint and status
code, time to first token and inter-token latency (histograms, as a streaming client sees them: measured
when an output reaches the event loop). Read at scrape time from the engine thread's last
:class:`~minivllm.outputs.EngineSnapshot`: prompt and generation tokens, running and waiting
sequences, KV blocks in use and cached, the prefix cache's token hit rate, engine steps.

Left out: per-model labels (one model per server), queue-time and end-to-end latency histograms.
"""

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from minivllm.outputs import EngineSnapshot

TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class _EngineCollector:
    """Turns the latest engine snapshot into metric families at each scrape."""

    def __init__(self, snapshot: Callable[[], EngineSnapshot]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot()
        counters = {"prompt_tokens": ("prompt tokens accepted", s.prompt_tokens),
                    "generation_tokens": ("tokens generated", s.generation_tokens),
                    "engine_steps": ("engine steps run", s.steps)}
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(f"minivllm_{name}", doc, value=value)
        gauges = {"num_requests_running": ("sequences running", s.running),
                  "num_requests_waiting": ("sequences waiting to run", s.waiting),
                  "kv_blocks_used": ("KV blocks not free (held by sequences or the prefix cache)", s.kv_blocks_used),
                  "kv_blocks_cached": ("KV blocks held only by the prefix cache", s.kv_blocks_cached),
                  "kv_blocks_total": ("KV blocks in the pool", s.num_kv_blocks),
                  "prefix_cache_hit_rate": ("prompt tokens served by the prefix cache / tokens looked up",
                                            s.cache_hit_rate)}
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(f"minivllm_{name}", doc, value=value)


class ServerMetrics:
    def __init__(self, snapshot: Callable[[], EngineSnapshot]) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("minivllm_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=registry)
        self.time_to_first_token = Histogram("minivllm_time_to_first_token_seconds",
                                             "from request arrival to its first generated token",
                                             buckets=TTFT_BUCKETS, registry=registry)
        self.inter_token_latency = Histogram("minivllm_inter_token_latency_seconds",
                                             "time between a request's generated tokens",
                                             buckets=ITL_BUCKETS, registry=registry)
        registry.register(_EngineCollector(snapshot))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class TokenTimer:
    """Feeds one request's token arrivals into the latency histograms."""

    def __init__(self, metrics: ServerMetrics, arrival: float) -> None:
        self.metrics, self.last = metrics, arrival
        self.first = True

    def tokens(self, n: int, now: float) -> None:
        """``n`` new tokens reached the event loop at ``now`` (time.monotonic())."""
        if n <= 0:
            return
        gap = now - self.last
        if self.first:
            self.metrics.time_to_first_token.observe(gap)
            self.first = False
        else:
            for _ in range(n):
                self.metrics.inter_token_latency.observe(gap / n)
        self.last = now
