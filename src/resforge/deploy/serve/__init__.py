"""`resforge serve`: a Predictor behind HTTP, with dynamic micro-batching, limits, metrics and a page.

FastAPI on uvicorn. A request's images are decoded and preprocessed in a thread pool; the prepared
images wait in a bounded queue; one batcher task takes up to `max_batch` of them as soon as the
batch is full or the oldest has waited `max_wait_ms`, and runs the model in a thread of its own, so
the event loop goes on accepting and decoding while the model runs. A full queue answers 503 at
once and a request whose deadline passed before its turn 504: nothing waits or grows without bound.

The package by concern: `options` (ServeOptions, the flags), `batcher` (the queue and its batches),
`metrics` (Prometheus, the counting middleware), `gate` (API key, body size), `http` (errors and JSON
answers below the app), `app` (create_app: loading, routes), `connections` (what uvicorn lacks at the
level of connections) and `server` (uvicorn_server, serve: the process).
"""

from .app import create_app
from .options import ServeOptions
from .server import serve, uvicorn_server

__all__ = ["ServeOptions", "create_app", "serve", "uvicorn_server"]
