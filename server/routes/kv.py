"""The data plane: KV in and out as msgpack with raw tensor bytes, or through shared memory.

msgpack suits a remote engine (one copy into the body each way); the shared-memory path
suits an engine on the same host: the client hands a region it created to the server once
(a file descriptor over the region socket, ``kvtier.server.shm_socket``), then names it by id; the
server reads from or writes into it, and only a small control message (JSON, or msgpack with
packed token ids) crosses HTTP. Regions are bound to the tenant that handed them over
(``kvtier.server.shm``).
"""

from __future__ import annotations

from typing import Any

import msgpack
import torch
from fastapi import APIRouter, Request, Response

from kvtier.errors import InvalidRequest, InvalidType, LayoutMismatch
from kvtier.layout import KVLayout
from kvtier.server.body import (
    decode,
    decode_views,
    listed_token_ids,
    openapi_body,
    streamed,
    tokens_body,
    unpack_token_ids,
    with_packed,
)
from kvtier.server.deps import Ctx, CtxDep
from kvtier.server.errors import Forbidden, PayloadTooLarge, ServiceUnavailable
from kvtier.server.schemas import (
    ShmGetOut,
    ShmGetRequest,
    ShmPutRequest,
    ShmRegion,
    ShmSocketOut,
    StoredOut,
)
from kvtier.server.shm import RegionTable
from kvtier.server.shm_socket import PROTOCOL
from kvtier.wire import (
    MSGPACK,
    kv_from_wire,
    kv_to_wire,
    pack_pieces,
    packed_nbytes,
    packed_views,
    unpack_from,
)

router = APIRouter(prefix="/v1/kv", tags=["kv"])

_TENSOR = {"type": "object", "required": ["shape", "dtype", "data"], "properties": {
    "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
    "dtype": {"type": "string"}, "data": {"type": "string", "format": "binary"}}}
_KV = {"type": "array", "description": "layers, each a list of tensors [tokens, ...]",
       "items": {"type": "array", "items": _TENSOR}}
_TOKENS = {"type": "array", "items": {"type": "integer", "minimum": 0}}
_PUT_BODY = {"requestBody": {"required": True, "content": {MSGPACK: {"schema": {
    "type": "object", "required": ["namespace", "token_ids", "kv"],
    "properties": {"namespace": {"type": "string"}, "token_ids": with_packed(_TOKENS), "kv": _KV}}}}}}
_GET_BODY = {"requestBody": {"required": True, "content": {
    ct: {"schema": {"type": "object", "required": ["namespace", "token_ids"], "properties": {
        "namespace": {"type": "string"},
        "token_ids": with_packed(_TOKENS) if ct == MSGPACK else _TOKENS}}}
    for ct in (MSGPACK, "application/json")}}}
_GET_RESPONSE: dict[int | str, dict[str, Any]] = {200: {"description": "KV of the longest cached prefix (kv is null on a miss)",
                       "content": {MSGPACK: {"schema": {"type": "object", "properties": {
                           "tokens": {"type": "integer"}, "kv": {**_KV, "nullable": True}}}}}}}


def _token_ids(d: dict) -> Any:
    """``token_ids`` of a msgpack data-plane body: listed, or packed (``kvtier.server.body``)."""
    raw = d.get("token_ids")
    return unpack_token_ids(raw) if isinstance(raw, (bytes, memoryview)) else listed_token_ids(_field(d, "token_ids", list))


def _field(d: dict, name: str, kind: type) -> Any:
    if name not in d:
        raise InvalidRequest(f"body is missing field {name!r}")
    if not isinstance(d[name], kind):
        raise InvalidType(f"field {name!r} must be {kind.__name__}, got {type(d[name]).__name__}")
    return d[name]


