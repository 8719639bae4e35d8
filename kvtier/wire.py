"""The sidecar's KV wire formats, shared by the client and the server.

- msgpack (``application/msgpack``): ``kv`` is a list over layers of lists of
  ``{"shape": [tokens, ...], "dtype": "float16", "data": <raw C-order bytes>}``.
- packed (shared memory): the KV of ``n`` tokens laid out layer by layer, tensor by tensor, each
  ``[slot, *tensor_shape]`` C-contiguous, with no padding (``packed_nbytes(layout, slot)``
  bytes; ``slot`` is ``n`` unless ``slot_tokens`` says more, and the first ``n`` rows count).
"""

from __future__ import annotations

import struct
import warnings
from math import prod
from typing import Any

import torch

from kvtier.bytecopy import copy_bytes
from kvtier.errors import InvalidRequest, InvalidType, LayoutMismatch
from kvtier.layout import KV, KVLayout, dtype_from_name, dtype_name

MSGPACK = "application/msgpack"
# Largest product of a shape's dimensions (zeros counted as 1): torch computes strides and
# sizes in int64, so ``[0, 2**63]`` or ``[0, 2**40, 2**40]`` would overflow it even though they
# hold no element; 2**48 elements is far beyond any KV tensor.
MAX_SHAPE_PRODUCT = 2**48


