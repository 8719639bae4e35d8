"""The Tier extension point: one storage level of the hierarchy.

Tiers hold opaque encoded blocks (see ``kvtier.block``) by 16-byte key. The manager owns
placement, eviction order and admission; a tier only stores, reads and reports. The manager
never asks which kind of tier it talks to.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass(frozen=True, slots=True)
class BlockMeta:
    """What a tier persists beside a block so an index can be rebuilt after a restart."""

    namespace: str
    parent: bytes | None  # None for block 0 of a prefix
    tokens: int
    codec: str
    created: float  # unix seconds


@runtime_checkable
class Tier(Protocol):
    """One storage level. All methods are thread-safe.

    - ``put`` stores the whole block or nothing; raises ``StorageFull`` when it does not fit
      (the manager makes room first via ``can_fit``) and never harms blocks already stored.
      Putting a key that exists is a no-op (content-addressed keys: first writer wins).
    - ``read_into`` copies ``out.numel()`` bytes starting at byte ``offset`` of the block into
      ``out`` (a 1-D uint8 tensor, possibly pinned or on a GPU) and returns the count; raises
      ``KeyError`` if absent and ``CorruptBlock`` if stored bytes fail their checksum (the tier
      then drops the block). A whole-block read (offset 0, ``out`` the block's size) verifies
      every byte before it returns: the manager relies on it and does not verify again.
    - ``delete`` returns False if the key was absent.
    - ``scan`` yields what a persistent tier holds (for warm restarts); volatile tiers yield
      nothing.
    - ``durable``: a ``put`` that returned survives a crash (at once, or within the tier's
      documented commit window). The manager acknowledges a put only after every durable tier
      below the one that took it holds the block (write-through admission).
    """

    name: str
    persistent: bool
    durable: bool

    @property
    def capacity_bytes(self) -> int: ...

    @property
    def used_bytes(self) -> int: ...

    def can_fit(self, nbytes: int) -> bool: ...

    def put(self, key: bytes, data: bytes | memoryview | torch.Tensor, meta: BlockMeta) -> None: ...

    def contains(self, key: bytes) -> bool: ...

    def size(self, key: bytes) -> int | None: ...

    def read_into(self, key: bytes, out: torch.Tensor, offset: int = 0) -> int: ...

    def delete(self, key: bytes) -> bool: ...

    def scan(self) -> Iterator[tuple[bytes, BlockMeta, int]]: ...

    def close(self) -> None: ...


@runtime_checkable
class MemoryTier(Tier, Protocol):
    """A tier in addressable memory, which can lend a zero-copy view of a stored block.

    The view stays valid only while the manager holds the block pinned.
    """

    def view(self, key: bytes) -> torch.Tensor: ...


@runtime_checkable
class ReportsHealth(Protocol):
    """A tier that can be degraded while still serving (a full disk, a damaged index, an
    unreachable engine). ``health`` returns what is wrong now, one short sentence each; an empty
    list means healthy. Cheap and non-blocking: ``/readyz`` calls it on every probe."""

    def health(self) -> list[str]: ...


@runtime_checkable
class DiskBound(Protocol):
    """A tier bounded by its file system's free space as well as by its byte budget, whose
    deletes return disk space only later (a log-structured store gets it back by compacting).

    ``short_of_disk(nbytes)`` is True when a put of ``nbytes`` would be refused for the disk
    (a free-space floor, or the device out of space) rather than for the budget. Evicting then
    cannot make the block fit — it would only empty the tier — so the manager does not evict
    for it; the tier's ``put`` refuses the block with ``StorageFull``. Cheap and thread-safe."""

    def short_of_disk(self, nbytes: int) -> bool: ...


@runtime_checkable
class BatchedPuts(Protocol):
    """A tier that stores many blocks in one call, their writes in flight together and made
    durable together (the SSD tier: one fdatasync per segment file written, one index
    transaction — a group commit), where ``put`` after ``put`` pays each of those per block.

    ``put_many(blocks)`` takes ``(key, data, meta)`` triples as ``put`` takes its arguments and
    returns one entry per block: None when it is stored (or was already: first writer wins)
    or the exception ``put`` would have raised for it (``StorageFull``, ``KVTierError``,
    ``InvalidRequest``). It never raises for one block's failure, a failed block changes
    nothing already stored, and when it returns every stored block is exactly as durable as
    ``put`` would have left it (``durable`` tiers: acknowledged, or within the tier's commit
    window). Thread-safe; calls from several threads write in parallel.
    """

    def put_many(self, blocks: Sequence[tuple[bytes, bytes | memoryview | torch.Tensor, BlockMeta]]
                 ) -> list[Exception | None]: ...
