"""What `resforge serve` adds to uvicorn at the level of connections, where an ASGI app cannot act.

uvicorn's h11 protocol waits for a request's headers without a deadline, accepts connections until the
process has no file descriptor left (its `limit_concurrency` answers 503 once a request's headers have
arrived: it bounds requests, not descriptors), and closes a connection as soon as it has answered,
even while the client is still sending the body (a client that sends its whole body before reading,
as Python's urllib and requests do, then reads a reset instead of the answer); asyncio logs every
failed accept with a traceback. Here:

  - open connections are capped: one over the cap is answered 503 and closed at once; asyncio accepts
    up to ACCEPT_BACKLOG connections per turn of the loop (its `backlog`, uvicorn's setting) and each
    takes a few turns to be refused and closed, so `connection_cap` keeps the cap that far below the
    descriptor limit;
  - each request must arrive in full, headers and body, within `arrival_s` of the connection or the
    previous answer, or its connection is closed (the app answers a body slower than the request's
    own deadline with a 408 before that);
  - closing while the client is still sending its body lingers, as nginx does: our side is shut,
    what arrives is read and dropped, up to LINGER_BYTES and LINGER_S, so the client reads the answer
    (unless the app set NO_LINGER in the request's scope: a client too slow to wait for);
  - a failed accept is logged once per ACCEPT_LOG_S, with how often it happened;
  - a second SIGTERM ends the graceful wait, as a second Ctrl-C does, and answers what is left.

The protocol is uvicorn's h11 one, subclassed: the server runs on h11 even where httptools is installed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import resource
import time
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ...errors import ConfigError

log = logging.getLogger("resforge")

LINGER_BYTES = 128 * 2**20  # of a refused body read and dropped before the connection closes, at most
LINGER_S = 5.0  # how long a connection lingers, at most
NO_LINGER = "resforge.no_linger"  # a request scope's key: its connection closes at once after the answer
ACCEPT_LOG_S = 10.0  # failed accepts are logged at most once per this interval
FD_RESERVE = 16  # descriptors left beside connections for what opens after the start: model files, engines
ACCEPT_BACKLOG = 16  # connections the kernel holds until accepted, and asyncio accepts per turn of its loop
RETRY_AFTER_S = 1  # what a 503 asks a client to wait


def connection_cap(wanted: int) -> int:
    """`wanted` connections, or fewer where the descriptor limit (ulimit -n) leaves room for fewer: less
    those open now, FD_RESERVE, and the connections accepted in the three turns of the loop it takes to
    refuse one over the cap."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    room = soft - len(os.listdir("/dev/fd")) - FD_RESERVE - 3 * ACCEPT_BACKLOG
    if room < 1:
        raise ConfigError(f"this process may open {soft} files (ulimit -n), too few to serve connections: raise it")
    return min(wanted, room)


def _refusal(message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"retry-after: {RETRY_AFTER_S}\r\nconnection: close\r\n\r\n")
    return head.encode() + body


class _Transport:
    """The connection's transport as uvicorn holds it: its `close` goes through the protocol, which lingers
    when the client is still sending."""

    def __init__(self, transport: asyncio.Transport, protocol: GuardedProtocol):
        self._transport, self._protocol = transport, protocol

    def close(self) -> None:
        self._protocol.close()

    def is_closing(self) -> bool:
        return self._protocol.lingering or self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol with a connection cap, a deadline for each request to arrive, and lingering close.
    `guarded_protocol` makes the class for one server's settings."""

    max_connections: int
    arrival_s: float

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.raw, self.lingering, self.drained = transport, False, 0
        self.timer: asyncio.TimerHandle | None = None
        super().connection_made(_Transport(transport, self))  # type: ignore[arg-type]
        if len(self.connections) > self.max_connections:
            transport.write(_refusal(f"the server has {self.max_connections} connections open, its limit "
                                     "(--max-connections): try again shortly"))
            transport.close()
            return
        self._arm(self.arrival_s, self._arrival_passed)

    def data_received(self, data: bytes) -> None:
        if not self.lingering:
            return super().data_received(data)
        self.drained += len(data)
        if self.drained > LINGER_BYTES:
            self._close_now()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():  # the next request's turn to arrive
            self._arm(self.arrival_s, self._arrival_passed)

    def connection_lost(self, exc: Exception | None) -> None:
        self._arm(None)
        super().connection_lost(exc)

    def close(self) -> None:
        """Close now, or, when the client is still sending its request body, shut our side and linger."""
        if self.lingering or self.raw.is_closing():
            return
        slow = self.scope is not None and self.scope.get(NO_LINGER)
        if slow or self.conn.their_state is not h11.SEND_BODY or not self.raw.can_write_eof():
            return self._close_now()
        self.lingering = True
        self.raw.write_eof()
        self.raw.resume_reading()
        self._arm(LINGER_S, self._close_now)

    def _arrival_passed(self) -> None:
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY):  # not yet arrived in full
            self._close_now()

    def _close_now(self) -> None:
        self._arm(None)
        self.raw.close()

    def _arm(self, seconds: float | None, action: Any = None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = None if seconds is None else self.loop.call_later(seconds, action)


def guarded_protocol(max_connections: int, arrival_s: float) -> type[GuardedProtocol]:
    return type("GuardedProtocol", (GuardedProtocol,), {"max_connections": max_connections, "arrival_s": arrival_s})


class AcceptErrors:
    """asyncio's exception handler, with failed accepts (out of descriptors or memory; asyncio 3.11 reports
    one for each connection it tries in a turn) logged once per ACCEPT_LOG_S with their count, not each
    with a traceback."""

    def __init__(self, clock: Any = time.monotonic):
        self.clock, self.count, self.last = clock, 0, -math.inf

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if not context.get("message", "").startswith("socket.accept() out of system resource"):
            return loop.default_exception_handler(context)
        self.count += 1
        if self.clock() - self.last >= ACCEPT_LOG_S:
            log.error("cannot accept connections: %s (%d time(s) since the last report); lower --max-connections "
                      "or raise ulimit -n", context.get("exception"), self.count)
            self.last, self.count = self.clock(), 0


class Server(uvicorn.Server):
    """uvicorn's server: a second SIGTERM or SIGINT ends the graceful wait, the requests still running
    cancelled (the app answers each 503), and failed accepts are logged through AcceptErrors."""

    loop: asyncio.AbstractEventLoop | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        second = self.should_exit
        super().handle_exit(sig, frame)
        if second and self.loop is not None:
            self.force_exit = True  # uvicorn waits no more for connections and tasks
            self.loop.call_soon_threadsafe(self._cancel_requests)

    def _cancel_requests(self) -> None:
        """Without this a connection still open would hold the shutdown (Python 3.12's Server.wait_closed
        waits for every connection)."""
        for task in list(self.server_state.tasks):
            task.cancel()

    async def startup(self, sockets: Any = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.loop.set_exception_handler(AcceptErrors())
        await super().startup(sockets)
