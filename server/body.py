"""Request bodies in JSON or msgpack, validated by the models of ``kvtier.server.schemas``.

Token ids dominate the control messages of a long prefix: a 4K-token shared-memory put is
~50 KB of JSON, and encoding, parsing and validating it costs more than an HTTP round trip on
a small host. So a msgpack body may carry ``token_ids`` *packed*: the ids as little-endian
int64 bytes (``numpy.asarray(ids, "<i8").tobytes()``), which the server takes as an array
without parsing. A list of integers works in msgpack too; JSON bodies are unchanged.
"""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import msgpack
import numpy as np
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError

from kvtier.bufpool import MAPPED_BYTES, BufferPool, MappedPool
from kvtier.errors import InvalidRequest, InvalidType
from kvtier.server.errors import UnsupportedMediaType
from kvtier.server.schemas import TokensRequest
from kvtier.wire import MSGPACK, unpack_views

M = TypeVar("M", bound=TokensRequest)
BODY_INTO = "kvtier.body_into"  # ``kvtier.server.protocol.EXTENSION``
POOLED_BODY_BYTES = 1 << 20  # bodies from this size on are received into recycled buffers
PACKED_TOKEN_DTYPE = np.dtype("<i8")
MAX_TOKEN_ID = 2**62  # as ``kvtier.server.schemas.TokenId``


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def decode_views(request: Request) -> dict[str, Any]:
    """A msgpack body as a map whose binary fields are views into the one buffer it was
    received into (``wire.unpack_views``): a big KV put is copied once, not three times."""
    ctype = content_type(request)
    if ctype != MSGPACK:
        raise UnsupportedMediaType(f"content-type {ctype or '(none)'!r} is not accepted here: send {MSGPACK}")
    length = request.headers.get("content-length")
    if length is None or not length.isdigit():
        body: bytes | memoryview = await request.body()
    else:
        # A recycled buffer (BodyLimit checked the length): a fresh one faults in every page
        # on first touch, and bytearray(n) zero-fills them too, each a large part of a big put.
        body = body_buffer(request, int(length))
        into = request.scope.get("extensions", {}).get(BODY_INTO)
        got = await into(body) if into is not None else None
        if got is None:
            at = 0
            async for chunk in request.stream():
                if at + len(chunk) > len(body):
                    raise InvalidRequest(f"request body is longer than its Content-Length {len(body)}")
                body[at:at + len(chunk)] = chunk
                at += len(chunk)
            if at != len(body):
                raise InvalidRequest(f"request body ended after {at} of {len(body)} bytes")
    d = unpack_views(body)
    if not isinstance(d, dict):
        raise InvalidType(f"body must be a map, got {type(d).__name__}")
    return d