def _raw(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().data


def kv_to_wire(kv: KV) -> list[list[dict[str, Any]]]:
    """msgpack-ready layers; ``data`` views the tensors' bytes (no copy for CPU tensors)."""
    return [[{"shape": list(t.shape), "dtype": dtype_name(t.dtype), "data": _raw(t)} for t in layer]
            for layer in kv]


def kv_from_wire(layers: Any) -> list[tuple[torch.Tensor, ...]]:
    """Tensors viewing the received bytes; raises InvalidType/LayoutMismatch naming the bad item."""
    if not isinstance(layers, list) or not layers:
        raise InvalidType(f"kv must be a non-empty list over layers, got {type(layers).__name__}")
    out = []
    for i, layer in enumerate(layers):
        if not isinstance(layer, list) or not layer:
            raise InvalidType(f"kv layer {i} must be a non-empty list of tensors, got {type(layer).__name__}")
        tensors = []
        for j, item in enumerate(layer):
            where = f"kv layer {i} tensor {j}"
            if not isinstance(item, dict) or set(item) != {"shape", "dtype", "data"}:
                raise InvalidType(f"{where} must be a map with keys shape, dtype, data")
            shape, dtype, data = item["shape"], item["dtype"], item["data"]
            if (not isinstance(shape, list) or not shape
                    or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
                raise InvalidType(f"{where}: shape must be a non-empty list of integers >= 0, got {shape!r}")
            if prod(max(d, 1) for d in shape) > MAX_SHAPE_PRODUCT:
                raise InvalidType(f"{where}: shape {shape} is too large (its dimensions multiply "
                                  f"past 2**48)")
            if not isinstance(dtype, str):
                raise InvalidType(f"{where}: dtype must be a string, got {dtype!r}")
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise InvalidType(f"{where}: data must be binary, got {type(data).__name__}")
            tdtype = dtype_from_name(dtype)
            need = prod(shape) * tdtype.itemsize
            if len(data) != need:
                raise LayoutMismatch(f"{where}: shape {shape} of {dtype} needs {need} bytes, got {len(data)}")
            if need == 0:
                tensors.append(torch.empty(shape, dtype=tdtype))
                continue
            with warnings.catch_warnings():  # read-only bytes: the cache only reads them
                warnings.simplefilter("ignore", UserWarning)
                tensors.append(torch.frombuffer(data, dtype=tdtype).view(shape))
        out.append(tuple(tensors))
    return out


def packed_nbytes(layout: KVLayout, n_tokens: int) -> int:
    return n_tokens * layout.bytes_per_token


def pack_into(kv: KV, buf: memoryview) -> int:
    """Copy ``kv`` into ``buf`` in the packed layout; returns bytes written."""
    off = 0
    flat = torch.frombuffer(buf, dtype=torch.uint8) if len(buf) else None
    for layer in kv:
        for t in layer:
            nb = t.numel() * t.element_size()
            if nb == 0:
                continue
            if flat is None or off + nb > len(buf):
                raise LayoutMismatch(f"kv needs more than the {len(buf)} bytes given")
            if t.is_cpu and t.is_contiguous():
                copy_bytes(flat[off:off + nb], t)  # no torch thread pool (kvtier.bytecopy)
            else:
                flat[off:off + nb].view(t.dtype).view(t.shape).copy_(t)
            off += nb
    return off


def packed_views(flat: torch.Tensor, layout: KVLayout, n_tokens: int) -> list[tuple[torch.Tensor, ...]]:
    """Views of a packed uint8 buffer as KV tensors ``[n_tokens, *shape]`` (no copy)."""
    need = packed_nbytes(layout, n_tokens)
    if flat.numel() < need:
        raise LayoutMismatch(f"{n_tokens} tokens of layout {layout.fingerprint()} need {need} bytes, "
                             f"the region has {flat.numel()}")
    dtype = dtype_from_name(layout.dtype)
    out, off = [], 0
    for _ in range(layout.num_layers):
        tensors = []
        for shape in layout.tensor_shapes:
            nb = n_tokens * prod(shape) * dtype.itemsize
            tensors.append(flat[off:off + nb].view(dtype).view(n_tokens, *shape))
            off += nb
        out.append(tuple(tensors))
    return out


def unpack_from(buf: memoryview, layout: KVLayout, n_tokens: int, *, copy: bool) -> list[tuple[torch.Tensor, ...]]:
    """KV of ``n_tokens`` in ``layout`` read from packed ``buf`` (views unless ``copy``)."""
    if len(buf) == 0 or n_tokens == 0:
        return [tuple(torch.empty((n_tokens, *s), dtype=layout.torch_dtype) for s in layout.tensor_shapes)
                for _ in range(layout.num_layers)]
    views = packed_views(torch.frombuffer(buf, dtype=torch.uint8), layout, n_tokens)
    return [tuple(t.clone() for t in layer) for layer in views] if copy else views


# ---- msgpack without copying the bulk ------------------------------------------------------------
# A 1 GiB put must not be built in memory twice: ``pack_pieces`` yields the msgpack encoding of a
# body as pieces in which every large binary field is the caller's own buffer (the tensors'
# bytes), and ``unpack_views`` decodes a received body with every binary field a memoryview into
# it. Both speak plain msgpack: any msgpack peer reads and writes these bodies.

PIECE_BYTES = 1 << 20  # largest piece handed to the transport at once (bounded re-slicing cost)
_INLINE_BIN = 64 * 1024  # smaller binary fields are copied into the headers around them


def pack_pieces(obj: Any) -> tuple[int, list[bytes | memoryview]]:
    """``msgpack.packb(obj)`` as pieces (total length first): small values packed into header
    pieces, binary fields of ``_INLINE_BIN`` bytes or more passed through uncopied."""
    import msgpack

    pieces: list[bytes | memoryview] = []
    head = _pack_into(obj, msgpack.Packer(autoreset=True), pieces, bytearray())
    if head:
        pieces.append(bytes(head))
    return sum(len(p) for p in pieces), pieces


def _pack_into(v: Any, packer: Any, pieces: list[bytes | memoryview], head: bytearray) -> bytearray:
    """Encode ``v`` after ``head`` (packed bytes not yet in ``pieces``); returns the new head.
    A function, not a recursive closure: that is a reference cycle, and it kept a sidecar
    ``get``'s KV (the pieces) from going back to the reload pool until the garbage collector
    ran, so every such get faulted in fresh memory."""
    if isinstance(v, dict):
        head += packer.pack_map_header(len(v))
        for k, item in v.items():
            head += packer.pack(k)
            head = _pack_into(item, packer, pieces, head)
    elif isinstance(v, (list, tuple)):
        head += packer.pack_array_header(len(v))
        for item in v:
            head = _pack_into(item, packer, pieces, head)
    elif isinstance(v, (bytes, bytearray, memoryview)) and len(memoryview(v).cast("B")) >= _INLINE_BIN:
        view = memoryview(v).cast("B")
        head += _bin_header(len(view))
        pieces.append(bytes(head))
        pieces.extend(view[i:i + PIECE_BYTES] for i in range(0, len(view), PIECE_BYTES))
        return bytearray()
    else:
        head += packer.pack(v)
    return head


def _bin_header(n: int) -> bytes:
    if n < 1 << 8:
        return struct.pack(">BB", 0xc4, n)
    if n < 1 << 16:
        return struct.pack(">BH", 0xc5, n)
    return struct.pack(">BI", 0xc6, n)


def unpack_views(buf: bytes | bytearray | memoryview) -> Any:
    """Decode one msgpack object; binary fields come back as memoryviews into ``buf`` (no copy),
    strings as ``str``, maps as dicts. Raises InvalidType on malformed or trailing bytes."""
    mv = memoryview(buf).cast("B")
    try:
        obj, end = _decode(mv, 0)
    except (IndexError, struct.error, UnicodeDecodeError, RecursionError) as e:
        raise InvalidRequest(f"malformed msgpack body: {type(e).__name__}: {e}") from None
    if end != len(mv):
        raise InvalidRequest(f"malformed msgpack body: {len(mv) - end} bytes after the object")
    return obj


_FMT = {0xcc: ">B", 0xcd: ">H", 0xce: ">I", 0xcf: ">Q", 0xd0: ">b", 0xd1: ">h", 0xd2: ">i",
        0xd3: ">q", 0xca: ">f", 0xcb: ">d"}
_LEN = {0xc4: ">B", 0xc5: ">H", 0xc6: ">I", 0xd9: ">B", 0xda: ">H", 0xdb: ">I",
        0xdc: ">H", 0xdd: ">I", 0xde: ">H", 0xdf: ">I"}


def _decode(mv: memoryview, at: int) -> tuple[Any, int]:
    b = mv[at]
    at += 1
    if b <= 0x7f:
        return b, at
    if b >= 0xe0:
        return b - 0x100, at
    if 0x80 <= b <= 0x8f:
        return _map(mv, at, b & 0x0f)
    if 0x90 <= b <= 0x9f:
        return _array(mv, at, b & 0x0f)
    if 0xa0 <= b <= 0xbf:
        n = b & 0x1f
        return str(mv[at:at + n], "utf-8"), at + n
    if b == 0xc0:
        return None, at
    if b in (0xc2, 0xc3):
        return b == 0xc3, at
    if b in _FMT:
        fmt = _FMT[b]
        return struct.unpack_from(fmt, mv, at)[0], at + struct.calcsize(fmt)
    if b in _LEN:
        fmt = _LEN[b]
        n = struct.unpack_from(fmt, mv, at)[0]
        at += struct.calcsize(fmt)
        if b in (0xc4, 0xc5, 0xc6):
            if at + n > len(mv):
                raise IndexError("binary field runs past the end of the body")
            return mv[at:at + n], at + n
        if b in (0xd9, 0xda, 0xdb):
            if at + n > len(mv):
                raise IndexError("string runs past the end of the body")
            return str(mv[at:at + n], "utf-8"), at + n
        return (_array if b in (0xdc, 0xdd) else _map)(mv, at, n)
    raise InvalidRequest(f"malformed msgpack body: unsupported type byte 0x{b:02x}")


def _array(mv: memoryview, at: int, n: int) -> tuple[list, int]:
    if n > len(mv) - at:
        raise IndexError("array longer than the body")
    out = []
    for _ in range(n):
        item, at = _decode(mv, at)
        out.append(item)
    return out, at


def _map(mv: memoryview, at: int, n: int) -> tuple[dict, int]:
    if 2 * n > len(mv) - at:
        raise IndexError("map longer than the body")
    out = {}
    for _ in range(n):
        key, at = _decode(mv, at)
        if isinstance(key, (list, dict, memoryview)):
            raise InvalidRequest("malformed msgpack body: a map key must be a scalar")
        out[key], at = _decode(mv, at)
    return out, at
