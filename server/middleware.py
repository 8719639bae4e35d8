"""ASGI middleware: request body limits and the HTTP latency histogram."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from prometheus_client import Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyLimit:
    """413 for bodies over the limit; data-plane paths (``/v1/kv``, ``/v1/blocks``) get the
    larger one.

    A declared Content-Length is checked up front; a chunked body is counted while it is
    read and the request is answered 413 before the app sees it.
    """

    def __init__(self, app: ASGIApp, small: int, large: int) -> None:
        self.app, self.small, self.large = app, small, large

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        limit = self.large if path.startswith(("/v1/kv", "/v1/blocks")) else self.small
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return await _reject(send, 400, "InvalidRequest", "malformed Content-Length header")
            if declared > limit:
                return await _reject(send, 413, "PayloadTooLarge",
                                     f"request body of {declared} bytes exceeds the limit of {limit} bytes")
            return await self.app(scope, receive, send)
        chunks: list[Message] = []
        total = 0
        while True:
            msg = await receive()
            chunks.append(msg)
            if msg["type"] != "http.request":
                break
            total += len(msg.get("body", b""))
            if total > limit:
                return await _reject(send, 413, "PayloadTooLarge",
                                     f"request body exceeds the limit of {limit} bytes")
            if not msg.get("more_body", False):
                break

        async def replay() -> Message:
            return chunks.pop(0) if chunks else await receive()

        await self.app(scope, replay, send)


async def _reject(send: Send, status: int, error: str, message: str) -> None:
    body = json.dumps({"error": error, "message": message, "status": status}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class RequestMetrics:
    """Observes each request's latency by route template (not raw path), method and status."""

    def __init__(self, app: ASGIApp, histogram: Histogram, clock: Callable[[], float] = time.perf_counter) -> None:
        self.app, self.histogram, self.clock = app, histogram, clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = self.clock()
        status = 500

        async def send_wrapper(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "<unmatched>"
            self.histogram.labels(template, scope.get("method", ""), str(status)).observe(self.clock() - start)
