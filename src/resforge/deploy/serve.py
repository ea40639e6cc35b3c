"""`resforge serve`: a Predictor behind HTTP, with dynamic micro-batching, limits, metrics and a page.

FastAPI on uvicorn. A request's images are decoded and preprocessed in a thread pool; the prepared
images wait in a bounded queue; one batcher task takes up to `max_batch` of them as soon as the
batch is full or the oldest has waited `max_wait_ms`, and runs the model in a thread of its own, so
the event loop goes on accepting and decoding while the model runs. A full queue answers 503 at
once and a request whose deadline passed before its turn 504: nothing waits or grows without bound.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ipaddress
import json
import logging
import math
import os
import secrets
import signal
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from .. import __version__
from ..device import cpu_cores
from ..errors import ConfigError, ImageError
from ..options import check_fields, option
from .connections import ACCEPT_BACKLOG, NO_LINGER, RETRY_AFTER_S, Server, connection_cap, guarded_protocol
from ..runtime.predictor import Predictor, backend_device, check_backend, open_source, sample_batch

log = logging.getLogger("resforge")

API_KEY_ENV = "RESFORGE_API_KEY"
# how each reason an image cannot be read is answered
IMAGE_STATUS = {"too many pixels": 413, "too elongated": 413, "not an image": 415, "corrupt": 400, "empty": 400,
                "missing": 400}
GRACE_S = 5  # beyond --timeout: for a request's headers to arrive, and for the shutdown's last answers
# the values a request's method may add to the metrics' labels; any other is counted as "other"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
CLIENT_GONE = 499  # nginx's status for a client that closed its connection before the answer


@dataclass
class ServeOptions:
    """How `resforge serve` listens, batches and limits (its flags are generated from these fields)."""
    host: str = option("127.0.0.1", "address to bind (any other needs --api-key)")
    port: int = option(8000, "port (0: a free port, logged)", ge=0, le=65535)
    backend: str = "auto"  # backend, precision, device: the flags every command that runs a model has
    precision: str = "auto"
    device: str = "auto"
    max_batch: int = option(16, "images per batch", ge=1, group="batching")
    max_wait_ms: float = option(5.0, "how long the oldest image waits for a fuller batch", ge=0, group="batching")
    queue: int = option(64, "images waiting, at most", ge=1, group="batching")
    workers: int = option(help="threads decoding images (default: the CPU cores)", factory=cpu_cores, ge=1,
                          group="batching")
    timeout: float = option(30.0, "seconds a request may take, unless it asks for less", gt=0, group="batching")
    max_bytes: int = option(20_000_000, "request body size", ge=1, group="limits and access")
    max_images: int = option(16, "images per request", ge=1, group="limits and access")
    max_pixels: int = option(50_000_000, "pixels an image may declare (read from its header, before decoding)",
                             ge=1, group="limits and access")
    max_aspect: float = option(20.0, "an image's long side over its short side, at most (read from its header, "
                                     "before decoding)", ge=1, group="limits and access")
    max_connections: int = option(512, "connections open at once; fewer where ulimit -n leaves room for fewer",
                                  ge=1, group="limits and access")
    api_key: str | None = option(None, f"required by every route but /health (default: ${API_KEY_ENV}); needed to "
                                       "bind anything but loopback", group="limits and access")
    cors: list[str] = option([], "allow browser calls from this origin (repeatable; default: none)", action="append",
                             metavar="ORIGIN", group="limits and access")
    docs: bool = option(False, "Swagger UI at /docs (the browser loads it from a CDN; /openapi.json is always "
                               "served)", group="limits and access")

    def check(self) -> None:
        check_fields(self, lambda name: "--" + name.replace("_", "-"))
        if self.max_images > self.queue:
            raise ConfigError(f"--max-images ({self.max_images}) must not exceed --queue ({self.queue}): such a "
                              "request could never be queued")
        if not is_loopback(self.host) and not self.api_key:
            raise ConfigError(f"binding {self.host} exposes the server beyond this machine: give --api-key (or set "
                              f"{API_KEY_ENV}), or bind 127.0.0.1")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- the batcher -----------------------------------------------------------------------------------

class QueueFull(Exception):
    """No room in the queue for a request's images."""


class DeadlineExceeded(Exception):
    """A request's deadline passed before its images reached the model."""


class ShuttingDown(Exception):
    """The server is draining its queue and takes no new work."""


@dataclass
class Item:
    x: torch.Tensor
    deadline: float
    enqueued: float
    future: asyncio.Future


