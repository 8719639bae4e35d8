"""``create_app(cache, settings)``: the FastAPI sidecar over one TieredCache.

The app does not own the cache: whoever built it (``kvtier serve``, a test) closes it after
the server has stopped, so in-flight requests finish before storage closes.
"""

from __future__ import annotations

from fastapi import FastAPI

import kvtier
from kvtier.manager import TieredCache
from kvtier.metrics import anonymous_registry, make_registry
from kvtier.settings import ServerSettings
from server import errors
from server.middleware import BodyLimit, RequestMetrics
from server.routes import kv, lookup, namespaces, ops, prefetch
from server.schemas import ErrorOut

_ERROR_RESPONSES = {code: {"model": ErrorOut} for code in (400, 401, 403, 404, 413, 415, 422, 507)}


def create_app(cache: TieredCache, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    app = FastAPI(title="kvtier sidecar", version=kvtier.__version__,
                  description="Tiered KV-cache offload: lookups, prefetches, KV data plane, metrics.",
                  responses=_ERROR_RESPONSES)
    app.state.cache = cache
    app.state.settings = settings
    app.state.registry, http_histogram = make_registry(cache.stats)
    app.state.anonymous_registry = anonymous_registry(cache.stats, http_histogram)
    errors.install(app)
    for module in (namespaces, lookup, prefetch, kv, ops):
        app.include_router(module.router)
    # Added last = outermost: latency covers body-limit rejections too.
    app.add_middleware(BodyLimit, small=settings.max_body_bytes, large=settings.max_kv_bytes)
    app.add_middleware(RequestMetrics, histogram=http_histogram)
    app.add_middleware(errors.LastResort)  # outermost: also catches the middlewares' own bugs
    return app
