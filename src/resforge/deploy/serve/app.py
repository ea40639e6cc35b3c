"""The FastAPI app of `resforge serve`: the model loaded in the background, the routes, the answers to
every error, and the middleware around them (the gate inside CORS, the metrics outermost).

A request's images are read, admitted into the batcher's queue (all or none, 503 when full), decoded
and preprocessed in a thread pool, and answered once their batch has run; a deadline that passes on
the way is a 408 (the request arrived too slowly) or a 504. What a model answers follows its task
(`service.py`): classes, objects, or a class map.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from ... import __version__
from ...errors import ImageError
from ...runtime.drift import Monitor, Signal
from ...runtime.predictor import Predictor
from .batcher import Batcher, DeadlineExceeded, QueueFull, ShuttingDown
from .connections import NO_LINGER, RETRY_AFTER_S
from .gate import Gate
from .http import CLIENT_GONE, BodyTooLarge, HttpError
from .metrics import Metered, Metrics
from .options import ServeOptions
from .service import Query, Segmenter, Service, load_service, service_of

log = logging.getLogger("resforge")

# how each reason an image cannot be read is answered
CHECK_EVERY = 50  # images between two judgements of the drift, for the log
IMAGE_STATUS = {"too many pixels": 413, "too elongated": 413, "not an image": 415, "corrupt": 400, "empty": 400,
                "missing": 400}


class State:
    """What the routes share: the model once loaded, the batcher, the decoding threads."""

    def __init__(self, options: ServeOptions, metrics: Metrics):
        self.options, self.metrics = options, metrics
        self.service: Service | None = None
        self.batcher: Batcher | None = None
        self.decoders = ThreadPoolExecutor(options.workers, thread_name_prefix="resforge-decode")
        self.failed: str | None = None

    def ready(self) -> Service:
        if self.service is None or self.batcher is None:
            raise HttpError(503, self.failed or "the model is loading", {"retry-after": str(RETRY_AFTER_S)})
        return self.service


def create_app(model: str | os.PathLike | Predictor | Service, options: ServeOptions | None = None,
               metadata: dict[str, Any] | None = None, on_failure: Callable[[], None] | None = None) -> FastAPI:
    """The FastAPI app serving `model`: a classifier, detector or segmenter (a run directory or model file), or a
    loaded Predictor or Service. A path is loaded in the background when the app starts: /health answers at
    once, /ready once it is warm; `on_failure` is called when loading fails (the server stops)."""
    options = options or ServeOptions()
    options.check()
    metrics = Metrics()
    state = State(options, metrics)
    app = FastAPI(title="resforge serve", lifespan=_lifespan(state, model, metadata, on_failure), version=__version__,
                  docs_url="/docs" if options.docs else None, redoc_url=None)
    app.state.resforge = state
    _answer_errors(app, options)
    _add_info_routes(app, state)
    _add_predict_route(app, state)
    app.add_middleware(Gate, options=options)  # the last added is the outermost
    if options.cors:
        app.add_middleware(CORSMiddleware, allow_origins=options.cors, allow_methods=["GET", "POST"],
                           allow_headers=["*"])
    app.add_middleware(Metered, metrics=metrics, routes={r.path for r in app.routes})
    return app


def _load(model: str | os.PathLike | Predictor | Service, options: ServeOptions, metadata: dict[str, Any] | None
          ) -> Service:
    if isinstance(model, Service):
        service = model
    elif isinstance(model, Predictor):
        service = service_of(model)
    else:
        service = load_service(model, options.backend, options.device, options.precision, options.max_batch,
                               metadata)
    service.limit(options.max_pixels, options.max_aspect)
    service.warm_up(options.max_batch)
    if options.monitor:
        service.watch(options.window, options.decay)
        if service.monitor is None and service.task == "classify":
            log.info("not monitored: the model has no profile (resforge monitor MODEL --profile DATA makes one)")
    return service


def _lifespan(state: State, model: str | os.PathLike | Predictor | Service, metadata: dict[str, Any] | None,
              on_failure: Callable[[], None] | None) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager]:
    """Loading in the background at the start; at the end, what was queued answered before the server exits."""
    options = state.options

    async def start() -> None:
        try:
            service = await asyncio.get_running_loop().run_in_executor(None, _load, model, options, metadata)
        except Exception as e:  # noqa: BLE001 - any failure to load is the answer of /ready and the exit message
            state.failed = f"the model could not be loaded: {e}"
            if on_failure is not None:
                on_failure()
            return
        state.batcher = Batcher(service.run, options.max_batch, options.max_wait_ms, options.queue, state.metrics)
        state.batcher.start()
        state.service = service
        log.info("ready: %s", service.describe())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.create_task(start())
        yield
        if not loading.done():
            loading.cancel()
        if state.batcher is not None:
            await state.batcher.close()  # what was queued is answered before the server exits
        state.decoders.shutdown(wait=False)

    return lifespan


def _answer_errors(app: FastAPI, options: ServeOptions) -> None:
    """Every refusal as {"error": message} JSON with its status, whoever raised it."""

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


def _add_info_routes(app: FastAPI, state: State) -> None:
    """The page, liveness, readiness, the model's metadata and the Prometheus metrics."""
    options = state.options

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
        """The model's task, classes, preprocessing, accepted formats and architecture, the backend it runs on,
        and the server's limits: names, never a path of this machine."""
        service = state.ready()
        record = service.info.to_dict()
        return {"name": service.info.name, "task": service.task, "classes": service.classes,
                "preprocess": record["preprocess"],
                "input": record["input"], "formats": record["formats"], "model": _named(record["arch"]),
                "metrics": {k: v for k, v in record["metrics"].items() if isinstance(v, (int, float))},
                "backend": service.backend, "precision": service.precision,
                "batching": {"max_batch": options.max_batch, "max_wait_ms": options.max_wait_ms,
                             "queue": options.queue},
                "limits": {"max_bytes": options.max_bytes, "max_images": options.max_images,
                           "max_pixels": options.max_pixels, "max_aspect": options.max_aspect,
                           "max_connections": options.max_connections, "timeout_s": options.timeout}}

    @app.get("/v1/monitor")
    async def monitor() -> dict[str, Any]:
        """The recent window of images against the model's profile: each drift signal with its threshold, the
        alarms, the distributions side by side, the images flagged out of distribution."""
        service = state.ready()
        if service.monitor is None:
            raise HttpError(404, "this server watches no drift: " + (
                "monitoring is off (--no-monitor)" if not options.monitor else
                "the model has no profile (resforge monitor MODEL --profile DATA makes one)"
                if service.task == "classify" else f"drift is watched for classifiers, not a {service.task} model"))
        status = await asyncio.to_thread(service.monitor.status)  # thresholds may be simulated: off the loop
        state.metrics.show_drift([Signal(**d) for d in status["signals"]])
        return status

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        if state.service is not None and state.service.monitor is not None:  # judged when asked, not per request
            state.metrics.show_drift(await asyncio.to_thread(state.service.monitor.signals))
        body, kind = state.metrics.render()
        return Response(body, media_type=kind)


