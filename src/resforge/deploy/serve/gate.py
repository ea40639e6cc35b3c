"""The gate in front of every route: the API key and the request body's size limit."""

from __future__ import annotations

import base64
import binascii
import contextlib
import secrets
from collections.abc import Callable

from .http import Asgi, BodyTooLarge, send_json
from .options import ServeOptions


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
            return await send_json(send, 401, {"error": "this server needs an API key: send it as X-API-Key, "
                                                         "a Bearer token or a Basic password"},
                                    {"www-authenticate": 'Basic realm="resforge"'})
        limit = self.options.max_bytes
        declared = headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            return await send_json(send, 413, {"error": f"the request body is {int(declared):,} bytes, over the "
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

