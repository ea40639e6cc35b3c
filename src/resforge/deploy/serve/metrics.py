"""The server's Prometheus metrics, and the outermost middleware that counts every request."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .http import Asgi, send_json

# the values a request's method may add to the metrics' labels; any other is counted as "other"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (several apps in one process stay apart)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("resforge_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("resforge_request_seconds", "time from request to answer", ["route", "status"],
                                 registry=r,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.queue_seconds = Histogram("resforge_queue_seconds", "time an image waited for its batch", registry=r,
                                       buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
        self.inference_seconds = Histogram("resforge_inference_seconds", "time the model took per batch",
                                           registry=r, buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
        self.batch_size = Histogram("resforge_batch_size", "images per batch", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.batches = Counter("resforge_batches", "batches by what sent them: full, the oldest waited "
                               "max-wait-ms (timeout), or no other request was arriving (idle)", ["trigger"],
                               registry=r)
        self.queue_depth = Gauge("resforge_queue_depth", "images waiting for a batch", registry=r)
        self.arriving = Gauge("resforge_arriving", "requests being read or decoded", registry=r)
        self.ood = Counter("resforge_ood_images", "images scored out of distribution against the model's profile",
                           registry=r)
        self.drift = Gauge("resforge_drift", "each drift signal of the recent window against the model's profile",
                           ["signal"], registry=r)
        self.drift_threshold = Gauge("resforge_drift_threshold", "the value over which a drift signal alarms",
                                     ["signal"], registry=r)
        self.drift_alarm = Gauge("resforge_drift_alarm", "1 while a drift signal is over its threshold", ["signal"],
                                 registry=r)

    def show_drift(self, signals: list[Any]) -> None:
        for s in signals:
            self.drift.labels(s.name).set(s.value)
            self.drift_threshold.labels(s.name).set(s.threshold)
            self.drift_alarm.labels(s.name).set(int(s.alarm))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class Metered:
    """The outermost ASGI middleware: every request counted by route, method and status, with labels from
    fixed sets (unknown routes and methods fold into one value each, so no request adds a series), and a
    request cancelled before its answer (a forced shutdown) answered 503 in JSON."""

    def __init__(self, app: Asgi, metrics: Metrics, routes: set[str]):
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]
        started = False

        async def counted_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                status[0], started = message["status"], True
            await send(message)

        try:
            await self.app(scope, receive, counted_send)
        except asyncio.CancelledError:
            if started:
                raise
            # the request's task ends here either way: its answer is its last act
            await send_json(counted_send, 503, {"error": "the server is shutting down"}, {"connection": "close"})
        finally:
            path = scope["path"] if scope["path"] in self.routes else "unmatched"
            method = scope["method"] if scope["method"] in METHODS else "other"
            self.metrics.requests.labels(path, method, str(status[0])).inc()
            self.metrics.latency.labels(path, str(status[0])).observe(time.perf_counter() - start)

