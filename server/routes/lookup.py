"""``/v1/lookup`` and ``DELETE /v1/kv``: where a prefix's blocks are, and evicting them.

Bodies are JSON or msgpack; msgpack may carry the token ids packed (``kvtier.server.body``), which is
what ``KVTierClient`` sends: parsing an 8K-token JSON list costs more than the lookup itself.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from kvtier.server.body import openapi_body, tokens_body
from kvtier.server.deps import Ctx, CtxDep
from kvtier.server.schemas import CountOut, HitOut, TokensRequest
from kvtier.wire import MSGPACK

router = APIRouter(tags=["lookup"])


_BODY = openapi_body(TokensRequest, "application/json", MSGPACK)


@router.post("/v1/lookup", response_model=HitOut, openapi_extra=_BODY)
async def lookup(request: Request, ctx: Ctx = CtxDep) -> dict:
    """The longest cached prefix of ``token_ids`` and the tier of each of its blocks."""
    body = await tokens_body(request, TokensRequest)
    ctx.check_tokens(body.token_ids)
    scoped = ctx.principal.scoped(body.namespace)  # 403 for another tenant's; unknown: a miss
    hit = await ctx.call(ctx.cache.lookup, scoped, body.token_ids)
    d = hit.to_dict()
    d["namespace"] = body.namespace
    return d


@router.delete("/v1/kv", response_model=CountOut, openapi_extra=_BODY)
async def evict(request: Request, ctx: Ctx = CtxDep) -> dict:
    """Remove a prefix's blocks (and anything cached beyond them) from every tier."""
    body = await tokens_body(request, TokensRequest)
    ctx.check_tokens(body.token_ids)
    ns = ctx.namespace(body.namespace)
    return {"blocks": await ctx.call(ctx.cache.evict, ns.name, body.token_ids)}
