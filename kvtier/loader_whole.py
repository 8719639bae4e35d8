"""Path 2 of the loader for tiers that read a block only whole (a remote tier).

A remote engine reads a value only whole (Mooncake) and every call is a network round trip, so
header-then-ranges would fetch a block once per range. Instead one ``read_blocks_into`` per
batch of blocks (up to half the staging ring's slots) lands whole blocks straight in ring slots
registered with the tier once (zero-copy where the engine supports it); the tier verifies every
byte, the layers are decoded from the slot, and a block's layers land together. Two batches are
in flight, so one decodes while the next transfers; a tier without batched reads gets one block
per task, ``io_threads`` in flight.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

import torch

from kvtier.block import decode_layer_into
from kvtier.errors import CorruptBlock, KVTierError
from kvtier.loader_job import Fallback, Item, LoadJob, checked_header
from kvtier.loader_promote import Promoter
from kvtier.staging import StagingRing, StagingSlot
from kvtier.tiers.base import RegisteredBatchReads, Tier

log = logging.getLogger(__name__)


class WholeReads:
    """Whole-block batched reads into registered staging; one per loader."""

    def __init__(self, io: Executor, promoter: Promoter, fallback: Fallback,
                 ring_for: Callable[[int], StagingRing],
                 on_stream: Callable[[], contextlib.AbstractContextManager[Any]],
                 cuda: torch.cuda.Stream | None) -> None:
        self._io, self._promoter, self._fallback = io, promoter, fallback
        self._ring_for, self._on_stream, self._cuda = ring_for, on_stream, cuda
        self._lock = threading.Lock()
        self._registered: list[tuple[RegisteredBatchReads, StagingRing]] = []  # registered once

    def submit(self, job: LoadJob, items: list[Item[RegisteredBatchReads]]) -> list[Future]:
        """Submit whole-block reads of ``items`` in batches of up to half the ring's slots (two
        batches in flight: one decodes while the next transfers), or one block per task where
        the tier has no batched read; the futures of the tasks."""
        items = self._known_sizes(job, items)
        if not items:
            return []
        ring = self._ring_for(max(b.nbytes for _, b, _ in items))
        by_tier: dict[int, list[Item[RegisteredBatchReads]]] = {}
        for it in items:
            by_tier.setdefault(id(it[2]), []).append(it)
        futures: list[Future] = []
        for group in by_tier.values():
            tier = group[0][2]
            self._register(tier, ring)
            # A tier that reads block by block gets one block per task, io_threads in flight.
            per = max(1, ring.slots // 2) if tier.batched_reads else 1
            for k in range(0, len(group), per):
                if job.stream.cancelled:
                    break
                batch = group[k:k + per]
                slots = [ring.acquire() for _ in batch]  # back-pressure: at most the ring's slots
                futures.append(self._io.submit(self._read_whole, job, ring, slots, batch, tier))
        return futures

    def _known_sizes(self, job: LoadJob, items: list[Item[RegisteredBatchReads]]) -> list[Item[RegisteredBatchReads]]:
        """``items`` with every block's size known: blocks found by a remote existence query have
        none yet, so ask the tier for those at once (in parallel) and remember the answer, as
        ``TieredCache.load_block`` does; a block without one is read whole through the manager."""
        unknown = [it for it in items if not it[1].nbytes]
        sizes = list(self._io.map(lambda it: _size_or_none(it[2], it[1].key), unknown))
        lost = set()
        for (i, b, _), n in zip(unknown, sizes, strict=True):
            if n:
                b.nbytes = n
                job.result.sizes[b.key] = n
            else:
                lost.add(i)
                self._promoter.abandon(job, i)
                self._fallback(job, i, b)
        return [it for it in items if it[0] not in lost]

    def _read_whole(self, job: LoadJob, ring: StagingRing, slots: list[StagingSlot],
                    batch: list[Item[RegisteredBatchReads]], tier: RegisteredBatchReads) -> None:
        """One ``read_blocks_into`` for ``batch``, then decode each verified block into dest."""
        live = [(slot, i, b) for slot, (i, b, _) in zip(slots, batch, strict=True)
                if not job.stream.cancelled and i < job.stream.valid_blocks]
        outs = [slot.tensor[:b.nbytes] for slot, _, b in live]
        try:
            got = tier.read_blocks_into([b.key for _, _, b in live], outs) if live else []
        except Exception as e:  # noqa: BLE001  read_blocks_into never raises per block; be safe
            got = [e] * len(live)
        try:
            for (_, i, b), out, res in zip(live, outs, got, strict=True):
                try:
                    if isinstance(res, BaseException):
                        raise res
                    if res != b.nbytes:
                        raise CorruptBlock(f"short read: {res} of {b.nbytes} bytes")
                    h = checked_header(out, job.n_layers)
                    views = job.outs(i)
                    with self._on_stream():
                        for layer in range(job.n_layers):  # the tier verified every byte
                            decode_layer_into(h, layer, out, views[layer], verify=False)
                        if self._cuda is not None:
                            self._cuda.synchronize()  # the slot is reused once its copies are done
                except (KeyError, KVTierError, OSError) as e:
                    job.note_failure(tier.name, e)
                    log.warning("block %d in %s unreadable (%s); reading it whole", i, tier.name, e)
                    self._promoter.abandon(job, i)
                    self._fallback(job, i, b)
                    continue
                job.stream._land(range(job.n_layers), [i])
                self._promoter.gather_whole(job, i, out)
        finally:
            for slot in slots:  # a slot a timed-out read may still write into waits for it
                tier.when_settled(slot.tensor, functools.partial(ring.release, slot))

    def _register(self, tier: RegisteredBatchReads, ring: StagingRing) -> None:
        """Register ``ring`` with ``tier`` once (remote engines then read straight into it).
        A ring replaced by a larger one stays registered, and alive, until ``close``."""
        with self._lock:
            if any(t is tier and r is ring for t, r in self._registered):
                return
            self._registered.append((tier, ring))
        tier.register(ring.buffer)

    def close(self) -> None:
        """Unregister every ring (the loader's pools have stopped)."""
        with self._lock:
            registered, self._registered = self._registered, []
        for tier, ring in registered:
            tier.unregister(ring.buffer)


def _size_or_none(tier: Tier, key: bytes) -> int | None:
    try:
        return tier.size(key)
    except (KeyError, KVTierError, OSError):
        return None
