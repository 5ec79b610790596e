"""Prometheus metrics of ``framecap web`` (served at ``/metrics``, no login).

Each :class:`WebMetrics` owns its own :class:`~prometheus_client.CollectorRegistry`, so tests
that build many apps never collide ("Duplicated timeseries"). The feed, the alerts and the API
of one process share one instance (``WebContext.metrics``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from cloud.web.model import CaptionDoc

logger = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST
"""Content type of :meth:`WebMetrics.render`."""

SEARCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class WebMetrics:
    """The process's counters, gauges and histograms (names prefixed ``framecap_web_``).

    Attributes:
        captions_indexed: captions written to the index (new or replaced), counter.
        index_lag: seconds from the newest indexed caption's ``captured_at`` to when it was
            indexed, gauge (how far behind the cameras the index is).
        invalid_captions: caption records skipped at indexing (JSON that does not parse),
            counter by ``source`` (``mqtt`` / ``s3``).
        searches: searches run, counter by ``kind`` (``api``, ``page``, ``export``, ``alert``).
        search_latency: seconds per search in the index, histogram by ``kind``.
        alerts_sent / alerts_failed: alert deliveries, counters by ``channel``
            (``mqtt`` / ``webhook``).
        live_clients: server-sent-events clients connected, gauge.
        live_dropped: live captions dropped for slow clients since start, gauge (set from
            :attr:`cloud.web.live.LiveHub.dropped` at each scrape).
        up: 1 if the feed's ``part`` (``mqtt`` / ``s3``) is connected, gauge.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.captions_indexed = Counter("framecap_web_captions_indexed", "Captions written to the index.",
                                        registry=r)
        self.index_lag = Gauge("framecap_web_index_lag_seconds",
                               "Seconds from the newest indexed caption's capture to its indexing.",
                               registry=r)
        self.invalid_captions = Counter("framecap_web_invalid_captions",
                                        "Caption records skipped at indexing because they do not parse.",
                                        ["source"], registry=r)
        self.searches = Counter("framecap_web_searches", "Searches run.", ["kind"], registry=r)
        self.search_latency = Histogram("framecap_web_search_seconds", "Seconds per index search.",
                                        ["kind"], buckets=SEARCH_BUCKETS, registry=r)
        self.alerts_sent = Counter("framecap_web_alerts_sent", "Alerts delivered.", ["channel"], registry=r)
        self.alerts_failed = Counter("framecap_web_alerts_failed", "Alert deliveries that failed.",
                                     ["channel"], registry=r)
        self.live_clients = Gauge("framecap_web_live_clients", "Live (SSE) clients connected.",
                                  registry=r)
        self.live_dropped = Gauge("framecap_web_live_dropped",
                                  "Live captions dropped since start because a client was slow.",
                                  registry=r)
        self.up = Gauge("framecap_web_feed_up", "1 if the feed's part is connected.", ["part"],
                        registry=r)
        for channel in ("mqtt", "webhook"):  # show zeroes before the first alert
            self.alerts_sent.labels(channel)
            self.alerts_failed.labels(channel)
        for source in ("mqtt", "s3"):
            self.invalid_captions.labels(source)

    def observe_indexed(self, docs: Sequence[CaptionDoc], now: datetime | None = None) -> None:
        """Count ``docs`` as indexed and set the index lag from the newest of them."""
        if not docs:
            return
        self.captions_indexed.inc(len(docs))
        newest = max(d.captured_at for d in docs)
        now = now or datetime.now(timezone.utc)
        self.index_lag.set(max(0.0, (now - newest).total_seconds()))

    def time_search(self, kind: str) -> _SearchTimer:
        """``with metrics.time_search("api"): index.search(...)``: counts and times it."""
        return _SearchTimer(self, kind)

    def render(self, before: Callable[[], None] | None = None) -> bytes:
        """The exposition text of every metric (``before`` updates gauges first)."""
        if before is not None:
            try:
                before()
            except Exception:  # noqa: BLE001 - a scrape must never fail on a gauge
                logger.exception("updating gauges before a /metrics scrape failed")
        return generate_latest(self.registry)


class _SearchTimer:
    def __init__(self, metrics: WebMetrics, kind: str) -> None:
        self.metrics = metrics
        self.kind = kind
        self.started = 0.0

    def __enter__(self) -> _SearchTimer:
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.metrics.searches.labels(self.kind).inc()
        self.metrics.search_latency.labels(self.kind).observe(time.perf_counter() - self.started)
