"""``create_app(cache, settings)``: the FastAPI sidecar over one TieredCache.

The app does not own the cache: whoever built it (``kvtier serve``, a test) closes it after
the server has stopped, so in-flight requests finish before storage closes. Serve it with its
lifespan on: that runs the shared-memory region socket (``kvtier.server.shm_socket``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI

import kvtier
from kvtier.bufpool import BufferPool, MappedPool
from kvtier.manager import TieredCache
from kvtier.metrics import anonymous_registry, make_registry
from kvtier.server import errors
from kvtier.server.middleware import BodyLimit, RequestMetrics
from kvtier.server.routes import blocks, kv, lookup, namespaces, ops, prefetch
from kvtier.server.schemas import ErrorOut
from kvtier.server.shm import RegionTable
from kvtier.server.shm_socket import RegionSocket
from kvtier.settings import ServerSettings

_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut} for code in (400, 401, 403, 404, 413, 415, 422, 507)}


def start_region_socket(app: FastAPI) -> None:
    """Bind and serve the region socket now (if the shared-memory path is on and it is not
    running yet): ``kvtier serve`` calls it before serving, so a bad ``--shm-socket`` fails
    in one line; the lifespan calls it otherwise."""
    settings: ServerSettings = app.state.settings
    if settings.shm and app.state.shm_socket is None:
        sock = RegionSocket(app.state.shm_regions, settings.tokens, settings.shm_socket or None)
        sock.start()
        app.state.shm_socket = sock


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Run the region socket while the server runs; unmap every region once it stops."""
    start_region_socket(app)
    try:
        yield
    finally:
        if app.state.shm_socket is not None:
            app.state.shm_socket.close()
            app.state.shm_socket = None
        app.state.shm_regions.close()


def create_app(cache: TieredCache, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    app = FastAPI(title="kvtier sidecar", version=kvtier.__version__,
                  description="Tiered KV-cache offload: lookups, prefetches, KV data plane, metrics.",
                  responses=_ERROR_RESPONSES, lifespan=lifespan)
    app.state.cache = cache
    app.state.settings = settings
    app.state.shm_regions = RegionTable()
    app.state.shm_socket = None
    # Big request bodies (``kvtier.server.body``): at most one put's worth kept idle.
    app.state.body_buffers = BufferPool(max_idle_bytes=settings.max_kv_bytes)
    app.state.answer_buffers = MappedPool(settings.max_kv_bytes)  # big answers' KV (engine pages)
    app.state.registry, http_histogram = make_registry(cache.stats)
    app.state.anonymous_registry = anonymous_registry(cache.stats, http_histogram)
    errors.install(app)
    for module in (namespaces, lookup, prefetch, kv, blocks, ops):
        app.include_router(module.router)
    # Added last = outermost: latency covers body-limit rejections too.
    app.add_middleware(BodyLimit, small=settings.max_body_bytes, large=settings.max_kv_bytes)
    app.add_middleware(RequestMetrics, histogram=http_histogram)
    app.add_middleware(errors.LastResort)  # outermost: also catches the middlewares' own bugs
    return app
