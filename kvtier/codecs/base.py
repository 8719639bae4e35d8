"""The Codec extension point and its registry.

A codec turns one layer of one block (a tuple of tensors with the token axis first) into bytes
and back. Spec strings name a value codec optionally stacked with a lossless byte compressor:
``none``, ``fp8``, ``int8``, ``none+zstd``, ``fp8+zstd``, ``int8+zstd`` (``zstd`` means
``none+zstd``). Every encoded block records its spec, so blocks of different codecs coexist.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch

from kvtier.errors import InvalidRequest


@runtime_checkable
class Codec(Protocol):
    """Encode/decode one layer of one block.

    ``encode`` may take tensors on any device and returns CPU bytes. ``decode_into`` reads a 1-D
    uint8 tensor produced by ``encode`` and writes into ``outs`` (contiguous tensors with the
    original shapes and dtype, on any device) without allocating output tensors. Both are
    thread-safe. ``lossy`` says whether decode(encode(x)) may differ from x.

    A codec may also offer ``encode_parts(tensors) -> list of buffers`` whose concatenation is
    ``encode``'s result; the block encoder then copies each part once, straight into place.
    """

    name: str
    lossy: bool

    def encode(self, tensors: Sequence[torch.Tensor]) -> bytes: ...

    def decode_into(self, data: torch.Tensor, outs: Sequence[torch.Tensor]) -> None: ...


_VALUE_CODECS: dict[str, Callable[[], Codec]] = {}
_BYTE_CODECS: dict[str, Callable[[Codec], Codec]] = {}
_CACHE: dict[str, Codec] = {}


def register_value_codec(name: str, factory: Callable[[], Codec]) -> None:
    _VALUE_CODECS[name] = factory


def register_byte_codec(name: str, factory: Callable[[Codec], Codec]) -> None:
    _BYTE_CODECS[name] = factory


def normalize_spec(spec: str) -> str:
    """Canonical spec string, e.g. ``"zstd"`` -> ``"none+zstd"``. Raises InvalidRequest."""
    if not isinstance(spec, str) or not spec:
        raise InvalidRequest(f"codec must be a non-empty string, got {spec!r}")
    parts = spec.lower().split("+")
    if len(parts) == 1 and parts[0] in _BYTE_CODECS:
        parts = ["none", parts[0]]
    value, *byte = parts
    if value not in _VALUE_CODECS or len(byte) > 1 or (byte and byte[0] not in _BYTE_CODECS):
        raise InvalidRequest(
            f"unknown codec {spec!r}: expected one of {sorted(_VALUE_CODECS)}, optionally "
            f"followed by '+' and one of {sorted(_BYTE_CODECS)}")
    return "+".join(parts)


def get_codec(spec: str) -> Codec:
    """The (cached, shared) codec for a spec string. Raises InvalidRequest if unknown."""
    codec = _CACHE.get(spec) if isinstance(spec, str) else None  # once per layer of every decode
    if codec is not None:
        return codec
    canonical = normalize_spec(spec)
    codec = _CACHE.get(canonical)
    if codec is None:
        value, *byte = canonical.split("+")
        codec = _VALUE_CODECS[value]()
        if byte:
            codec = _BYTE_CODECS[byte[0]](codec)
        _CACHE[canonical] = codec
    _CACHE[spec] = codec
    return codec


def available_codecs() -> list[str]:
    return sorted(_VALUE_CODECS) + [f"{v}+{b}" for v in sorted(_VALUE_CODECS) for b in _BYTE_CODECS]


def group_view(t: torch.Tensor) -> torch.Tensor:
    """View ``[tokens, *heads, last]`` as ``[tokens, groups, last]`` (groups=1 for 2-D tensors)."""
    if t.dim() == 1:
        return t.reshape(t.shape[0], 1, 1)
    return t.reshape(t.shape[0], -1, t.shape[-1])


def as_bytes(t: torch.Tensor) -> bytes:
    """CPU bytes of a tensor's contents."""
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


def take(data: torch.Tensor, offset: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """``n`` elements of ``dtype`` at byte ``offset`` of a uint8 tensor (copied if misaligned)."""
    chunk = data[offset: offset + n * dtype.itemsize]
    if dtype.itemsize > 1 and chunk.data_ptr() % dtype.itemsize:
        chunk = chunk.clone()
    return chunk.view(dtype)
