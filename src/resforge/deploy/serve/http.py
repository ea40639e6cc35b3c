"""The server's HTTP vocabulary below the app: an answer other than 200, a body over the limit, the ASGI
callable's type and a JSON answer sent straight from a middleware."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

CLIENT_GONE = 499  # nginx's status for a client that closed its connection before the answer


class BodyTooLarge(Exception):
    """A request body past --max-bytes, found while it arrives (its length was not declared, or was wrong)."""


class HttpError(Exception):
    """An answer other than 200, with its message and headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


Asgi = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


async def send_json(send: Callable[[dict], Awaitable[None]], status: int, body: dict[str, Any],
                    headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})