def _add_predict_route(app: FastAPI, state: State) -> None:
    options = state.options

    @app.post("/v1/predict", openapi_extra=_PREDICT_BODY)
    async def predict(request: Request, topk: int | None = None, conf: float | None = None,
                      timeout: float | None = None) -> Response:
        """One image (the raw body) or several (multipart files), with timings in ms: a classifier answers the
        top-k classes of each (`topk`, 5), a detector the objects scoring at least `conf` (0.25), a segmenter
        its class map (a palette PNG, base64, and each class's share of the pixels; the PNG alone when the
        request accepts only image/png and sends one image)."""
        began = time.monotonic()
        service = state.ready()
        query = Query(service.task, topk, conf)
        if timeout is not None and not timeout > 0:
            raise HttpError(422, f"timeout must be a positive number of seconds, got {timeout:g}")
        png_only = request.headers.get("accept", "").strip().lower() == "image/png"
        if png_only and not isinstance(service, Segmenter):
            raise HttpError(406, f"a {service.task} model answers JSON, not image/png")
        deadline = began + min(timeout or options.timeout, options.timeout)
        images, prepared, futures = await _queue(state, service, request, deadline)
        results = await asyncio.gather(*futures, return_exceptions=True)  # every outcome retrieved
        if any(isinstance(r, DeadlineExceeded) for r in results):
            raise HttpError(504, "the deadline passed before the images reached the model")
        if failed := next((r for r in results if isinstance(r, BaseException)), None):
            raise HttpError(500, f"the model failed on this batch: {failed}")
        if png_only:
            if len(results) != 1:
                raise HttpError(406, f"image/png answers one image; this request sent {len(results)}")
            return Response(service.png(results[0][0]), media_type="image/png")
        outputs = [result for result, _ in results]
        ood = _watch(state, service, [seen for _, _, seen in prepared], outputs)
        predictions = [{"name": name, **service.answer(result, query), **({"ood": ood[i]} if ood else {}),
                        "timings_ms": {"preprocess": decode_ms, **timings}}
                       for i, ((name, _), (_, decode_ms, _), (result, timings)) in enumerate(zip(images, prepared,
                                                                                                 results))]
        return JSONResponse({"model": service.info.name, "task": service.task, "backend": service.backend,
                             "predictions": predictions, "timings_ms": {"total": 1000 * (time.monotonic() - began)}})


