"""The process of `resforge serve`: uvicorn with what `connections.py` adds, the socket bound and every
check that can fail made before the model loads, and a drained exit on SIGINT or SIGTERM."""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
from typing import Any

import uvicorn
from fastapi import FastAPI

from ...errors import ConfigError
from ...runtime.build import backend_device, check_backend
from ...runtime.source import open_source
from ...tasks.detect_infer import check_detector_precision, detector_backend
from .app import create_app
from .connections import ACCEPT_BACKLOG, Server, connection_cap, guarded_protocol
from .options import API_KEY_ENV, ServeOptions

log = logging.getLogger("resforge")

GRACE_S = 5  # beyond --timeout: for a request's headers to arrive, and for the shutdown's last answers


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
    if source.info.task == "detect":
        detector_backend(source, options.backend)
        check_detector_precision(options.precision)
    elif options.backend != "auto":
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
