"""Prometheus counters of the cloud services (``framecap ingest``, ``framecap worker``).

Defined once per process (prometheus-client registers each name globally); every
:class:`~cloud.ingest.IngestService` and :class:`~cloud.worker.CaptionWorker` in the process
adds to them. The services also keep plain ``counters`` dicts of their own for tests and
``framecap demo``. Served over HTTP with :func:`serve` when a config sets ``metrics_port``.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Histogram, start_http_server

logger = logging.getLogger(__name__)

INGEST_FRAMES = Counter(
    "framecap_ingest_frames_total",
    "Frames handled by the ingest, by result (stored, duplicate, conflict, invalid).",
    ["result"],
)
INGEST_INVALID = Counter(
    "framecap_ingest_invalid_total",
    "Frames refused by the ingest, by reason.",
    ["reason"],
)
INGEST_S3_ERRORS = Counter(
    "framecap_ingest_s3_errors_total",
    "Failed S3 calls of the ingest (each retried).",
)
WORKER_FRAMES = Counter(
    "framecap_worker_frames_total",
    "Frames handled by the caption worker, by result (captioned, error, skipped).",
    ["result"],
)
WORKER_BATCH_SECONDS = Histogram(
    "framecap_worker_batch_seconds",
    "Seconds to caption one batch (model only).",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)
WORKER_LISTING_SECONDS = Histogram(
    "framecap_worker_listing_seconds",
    "Seconds of one listing pass of frames/ against captions/, by kind (full, recent, "
    "recent-uncursored); a periodic (recent) pass costs what is new, a full pass what exists.",
    ["kind"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
)
WORKER_LISTING_REQUESTS = Counter(
    "framecap_worker_listing_requests_total",
    "ListObjectsV2 requests of the worker's listing passes, by kind.",
    ["kind"],
)
WORKER_S3_ERRORS = Counter(
    "framecap_worker_s3_errors_total",
    "Failed S3 calls of the caption worker (each retried).",
)


def serve(port: int) -> None:
    """Serve ``/metrics`` on 0.0.0.0:``port`` from a daemon thread.

    Raises:
        OSError: the port cannot be bound.
    """
    start_http_server(port)
    logger.info("prometheus metrics on port %d", port)
