"""Operations: ``/v1/stats``, ``/metrics``, ``/healthz``, ``/readyz``."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from kvtier.server.auth import metrics_access
from kvtier.server.deps import Ctx, CtxDep
from kvtier.server.schemas import HealthOut, StatsOut

router = APIRouter(tags=["ops"])


@router.get("/v1/stats", response_model=StatsOut)
async def stats(ctx: Ctx = CtxDep) -> dict:
    """Per-tier fill, hit rates, retention, reload latency, traffic, evictions, prefetch outcomes."""
    snap = await ctx.call(ctx.cache.stats)
    # A tenant sees only its own namespaces' counters, under the names it registered them by.
    snap.namespaces = {ctx.principal.external(n): v for n, v in snap.namespaces.items()
                       if ctx.principal.owns(n)}
    return snap.to_dict()


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus exposition"}})
async def metrics(request: Request) -> Response:
    """Prometheus exposition; every name starts with ``kvtier_`` (see the README, "Metrics").

    With ``--metrics-token`` set it needs that token; with tenants (``--tokens``) and no scrape
    token it omits the per-namespace families, whose labels name the tenants' namespaces."""
    state = request.app.state
    full = metrics_access(state.settings, request)
    body = await run_in_threadpool(generate_latest, state.registry if full else state.anonymous_registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@router.get("/healthz", response_model=HealthOut)
async def healthz() -> dict:
    """The process is alive and serving HTTP."""
    return {"status": "ok"}


def storage_problem(request: Request) -> str | None:
    """None when the cache is open and its data directory takes a write; else what is wrong."""
    cache = request.app.state.cache
    if cache.closed:
        return "the cache is closed"
    if not cache.config.ssd.path:
        return None  # memory tiers only: nothing on disk to check
    where = Path(cache.config.ssd.path)
    try:
        where.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=where, prefix=".readyz-") as f:
            f.write(b"ok")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return f"data directory {str(where)!r} is not writable: {e.strerror}"
    return None


@router.get("/readyz", response_model=HealthOut, responses={503: {"model": HealthOut}})
async def readyz(request: Request) -> Response:
    """Storage is open and writable (200); ``degraded`` (still 200) lists what a tier lacks while
    the cache keeps serving, e.g. a full disk or an unreachable remote engine; 503 otherwise."""
    problem = await run_in_threadpool(storage_problem, request)
    if problem:
        return JSONResponse({"status": "unavailable", "detail": problem}, 503)
    problems = await run_in_threadpool(request.app.state.cache.health)
    if problems:
        return JSONResponse({"status": "degraded", "problems": problems})
    return JSONResponse({"status": "ok"})
