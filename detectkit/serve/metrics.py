"""Prometheus metrics and JSON logs for ``detectkit serve``.

LitServe runs the HTTP servers, the inference workers and its logger in separate processes, so
the metrics use prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, set by
``detectkit serve`` before anything imports prometheus_client): every process writes its own
files and ``/metrics`` sums them. Worker-side figures (batch size, queue time, inference time)
travel through LitServe's own channel, ``LitAPI.log`` -> :class:`PrometheusLogger` (a
``litserve.Logger`` running in LitServe's logger process); request counts by status and
end-to-end latency are recorded by the HTTP gate; worker deaths and restarts by the supervisor.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

import litserve as ls

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# LitAPI.log keys (worker -> logger process)
BATCH_SIZE = "batch_size"
QUEUE_SECONDS = "queue_seconds"
INFERENCE_SECONDS = "inference_seconds"


def _require_multiproc_dir() -> None:
    if not os.environ.get(MULTIPROC_ENV):
        raise RuntimeError(f"{MULTIPROC_ENV} must be set before metrics are created (detectkit serve sets it)")


class _Instruments:
    """Created lazily, once per process, after the multiprocess directory is known."""

    _made: _Instruments | None = None

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        _require_multiproc_dir()
        self.requests = Counter("detectkit_requests_total", "HTTP prediction requests by status code", ["status"])
        self.latency = Histogram("detectkit_request_seconds", "End-to-end request time in the HTTP server",
                                 buckets=TIME_BUCKETS)
        self.batch = Histogram("detectkit_batch_size", "Images per model call (dynamic batching)",
                               buckets=BATCH_BUCKETS)
        self.queue = Histogram("detectkit_queue_seconds", "Time from request accepted to its batch starting",
                               buckets=TIME_BUCKETS)
        self.inference = Histogram("detectkit_inference_seconds", "Time of one batched model call "
                                   "(preprocess, model, postprocess)", buckets=TIME_BUCKETS)
        self.workers = Counter("detectkit_worker_events_total", "Inference-worker deaths and completed restarts "
                               "(the supervisor, in the main process)", ["event"])

    @classmethod
    def get(cls) -> _Instruments:
        if cls._made is None:
            cls._made = cls()
        return cls._made


class HttpMetrics:
    """Used by the HTTP gate: count requests and render ``/metrics`` from every process's files."""

    def request(self, status: int, seconds: float) -> None:
        inst = _Instruments.get()
        inst.requests.labels(status=str(status)).inc()
        inst.latency.observe(seconds)

    def worker_event(self, event: str) -> None:
        """``died`` or ``restarted``: counted by the worker supervisor."""
        _Instruments.get().workers.labels(event=event).inc()

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

        _Instruments.get()
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST


class PrometheusLogger(ls.Logger):
    """Receives ``LitAPI.log(key, value)`` from the inference workers (LitServe's logger process)."""

    def process(self, key: str, value: Any) -> None:
        inst = _Instruments.get()
        if key == BATCH_SIZE:
            inst.batch.observe(float(value))
        elif key == QUEUE_SECONDS:
            inst.queue.observe(max(0.0, float(value)))
        elif key == INFERENCE_SECONDS:
            inst.inference.observe(float(value))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any ``extra={"fields": {...}}``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_json_logging(level: str = "info") -> None:
    """JSON lines on stderr for detectkit's and LitServe's loggers (idempotent, per process)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in ("detectkit", "litserve"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