@router.put("", response_model=StoredOut, openapi_extra=_PUT_BODY)
async def put(request: Request, ctx: Ctx = CtxDep) -> dict:
    """Store KV (msgpack) for ``token_ids``; shape and dtype must match the namespace layout.

    As ``TieredCache.put``: the first put to an unknown namespace registers it (the caller's
    tenant, the layout of this KV, the server's block size and codec).
    """
    d = await decode_views(request)
    extra = set(d) - {"namespace", "token_ids", "kv"}
    if extra:
        raise InvalidRequest(f"unknown body fields {sorted(extra)}")
    ids = _token_ids(d)
    ctx.check_tokens(ids)
    name = _field(d, "namespace", str)
    ctx.principal.scoped(name)  # 403 for another tenant's, before any work
    layers = _field(d, "kv", list)

    def work() -> int:
        kv = kv_from_wire(layers)
        layout = KVLayout.from_kv(kv)
        layout.validate(kv, len(ids))  # a put that fails registers nothing
        ns = ctx.namespace_for_put(name, layout)
        return ctx.cache.put(ns.name, ids, kv, create=False)  # dropped meanwhile: 404, never re-created

    return {"tokens": await ctx.call(work)}


@router.post("/get", openapi_extra=_GET_BODY, responses=_GET_RESPONSE, response_class=Response)
async def get(request: Request, ctx: Ctx = CtxDep) -> Response:
    """KV of the longest cached prefix of ``token_ids``, as msgpack."""
    d = await decode(request, json_ok=True)
    ids = _token_ids(d)
    ctx.check_tokens(ids)
    ns = ctx.find_namespace(_field(d, "namespace", str))
    if ns is None:  # never stored into: a miss, as in-process
        return Response(msgpack.packb({"tokens": 0, "kv": None}), media_type=MSGPACK)

    def work() -> tuple[int, list[bytes | memoryview]]:
        kv, n = ctx.cache.get(ns.name, ids)
        if kv is not None and n * (ns.layout.bytes_per_token if ns.layout else 0) > ctx.settings.max_kv_bytes:
            raise PayloadTooLarge(f"the answer would carry {n} tokens, over the data-plane limit")
        return pack_pieces({"tokens": n, "kv": kv_to_wire(kv) if kv is not None else None})

    return streamed(*await ctx.call(work))


def _shm_on(ctx: Ctx) -> None:
    if not ctx.settings.shm:
        raise Forbidden("the shared-memory data path is disabled on this server (--shm false)")


def _regions(request: Request, region: ShmRegion) -> tuple[RegionTable, str]:
    """The server's region table and the id of the region a request names."""
    if region.name is not None:
        raise InvalidRequest("shared-memory regions are no longer opened by name (region.name): "
                             "hand the region's file descriptor over on the region socket "
                             "(GET /v1/kv/shm/socket) and send the region.id it answers")
    if region.id is None:
        raise InvalidRequest("region.id is required: the id the region socket answered when the "
                             "region was handed over (GET /v1/kv/shm/socket)")
    return request.app.state.shm_regions, region.id


@router.get("/shm/socket", response_model=ShmSocketOut)
async def shm_socket(request: Request, ctx: Ctx = CtxDep) -> dict:
    """Where a same-host client hands its shared memory over: the region socket's path.

    Send ``{"op": "register", "token": <bearer token>}`` with one memfd (sealed with
    ``F_SEAL_SHRINK``) as ``SCM_RIGHTS``; the answer's ``id`` then names the region in
    ``region.id`` here. Protocol: ``kvtier.server.shm_socket``.
    """
    _shm_on(ctx)
    sock = request.app.state.shm_socket
    if sock is None:
        raise ServiceUnavailable("the region socket is not running (the app is served without "
                                 "its lifespan)")
    return {"path": sock.path, "protocol": PROTOCOL}


@router.put("/shm", response_model=StoredOut,
            openapi_extra=openapi_body(ShmPutRequest, "application/json", MSGPACK))
