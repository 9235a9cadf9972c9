"""Prometheus metrics of one app (its own registry, so several apps can live in one process).

``refmodel_queue_depth{model}``: sequences admitted and not yet answered; ``refmodel_batch_size``:
sequences per model call; ``refmodel_tokens_total`` (use ``rate()`` for tokens/s) and
``refmodel_tokens_per_second`` (the last batch); ``refmodel_request_latency_seconds{endpoint}``;
``refmodel_requests_total{endpoint,status}``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("refmodel_queue_depth", "Sequences admitted and not yet answered",
                                 ["model"], registry=r)
        self.batch_size = Histogram("refmodel_batch_size", "Sequences per model call", ["model"],
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("refmodel_batch_seconds", "Model time per batch", ["model"],
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("refmodel_tokens", "Tokens scored", ["model"], registry=r)
        self.tokens_per_second = Gauge("refmodel_tokens_per_second", "Tokens/s of the last batch", ["model"],
                                       registry=r)
        self.latency = Histogram("refmodel_request_latency_seconds", "Request latency", ["endpoint"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.requests = Counter("refmodel_requests", "Requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self._request_children: dict[tuple[str, int], tuple] = {}

    def observer(self, model: str):
        """``observe(batch_size, tokens, seconds)`` for a model's batcher."""
        size_h, seconds_h = self.batch_size.labels(model), self.batch_seconds.labels(model)
        tokens_c, rate_g = self.tokens.labels(model), self.tokens_per_second.labels(model)

        def observe(size: int, tokens: int, seconds: float) -> None:
            size_h.observe(size)
            seconds_h.observe(seconds)
            tokens_c.inc(tokens)
            if seconds > 0:
                rate_g.set(tokens / seconds)
        return observe

    def request_done(self, endpoint: str, status: int, seconds: float) -> None:
        """Count one answered request and its latency (labelled children cached: this runs per request)."""
        key = (endpoint, status)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (self.latency.labels(endpoint),
                                                       self.requests.labels(endpoint, str(status)))
        children[0].observe(seconds)
        children[1].inc()

    def depth_setter(self, model: str):
        gauge = self.queue_depth.labels(model)
        return gauge.set

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["CONTENT_TYPE", "Metrics"]
