"""``/v1/namespaces``: register, list, inspect and drop namespaces."""

from __future__ import annotations

from fastapi import APIRouter

from kvtier.layout import KVLayout
from kvtier.server.deps import Ctx, CtxDep
from kvtier.server.schemas import CountOut, NamespaceCreate, NamespaceOut

router = APIRouter(prefix="/v1/namespaces", tags=["namespaces"])


@router.post("", response_model=NamespaceOut, status_code=201)
async def register(body: NamespaceCreate, ctx: Ctx = CtxDep) -> dict:
    """Register a namespace (idempotent for identical settings; 400 if they conflict)."""
    name = ctx.principal.scoped(body.name)
    layout = KVLayout.from_dict(body.layout.model_dump()) if body.layout else None
    ns = await ctx.call(ctx.cache.register_namespace, name,
                        model_id=body.model_id or ctx.principal.external(name), layout=layout,
                        block_tokens=body.block_tokens, codec=body.codec, ttl_s=body.ttl_s,
                        tenant=ctx.principal.tenant)
    return ctx.out(ns)


@router.get("", response_model=list[NamespaceOut])
async def list_namespaces(ctx: Ctx = CtxDep) -> list[dict]:
    """The caller's namespaces (a tenant sees only its own)."""
    return [ctx.out(ns) for ns in ctx.cache.namespaces() if ns.tenant == ctx.principal.tenant]


@router.get("/{name:path}", response_model=NamespaceOut)
async def get_namespace(name: str, ctx: Ctx = CtxDep) -> dict:
    return ctx.out(ctx.namespace(name))


@router.delete("/{name:path}", response_model=CountOut)
async def drop(name: str, ctx: Ctx = CtxDep) -> dict:
    """Drop a namespace and every block it owns."""
    ns = ctx.namespace(name)
    return {"blocks": await ctx.call(ctx.cache.drop_namespace, ns.name)}
