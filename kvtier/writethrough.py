"""Write-through: copies of new blocks into the persistent tiers below the one they landed in.

A durable tier (``Tier.durable``: the SSD tier under ``sync``/``batch``) must hold every block
of a put before the put is acknowledged, so those writes are waited for (``wait``); they run on
a small pool so one put's blocks are written in parallel. Writes to other persistent tiers (SSD
under ``none``, a shared remote tier) run in the background, their queued bytes bounded by
``backlog_bytes`` (a put waits for room: back-pressure rather than memory growth). One write per
block and tier is in flight at a time: a second put of the same block waits on the first's.

A write belongs to its block's entry, not to its key: a namespace dropped and registered again
with the same name and layout gives its blocks the same keys and other bytes. A write of the
dropped entry still in flight is never joined by the new one (the new one waits for it to end,
then writes its own bytes), and never publishes its bytes as the new entry's copy (it deletes
them instead). Both happened: a get returned the dropped namespace's KV, checksums valid.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from kvtier.errors import KVTierError, StorageFull
from kvtier.index import BlockEntry
from kvtier.pieces import Block, contiguous
from kvtier.placement import Placement
from kvtier.tiers.base import BatchedPuts

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DurableWrite:
    """A write of ``entry`` into durable tier ``tier``, which its put waits for."""

    entry: BlockEntry
    tier: int
    future: Future


class WriteThrough:
    """Schedules and tracks write-throughs for one cache. Thread-safe."""

    def __init__(self, placement: Placement, *, admit_on_put: bool, backlog_bytes: int,
                 threads: int) -> None:
        self.placement = placement
        self.admit_on_put = admit_on_put
        self.durable = [t for t, tier in enumerate(placement.tiers) if tier.durable]
        # Per tier: whether a block placed there is written through to some tier under it.
        self._below = [admit_on_put and any(tier.persistent for tier in placement.tiers[t + 1:])
                       for t in range(len(placement.tiers))]
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="kvtier-writer")
        # (key, tier) -> (the entry being written, its write); guarded by the placement lock
        self._inflight: dict[tuple[bytes, int], tuple[BlockEntry, Future]] = {}
        self._pending: set[Future] = set()
        self._backlog = threading.Condition()
        self._backlog_bytes = 0
        self._backlog_limit = backlog_bytes

    @property
    def all_awaited(self) -> bool:
        """Whether every write-through a put starts is one it waits for (none at all, or only
        durable tiers below): the put's pinned blocks then outlive their writes, so a write may
        read a block from its slot in a memory tier instead of from a copy of its own."""
        return not self.admit_on_put or all(tier.durable for tier in self.placement.tiers if tier.persistent)

    def writes_below(self, t: int) -> bool:
        """Whether ``schedule`` writes a block placed in tier ``t`` anywhere (a persistent tier
        under it, write-through admission): a put of a host-only cache skips the bookkeeping."""
        return self._below[t]

    @property
    def batches(self) -> bool:
        """Whether some write-through goes to a durable tier in batches (``schedule``)."""
        return self.admit_on_put and any(self.placement.batched[t] for t in self.durable)

    @property
    def backlog_bytes(self) -> int:
        """Bytes of background writes queued now."""
        return self._backlog_bytes

    def schedule(self, blocks: Sequence[tuple[BlockEntry, Block, int]]) -> list[DurableWrite]:
        """Write new blocks (``(entry, data, the tier it is in now)``) to every persistent tier
        under them; returns the writes to durable tiers. Call without the lock: the backlog
        bound may wait.

        A durable tier that stores batches (``BatchedPuts``: the SSD tier) takes them in one
        ``put_many`` on the pool: their writes in flight together, one group commit, where a
        ``put`` per block kept one write per writer thread in flight. Elsewhere a block in
        pieces (the caller's memory) is copied together first, since a write may outlive the
        put; a durable write does not (the put waits for it)."""
        if not self.admit_on_put:
            return []
        p = self.placement
        waits: list[DurableWrite] = []
        batches: dict[int, list[tuple[BlockEntry, Block]]] = {}
        for entry, data, below in blocks:
            rest = []
            for t in range(below + 1, len(p.tiers)):
                if t in self.durable and p.batched[t]:
                    batches.setdefault(t, []).append((entry, data))
                elif p.tiers[t].persistent:
                    rest.append(t)
            if rest:
                waits += self.write(entry, contiguous(data), rest)
        for t, batch in batches.items():
            waits += self._write_batch(batch, t)
        return waits

    def missing(self, entry: BlockEntry) -> list[int]:
        """Durable tiers that should hold ``entry`` by write-through but do not (lock held)."""
        if not self.admit_on_put or not entry.tiers:
            return []
        fastest = min(entry.tiers)
        return [t for t in self.durable if t > fastest and t not in entry.tiers]

    def write(self, entry: BlockEntry, data: torch.Tensor, tiers: Sequence[int]) -> list[DurableWrite]:
        """Write ``entry`` into each of ``tiers`` (or join a write of it already in flight);
        returns the writes to durable tiers. Call without the lock."""
        waits = []
        for t in tiers:
            background = t not in self.durable
            if background:
                self._reserve(len(data))
            while True:
                with self.placement.lock:  # check and submit at once: one write per block and tier
                    writing, fut = self._inflight.get((entry.key, t), (None, None))
                    if fut is None:
                        fut = self._pool.submit(self._write, entry, data, t)
                        self._inflight[(entry.key, t)] = (entry, fut)
                        self._pending.add(fut)
                        fut.add_done_callback(
                            functools.partial(self._done, entry.key, t, len(data) if background else 0))
                    elif writing is entry and background:
                        self._unreserve(len(data))
                if writing is None or writing is entry:
                    break
                _ended(fut)  # a dropped entry's write of this key: ours goes after it
            if not background:
                waits.append(DurableWrite(entry, t, fut))
        return waits

    def wait(self, writes: Sequence[DurableWrite]) -> None:
        """Wait for a put's durable writes; raise if a block did not reach its tier."""
        p = self.placement
        errors: list[KVTierError] = []
        for w in writes:
            try:
                failed = w.future.result()  # a batch's: its blocks' errors by key
            except KVTierError as e:
                errors.append(e)
                continue
            if failed and w.entry.key in failed:
                errors.append(failed[w.entry.key])
                continue
            with p.lock:
                if w.tier not in w.entry.tiers and not w.entry.doomed:
                    errors.append(StorageFull(
                        f"block {w.entry.index} did not reach the {p.tiers[w.tier].name} tier"))
        if errors:
            first = errors[0]
            raise type(first)(f"put not acknowledged: {len(errors)} of {len(writes)} blocks could "
                              f"not be made durable ({first})")

    def _write(self, entry: BlockEntry, data: torch.Tensor, t: int) -> None:
        """Copy ``entry``'s block into tier ``t``; raises StorageFull/KVTierError if the tier
        cannot take it (counted; a put waiting on a durable tier reports it to its caller)."""
        p = self.placement
        tier = p.tiers[t]
        key = entry.key
        with p.lock:
            if p.index.get(key) is not entry or entry.doomed or t in entry.tiers:
                return
            no_room = self._make_room(t, len(data), 0)
            if no_room is not None:
                raise no_room
            meta = entry.meta()
            p.promise(t, len(data))
        try:
            tier.put(key, data, meta)  # I/O outside the lock
        except BaseException as e:
            with p.lock:
                p.settle(t, len(data))
                if isinstance(e, KVTierError):
                    self._count_failure(t, e)
            raise
        with p.lock:
            p.settle(t, len(data))
            self._publish(entry, t, len(data))

    def _make_room(self, t: int, nbytes: int, promised: int) -> StorageFull | None:
        """Make room in tier ``t`` for ``nbytes`` more than the ``promised`` bytes (lock held);
        the counted StorageFull if it cannot."""
        tier = self.placement.tiers[t]
        if tier.fits_ever(nbytes) and self.placement.make_room(t, promised + nbytes):
            return None
        self.placement.stats.tiers[tier.name].put_failures += 1
        return StorageFull(f"{tier.name} tier has no room for a {nbytes}-byte block ({tier.used_bytes} of "
                           f"{tier.capacity_bytes} bytes used, the rest held by readers or unevictable)")

    def _count_failure(self, t: int, e: Exception) -> None:
        """Count a write-through the tier refused (lock held) and log it: quietly for a full tier
        (``kvtier_put_failures_total`` shows it; a full or frozen tier would flood the log)."""
        tier = self.placement.tiers[t]
        self.placement.stats.tiers[tier.name].put_failures += 1
        log.log(logging.DEBUG if isinstance(e, StorageFull) else logging.WARNING,
                "write-through to %s failed: %s", tier.name, e)

    def _publish(self, entry: BlockEntry, t: int, nbytes: int) -> None:
        """Record ``entry``'s copy written into tier ``t`` (lock held), or delete it if the
        entry was dropped meanwhile (its key may name another entry's bytes by now)."""
        p = self.placement
        if p.index.get(entry.key) is not entry or entry.doomed:
            p.tiers[t].delete(entry.key)
        elif t not in entry.tiers:
            p.publish(entry, t, nbytes)

    def _write_batch(self, blocks: Sequence[tuple[BlockEntry, Block]], t: int) -> list[DurableWrite]:
        """Submit one ``put_many`` of ``blocks`` into durable tier ``t`` (joining the writes of
        any already in flight); returns the writes to wait for."""
        while True:
            waits: list[DurableWrite] = []
            todo: list[tuple[BlockEntry, Block]] = []
            stale: list[Future] = []
            with self.placement.lock:  # check and submit at once: one write per block and tier
                for entry, data in blocks:
                    writing, fut = self._inflight.get((entry.key, t), (None, None))
                    if fut is None:
                        todo.append((entry, data))
                    elif writing is entry:  # joined: the write of this very block
                        waits.append(DurableWrite(entry, t, fut))
                    else:  # a dropped entry's write of this key
                        stale.append(fut)
                if not stale:
                    if todo:
                        fut = self._pool.submit(self._write_many, todo, t)
                        self._pending.add(fut)
                        for entry, _ in todo:
                            self._inflight[(entry.key, t)] = (entry, fut)
                            waits.append(DurableWrite(entry, t, fut))
                        fut.add_done_callback(functools.partial(self._done_many, [e.key for e, _ in todo], t))
                    return waits
            for fut in stale:  # ours go after them (outside the lock: they need it to end)
                _ended(fut)

    def _write_many(self, blocks: Sequence[tuple[BlockEntry, Block]], t: int) -> dict[bytes, KVTierError]:
        """``_write`` for many blocks into batching tier ``t``: room made for all under the lock,
        one ``put_many`` outside it, each published under it. Returns the errors by key (counted;
        a put waiting for them reports them), never raises for one block. A block whose parent
        in the batch did not reach the tier is not kept there either: its copy would be an
        orphan (dropped, unreadable) once the parent left the tiers above."""
        p = self.placement
        tier = p.tiers[t]
        assert isinstance(tier, BatchedPuts)  # schedule batches only such tiers
        failed: dict[bytes, KVTierError] = {}
        go: list[tuple[BlockEntry, Block]] = []
        with p.lock:
            room = 0
            for entry, data in blocks:
                e = entry
                if p.index.get(e.key) is not e or e.doomed or t in e.tiers:
                    continue
                if e.parent in failed:  # its copy there would be an orphan once the parent leaves
                    failed[e.key] = failed[e.parent]
                    continue
                no_room = self._make_room(t, len(data), room)
                if no_room is not None:
                    failed[entry.key] = no_room
                    continue
                room += len(data)
                go.append((e, data))
            p.promise(t, room)
        try:
            results = tier.put_many([(e.key, data, e.meta()) for e, data in go]) if go else []
        finally:
            with p.lock:
                p.settle(t, room)
        with p.lock:
            for (entry, data), err in zip(go, results, strict=True):
                if err is not None:
                    self._count_failure(t, err)
                    failed[entry.key] = err if isinstance(err, KVTierError) else KVTierError(str(err))
                elif entry.parent in failed:  # written beside a parent that was not: no orphans
                    tier.delete(entry.key)
                    failed[entry.key] = failed[entry.parent]
                else:
                    self._publish(entry, t, len(data))
        return failed

    def _done_many(self, keys: Sequence[bytes], t: int, fut: Future) -> None:
        with self.placement.lock:
            self._pending.discard(fut)
            for key in keys:
                if self._inflight.get((key, t), (None, None))[1] is fut:
                    del self._inflight[(key, t)]

    def _reserve(self, nbytes: int) -> None:
        with self._backlog:  # back-pressure: a put waits rather than letting memory grow
            while self._backlog_bytes and self._backlog_bytes + nbytes > self._backlog_limit:
                self._backlog.wait()
            self._backlog_bytes += nbytes

    def _unreserve(self, nbytes: int) -> None:
        with self._backlog:
            self._backlog_bytes -= nbytes
            self._backlog.notify_all()

    def _done(self, key: bytes, t: int, backlog: int, fut: Future) -> None:
        with self.placement.lock:
            self._pending.discard(fut)
            if self._inflight.get((key, t), (None, None))[1] is fut:
                del self._inflight[(key, t)]
        if backlog:
            self._unreserve(backlog)

    def wait_dropped(self, namespace: str) -> None:
        """Wait for the writes of ``namespace``'s blocks still in flight (it was just dropped:
        each ends by deleting the copy it wrote), so none of them is still writing once the
        drop returns and the name is registered again."""
        with self.placement.lock:
            futs = {fut for entry, fut in self._inflight.values() if entry.namespace == namespace}
        for fut in futs:
            _ended(fut)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until the write-throughs queued so far are done."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self.placement.lock:
                fut = next(iter(self._pending), None)
            if fut is None:
                return
            with contextlib.suppress(KVTierError):  # counted where it failed; flush only waits
                fut.result(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _ended(fut: Future) -> None:
    """Wait for a write to end, whatever its outcome (it was counted where it failed)."""
    with contextlib.suppress(Exception):
        fut.result()