class Batcher:
    """A bounded queue of prepared images and the task that runs them through the model in batches."""

    def __init__(self, run: Callable[[torch.Tensor], torch.Tensor], max_batch: int, max_wait_ms: float,
                 capacity: int, metrics: Metrics):
        self.run, self.max_batch, self.max_wait, self.capacity = run, max_batch, max_wait_ms / 1000, capacity
        self.metrics = metrics
        self.pending: deque[Item] = deque()
        self.wakeup = asyncio.Event()
        self.closing = False
        self.arriving = 0  # requests being read and decoded: the only ones that could still join a batch
        self.reserved = 0  # images admitted and being decoded: they count against the capacity too
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="resforge-model")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    @contextlib.contextmanager
    def arrival(self):
        """Around a request's reading and decoding: while none is under way, nothing waits for a fuller batch."""
        self.arriving += 1
        self.metrics.arriving.set(self.arriving)
        try:
            yield
        finally:
            self.arriving -= 1
            self.metrics.arriving.set(self.arriving)
            self.wakeup.set()

    @contextlib.contextmanager
    def admission(self, count: int):
        """Room for a request's images, all or none, held while they are decoded: raises QueueFull at once
        when the queue and what is being decoded leave too little, so an overloaded server refuses before
        it spends anything on the request."""
        if self.closing:
            raise ShuttingDown
        if len(self.pending) + self.reserved + count > self.capacity:
            raise QueueFull
        self.reserved += count
        try:
            yield
        finally:
            self.reserved -= count

    def submit(self, xs: list[torch.Tensor], deadline: float) -> list[asyncio.Future]:
        """Queue a request's decoded images (within the room `admission` held for them)."""
        if self.closing:
            raise ShuttingDown
        loop, now = asyncio.get_running_loop(), time.monotonic()
        items = [Item(x, deadline, now, loop.create_future()) for x in xs]
        self.pending.extend(items)
        self.metrics.queue_depth.set(len(self.pending))
        self.wakeup.set()
        return [item.future for item in items]

    async def close(self) -> None:
        """Take no new work, run what is queued, then stop."""
        self.closing = True
        self.wakeup.set()
        if self.task is not None:
            await self.task
        self.model_thread.shutdown(wait=True)

    async def _loop(self) -> None:
        while True:
            if not self.pending:
                if self.closing:
                    return
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            wait = self.pending[0].enqueued + self.max_wait - time.monotonic()
            full = len(self.pending) >= self.max_batch
            if not full and wait > 0 and self.arriving and not self.closing:
                self.wakeup.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.wakeup.wait(), wait)
                continue
            batch = self._take()
            if batch:
                await self._compute(batch, "full" if full else "timeout" if wait <= 0 else "idle")

    def _take(self) -> list[Item]:
        """Up to max_batch queued images of one shape, in order; the expired are answered, the abandoned dropped."""
        now, batch, rest = time.monotonic(), [], deque()
        while self.pending:
            item = self.pending.popleft()
            if item.future.done():  # the client went away
                continue
            if item.deadline <= now:
                item.future.set_exception(DeadlineExceeded())
                continue
            if len(batch) < self.max_batch and (not batch or item.x.shape == batch[0].x.shape):
                batch.append(item)
            else:
                rest.append(item)
        self.pending = rest
        self.metrics.queue_depth.set(len(self.pending))
        return batch

    async def _compute(self, batch: list[Item], trigger: str) -> None:
        start = time.monotonic()
        for item in batch:
            self.metrics.queue_seconds.observe(start - item.enqueued)
        self.metrics.batch_size.observe(len(batch))
        self.metrics.batches.labels(trigger).inc()
        x = torch.stack([item.x for item in batch])
        try:
            probs = await asyncio.get_running_loop().run_in_executor(
                self.model_thread, lambda: self.run(x).softmax(-1))
        except Exception as e:  # a model failure is every waiting request's 500, not the batcher's end
            log.exception("inference failed on a batch of %d", len(batch))
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(e)
            return
        seconds = time.monotonic() - start
        self.metrics.inference_seconds.observe(seconds)
        for item, p in zip(batch, probs):
            if not item.future.done():
                item.future.set_result((p, {"queue": 1000 * (start - item.enqueued), "inference": 1000 * seconds,
                                            "batch": len(batch)}))


# -- metrics ---------------------------------------------------------------------------------------

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

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# -- the HTTP layer --------------------------------------------------------------------------------

class BodyTooLarge(Exception):
    pass


