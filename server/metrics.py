"""Prometheus metrics of the server (exposed at `/metrics`)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

INGEST_BATCHES = Counter("emu_ingest_batches_total", "Batches received", ["stream", "outcome"])
INGEST_POINTS = Counter("emu_ingest_points_total", "Telemetry points stored")
INGEST_LAG = Histogram(
    "emu_ingest_lag_seconds", "Sample timestamp to stored",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300),
)
FAULTS_OPEN = Gauge("emu_faults_open", "Open faults", ["fault_class"])
HTTP_REQUESTS = Counter("emu_http_requests_total", "API requests", ["method", "status"])
