"""The sidecar's KV wire formats, shared by the client and the server.

- msgpack (``application/msgpack``): ``kv`` is a list over layers of lists of
  ``{"shape": [tokens, ...], "dtype": "float16", "data": <raw C-order bytes>}``.
- packed (shared memory): the KV of ``n`` tokens laid out layer by layer, tensor by tensor, each
  ``[slot, *tensor_shape]`` C-contiguous, with no padding (``packed_nbytes(layout, slot)``
  bytes; ``slot`` is ``n`` unless ``slot_tokens`` says more, and the first ``n`` rows count).
"""

from __future__ import annotations

import warnings
from math import prod
from typing import Any

import torch

from kvtier.errors import InvalidType, LayoutMismatch
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