class HttpError(Exception):
    """An answer other than 200, with its message and headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


Asgi = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


async def _send_json(send: Callable[[dict], Awaitable[None]], status: int, body: dict[str, Any],
                     headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


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
            await _send_json(counted_send, 503, {"error": "the server is shutting down"}, {"connection": "close"})
        finally:
            path = scope["path"] if scope["path"] in self.routes else "unmatched"
            method = scope["method"] if scope["method"] in METHODS else "other"
            self.metrics.requests.labels(path, method, str(status[0])).inc()
            self.metrics.latency.labels(path, str(status[0])).observe(time.perf_counter() - start)


class Gate:
    """ASGI middleware in front of every route, inside CORS (so a preflight needs no key and a refusal
    carries the CORS headers a browser needs to read it): the API key and the body-size limit."""

    def __init__(self, app: Asgi, options: ServeOptions):
        self.app, self.options = app, options

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        key = self.options.api_key
        if key and scope["path"] != "/health" and not _key_matches(headers, key):
            return await _send_json(send, 401, {"error": "this server needs an API key: send it as X-API-Key, "
                                                         "a Bearer token or a Basic password"},
                                    {"www-authenticate": 'Basic realm="resforge"'})
        limit = self.options.max_bytes
        declared = headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            return await _send_json(send, 413, {"error": f"the request body is {int(declared):,} bytes, over the "
                                                         f"limit of {limit:,} (--max-bytes)"},
                                    {"connection": "close"})
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise BodyTooLarge
            return message

        await self.app(scope, limited_receive, send)


def _key_matches(headers: dict[str, str], key: str) -> bool:
    given = headers.get("x-api-key", "")
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        given = value.strip()
    elif scheme.lower() == "basic":
        with contextlib.suppress(binascii.Error, UnicodeDecodeError):
            given = base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
    return secrets.compare_digest(given.encode(), key.encode())


class State:
    """What the routes share: the predictor once loaded, the batcher, the decoding threads."""

    def __init__(self, options: ServeOptions, metrics: Metrics):
        self.options, self.metrics = options, metrics
        self.predictor: Predictor | None = None
        self.batcher: Batcher | None = None
        self.decoders = ThreadPoolExecutor(options.workers, thread_name_prefix="resforge-decode")
        self.failed: str | None = None

    def ready(self) -> Predictor:
        if self.predictor is None or self.batcher is None:
            raise HttpError(503, self.failed or "the model is loading", {"retry-after": str(RETRY_AFTER_S)})
        return self.predictor


def warm_up(predictor: Predictor, max_batch: int) -> None:
    """The first calls of a backend allocate and plan; clients should not pay for them."""
    for n in (1, max_batch):
        for _ in range(2):
            predictor(sample_batch(predictor.info, n))


def create_app(model: str | os.PathLike | Predictor, options: ServeOptions | None = None,
               metadata: dict[str, Any] | None = None, on_failure: Callable[[], None] | None = None):
    """The FastAPI app serving `model` (anything `Predictor.load` takes, or a loaded Predictor). A path is
    loaded in the background when the app starts: /health answers at once, /ready once it is warm;
    `on_failure` is called when loading fails (the server stops)."""
    options = options or ServeOptions()
    options.check()
    metrics = Metrics()
    state = State(options, metrics)

    def load() -> Predictor:
        predictor = model if isinstance(model, Predictor) else Predictor.load(
            model, options.backend, options.device, options.precision, batch_size=options.max_batch,
            metadata=metadata)
        predictor.max_pixels, predictor.max_aspect = options.max_pixels, options.max_aspect
        warm_up(predictor, options.max_batch)
        return predictor

    async def start() -> None:
        try:
            predictor = await asyncio.get_running_loop().run_in_executor(None, load)
        except Exception as e:  # noqa: BLE001 - any failure to load is the answer of /ready and the exit message
            state.failed = f"the model could not be loaded: {e}"
            if on_failure is not None:
                on_failure()
            return
        state.batcher = Batcher(predictor, options.max_batch, options.max_wait_ms, options.queue, metrics)
        state.batcher.start()
        state.predictor = predictor
        log.info("ready: %s", predictor.describe())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.create_task(start())
        yield
        if not loading.done():
            loading.cancel()
        if state.batcher is not None:
            await state.batcher.close()  # what was queued is answered before the server exits
        state.decoders.shutdown(wait=False)

    app = FastAPI(title="resforge serve", lifespan=lifespan, version=__version__,
                  docs_url="/docs" if options.docs else None, redoc_url=None)
    app.state.resforge = state

    @app.exception_handler(HttpError)
    async def _http_error(request: Request, e: HttpError) -> JSONResponse:
        return JSONResponse({"error": e.message}, e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def _starlette_error(request: Request, e: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(e.detail)}, e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "query")
        return JSONResponse({"error": f"{where}: {first.get('msg')}"}, 422)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, e: BodyTooLarge) -> JSONResponse:
        return JSONResponse({"error": f"the request body is over the limit of {options.max_bytes:,} bytes "
                                      "(--max-bytes)"}, 413, headers={"connection": "close"})

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, e: ClientDisconnect) -> Response:
        log.info("%s %s: the client closed the connection before its request arrived in full (%d)",
                 request.method, request.url.path, CLIENT_GONE)
        return Response(status_code=CLIENT_GONE)  # counted; nobody is there to read it

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("resforge.deploy").joinpath("static/index.html").read_text())

    @app.head("/health", include_in_schema=False)  # what load balancers probe with
    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.head("/ready", include_in_schema=False)  # what load balancers probe with
    @app.get("/ready")
    async def ready() -> dict[str, str]:
        """Readiness: the model is loaded and warmed up (503 until then)."""
        state.ready()
        return {"status": "ready"}

    @app.get("/v1/metadata")
    async def model_metadata() -> dict[str, Any]:
        """The model's classes, preprocessing, accepted formats and architecture, the backend it runs on, and
        the server's limits: names, never a path of this machine."""
        predictor = state.ready()
        record = predictor.info.to_dict()
        return {"name": predictor.info.name, "classes": predictor.classes, "preprocess": record["preprocess"],
                "input": record["input"], "formats": record["formats"], "model": _named(record["arch"]),
                "metrics": {k: v for k, v in record["metrics"].items() if isinstance(v, (int, float))},
                "backend": predictor.backend, "precision": predictor.precision,
                "batching": {"max_batch": options.max_batch, "max_wait_ms": options.max_wait_ms,
                             "queue": options.queue},
                "limits": {"max_bytes": options.max_bytes, "max_images": options.max_images,
                           "max_pixels": options.max_pixels, "max_aspect": options.max_aspect,
                           "max_connections": options.max_connections, "timeout_s": options.timeout}}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        body, kind = metrics.render()
        return Response(body, media_type=kind)

    @app.post("/v1/predict", openapi_extra=_PREDICT_BODY)
    async def predict(request: Request, topk: int = 5, timeout: float | None = None) -> dict[str, Any]:
        """Top-k classes of one image (the raw body) or several (multipart files), with timings in ms."""
        began = time.monotonic()
        predictor = state.ready()
        if topk < 1:
            raise HttpError(422, f"topk must be at least 1, got {topk}")
        if timeout is not None and not timeout > 0:
            raise HttpError(422, f"timeout must be a positive number of seconds, got {timeout:g}")
        deadline = began + min(timeout or options.timeout, options.timeout)
        with state.batcher.arrival():
            try:
                images = await asyncio.wait_for(_read_images(request, options), deadline - time.monotonic())
            except asyncio.TimeoutError:
                request.scope[NO_LINGER] = True  # a client this slow is not waited for any longer
                raise HttpError(408, "the request did not arrive in full before its deadline (?timeout= or "
                                     "--timeout)", {"connection": "close"}) from None
            try:
                with state.batcher.admission(len(images)):
                    loop = asyncio.get_running_loop()
                    prepared = await asyncio.gather(*(loop.run_in_executor(state.decoders, _prepare, predictor,
                                                                           data, name) for name, data in images))
                    if time.monotonic() >= deadline:
                        raise HttpError(504, "the deadline passed while the images were decoded")
                    futures = state.batcher.submit([x for x, _ in prepared], deadline)
            except QueueFull:
                raise HttpError(503, f"the queue is full ({options.queue} images waiting or being decoded): try "
                                     "again shortly", {"retry-after": str(RETRY_AFTER_S)}) from None
            except ShuttingDown:
                raise HttpError(503, "the server is shutting down", {"retry-after": str(RETRY_AFTER_S)}) from None
        results = await asyncio.gather(*futures, return_exceptions=True)  # every outcome retrieved
        if any(isinstance(r, DeadlineExceeded) for r in results):
            raise HttpError(504, "the deadline passed before the images reached the model")
        if failed := next((r for r in results if isinstance(r, BaseException)), None):
            raise HttpError(500, f"the model failed on this batch: {failed}")
        k = min(topk, len(predictor.classes))
        predictions = []
        for (name, _), (_, decode_ms), (probs, timings) in zip(images, prepared, results):
            top = probs.topk(k)
            predictions.append({"name": name, "top": [{"class": predictor.classes[c], "prob": p}
                                                      for p, c in zip(top.values.tolist(), top.indices.tolist())],
                                "timings_ms": {"preprocess": decode_ms, **timings}})
        return {"model": predictor.info.name, "backend": predictor.backend, "predictions": predictions,
                "timings_ms": {"total": 1000 * (time.monotonic() - began)}}

    app.add_middleware(Gate, options=options)  # the last added is the outermost
    if options.cors:
        app.add_middleware(CORSMiddleware, allow_origins=options.cors, allow_methods=["GET", "POST"],
                           allow_headers=["*"])
    app.add_middleware(Metered, metrics=metrics, routes={r.path for r in app.routes})
    return app


