"""/metrics in Prometheus' text format (prometheus_client), one registry per app.

Server-side series (this process's HTTP layer):
    jambalab_http_requests_total{path, status}       every HTTP response, by route and status code
    jambalab_requests_total{endpoint, finish_reason} generation requests that ran: stop, length,
                                                     cancelled (client went away), error
    jambalab_prompt_tokens_total, jambalab_generation_tokens_total
    jambalab_time_to_first_token_seconds             request received -> first token (histogram)
    jambalab_time_per_output_token_seconds           gap between consecutive tokens (histogram)
    jambalab_request_duration_seconds                request received -> last token (histogram)
Engine series, read from engine.stats() at each scrape:
    jambalab_engine_<key> for every numeric key: counters (_total) for the cumulative ones
    (prefix_lookups, prefix_hits, prefix_tokens_reused, ...), gauges for the rest (running,
    waiting, prefix_bytes, free_slots, kv_tokens_used, ...).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

ENGINE_COUNTERS = {
    "requests_finished": "requests the engine finished",
    "prompt_tokens": "prompt tokens the engine admitted",
    "generated_tokens": "tokens the engine generated",
    "prefix_lookups": "prefix-state cache lookups",
    "prefix_hits": "prefix-state cache lookups that found a cached prefix",
    "prefix_tokens_reused": "prompt tokens taken from the prefix-state cache instead of prefilled",
    "prefix_evictions": "prefix-state cache entries evicted",
    "prefill_tokens_computed": "prompt tokens the engine prefilled (not taken from the prefix cache)",
    "steps": "engine steps",
}
ENGINE_GAUGES = {
    "running": "requests holding a slot",
    "waiting": "requests queued for a slot",
    "prefix_bytes": "bytes held by the prefix-state cache",
    "free_slots": "free batch slots",
    "kv_tokens_used": "KV-cache tokens in use",
    "kv_tokens_reserved": "KV-cache tokens reserved by running requests (prompt + max_tokens)",
    "prefix_checkpoints": "model-state checkpoints held by the prefix-state cache",
}

# Seconds; a tiny model on a CPU answers in milliseconds, a large one in seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class EngineCollector:
    def __init__(self, stats: Callable[[], dict[str, int | float]]) -> None:
        self.stats = stats

    def collect(self):
        for key, value in sorted(self.stats().items()):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            name = f"jambalab_engine_{key}"
            if key in ENGINE_COUNTERS:
                yield CounterMetricFamily(name, ENGINE_COUNTERS[key], value=value)
            else:
                yield GaugeMetricFamily(name, ENGINE_GAUGES.get(key, f"engine.stats()['{key}']"), value=value)


class ServerMetrics:
    def __init__(self, engine_stats: Callable[[], dict[str, int | float]]) -> None:
        disable_created_metrics()  # the *_created timestamp series only clutter a scrape (process-wide setting)
        r = self.registry = CollectorRegistry()
        self.http_requests = Counter("jambalab_http_requests", "HTTP responses by route and status code",
                                     ["path", "status"], registry=r)
        self.requests = Counter("jambalab_requests", "generation requests by endpoint and finish reason",
                                ["endpoint", "finish_reason"], registry=r)
        self.prompt_tokens = Counter("jambalab_prompt_tokens", "prompt tokens of generation requests", registry=r)
        self.generation_tokens = Counter("jambalab_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("jambalab_time_to_first_token_seconds", "request received to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("jambalab_time_per_output_token_seconds", "time between consecutive tokens",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.duration = Histogram("jambalab_request_duration_seconds", "request received to last token",
                                  buckets=LATENCY_BUCKETS, registry=r)
        r.register(EngineCollector(engine_stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)
