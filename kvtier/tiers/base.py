"""The Tier extension point: one storage level of the hierarchy.

Tiers hold opaque encoded blocks (see ``kvtier.block``) by 16-byte key. The manager owns
placement, eviction order and admission; a tier only stores, reads and reports. Every tier
implements ``Tier``; what only some tiers can do is a small capability Protocol of its own below
(``MemoryTier``, ``WritesInPlace``, ``RangedBatchReads``, ``ScatterReads``, ``RegisteredBatchReads``, ``SharedIndex``,
``DiskBound``, ``ReportsHealth``, ``ReportsStats``), checked with ``isinstance`` once, when a cache is built or
a load starts (``kind_check`` remembers the answer over a load's blocks): nothing asks a tier what
it is by probing its attributes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeGuard, TypeVar, runtime_checkable

import numpy as np
import torch

from kvtier.pieces import BlockPieces


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

    # read-only here: a plain attribute satisfies them
    @property
    def name(self) -> str: ...

    @property
    def persistent(self) -> bool: ...

    @property
    def durable(self) -> bool: ...

    @property
    def capacity_bytes(self) -> int: ...

    @property
    def used_bytes(self) -> int: ...

    def can_fit(self, nbytes: int) -> bool: ...

    def fits_ever(self, nbytes: int) -> bool: ...

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

    def slot(self, key: bytes) -> tuple[int, int] | None:
        """(offset into the tier's memory, nbytes) of a stored block, or None."""

    @property
    def host_bytes(self) -> np.ndarray | None:
        """The tier's memory as one numpy byte array where it is host memory (None on a
        device): with ``slot``, many blocks are gathered by one copy call."""


@runtime_checkable
class WritesInPlace(Protocol):
    """A tier whose put can hand its caller the block's slot to write into (the memory tiers):
    a block encoded straight into place is copied once, not encoded into a buffer and copied
    again. ``put_with(key, nbytes, write, meta)`` calls ``write`` with ``nbytes`` of host uint8
    to fill; False, writing nothing, if ``key`` is already stored; if ``write`` raises, nothing
    is stored. Raises ``StorageFull`` like ``put``. ``put_many_with(blocks, write)`` does so for
    the leading (key, nbytes, meta) it has slots for, filled by one ``write`` of them all, and
    returns how many."""

    def put_with(self, key: bytes, nbytes: int, write: Callable[[torch.Tensor], None],
                 meta: BlockMeta | None = None) -> bool: ...

    def put_many_with(self, blocks: Sequence[tuple[bytes, int, BlockMeta | None]],
                      write: Callable[[list[torch.Tensor]], None]) -> int: ...


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
class ReportsStats(Protocol):
    """A tier with counters of its own (JSON-able), shown as ``extra`` in ``/v1/stats``."""

    def stats(self) -> dict: ...


@runtime_checkable
class RangedBatchReads(Protocol):
    """A tier that overlaps many range reads in one call (the SSD tier: a thread pool, adjacent
    records coalesced). ``requests`` are ``(key, out, offset)`` as for ``read_into``; returns, per
    request, the byte count or the exception ``read_into`` would raise (never raises itself)."""

    def read_many_into(self, requests: list[tuple[bytes, torch.Tensor, int]]) -> list[int | Exception]: ...


@runtime_checkable
class ScatterReads(Protocol):
    """A tier that reads one range of a block into several host buffers in one request (the
    SSD tier: one ``preadv``, O_DIRECT when every buffer is whole 4 KiB pages of aligned memory).

    ``read_scatter_into(key, offset, outs)`` fills ``outs`` (1-D uint8 numpy arrays) in order
    with the block's bytes from ``offset``, as if they lay end to end, and returns the bytes
    read (short only past the block's end). Raises and verifies as ``read_into``: a whole-block
    read is checked against the block's checksum, other ranges are the caller's to check. Why:
    a block's layers land straight in a destination whose tensors are not adjacent in memory
    (K and V of a layer), with no staging copy.
    """

    def read_scatter_into(self, key: bytes, offset: int, outs: Sequence[np.ndarray]) -> int: ...


@runtime_checkable
class RegisteredBatchReads(Tier, Protocol):
    """A tier that reads blocks only whole, a batch per call, straight into host memory
    registered with it once (a remote engine; every call is a network round trip).

    - ``read_blocks_into(keys, outs)``: whole blocks into ``outs`` (each exactly the block's
      size), verified; per block the byte count or the exception (``KeyError`` for misses).
    - ``batched_reads``: True when one call serves the whole batch (else callers should spread
      blocks over their own threads, one per call).
    - ``register``/``unregister`` a long-lived buffer (slow: once per buffer, never per read);
      ``when_settled(tensor, fn)`` runs ``fn`` once no timed-out read can still write there.
    """

    @property
    def batched_reads(self) -> bool: ...

    def read_blocks_into(self, keys: Sequence[bytes], outs: Sequence[torch.Tensor]) -> list[int | Exception]: ...

    def register(self, tensor: torch.Tensor) -> bool: ...

    def unregister(self, tensor: torch.Tensor) -> bool: ...

    def when_settled(self, tensor: torch.Tensor, fn: Callable[[], None]) -> None: ...


@runtime_checkable
class SharedIndex(Tier, Protocol):
    """A tier shared by several kvtier instances (a remote engine). It evicts by its own policy
    (the manager never evicts from it; ``can_fit`` is its write bound), answers for many keys in
    one round trip, and a block another instance stored can be found there though this instance
    never indexed it. A dropped block's copy there is only forgotten, except for explicit
    evictions, which delete it (outside the cache lock: every call is a network round trip)."""

    def contains_many(self, keys: Sequence[bytes]) -> list[bool]: ...


@runtime_checkable
class BatchedDeletes(Protocol):
    """A tier that removes many blocks in one call for what ``delete`` pays per block (the SSD
    tier: one index transaction, where each ``delete`` commits, and syncs, its own).

    ``delete_many(keys)`` is ``delete`` of each key, all done when it returns; returns how many
    were stored. Never raises for the index, as ``delete``."""

    def delete_many(self, keys: Sequence[bytes]) -> int: ...


@runtime_checkable
class LazyDeletes(Protocol):
    """A tier whose ``delete`` pays for durability (the SSD tier: an index transaction and its
    sync) and can leave that to a later batch: ``delete_later(key)`` removes the block from
    this process at once, as ``delete``, and its durable record with the tier's next flush.
    A crash before then brings the block back, intact: for evictions that make room, never
    for deletes a caller asked for."""

    def delete_later(self, key: bytes) -> bool: ...


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

    def put_many(self, blocks: Sequence[tuple[bytes, bytes | memoryview | torch.Tensor | BlockPieces,
                                              BlockMeta]]
                 ) -> list[Exception | None]: ...


K = TypeVar("K")


def kind_check(proto: type[K]) -> Callable[[object], TypeGuard[K]]:
    """``isinstance(tier, proto)`` remembered per tier, for one pass over a load's blocks. Why:
    a runtime Protocol check walks the protocol's members every time (13 us), and a 2 GiB
    reload of 2 MiB blocks would ask it thousands of times about one or two tiers."""
    seen: dict[int, bool] = {}

    def check(tier: object) -> TypeGuard[K]:
        known = seen.get(id(tier))
        if known is None:
            known = seen[id(tier)] = isinstance(tier, proto)
        return known
    return check
