"""``/v1/blocks``: an engine's pages addressed by the engine's own keys (``kvtier.blocks``).

Keys travel as raw bytes in msgpack bodies, or as hex strings in JSON ones. Pages travel packed:
``pages`` is the ``len(keys) * page_bytes`` bytes of the pages one after another, both ways.
A shared-memory variant (the server reading and writing the engine's pages in place) is to come
with the fd-passing data plane; the request and answer maps are laid out so it only replaces
``pages`` by a region.
"""

from __future__ import annotations

from typing import Any

import torch
from fastapi import APIRouter, Request, Response

from kvtier.blocks import bytes_tensor
from kvtier.errors import InvalidRequest, InvalidType
from kvtier.server.body import answer_buffer, decode, decode_views, streamed
from kvtier.server.deps import Ctx, CtxDep
from kvtier.server.errors import PayloadTooLarge
from kvtier.server.schemas import (
    BlockHitsOut,
    BlockNamespaceCreate,
    BlocksStoredOut,
    CountOut,
    NamespaceOut,
)
from kvtier.wire import MSGPACK, pack_pieces

router = APIRouter(tags=["blocks"])

_KEYS = {"type": "array", "items": {"type": "string", "format": "binary"},
         "description": "engine keys, 1..64 bytes each (hex strings in JSON)"}
_KEYS_BODY = {"requestBody": {"required": True, "content": {ct: {"schema": {
    "type": "object", "required": ["namespace", "keys"],
    "properties": {"namespace": {"type": "string"}, "keys": _KEYS}}} for ct in (MSGPACK, "application/json")}}}
_PUT_BODY = {"requestBody": {"required": True, "content": {MSGPACK: {"schema": {
    "type": "object", "required": ["namespace", "keys", "pages"],
    "properties": {"namespace": {"type": "string"}, "keys": _KEYS,
                   "pages": {"type": "string", "format": "binary",
                             "description": "len(keys) * page_bytes bytes: the pages in key order"}}}}}}}
_GET_RESPONSE: dict[int | str, dict[str, Any]] = {200: {"description": "the leading run of stored pages", "content": {MSGPACK: {"schema": {
    "type": "object", "properties": {
        "count": {"type": "integer"}, "page_bytes": {"type": "integer"},
        "pages": {"type": "string", "format": "binary", "description": "count * page_bytes bytes"}}}}}}}


@router.post("/v1/block-namespaces", response_model=NamespaceOut, status_code=201)
async def register(body: BlockNamespaceCreate, ctx: Ctx = CtxDep) -> dict:
    """Register a block namespace (idempotent for identical settings; 400 ``FingerprintMismatch``
    for the same name with another engine fingerprint or page size)."""
    name = ctx.principal.scoped(body.name)
    ns = await ctx.call(ctx.cache.register_block_namespace, name, page_bytes=body.page_bytes,
                        fingerprint=body.fingerprint, codec=body.codec, ttl_s=body.ttl_s,
                        tenant=ctx.principal.tenant)
    return ctx.out(ns)


async def _namespace_and_keys(request: Request, ctx: Ctx, *, json_ok: bool, fields: set[str],
                              views: bool = False) -> tuple:
    """``views``: a msgpack body received straight into one buffer, binary fields viewing it
    (``decode_views``: a put's pages are copied once, by the cache)."""
    d = await (decode_views(request) if views else decode(request, json_ok=json_ok))
    extra = set(d) - fields
    if extra:
        raise InvalidRequest(f"unknown body fields {sorted(extra)}")
    name = d.get("namespace")
    if not isinstance(name, str):
        raise InvalidType(f"field 'namespace' must be a string, got {type(name).__name__}")
    ns = ctx.namespace(name)
    keys = d.get("keys")
    if not isinstance(keys, list):
        raise InvalidType(f"field 'keys' must be a list, got {type(keys).__name__}")
    if len(keys) > ctx.settings.max_tokens:
        raise PayloadTooLarge(f"keys has {len(keys)} entries, the limit is {ctx.settings.max_tokens}")
    return ns, [_key(k, i) for i, k in enumerate(keys)], d


def _key(k: Any, i: int) -> bytes:
    if isinstance(k, (bytes, memoryview)):
        return bytes(k)
    if isinstance(k, str):
        try:
            return bytes.fromhex(k)
        except ValueError:
            raise InvalidRequest(f"keys[{i}] is not hex: {k[:80]!r}") from None
    raise InvalidType(f"keys[{i}] must be bytes (msgpack) or a hex string (JSON), got {type(k).__name__}")


@router.post("/v1/blocks/exists", response_model=BlockHitsOut, openapi_extra=_KEYS_BODY)
async def exists(request: Request, ctx: Ctx = CtxDep) -> dict:
    """Which keys are stored; ``leading`` is the run present from key 0."""
    ns, keys, _ = await _namespace_and_keys(request, ctx, json_ok=True, fields={"namespace", "keys"})
    return (await ctx.call(ctx.cache.block_exists, ns.name, keys)).to_dict()


@router.put("/v1/blocks", response_model=BlocksStoredOut, openapi_extra=_PUT_BODY)
async def put(request: Request, ctx: Ctx = CtxDep) -> dict:
    """Store pages (msgpack); a key already stored keeps its first page."""
    ns, keys, d = await _namespace_and_keys(request, ctx, json_ok=False,
                                            fields={"namespace", "keys", "pages"}, views=True)
    raw = d.get("pages")
    if not isinstance(raw, (bytes, memoryview)):
        raise InvalidType(f"field 'pages' must be binary, got {type(raw).__name__}")
    page = ns.page_bytes
    if len(raw) != len(keys) * page:
        raise InvalidRequest(f"pages has {len(raw)} bytes: {len(keys)} keys of this namespace's "
                             f"{page}-byte pages need {len(keys) * page}")
    pages = bytes_tensor(raw).view(len(keys), page) if raw else torch.empty(0, page, dtype=torch.uint8)
    return {"stored": await ctx.call(ctx.cache.put_blocks, ns.name, keys, pages)}


@router.post("/v1/blocks/get", openapi_extra=_KEYS_BODY, responses=_GET_RESPONSE, response_class=Response)
async def get(request: Request, ctx: Ctx = CtxDep) -> Response:
    """The leading run of stored pages, verified, as msgpack."""
    ns, keys, _ = await _namespace_and_keys(request, ctx, json_ok=True, fields={"namespace", "keys"})
    page = ns.page_bytes
    if len(keys) * page > ctx.settings.max_kv_bytes:
        raise PayloadTooLarge(f"{len(keys)} pages of {page} bytes exceed the data-plane limit "
                              f"{ctx.settings.max_kv_bytes}")

    def work() -> tuple[int, list[bytes | memoryview]]:
        out = torch.from_numpy(answer_buffer(request, len(keys) * page)).view(len(keys), page)
        n = ctx.cache.get_blocks_into(ns.name, keys, out)
        # flat first: a (0, page) view cannot be cast to bytes (every miss answered 500)
        return pack_pieces({"count": n, "page_bytes": page, "pages": out[:n].reshape(-1).numpy().data})

    return streamed(*await ctx.call(work))


@router.delete("/v1/blocks", response_model=CountOut, openapi_extra=_KEYS_BODY)
async def evict(request: Request, ctx: Ctx = CtxDep) -> dict:
    """Remove pages from every tier (a shared remote one included)."""
    ns, keys, _ = await _namespace_and_keys(request, ctx, json_ok=True, fields={"namespace", "keys"})
    return {"blocks": await ctx.call(ctx.cache.evict_blocks, ns.name, keys)}
