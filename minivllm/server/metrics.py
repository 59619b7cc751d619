"""``/metrics``: the server's Prometheus text, from a registry of its own (several servers may share a process).

Two kinds of numbers. Counted by the HTTP side as requests come and go: requests by endpoint and status
code, internal errors (500s and error events in streams), time to first token and inter-token latency (as a
streaming client sees them: measured when an output reaches the event loop), and, from each finished
request's :class:`~minivllm.outputs.RequestMetrics`, end-to-end latency, queue time and the finish reason.
Read at scrape time from the engine thread's last :class:`~minivllm.outputs.EngineSnapshot`: prompt and
generation tokens, running and waiting sequences, KV blocks and KV usage, the prefix cache's hit rate,
preemptions, engine steps.

Names follow vLLM's (``vllm:e2e_request_latency_seconds`` is ``minivllm_e2e_request_latency_seconds``,
``vllm:request_success_total{finished_reason}``, ``vllm:kv_cache_usage_perc`` a fraction 0..1, ...) with
this server's prefix and Prometheus' underscore.

Left out: per-model labels (one model per server), prefill/decode time histograms, per-step batch sizes.
"""

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from minivllm.outputs import EngineSnapshot, RequestOutput

TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class _EngineCollector:
    """Turns the latest engine snapshot into metric families at each scrape."""

    def __init__(self, snapshot: Callable[[], EngineSnapshot]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot()
        counters = {"prompt_tokens": ("prompt tokens accepted", s.prompt_tokens),
                    "generation_tokens": ("tokens generated", s.generation_tokens),
                    "engine_steps": ("engine steps run", s.steps),
                    "num_preemptions": ("sequences preempted (their KV recomputed later)", s.num_preemptions)}
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(f"minivllm_{name}", doc, value=value)
        gauges = {"num_requests_running": ("sequences running", s.running),
                  "num_requests_waiting": ("sequences waiting to run", s.waiting),
                  "kv_blocks_used": ("KV blocks not free (held by sequences or the prefix cache)", s.kv_blocks_used),
                  "kv_blocks_cached": ("KV blocks held only by the prefix cache", s.kv_blocks_cached),
                  "kv_blocks_total": ("KV blocks in the pool", s.num_kv_blocks),
                  "prefix_cache_hit_rate": ("prompt tokens served by the prefix cache / tokens looked up",
                                            s.cache_hit_rate),
                  "kv_cache_usage_perc": ("fraction of KV blocks held by sequences (0..1; 1 = full)", s.kv_usage)}
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
        self.internal_errors = Counter("minivllm_internal_errors", "requests that failed inside the server (HTTP "
                                       "500, or an error event in a stream)", registry=registry)
        self.e2e_latency = Histogram("minivllm_e2e_request_latency_seconds", "from arrival to the request's end",
                                     buckets=E2E_BUCKETS, registry=registry)
        self.queue_time = Histogram("minivllm_request_queue_time_seconds", "from arrival to the first schedule",
                                    buckets=E2E_BUCKETS, registry=registry)
        self.request_success = Counter("minivllm_request_success", "finished sequences, by finish reason",
                                       ["finished_reason"], registry=registry)
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

    def finished(self, out: RequestOutput) -> None:
        """A finished engine request: its latency, its queue time and each sample's finish reason."""
        m = out.metrics
        if m.finished_time is not None:
            self.metrics.e2e_latency.observe(max(m.finished_time - m.arrival_time, 0.0))
        if m.first_scheduled_time is not None:
            self.metrics.queue_time.observe(max(m.first_scheduled_time - m.arrival_time, 0.0))
        for o in out.outputs:
            self.metrics.request_success.labels(o.finish_reason or "abort").inc()
