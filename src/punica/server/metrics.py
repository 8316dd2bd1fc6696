"""Prometheus metrics of the server, in a registry of its own (several apps may live in one process).

Request-level series are recorded on the event loop as outputs arrive; engine gauges and counters are
read at scrape time from the snapshot the engine thread publishes after every step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from punica.server.async_engine import Delivery, EngineStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/load_lora_adapter",
          "/v1/unload_lora_adapter", "/health", "/metrics")
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
FINISH_REASONS = ("stop", "length", "abort", "error")


class EngineCollector(Collector):
    """Engine state at scrape time: running/waiting requests, KV usage, adapter residency."""

    def __init__(self, stats: Callable[[], EngineStats]):
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        gauges = {"num_requests_running": (s.running, "Requests in the running batch"),
                  "num_requests_waiting": (s.waiting, "Requests queued for admission"),
                  "kv_cache_usage_ratio": (s.kv_usage, "Fraction of KV-cache blocks in use"),
                  "adapters_loaded": (s.adapters_loaded, "Adapters registered (servable)"),
                  "adapter_slots_used": (s.adapter_slots_used, "Device adapter slots holding an adapter")}
        for name, (value, doc) in gauges.items():
            yield GaugeMetricFamily(f"punica_{name}", doc, value=value)
        counters = {"adapter_device_loads": (s.device_loads, "Adapter copies into a device slot"),
                    "adapter_device_evictions": (s.device_evictions, "Adapters evicted from a device slot"),
                    "adapter_disk_loads": (s.disk_loads, "Adapter reads from disk into the CPU cache"),
                    "preemptions": (s.preemptions, "Requests preempted for lack of KV blocks"),
                    "engine_step_errors": (s.step_errors, "Engine steps that raised (their requests failed)"),
                    "prefix_cache_queries": (s.prefix_cache_queries, "Prompt tokens looked up in the prefix cache"),
                    "prefix_cache_hits": (s.prefix_cache_hits, "Prompt tokens whose KV the prefix cache held"),
                    "prefix_cache_evictions": (s.prefix_cache_evictions, "Cached KV blocks evicted for new ones")}
        for name, (value, doc) in counters.items():
            yield CounterMetricFamily(f"punica_{name}", doc, value=value)


class ServerMetrics:
    def __init__(self, stats: Callable[[], EngineStats]):
        r = self.registry = CollectorRegistry()
        self.http = Counter("punica_http_requests", "HTTP requests by route and status code",
                            ["route", "status"], registry=r)
        self.requests = Counter("punica_requests", "Generation requests accepted, by model (base or adapter)",
                                ["model"], registry=r)
        self.finished = Counter("punica_request_finished", "Generation choices finished, by model and reason "
                                "(stop, length, abort: client gone, error: engine failure)", ["model", "reason"],
                                registry=r)
        self.prompt_tokens = Counter("punica_prompt_tokens", "Prompt tokens, by model", ["model"], registry=r)
        self.generation_tokens = Counter("punica_generation_tokens", "Generated tokens, by model", ["model"],
                                         registry=r)
        self.ttft = Histogram("punica_time_to_first_token_seconds", "Arrival to first token, per choice",
                              ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("punica_time_per_output_token_seconds", "Gap between consecutive tokens of a choice",
                              ["model"], buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("punica_e2e_request_latency_seconds", "Arrival to last token, per request",
                             ["model"], buckets=TTFT_BUCKETS, registry=r)
        r.register(EngineCollector(stats))
        self._open: dict[str, int] = {}  # accepted requests per model whose response is not over
        self._retired: set[str] = set()  # unloaded adapters whose series go when their last request closes

    def count_http(self, path: str, status: int) -> None:
        self.http.labels(path if path in ROUTES else "other", str(status)).inc()

    def track(self, model: str, arrival: float) -> RequestTracker:
        self.requests.labels(model).inc()
        self._open[model] = self._open.get(model, 0) + 1
        return RequestTracker(self, model, arrival)

    def adapter_loaded(self, name: str) -> None:
        self._retired.discard(name)

    def adapter_unloaded(self, name: str) -> None:
        """Drop `name`'s per-model series once its requests in flight are over (adapters come and go by the
        thousand: series of unloaded ones would pile up in every scrape)."""
        self._retired.add(name)
        self._drop_if_idle(name)

    def request_closed(self, model: str) -> None:
        self._open[model] -= 1
        if not self._open[model]:
            del self._open[model]
            self._drop_if_idle(model)

    def _drop_if_idle(self, model: str) -> None:
        if model not in self._retired or model in self._open:
            return
        self._retired.discard(model)
        for metric in (self.requests, self.prompt_tokens, self.generation_tokens, self.ttft, self.tpot, self.e2e):
            _remove(metric, model)
        for reason in FINISH_REASONS:
            _remove(self.finished, model, reason)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTracker:
    """Latency and token accounting of one accepted request (all its choices)."""

    def __init__(self, metrics: ServerMetrics, model: str, arrival: float):
        self.m = metrics
        self.model = model
        self.arrival = arrival
        self._last: dict[int, float] = {}
        self._tokens: dict[int, int] = {}
        self.closed = False

    def on_output(self, d: Delivery) -> None:
        new = len(d.output.token_ids) - self._tokens.get(d.index, 0)
        if new > 0:
            last = self._last.get(d.index)
            if last is None:
                self.m.ttft.labels(self.model).observe(d.time - self.arrival)
            else:
                self.m.tpot.labels(self.model).observe((d.time - last) / new)
            self._last[d.index] = d.time
            self._tokens[d.index] = len(d.output.token_ids)
            self.m.generation_tokens.labels(self.model).inc(new)
        if d.output.finished:
            reason = d.output.finish_reason
            self.m.finished.labels(self.model, reason if reason in FINISH_REASONS else "error").inc()

    def on_prompts(self, num_tokens: int) -> None:
        self.m.prompt_tokens.labels(self.model).inc(num_tokens)

    def close(self, now: float, aborted: list[int]) -> None:
        """The response is over; `aborted` lists the choices that never finished (client gone). Once: later
        calls do nothing."""
        if self.closed:
            return
        self.closed = True
        for _ in aborted:
            self.m.finished.labels(self.model, "abort").inc()
        self.m.e2e.labels(self.model).observe(now - self.arrival)
        self.m.request_closed(self.model)


def _remove(metric, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:  # older prometheus_client raises for a series it never had
        pass
