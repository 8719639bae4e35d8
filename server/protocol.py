"""uvicorn's HTTP protocol, with request bodies received straight into a buffer the route owns.

uvicorn hands a body to the app in the chunks the socket delivered, each copied three more times
on the way (the loop's ``bytes``, the cycle's ``bytearray``, the message's ``bytes``) and
paused at 64 KiB until the app asks for more: one event-loop round trip per 64 KiB. For a
1 GiB KV put that was most of the request's time. For a request whose route asks for it
(``body_into``, below) this protocol pauses the transport and reads the rest of the body in a
worker thread with ``recv_into`` straight into the route's buffer: the kernel's copy only, in
reads as large as the socket holds, with the event loop free meanwhile. Every other request,
and every other part of a request (headers, a pipelined request behind the body), goes through
uvicorn unchanged.

A route asks through the ASGI scope: ``scope["extensions"]["kvtier.body_into"]`` is present on
requests with a ``Content-Length`` (never chunked ones) and is an async callable taking a
writable buffer of exactly that many bytes; it returns once the buffer holds the whole body,
or None when it cannot (the route then reads the body the ordinary way: nothing was consumed).
``uvicorn_http()`` is what to pass as ``uvicorn.Config(http=...)``: this class where httptools
is installed and uvicorn's protocol has the shape it was written for, else ``"auto"``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
from collections.abc import Callable
from typing import Any

EXTENSION = "kvtier.body_into"
IDLE_TIMEOUT_S = 60.0  # a body that stops arriving for this long is a disconnect
POLL_MS = 250  # how often a waiting read looks whether the server closed the connection

try:
    import httptools
    from starlette.requests import ClientDisconnect
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover  (httptools is a dependency; uvicorn falls back to h11)
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

_NEEDS = ("on_headers_complete", "on_message_complete", "data_received", "connection_lost")  # methods used


if HttpToolsProtocol is not None:

    class DirectBodyProtocol(HttpToolsProtocol):
        """``HttpToolsProtocol`` whose routes may receive a body with ``body_into``: the
        transport pauses and a worker thread reads the socket straight into the route's buffer."""

        direct_bytes = 0  # bytes received straight into a route's buffer, all connections (tests count them)

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            cycle = self.cycle
            if cycle is None or cycle.scope is not self.scope:  # an upgrade: no cycle of its own
                return
            length = _content_length(self.headers)
            if length is not None:
                extensions: Any = self.scope.setdefault("extensions", {})
                extensions[EXTENSION] = lambda buf: self._body_into(cycle, length, buf)

        async def _body_into(self, cycle: Any, length: int, buf: Any) -> int | None:
            view = memoryview(buf).cast("B")
            if len(view) != length:
                raise ValueError(f"body_into needs a buffer of the body's {length} bytes, got {len(view)}")
            sock = self.transport.get_extra_info("socket")
            # Only the newest request's body can be read directly (a pipelined request behind
            # it would have moved the parser on), only before the route read any of it, and
            # only from a plain socket (not TLS).
            if cycle is not self.cycle or cycle.disconnected or sock is None or self.transport.is_closing():
                return None
            pending = cycle.body
            at = len(pending)
            view[:at] = pending
            cycle.body = bytearray()
            if not cycle.more_body:
                return at
            if getattr(cycle, "waiting_for_100_continue", False):  # as uvicorn's receive()
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                cycle.waiting_for_100_continue = False
            self.flow.pause_reading()  # the loop stops reading this socket: the thread reads it
            try:
                got = await asyncio.get_running_loop().run_in_executor(
                    None, _recv_into, sock.fileno(), view, at, self.transport.is_closing)
            except ClientDisconnect:
                cycle.disconnected = True
                self.transport.close()
                raise
            type(self).direct_bytes += got - at
            # The body is in: the parser (which saw only its first part) is replaced by a fresh
            # one for the next request on this connection, and the cycle told the body ended.
            self.parser = _parser(self)
            self.on_message_complete()
            self.flow.resume_reading()
            return got


def _recv_into(fd: int, view: memoryview, at: int, closing: Callable[[], bool]) -> int:
    """Receive from ``fd`` until ``view`` is full (from ``at``): one ``recv_into`` per wakeup,
    as large as the socket holds, never past the body. ``ClientDisconnect`` when the peer
    closes, the server closes the connection, or nothing arrives for ``IDLE_TIMEOUT_S``."""
    sock = socket.socket(fileno=os.dup(fd))  # closed here; the transport keeps its own
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        idle = 0.0
        while at < len(view):
            try:
                got = sock.recv_into(view[at:])
            except (BlockingIOError, InterruptedError):
                if closing() or idle >= IDLE_TIMEOUT_S:
                    raise ClientDisconnect() from None
                if not poller.poll(POLL_MS):
                    idle += POLL_MS / 1000
                continue
            except OSError:
                raise ClientDisconnect() from None
            if not got:
                raise ClientDisconnect()
            at += got
            idle = 0.0
        return at
    finally:
        sock.close()


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    length = None
    for name, value in headers:
        if name == b"transfer-encoding":
            return None
        if name == b"content-length":
            if length is not None or not value.isdigit():
                return None
            length = int(value)
    return length


def _parser(protocol: Any) -> Any:
    parser = httptools.HttpRequestParser(protocol)
    with contextlib.suppress(AttributeError):  # httptools < 0.6.3, as uvicorn
        parser.set_dangerous_leniencies(lenient_data_after_close=True)
    return parser


def uvicorn_http() -> Any:
    """``uvicorn.Config(http=...)``: the direct-body protocol when it fits this uvicorn."""
    if HttpToolsProtocol is None or not all(hasattr(HttpToolsProtocol, a) for a in _NEEDS):
        return "auto"
    return DirectBodyProtocol
