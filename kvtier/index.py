"""The manager's block index: one record per cached block, leases, and the warm-restart rebuild.

A block's record says where its copies live (tier indices, fastest first), who its
parent and children are (a child is useless without its parent), and who is reading it (pins).
The manager mutates these under its lock; nothing here locks.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from dataclasses import dataclass, field

import numpy as np

from kvtier.namespaces import Namespace
from kvtier.policies import EvictionPolicy
from kvtier.tiers.base import BlockMeta, Tier


@dataclass(slots=True, eq=False)
class BlockEntry:
    key: bytes
    namespace: str
    parent: bytes | None
    index: int
    tokens: int
    nbytes: int
    created: float
    codec: str = "none"  # the codec spec its bytes are encoded with
    # Where its copies live, ascending (fastest first), and its children's keys (None until it
    # has one). Why a tuple and no empty set: the garbage collector stops tracking a tuple of
    # ints, never a set, and every object a stored block keeps alive makes full collections come
    # sooner (each walks all of them: ``kvtier.gcpauses``); most blocks are leaves.
    tiers: tuple[int, ...] = ()
    children: set[bytes] | None = None
    pins: int = 0
    hits: int = 0
    doomed: bool = False  # dropped while pinned: freed when the last reader lets go

    def meta(self) -> BlockMeta:
        return BlockMeta(self.namespace, self.parent, self.tokens, self.codec, self.created)

    def add_tier(self, t: int) -> None:
        if t not in self.tiers:
            self.tiers = tuple(sorted((*self.tiers, t)))

    def discard_tier(self, t: int) -> None:
        if t in self.tiers:
            self.tiers = tuple(x for x in self.tiers if x != t)

    def add_child(self, key: bytes) -> None:
        if self.children is None:
            self.children = {key}
        else:
            self.children.add(key)

    def discard_child(self, key: bytes) -> None:
        if self.children is not None:
            self.children.discard(key)


@dataclass(slots=True)
class LeasedBlock:
    """A pinned block of a lease: ``tiers`` lists where copies live, fastest first."""

    index: int
    key: bytes
    nbytes: int
    tiers: list[str]


@dataclass(slots=True)
class Lease:
    """A pinned cached prefix: safe to read until released."""

    namespace: Namespace | None
    blocks: list[LeasedBlock]
    requested_tokens: int
    _entries: list = field(default_factory=list, repr=False)
    token_ids: np.ndarray | None = field(default=None, repr=False)  # a sidecar lease: what to load

    @property
    def tokens(self) -> int:
        return len(self.blocks) * self.namespace.block_tokens if self.namespace else 0


class PinnedKeys:
    """``key in protected`` for eviction: blocks a reader holds, and any keys in ``also``."""

    def __init__(self, index: dict[bytes, BlockEntry], also: Container[bytes] = ()) -> None:
        self._index = index
        self._also = also

    def __contains__(self, key: object) -> bool:
        if key in self._also:
            return True
        e = self._index.get(key) if isinstance(key, bytes) else None
        return e is not None and e.pins > 0


def rebuild_index(tiers: Sequence[Tier], policies: Sequence[EvictionPolicy]) -> dict[bytes, BlockEntry]:
    """Index what persistent tiers hold; blocks whose ancestors are gone are deleted (unreachable)."""
    found: dict[bytes, tuple[BlockMeta, int, int]] = {}
    for t, tier in enumerate(tiers):
        if tier.persistent:
            for key, meta, size in tier.scan():
                found.setdefault(key, (meta, size, t))
    index: dict[bytes, BlockEntry] = {}
    for key, (meta, size, t) in sorted(found.items(), key=lambda kv: kv[1][0].created):
        depth, k = 0, meta.parent
        while k is not None and k in found:
            depth, k = depth + 1, found[k][0].parent
        if k is not None:  # an ancestor is missing: the block can never be reached
            tiers[t].delete(key)
            continue
        entry = BlockEntry(key, meta.namespace, meta.parent, depth, meta.tokens, size, meta.created,
                           meta.codec)
        index[key] = entry
        entry.add_tier(t)
        policies[t].insert(key)
    for e in index.values():
        if e.parent is not None and e.parent in index:
            index[e.parent].add_child(e.key)
    return index
