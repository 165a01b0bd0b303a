"""Prometheus metrics of one server: engine state read at scrape time, latencies observed per request.

Each app gets its own CollectorRegistry, so several apps in one process (tests) never register a name twice.
The engine keeps its own running totals (`engine.stats()`); a custom collector turns them into gauges and
counters when /metrics is scraped, so nothing is double-counted and the engine thread never touches
prometheus. Time to first token and time per output token are what the API sees, per request, from submit to
the first token and between the first and the last token (what `vllm bench serve` reports as TTFT / TPOT).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0)
_TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)

GAUGES = {  # metric name -> (EngineStats field, help)
    "longcat_kv_pages_used": ("kv_pages_used", "KV-cache pages held by requests"),
    "longcat_kv_pages_total": ("kv_pages_total", "KV-cache pages in the pool"),
    "longcat_requests_running": ("running", "Requests in the running batch"),
    "longcat_requests_waiting": ("waiting", "Requests queued for a batch slot"),
}
COUNTERS = {  # metric name without _total -> (EngineStats field, help)
    "longcat_prefix_cache_hits": ("prefix_cache_hits", "Prompt tokens served from the prefix cache"),
    "longcat_prompt_tokens": ("prompt_tokens", "Prompt tokens processed"),
    "longcat_generation_tokens": ("generation_tokens", "Tokens generated"),
}


class EngineCollector(Collector):
    """Reads `stats()` (an object with the EngineStats int fields) at every scrape."""

    def __init__(self, stats: Callable[[], object]):
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        for name, (field, doc) in GAUGES.items():
            yield GaugeMetricFamily(name, doc, value=int(getattr(stats, field)))
        for name, (field, doc) in COUNTERS.items():
            yield CounterMetricFamily(name, doc, value=int(getattr(stats, field)))


class ServerMetrics:
    """The registry of one app and the metrics the API observes itself."""

    def __init__(self, stats: Callable[[], object]):
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(stats))
        self.ttft = Histogram("longcat_time_to_first_token_seconds", "Time from submit to the first token",
                              buckets=_TTFT_BUCKETS, registry=self.registry)
        self.tpot = Histogram("longcat_time_per_output_token_seconds",
                              "Mean time between output tokens after the first, per request",
                              buckets=_TPOT_BUCKETS, registry=self.registry)
        self.e2e = Histogram("longcat_e2e_request_latency_seconds", "Time from submit to the last token",
                             buckets=_TTFT_BUCKETS, registry=self.registry)
        self.finished = Counter("longcat_requests_finished", "Engine requests finished, by finish reason",
                                ["finish_reason"], registry=self.registry)

    def observe(self, submitted: float, first: float | None, last: float, tokens: int, reason: str) -> None:
        """One finished engine request: perf_counter times of submit, first and last token."""
        self.finished.labels(reason).inc()
        if first is None:
            return
        self.ttft.observe(first - submitted)
        self.e2e.observe(last - submitted)
        if tokens > 1:
            self.tpot.observe((last - first) / (tokens - 1))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