def _named(model: dict[str, Any] | None) -> dict[str, Any] | None:
    """A model record's architecture with its ensemble members named, not located: a run by its folder's
    name, a model file by its folder's and its own."""
    if not model or "members" not in model:
        return model

    def name(source: Any) -> str:
        p = Path(str(source))
        return "/".join(p.parts[-2:] if p.suffix else p.parts[-1:])

    return {**model, "members": [{**m, "source": name(m.get("source", ""))} for m in model["members"]]}


_PREDICT_BODY = {"requestBody": {"content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


async def _read_images(request: Request, options: ServeOptions) -> list[tuple[str, bytes]]:
    """(name, bytes) of each uploaded image: the files of a multipart form, or the whole body."""
    if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        form = await request.form(max_files=10_000, max_fields=1_000)  # the body's size bounds them
        files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not files:
            raise HttpError(400, "the form holds no file: send images as file fields")
        if len(files) > options.max_images:
            raise HttpError(413, f"{len(files)} images in one request, over the limit of {options.max_images} "
                                 "(--max-images)")
        return [(f.filename or f"image {i}", await f.read()) for i, f in enumerate(files)]
    body = await request.body()
    if not body:
        raise HttpError(400, "the request has no body: send an image, or images as multipart file fields")
    return [("image", body)]


def _prepare(predictor: Predictor, data: bytes, name: str) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    try:
        x = predictor.prepare(data, name)
    except ImageError as e:
        raise HttpError(IMAGE_STATUS[e.reason], str(e)) from None
    return x, 1000 * (time.perf_counter() - start)


def uvicorn_server(app: FastAPI) -> Server:
    """uvicorn for an app of `create_app`, with what connections.py adds: the connection cap, each request's
    time to arrive (--timeout and GRACE_S for its headers), lingering close, a second SIGTERM."""
    options: ServeOptions = app.state.resforge.options
    protocol = guarded_protocol(options.max_connections, options.timeout + GRACE_S)
    return Server(uvicorn.Config(app, log_level="warning", http=protocol, backlog=ACCEPT_BACKLOG,
                                 timeout_graceful_shutdown=math.ceil(options.timeout) + GRACE_S))


def serve(model: str | os.PathLike, options: ServeOptions | None = None, metadata: dict[str, Any] | None = None
          ) -> None:
    """Serve `model` until SIGINT or SIGTERM: uvicorn stops accepting, the queued work is answered, and this
    returns (a second signal ends the wait: what is left is answered 503). Port 0 takes a free port; the
    address is logged once the socket listens, after every check that can fail before loading."""
    options = options or ServeOptions()
    if options.api_key is None:
        options.api_key = os.environ.get(API_KEY_ENV) or None
    options.check()
    source = open_source(model, metadata)  # a bad path or file is a clear error before anything listens
    device = backend_device(options.backend, options.device)
    if options.backend != "auto":
        check_backend(source, options.backend, device, options.precision)
    cap = connection_cap(options.max_connections)
    if cap < options.max_connections:
        log.warning("at most %d connections at once: the descriptor limit (ulimit -n) leaves room for no more", cap)
        options.max_connections = cap
    family = socket.AF_INET6 if ":" in options.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((options.host, options.port))
        sock.listen(ACCEPT_BACKLOG)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {options.host}:{options.port}: {e.strerror}") from None
    server: Server | None = None

    def stop() -> None:
        server.should_exit = True

    app = create_app(model, options, metadata, on_failure=stop)
    server = uvicorn_server(app)
    host = f"[{options.host}]" if family == socket.AF_INET6 else options.host
    log.info("serving %s on http://%s:%d (the page at /, the API at /v1/predict%s)", model, host,
             sock.getsockname()[1], ", its docs at /docs" if options.docs else "")
    # uvicorn catches SIGINT/SIGTERM to shut down gracefully and re-raises them once done; what it re-raises
    # reaches these no-ops, so a drained server exits 0 (an uncaught SIGTERM would kill the process)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if app.state.resforge.failed:
        raise ConfigError(app.state.resforge.failed)