def body_buffer(request: Request, n: int) -> memoryview:
    """``n`` writable bytes (contents undefined) for a body. Big ones come from the app's
    ``body_buffers`` pool (``kvtier.bufpool``) in size classes an eighth apart, so puts of
    similar sizes share buffers; a buffer is reused only once nothing views it any more (the
    put copied its KV into the cache), never while a request still reads it."""
    pool: BufferPool | None = getattr(request.app.state, "body_buffers", None)
    if pool is None or n < POOLED_BODY_BYTES:
        return np.empty(n, dtype=np.uint8).data
    step = 1 << max(n.bit_length() - 4, 16)
    return pool.take(-(-n // step) * step)[:n].numpy().data


def answer_buffer(request: Request, n: int) -> np.ndarray:
    """``n`` bytes (contents undefined) for the KV of an answer. Big ones (``MAPPED_BYTES`` on)
    come from the app's ``answer_buffers`` (``kvtier.bufpool.MappedPool``): memory an earlier
    answer used, once nothing views it any more (it was sent). Faulting in fresh memory for
    every answer cost more than sending it on the development VM."""
    pool: MappedPool | None = getattr(request.app.state, "answer_buffers", None)
    if pool is None or n < MAPPED_BYTES:
        return np.empty(n, dtype=np.uint8)
    return pool.take(n)


def streamed(nbytes: int, pieces: list[bytes | memoryview]) -> StreamingResponse:
    """A msgpack answer sent as it lies in memory (``kvtier.wire.pack_pieces``: the framing
    around the tensors' own bytes), with its length, so a client can read it straight into its
    own memory. Packing a 1 GiB answer into one bytes object first took 2 s of the call (copies
    while the packer grew, the faults of fresh memory); the pieces keep the KV alive until sent."""
    return StreamingResponse(_each(pieces), media_type=MSGPACK, headers={"content-length": str(nbytes)})


async def _each(pieces: list[bytes | memoryview]) -> AsyncIterator[bytes | memoryview]:
    for piece in pieces:
        yield piece


async def decode(request: Request, *, json_ok: bool) -> dict[str, Any]:
    """The body as a map: msgpack always, JSON where ``json_ok``; 415 for anything else."""
    ctype = content_type(request)
    body = await request.body()
    if ctype == MSGPACK:
        try:
            d = msgpack.unpackb(body, raw=False)
        except Exception as e:  # noqa: BLE001  msgpack raises many types for bad input
            raise InvalidRequest(f"malformed msgpack body: {e}") from None
    elif json_ok and ctype == "application/json":
        try:
            d = json.loads(body)
        except ValueError as e:
            raise InvalidRequest(f"malformed JSON body: {e}") from None
    else:
        want = MSGPACK + (" or application/json" if json_ok else "")
        raise UnsupportedMediaType(f"content-type {ctype or '(none)'!r} is not accepted here: send {want}")
    if not isinstance(d, dict):
        raise InvalidType(f"body must be a map, got {type(d).__name__}")
    return d


def listed_token_ids(value: Any) -> np.ndarray:
    """Token ids given as a list (msgpack or JSON bodies parsed by hand) as an int64 array.

    The same rules as ``kvtier.server.schemas.TokenId`` and packed ids: each a plain integer (not a
    bool, float or list) in [0, 2**62]; anything else is ``InvalidType`` naming the position.
    """
    if not isinstance(value, list):
        raise InvalidType(f"token_ids must be a list of integers (or packed bytes), "
                          f"got {type(value).__name__}")
    if not value:
        raise InvalidRequest("token_ids is empty: expected at least one token id")
    if not all(type(t) is int for t in value):
        i = next(i for i, t in enumerate(value) if type(t) is not int)
        raise InvalidType(f"token_ids.{i}: expected an integer, got {type(value[i]).__name__}")
    lo, hi = min(value), max(value)
    if lo < 0 or hi > MAX_TOKEN_ID:
        raise InvalidType(f"token_ids: each id must be in [0, 2**62], got {lo if lo < 0 else hi}")
    return np.asarray(value, dtype=np.int64)


def unpack_token_ids(raw: bytes | memoryview) -> np.ndarray:
    """Packed token ids (little-endian int64 bytes) as an int64 array, range-checked."""
    if not raw or len(raw) % PACKED_TOKEN_DTYPE.itemsize:
        raise InvalidRequest(f"packed token_ids must be a non-empty multiple of 8 bytes "
                             f"(little-endian int64), got {len(raw)} bytes")
    ids = np.frombuffer(raw, dtype=PACKED_TOKEN_DTYPE)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi > MAX_TOKEN_ID:
        raise InvalidType(f"token_ids: each id must be in [0, 2**62], got {lo if lo < 0 else hi}")
    return ids.astype(np.int64, copy=False)


async def tokens_body(request: Request, model: type[M]) -> M:
    """A ``TokensRequest``-shaped body as ``model``: JSON, or msgpack (token ids listed or
    packed; packed ids are left as an int64 array in ``token_ids``). Validation errors answer
    exactly as FastAPI's own body validation does (422 naming the field, 400 for bad JSON)."""
    packed = None
    try:
        if content_type(request) != MSGPACK:
            return model.model_validate_json(await request.body())
        d = await decode(request, json_ok=False)
        if isinstance(d.get("token_ids"), bytes):
            packed = unpack_token_ids(d["token_ids"])
            d["token_ids"] = [0]  # stands in while the model checks every other field
        out = model.model_validate(d)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False)) from None
    if packed is not None:  # the int64 array stands in for the list: routes take either
        out.token_ids = packed  # type: ignore[assignment]
    return out


def openapi_body(model: type[BaseModel], *content_types: str) -> dict:
    """``openapi_extra`` declaring ``model`` as the request body in each content type (for
    routes that parse their body themselves), its nested models inlined."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(copy.deepcopy(defs[ref.removeprefix("#/$defs/")]))
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    schema = inline(schema)
    content = {}
    for ct in content_types:
        content[ct] = {"schema": schema}
        if ct == MSGPACK and "token_ids" in schema.get("properties", {}):
            packed = copy.deepcopy(schema)
            packed["properties"]["token_ids"] = with_packed(schema["properties"]["token_ids"])
            content[ct] = {"schema": packed}
    return {"requestBody": {"required": True, "content": content}}


def with_packed(listed: dict) -> dict:
    """The schema of msgpack ``token_ids``: the JSON list, or the ids packed."""
    return {"oneOf": [listed, {"type": "string", "format": "binary",
                               "description": "packed: little-endian int64 token ids"}]}
