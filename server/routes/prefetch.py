"""``/v1/prefetch``: promote a prefix toward a faster tier in the background."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request

from kvtier.errors import InvalidRequest
from kvtier.prefetch import PrefetchHandle
from kvtier.server.body import openapi_body, tokens_body
from kvtier.server.deps import Ctx, CtxDep
from kvtier.server.errors import NotFound
from kvtier.server.schemas import PrefetchOut, PrefetchRequest
from kvtier.wire import MSGPACK

router = APIRouter(prefix="/v1/prefetch", tags=["prefetch"])


def _out(ctx: Ctx, h: PrefetchHandle) -> dict:
    d = h.to_dict()
    d["namespace"] = ctx.principal.external(h.namespace)
    return d


def _handle(ctx: Ctx, prefetch_id: str) -> PrefetchHandle:
    try:
        h = ctx.cache.prefetch_status(prefetch_id)
    except KeyError:
        h = None
    # Another tenant's prefetch is reported as unknown: ids reveal nothing across tenants.
    if h is None or not ctx.principal.owns(h.namespace):
        raise NotFound(f"unknown prefetch id {prefetch_id!r}")
    return h


@router.post("", response_model=PrefetchOut, status_code=202,
             openapi_extra=openapi_body(PrefetchRequest, "application/json", MSGPACK))
async def start(request: Request, ctx: Ctx = CtxDep) -> dict:
    """Start promoting the cached prefix of ``token_ids`` into tier ``to``; returns its id."""
    body = await tokens_body(request, PrefetchRequest)
    ctx.check_tokens(body.token_ids)
    ns = ctx.namespace(body.namespace)
    tiers = [t.name for t in ctx.cache.tiers]
    if body.to not in tiers:
        raise InvalidRequest(f"unknown prefetch target tier {body.to!r}: this cache has {tiers}")
    h = await ctx.call(ctx.cache.prefetch, ns.name, body.token_ids, body.to,
                       policy=body.policy, timeout_s=body.timeout_s)
    return _out(ctx, h)


@router.get("/{prefetch_id}", response_model=PrefetchOut)
async def status(prefetch_id: str, ctx: Ctx = CtxDep,
                 wait_s: float = Query(0.0, ge=0.0, le=30.0,
                                       description="long-poll up to this many seconds for completion")) -> dict:
    """State and ready tokens of a prefetch."""
    h = _handle(ctx, prefetch_id)
    if wait_s > 0:
        await ctx.call(h.wait, wait_s)
    return _out(ctx, h)


@router.delete("/{prefetch_id}", response_model=PrefetchOut)
async def cancel(prefetch_id: str, ctx: Ctx = CtxDep) -> dict:
    """Cancel a prefetch; blocks already promoted stay."""
    h = _handle(ctx, prefetch_id)
    stopped = h.cancel()
    return {**_out(ctx, h), "cancelled": stopped}
