"""``/v1/lookup`` and ``DELETE /v1/kv``: where a prefix's blocks are, and evicting them."""

from __future__ import annotations

from fastapi import APIRouter

from server.deps import Ctx, CtxDep
from server.schemas import CountOut, HitOut, TokensRequest

router = APIRouter(tags=["lookup"])


@router.post("/v1/lookup", response_model=HitOut)
async def lookup(body: TokensRequest, ctx: Ctx = CtxDep) -> dict:
    """The longest cached prefix of ``token_ids`` and the tier of each of its blocks."""
    ctx.check_tokens(body.token_ids)
    ns = ctx.namespace(body.namespace)
    hit = await ctx.call(ctx.cache.lookup, ns.name, body.token_ids)
    d = hit.to_dict()
    d["namespace"] = body.namespace
    return d


@router.delete("/v1/kv", response_model=CountOut)
async def evict(body: TokensRequest, ctx: Ctx = CtxDep) -> dict:
    """Remove a prefix's blocks (and anything cached beyond them) from every tier."""
    ctx.check_tokens(body.token_ids)
    ns = ctx.namespace(body.namespace)
    return {"blocks": await ctx.call(ctx.cache.evict, ns.name, body.token_ids)}
