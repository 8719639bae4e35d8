"""Write-through: copies of new blocks into the persistent tiers below the one they landed in.

A durable tier (``Tier.durable``: the SSD tier under ``sync``/``batch``) must hold every block
of a put before the put is acknowledged, so those writes are waited for (``wait``); they run on
a small pool so one put's blocks are written in parallel. Writes to other persistent tiers (SSD
under ``none``, a shared remote tier) run in the background, their queued bytes bounded by
``backlog_bytes`` (a put waits for room: back-pressure rather than memory growth). One write per
block and tier is in flight at a time: a second put of the same block waits on the first's.
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
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="kvtier-writer")
        self._inflight: dict[tuple[bytes, int], Future] = {}  # guarded by the placement lock
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

    @property
    def backlog_bytes(self) -> int:
        """Bytes of background writes queued now."""
        return self._backlog_bytes

    def schedule(self, entry: BlockEntry, data: Block, below: int) -> list[DurableWrite]:
        """Write a new block (now in tier ``below``) to every persistent tier under it; returns
        the writes to durable tiers. Call without the lock: the backlog bound may wait. A block
        in pieces (the caller's memory) is copied together first, since a write may outlive
        the put."""
        if not self.admit_on_put:
            return []
        tiers = self.placement.tiers
        under = [t for t in range(below + 1, len(tiers)) if tiers[t].persistent]
        return self.write(entry, contiguous(data), under) if under else []

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
            with self.placement.lock:  # check and submit at once: one write per block and tier
                fut = self._inflight.get((entry.key, t))
                if fut is None:
                    fut = self._pool.submit(self._write, entry.key, data, t)
                    self._inflight[(entry.key, t)] = fut
                    self._pending.add(fut)
                    fut.add_done_callback(
                        functools.partial(self._done, entry.key, t, len(data) if background else 0))
                elif background:
                    self._unreserve(len(data))
            if not background:
                waits.append(DurableWrite(entry, t, fut))
        return waits

    def wait(self, writes: Sequence[DurableWrite]) -> None:
        """Wait for a put's durable writes; raise if a block did not reach its tier."""
        p = self.placement
        errors: list[KVTierError] = []
        for w in writes:
            try:
                w.future.result()
            except KVTierError as e:
                errors.append(e)
                continue
            with p.lock:
                if w.tier not in w.entry.tiers and not w.entry.doomed:
                    errors.append(StorageFull(
                        f"block {w.entry.index} did not reach the {p.tiers[w.tier].name} tier"))
        if errors:
            first = errors[0]
            raise type(first)(f"put not acknowledged: {len(errors)} of {len(writes)} blocks could "
                              f"not be made durable ({first})")

    def _write(self, key: bytes, data: torch.Tensor, t: int) -> None:
        """Copy a block into tier ``t``; raises StorageFull/KVTierError if the tier cannot take
        it (counted; a put waiting on a durable tier reports it to its caller)."""
        p = self.placement
        tier = p.tiers[t]
        with p.lock:
            entry = p.index.get(key)
            if entry is None or entry.doomed or t in entry.tiers:
                return
            if not (tier.fits_ever(len(data)) and p.make_room(t, len(data))):
                p.stats.tiers[tier.name].put_failures += 1
                raise StorageFull(f"{tier.name} tier has no room for a {len(data)}-byte block "
                                  f"({tier.used_bytes} of {tier.capacity_bytes} bytes used, the rest "
                                  "held by readers or unevictable)")
            meta = entry.meta()
        try:
            tier.put(key, data, meta)  # I/O outside the lock
        except KVTierError as e:
            with p.lock:
                p.stats.tiers[tier.name].put_failures += 1
            # Counted (kvtier_put_failures_total); a full or frozen tier would flood the log.
            log.log(logging.DEBUG if isinstance(e, StorageFull) else logging.WARNING,
                    "write-through to %s failed: %s", tier.name, e)
            raise
        with p.lock:
            entry = p.index.get(key)
            if entry is None or entry.doomed:
                tier.delete(key)
            elif t not in entry.tiers:
                p.publish(entry, t, len(data))

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
            if self._inflight.get((key, t)) is fut:
                del self._inflight[(key, t)]
        if backlog:
            self._unreserve(backlog)

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
