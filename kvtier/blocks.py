"""Engine blocks addressed by the engine's own keys: validation and the pieces the manager uses.

An inference engine (vLLM's offloading tiers, SGLang's HiCache) names each page of KV by its own
opaque key (a chained hash it computed) and hands kvtier the page's raw bytes. kvtier keeps such
a page as an ordinary block of a *block namespace* (``Namespace.kind == "pages"``): one layer, one
"token" whose shape is ``(page_bytes,)`` of ``uint8``, encoded in the usual block format. So
checksums, durability, eviction, TTL, warm restarts and per-namespace metrics hold unchanged on
every tier. Its internal key is ``blake2b(namespace digest, engine key)``; it has no parent (the
engine already chained its keys).

The namespace digest includes the engine's *fingerprint* (model, KV dtype, tokens per block,
TP/PP rank, cache layout, tenant salt): two engine configurations never share a page, and
re-registering a name with another fingerprint is ``FingerprintMismatch``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvtier.codecs import normalize_spec
from kvtier.errors import InvalidRequest, InvalidType
from kvtier.layout import KVLayout

MAX_KEY_BYTES = 64
LOSSLESS_CODECS = ("none", "none+zstd")
MAX_PAGE_BYTES = 1 << 30


@dataclass(frozen=True, slots=True)
class BlockHits:
    """Which of a list of engine keys are stored: ``leading`` counts the run present from key 0
    (what an engine can load), ``present`` says it for every key."""

    leading: int
    present: list[bool]

    def to_dict(self) -> dict:
        return {"leading": self.leading, "present": list(self.present)}


def canonical_fingerprint(fingerprint: dict | str) -> str:
    """The engine fingerprint as canonical JSON (sorted keys), so equal configurations give equal
    strings whichever process built them."""
    if isinstance(fingerprint, str):
        if not fingerprint:
            raise InvalidRequest("fingerprint must not be empty: describe the engine configuration")
        return fingerprint
    if not isinstance(fingerprint, dict) or not fingerprint:
        raise InvalidType(f"fingerprint must be a non-empty dict or string, got {type(fingerprint).__name__}")
    try:
        return json.dumps(fingerprint, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise InvalidType(f"fingerprint must be JSON-serialisable: {e}") from None


def pages_codec(codec: str) -> str:
    """The canonical spec of a codec allowed for opaque pages (lossless only)."""
    spec = normalize_spec(codec)
    if spec not in LOSSLESS_CODECS:
        raise InvalidRequest(f"engine pages are opaque bytes: only the lossless codecs 'none' and "
                             f"'zstd' apply, got {codec!r} (fp8/int8 quantize float KV)")
    return spec


def pages_layout(page_bytes: int) -> KVLayout:
    if isinstance(page_bytes, bool) or not isinstance(page_bytes, int) or not 1 <= page_bytes <= MAX_PAGE_BYTES:
        raise InvalidRequest(f"page_bytes must be an integer in 1..{MAX_PAGE_BYTES}, got {page_bytes!r}")
    return KVLayout(1, ((page_bytes,),), "uint8")


def engine_keys(keys: Any) -> list[bytes]:
    """Validate a list of engine keys (bytes of 1..64 each); nothing is stored on failure."""
    if isinstance(keys, (bytes, bytearray, str)) or not isinstance(keys, Sequence):
        raise InvalidType(f"keys must be a list of bytes, got {type(keys).__name__}")
    out = []
    for i, k in enumerate(keys):
        if isinstance(k, (bytearray, memoryview)):
            k = bytes(k)
        if not isinstance(k, bytes):
            raise InvalidType(f"keys[{i}] must be bytes, got {type(k).__name__}")
        if not 1 <= len(k) <= MAX_KEY_BYTES:
            raise InvalidRequest(f"keys[{i}] has {len(k)} bytes: engine keys must be 1..{MAX_KEY_BYTES} bytes")
        out.append(k)
    return out


def page_rows(pages: Any, n: int, page_bytes: int, *, writable: bool = False) -> list[torch.Tensor]:
    """``n`` 1-D uint8 tensors of ``page_bytes`` each, viewing ``pages`` (no copy).

    ``pages`` is a 2-D ``[>= n, page_bytes]`` uint8 tensor, or a sequence of at least ``n`` rows,
    each a 1-D uint8 tensor or a buffer (bytes, bytearray, memoryview) of exactly ``page_bytes``.
    ``writable`` rows are for reading blocks into (``get_blocks_into``).
    """
    what = "out" if writable else "pages"
    if isinstance(pages, torch.Tensor):
        if pages.dtype != torch.uint8:
            raise InvalidType(f"{what} must be a uint8 tensor, got {pages.dtype}")
        if pages.dim() != 2 or pages.shape[1] != page_bytes or pages.shape[0] < n:
            raise InvalidRequest(f"{what} has shape {tuple(pages.shape)}: expected [{n}, {page_bytes}] "
                                 f"(one row of page_bytes per key)")
        if pages.stride(1) != 1:
            raise InvalidRequest(f"{what} rows must be contiguous")
        return [pages[i] for i in range(n)]
    if isinstance(pages, (bytes, bytearray, memoryview, str)) or not isinstance(pages, Sequence):
        raise InvalidType(f"{what} must be a 2-D uint8 tensor or a list of pages, got {type(pages).__name__}")
    if len(pages) < n:
        raise InvalidRequest(f"{what} has {len(pages)} pages for {n} keys")
    rows = []
    for i in range(n):
        p = pages[i]
        if isinstance(p, torch.Tensor):
            if p.dtype != torch.uint8 or p.dim() != 1:
                raise InvalidType(f"{what}[{i}] must be a 1-D uint8 tensor, got {p.dtype} {tuple(p.shape)}")
            if p.stride(0) != 1 and p.numel() > 1:
                raise InvalidRequest(f"{what}[{i}] must be contiguous")
            row = p
        elif isinstance(p, (bytes, bytearray, memoryview)):
            mv = memoryview(p).cast("B") if isinstance(p, memoryview) else memoryview(p)
            if writable and mv.readonly:
                raise InvalidType(f"{what}[{i}] is read-only: pass writable buffers to read into")
            if not len(mv):
                raise InvalidRequest(f"{what}[{i}] has 0 bytes, expected {page_bytes}")
            row = bytes_tensor(mv)
        else:
            raise InvalidType(f"{what}[{i}] must be a uint8 tensor or a bytes-like page, got {type(p).__name__}")
        if row.numel() != page_bytes:
            raise InvalidRequest(f"{what}[{i}] has {row.numel()} bytes: this namespace's pages are {page_bytes} bytes")
        rows.append(row)
    return rows


def bytes_tensor(buf: Any) -> torch.Tensor:
    """A 1-D uint8 tensor viewing ``buf`` (no copy), read-only buffers included: the caller only
    reads it (torch warns about read-only buffers because it cannot enforce that)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(buf, dtype=torch.uint8)
