"""The one place that maps kvtier errors to HTTP statuses.

Every error answer has the body ``{"error": <class name>, "message": <what was wrong>,
"status": <code>}``; the client turns it back into the same exception class.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvtier.errors import (
    BackendUnavailable,
    CorruptBlock,
    DataDirError,
    InvalidRequest,
    InvalidType,
    KVTierError,
    LayoutMismatch,
    StorageFull,
    UnknownNamespace,
)

log = logging.getLogger(__name__)
HTTP_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


class Unauthorized(KVTierError):
    """No bearer token, or one the server does not know."""


class Forbidden(KVTierError):
    """A valid token touching another tenant's namespace."""


class NotFound(KVTierError):
    """An unknown resource id (e.g. a prefetch id)."""


class PayloadTooLarge(KVTierError):
    """A body or transfer over the configured limit."""


class UnsupportedMediaType(KVTierError):
    """A body in a content type the endpoint does not take."""


class ServiceUnavailable(KVTierError):
    """A part of the server that is not running (e.g. the region socket of an app served
    without its lifespan)."""


# First isinstance match wins: subclasses before their bases.
STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (Unauthorized, 401),
    (Forbidden, 403),
    (NotFound, 404),
    (UnknownNamespace, 404),
    (PayloadTooLarge, 413),
    (UnsupportedMediaType, 415),
    (LayoutMismatch, 422),
    (InvalidType, 422),
    (InvalidRequest, 400),
    (StorageFull, 507),
    (BackendUnavailable, 503),
    (ServiceUnavailable, 503),
    (CorruptBlock, 500),
    (DataDirError, 500),
    (KVTierError, 500),
)


def status_of(exc: BaseException) -> int:
    for cls, status in STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def error_response(status: int, error: str, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    headers = dict(headers or {})
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse({"error": error, "message": message, "status": status}, status, headers or None)


def allowed_methods(app: ASGIApp, scope: Scope) -> list[str]:
    """Every method some route of ``app`` takes at this path (for a 405's ``Allow`` header).

    Starlette names only the methods of the first route whose path matched, while ``/v1/kv``
    (for one) is served by a PUT route and a DELETE route; asking each route about each method
    works through included routers too.
    """
    routes = getattr(app, "routes", ())
    return [m for m in HTTP_METHODS
            if any(r.matches({**scope, "method": m})[0] is Match.FULL for r in routes)]


def _validation_message(exc: RequestValidationError) -> tuple[str, str]:
    errs = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errs):
        e = next(e for e in errs if e.get("type") == "json_invalid")
        detail = (e.get("ctx") or {}).get("error", "")
        return "InvalidRequest", f"malformed JSON body: {detail}".rstrip(": ")
    parts = []
    for e in errs[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        parts.append(f"{loc}: {e.get('msg')}")
    more = f" (+{len(errs) - 5} more)" if len(errs) > 5 else ""
    return "InvalidType", "; ".join(parts) + more


def install(app: FastAPI) -> None:
    """Register the exception handlers on ``app``."""

    @app.exception_handler(KVTierError)
    async def _kvtier(_: Request, exc: KVTierError) -> JSONResponse:
        status = status_of(exc)
        if status >= 500:
            log.error("request failed: %s: %s", type(exc).__name__, exc)
        return error_response(status, type(exc).__name__, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        error, message = _validation_message(exc)
        return error_response(400 if error == "InvalidRequest" else 422, error, message)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(request.app, request.scope))
        return error_response(exc.status_code, "HTTPError", str(exc.detail), headers)


class LastResort:
    """ASGI middleware: an exception no handler took becomes the JSON 500 error body.

    Without it uvicorn answers ``text/plain`` "Internal Server Error" and, when Starlette
    re-raises after answering, closes the keep-alive connection. The traceback is logged here
    (the answer names only the exception class). Installed outermost of the app's middleware.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_wrapper(msg: Message) -> None:
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception as exc:
            log.exception("unhandled error answering %s %s", scope.get("method"), scope.get("path"))
            if started:  # half an answer is out: only closing the connection can end it
                raise
            response = error_response(500, "InternalError", f"unexpected {type(exc).__name__} "
                                      "on the server (its traceback is in the server log)")
            await response(scope, receive, send)