async def put_shm(request: Request, ctx: Ctx = CtxDep) -> dict:
    """Store KV the client wrote into its shared-memory region ``region.id``.

    Each tensor has ``slot_tokens`` rows in the region (default: one per token id); the first
    ``len(token_ids)`` rows are stored. The server encodes straight from views of the region.
    JSON or msgpack (token ids may come packed: ``kvtier.server.body``).
    """
    _shm_on(ctx)
    body = await tokens_body(request, ShmPutRequest)
    regions, region_id = _regions(request, body.region)
    ctx.check_tokens(body.token_ids)
    layout = KVLayout.from_dict(body.layout.model_dump())
    ns = ctx.find_namespace(body.namespace)
    if ns is not None and ns.layout is not None and ns.layout != layout:
        raise LayoutMismatch(f"layout {layout.fingerprint()} does not match namespace "
                             f"{body.namespace!r} layout {ns.layout.fingerprint()}")
    n = len(body.token_ids)
    slot = n if body.slot_tokens is None else body.slot_tokens
    if slot < n:
        raise InvalidRequest(f"slot_tokens {slot} is less than the {n} token_ids: each tensor "
                             "needs a row per token")
    nbytes = packed_nbytes(layout, slot)
    if nbytes > ctx.settings.max_kv_bytes:
        raise PayloadTooLarge(f"{nbytes} bytes of KV exceed the data-plane limit {ctx.settings.max_kv_bytes}")
    if nbytes > body.region.size:
        raise InvalidRequest(f"{slot} tokens of this layout need {nbytes} bytes, "
                             f"region.size is {body.region.size}")
    tenant = ctx.principal.tenant

    def work() -> int:  # the window is what this put reads: never more than --max-kv-bytes
        with regions.open(tenant, region_id, body.region.offset, nbytes,
                          ctx.settings.max_kv_bytes) as buf:
            kv = unpack_from(buf, layout, slot, copy=False)
            if slot != n:
                kv = [tuple(t[:n] for t in layer) for layer in kv]
            try:
                layout.validate(kv, n)  # a put that fails registers nothing
                target = ctx.namespace_for_put(body.namespace, layout)
                return ctx.cache.put(target.name, body.token_ids, kv, create=False)
            finally:
                del kv

    return {"tokens": await ctx.call(work)}


@router.post("/shm/get", response_model=ShmGetOut,
             openapi_extra=openapi_body(ShmGetRequest, "application/json", MSGPACK))
async def get_shm(request: Request, ctx: Ctx = CtxDep) -> dict:
    """Decode the longest cached prefix straight into region ``region.id`` (packed layout with
    ``slot_tokens`` rows per tensor; the first ``tokens`` rows are valid). JSON or msgpack."""
    _shm_on(ctx)
    body = await tokens_body(request, ShmGetRequest)
    regions, region_id = _regions(request, body.region)
    ctx.check_tokens(body.token_ids)
    ns = ctx.find_namespace(body.namespace)
    if ns is None or ns.layout is None:  # never stored into: a miss, as in-process
        return {"tokens": 0, "slot_tokens": 0, "layout": None, "nbytes": 0}
    layout, bt = ns.layout, ns.block_tokens
    slot = len(body.token_ids) // bt * bt  # rows per tensor: room for a hit on every block
    if slot == 0:  # not one whole block: a miss, counted as in-process (an empty window answered 500)
        await ctx.call(ctx.cache.get_into, ns.name, body.token_ids, [])
        return {"tokens": 0, "slot_tokens": 0, "layout": None, "nbytes": 0}
    need = packed_nbytes(layout, slot)
    if need > ctx.settings.max_kv_bytes:
        raise PayloadTooLarge(f"{need} bytes of KV exceed the data-plane limit {ctx.settings.max_kv_bytes}")
    if need > body.region.size:
        raise InvalidRequest(f"a hit on all of token_ids needs {need} bytes, region.size is {body.region.size}")
    tenant = ctx.principal.tenant

    def work() -> dict:  # the window is the most this get writes: never more than --max-kv-bytes
        with regions.open(tenant, region_id, body.region.offset, need,
                          ctx.settings.max_kv_bytes) as buf:
            outs = packed_views(torch.frombuffer(buf, dtype=torch.uint8), layout, slot)
            try:
                tokens = ctx.cache.get_into(ns.name, body.token_ids, outs)
            finally:
                del outs
        return {"tokens": tokens, "slot_tokens": slot if tokens else 0, "layout": layout.to_dict(),
                "nbytes": packed_nbytes(layout, slot) if tokens else 0}

    return await ctx.call(work)