def _watch(state: State, service: Service, stats: list[Any], outputs: list[Any]) -> list[dict[str, Any]]:
    """The monitor's verdict on a request's images; an alarm raised or cleared is logged (judged every
    CHECK_EVERY images, not per request)."""
    monitor = service.monitor
    if monitor is None:
        return []
    before = monitor.seen
    ood = service.observe(stats, outputs)
    state.metrics.ood.inc(sum(o["flagged"] for o in ood))
    if monitor.seen // CHECK_EVERY != before // CHECK_EVERY:
        asyncio.get_running_loop().run_in_executor(None, _log_changes, monitor)  # not waited for
    return ood


def _log_changes(monitor: Monitor) -> None:
    for signal, raised in monitor.changes():
        (log.warning if raised else log.info)("drift %s", signal.describe() if raised else
                                             f"{signal.name} is back under its threshold")


async def _queue(state: State, service: Service, request: Request, deadline: float
                 ) -> tuple[list[tuple[str, bytes]], list[tuple[torch.Tensor, float, Any]], list[asyncio.Future]]:
    """A request's images read, admitted, decoded and queued for the batcher: (name, bytes) of each, (prepared
    image, milliseconds decoding it, its statistics for the monitor) of each, and the futures of their answers."""
    options, batcher = state.options, state.batcher
    with batcher.arrival():
        try:
            images = await asyncio.wait_for(_read_images(request, options), deadline - time.monotonic())
        except asyncio.TimeoutError:
            request.scope[NO_LINGER] = True  # a client this slow is not waited for any longer
            raise HttpError(408, "the request did not arrive in full before its deadline (?timeout= or "
                                 "--timeout)", {"connection": "close"}) from None
        try:
            with batcher.admission(len(images)):
                loop = asyncio.get_running_loop()
                prepared = await asyncio.gather(*(loop.run_in_executor(state.decoders, _prepare, service, data,
                                                                       name) for name, data in images))
                if time.monotonic() >= deadline:
                    raise HttpError(504, "the deadline passed while the images were decoded")
                return images, prepared, batcher.submit([x for x, _, _ in prepared], deadline)
        except QueueFull:
            raise HttpError(503, f"the queue is full ({options.queue} images waiting or being decoded): try "
                                 "again shortly", {"retry-after": str(RETRY_AFTER_S)}) from None
        except ShuttingDown:
            raise HttpError(503, "the server is shutting down", {"retry-after": str(RETRY_AFTER_S)}) from None


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


def _prepare(service: Service, data: bytes, name: str) -> tuple[torch.Tensor, float, Any]:
    start = time.perf_counter()
    try:
        x, seen = service.prepare_seen(data, name)
    except ImageError as e:
        raise HttpError(IMAGE_STATUS[e.reason], str(e)) from None
    return x, 1000 * (time.perf_counter() - start), seen

