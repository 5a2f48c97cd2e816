"""Prometheus metrics for the serving apps, one CollectorRegistry per app.

A registry per app (not the global default) lets several stages live in one process (the
embedded `serve all`, or tests creating many apps) without "duplicated timeseries" errors, and
lets /metrics of each app show only its own series. Vocabulary follows Triton / Ray Serve:
queue time (waiting for a worker or a batch) is kept apart from compute time, because the two
call for different fixes (more workers vs a faster model).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

# 50 µs .. 2.5 s: stage work is sub-millisecond to tens of milliseconds.
LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                   0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
COUNT_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 50000)
METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST
# What the OpenAPI says the probes and /metrics answer, so a schema-driven client (or fuzzer)
# sees the real thing: Prometheus text, and a 503 from /readyz while not ready.
METRICS_ROUTE: dict[str, Any] = {"responses": {200: {
    "description": "Prometheus text exposition format",
    "content": {"text/plain": {"schema": {"type": "string"}}}}}}
READYZ_ROUTE: dict[str, Any] = {"responses": {503: {
    "description": "not ready; the body says which check failed"}}}


class StageMetrics:
    """The metrics one serving app exports; `stage` labels every series."""

    def __init__(self, stage: str, registry: CollectorRegistry | None = None):
        self.stage = stage
        self.registry = registry or CollectorRegistry(auto_describe=True)
        labels = ("stage", "endpoint")
        self.latency = Histogram(
            "cascade_request_seconds", "End-to-end handling time of a stage request",
            labels, registry=self.registry, buckets=LATENCY_BUCKETS)
        self.queue = Histogram(
            "cascade_queue_seconds", "Time a request waited for a worker thread or batch",
            labels, registry=self.registry, buckets=LATENCY_BUCKETS)
        self.compute = Histogram(
            "cascade_compute_seconds", "Time spent computing (model, index)",
            labels, registry=self.registry, buckets=LATENCY_BUCKETS)
        self.candidates_in = Histogram(
            "cascade_candidates_in", "Candidates received per request",
            labels, registry=self.registry, buckets=COUNT_BUCKETS)
        self.candidates_out = Histogram(
            "cascade_candidates_out", "Candidates returned per request",
            labels, registry=self.registry, buckets=COUNT_BUCKETS)
        self.batch_size = Histogram(
            "cascade_batch_size", "Candidates per compute batch (micro-batching)",
            ("stage",), registry=self.registry, buckets=COUNT_BUCKETS)
        self.responses = Counter(
            "cascade_responses", "Responses by HTTP status", ("stage", "endpoint", "status"),
            registry=self.registry)
        self.deadline_exceeded = Counter(
            "cascade_deadline_exceeded", "Requests refused or cut short by their deadline",
            labels, registry=self.registry)
        self.reloads = Counter(
            "cascade_bundle_reloads", "Bundle reloads by outcome", ("stage", "outcome"),
            registry=self.registry)
        self.model_info = Info(
            "cascade_model", "Bundle version being served", ("stage",), registry=self.registry)
        self.model_loaded = Gauge(
            "cascade_model_loaded_timestamp_seconds", "When the current bundle was loaded",
            ("stage",), registry=self.registry)

    def observe_request(self, endpoint: str, *, total_s: float, queue_s: float = 0.0,
                        compute_s: float = 0.0, candidates_in: int | None = None,
                        candidates_out: int | None = None) -> None:
        self.latency.labels(self.stage, endpoint).observe(total_s)
        self.queue.labels(self.stage, endpoint).observe(queue_s)
        self.compute.labels(self.stage, endpoint).observe(compute_s)
        if candidates_in is not None:
            self.candidates_in.labels(self.stage, endpoint).observe(candidates_in)
        if candidates_out is not None:
            self.candidates_out.labels(self.stage, endpoint).observe(candidates_out)

    def observe_batch(self, size: int) -> None:
        self.batch_size.labels(self.stage).observe(size)

    def count_response(self, endpoint: str, status: int) -> None:
        self.responses.labels(self.stage, endpoint, str(status)).inc()

    def count_deadline(self, endpoint: str) -> None:
        self.deadline_exceeded.labels(self.stage, endpoint).inc()

    def set_model(self, version: str, loaded_at: float) -> None:
        self.model_info.labels(self.stage).info({"version": version})
        self.model_loaded.labels(self.stage).set(loaded_at)

    def render(self) -> bytes:
        """The Prometheus text exposition of this app's registry."""
        return generate_latest(self.registry)
