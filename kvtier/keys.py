"""Namespace digests and chained prefix hashes.

Block i's key is ``blake2b(key[i-1] || token_ids[i] as little-endian int64, digest_size=16)``;
block 0 chains from the namespace digest. Keys are stable across processes and machines (no
Python ``hash()``, no seeds), and two namespaces (name, model, layout, codec, block size,
tenant salt) never share a key. A trailing partial block gets no key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeAlias

import numpy as np

from kvtier.errors import InvalidRequest, InvalidType

if TYPE_CHECKING:
    import torch

# Token ids as the API takes them: a sequence of ints, or a 1-D integer array or tensor.
TokenIds: TypeAlias = "Sequence[int] | np.ndarray | torch.Tensor"

KEY_BYTES = 16


def namespace_digest(
    model_id: str, layout_fingerprint: str, codec: str, block_tokens: int, tenant_salt: str = "",
    name: str = "", engine_fingerprint: str | None = None,
) -> bytes:
    """Digest that seeds a namespace's key chain; any differing field gives disjoint keys.

    The namespace's own name is part of it: two namespaces of one tenant and model never share
    a block, so dropping, expiring or counting one never touches the other. A block namespace
    (engine pages) adds the engine's fingerprint (model, KV dtype, tokens per block, ranks,
    cache layout, salt): two engine configurations never share a page.
    """
    h = hashlib.blake2b(digest_size=KEY_BYTES, person=b"kvtier-ns-v2")
    parts = [model_id, layout_fingerprint, codec, str(block_tokens), tenant_salt, name]
    if engine_fingerprint is not None:  # absent for token namespaces: their digests stay as they were
        parts += ["pages", engine_fingerprint]
    for part in parts:
        data = part.encode()
        h.update(len(data).to_bytes(4, "little"))
        h.update(data)
    return h.digest()


def block_key(ns_digest: bytes, engine_key: bytes) -> bytes:
    """Internal key of an engine block: the engine's own key (already chained by the engine)
    salted with its namespace's digest."""
    h = hashlib.blake2b(ns_digest, digest_size=KEY_BYTES, person=b"kvtier-blk-v1")
    h.update(engine_key)
    return h.digest()


def as_token_array(token_ids: TokenIds) -> np.ndarray:
    """Validate token ids and return them as a contiguous int64 array.

    Raises InvalidType for non-integers and InvalidRequest for empty or negative ids.
    """
    if hasattr(token_ids, "detach"):  # torch tensor
        token_ids = token_ids.detach().cpu().numpy()
    if isinstance(token_ids, (str, bytes)):
        raise InvalidType(f"token_ids must be a sequence of integers, got {type(token_ids).__name__}")
    arr = np.asarray(token_ids)
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 1:
        raise InvalidRequest(f"token_ids must be one-dimensional, got shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise InvalidRequest("token_ids is empty: expected at least one token id")
    integral = np.issubdtype(arr.dtype, np.integer) or (
        arr.dtype == object and all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in arr.tolist()))
    if not integral:
        raise InvalidType(f"token_ids must all be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if (arr < 0).any():
        raise InvalidRequest(f"token_ids must be >= 0, got {int(arr.min())}")
    return np.ascontiguousarray(arr)


def prefix_hashes(ns_digest: bytes, tokens: np.ndarray, block_tokens: int) -> list[bytes]:
    """Chained keys of every full block of ``tokens`` (validated by ``as_token_array``)."""
    n_blocks = len(tokens) // block_tokens
    keys: list[bytes] = []
    parent = ns_digest
    raw = tokens[: n_blocks * block_tokens].astype("<i8", copy=False).tobytes()
    stride = block_tokens * 8
    for i in range(n_blocks):
        h = hashlib.blake2b(parent, digest_size=KEY_BYTES)
        h.update(raw[i * stride : (i + 1) * stride])
        parent = h.digest()
        keys.append(parent)
    return keys
