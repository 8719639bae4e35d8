"""The SSD tier's store: the index, the segments, the block map, and the locks over them.

The reader, the writer and compaction share this state and nothing else: each takes the store
and calls its methods, none reaches into another part. The store moves no payload bytes; it
says where a block is, claims and pins space, applies what a write or a move did, forgets
blocks, and counts.

Locks (``lock`` is never held across payload I/O or an index transaction):

- ``lock`` guards the block map, the ``Segment`` counters, the disk-space state and the
  counters.
- ``commit_lock`` orders index mutations (commits, deletes, batch commits, compaction moves).
  It is taken before ``lock``, never inside it.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvtier.errors import CorruptBlock, InvalidRequest, KVTierError, StorageFull
from kvtier.tiers.ssd.blockmap import BlockMap, Pending
from kvtier.tiers.ssd.deletes import RecordDeleter
from kvtier.tiers.ssd.index import COMMIT_SLACK, Index, Location, Record
from kvtier.tiers.ssd.segments import Segment, SegmentSet
from kvtier.tiers.ssd.space import DiskSpace

log = logging.getLogger(__name__)

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
Pinned = tuple[Location, Segment | None, bytes | None]  # location, pinned segment, inline bytes


@dataclass(slots=True, eq=False)
class Reservation:
    """Room claimed for one put: its record's ``segment``/``offset``, or no segment: inline."""

    key: bytes
    nbytes: int
    segment: Segment | None
    offset: int


class Store:
    """Index, segments and the block map between them (see the module docstring).

    ``durability`` is the tier's level ("sync", "batch" or "none").
    """

    def __init__(self, root: Path, index: Index, segments: SegmentSet,
                 locations: dict[bytes, Location], durability: str, space: DiskSpace,
                 counters: Counter[str]) -> None:
        self.root = root
        self.index = index
        self.segments = segments
        self.durability = durability
        self.space = space
        self.counters = counters
        self.lock = threading.Lock()
        self.commit_lock = threading.Lock()
        self.deleter = RecordDeleter(index)
        self.blocks = BlockMap(locations, segments)
        self.locations = self.blocks.locations  # read without the lock: one dict lookup
        self._index_damage: str | None = None  # the last index failure found at run time
        self._closed = False

    @property
    def used_bytes(self) -> int:
        """Live payload bytes (dead space awaiting compaction is not counted)."""
        return self.blocks.used

    def mark_closed(self) -> bool:
        """Refuse reads and puts from now on; False if it was closed already."""
        with self.lock:
            was, self._closed = self._closed, True
            return not was

    def location(self, key: bytes) -> Location | None:
        return self.locations.get(key)

    def snapshot(self) -> dict[bytes, Location]:
        with self.lock:
            return dict(self.locations)

    def count(self, **increments: int) -> None:
        with self.lock:
            self.counters.update(increments)

    # ---- reads -------------------------------------------------------------------------------
    def pin(self, key: bytes, offset: int) -> Pinned:
        """Resolve ``key`` for a read from byte ``offset``: its location, its segment (pinned:
        the file stays open until ``unpin``; None for inline), and the inline payload if its
        record is still waiting for a batch commit. Raises KeyError, InvalidRequest (offset past
        the end) or KVTierError (closed)."""
        with self.lock:
            return self._pin(key, offset)

    def pin_many(self, wanted: Iterable[tuple[bytes, int]]) -> list[Pinned | Exception]:
        """``pin`` for many reads under one lock; per read the result or its error."""
        out: list[Pinned | Exception] = []
        with self.lock:
            if self._closed:
                raise KVTierError("the ssd tier is closed")
            for key, offset in wanted:
                try:
                    out.append(self._pin(key, offset))
                except (KeyError, InvalidRequest) as e:
                    out.append(e)
        return out

    def _pin(self, key: bytes, offset: int) -> Pinned:
        if self._closed:
            raise KVTierError("the ssd tier is closed")
        loc = self.locations.get(key)
        if loc is None:
            raise KeyError(key)
        if offset > loc.length:
            raise InvalidRequest(
                f"offset {offset} is past the end of block {key.hex()} ({loc.length} bytes)")
        if not loc.segment:
            return loc, None, self.blocks.pending_inline(key)
        seg = self.segments.by_id[loc.segment]
        seg.readers += 1
        return loc, seg, None

    def unpin(self, segs: Iterable[Segment | None]) -> None:
        with self.lock:
            for seg in segs:
                if seg is not None:
                    self.segments.release(seg)

    def finish_read(self, seg: Segment, key: bytes, nbytes: int, direct: bool, ok: bool) -> None:
        """Unpin one read's segment and, when it served ``nbytes``, count it."""
        now = time.time()
        with self.lock:
            self.segments.release(seg)
            if ok:
                self._served(key, nbytes, direct, False, now)

    def served(self, reads: Iterable[tuple[bytes, int, bool, bool]]) -> None:
        """Count reads that served their bytes: (key, bytes, direct, coalesced) each."""
        now = time.time()
        with self.lock:
            for key, nbytes, direct, coalesced in reads:
                self._served(key, nbytes, direct, coalesced, now)

    def _served(self, key: bytes, nbytes: int, direct: bool, coalesced: bool, now: float) -> None:
        c = self.counters
        c["blocks_read"] += 1
        c["bytes_read"] += nbytes
        c["direct_reads" if direct else "buffered_reads"] += 1
        c["coalesced_reads"] += coalesced
        self.blocks.touch(key, now)

    def take_touches(self) -> dict[bytes, tuple[float, int]]:
        """Access times and hit counts since the last call (persisted lazily)."""
        with self.lock:
            return self.blocks.take_touches()

    def read_inline(self, key: bytes, loc: Location, out: np.ndarray, offset: int) -> int:
        """Copy committed inline bytes of ``key`` from ``offset`` into ``out``; -1 if the index
        has none. Index damage found on the way is counted and raised as ``CorruptBlock``."""
        try:
            return self.index.read_inline(key, out, offset)
        except KVTierError as e:
            raise self.index_unreadable(key, loc, e) from None

    # ---- damage ------------------------------------------------------------------------------
    def drop_corrupt(self, key: bytes, loc: Location, why: str) -> CorruptBlock:
        """Remove a block whose bytes failed verification; returns the error to raise."""
        with self.commit_lock:
            with self.lock:
                mine = self.locations.get(key) == loc and self._forget(key) is not None
                if mine:
                    self.counters["corrupt_blocks"] += 1
            if mine:
                self._remove_records([(key, loc)], "removing a corrupt block")
        log.warning("ssd block %s %s; dropped", key.hex(), why)
        return CorruptBlock(f"ssd block {key.hex()} {why}; dropped", dropped=True)

    def index_unreadable(self, key: bytes, loc: Location, e: KVTierError) -> CorruptBlock:
        """A block the index cannot give back (damage found on read): counted, dropped, a miss."""
        self.index_failed(e, f"reading block {key.hex()}")
        return self.drop_corrupt(key, loc, "is unreadable from the damaged index")

    def index_failed(self, e: KVTierError, what: str) -> None:
        """Count and log index damage found at run time; ``damage`` reports it from now on.

        A full disk is not damage (the caller counts it as the disk refusing). The first failure
        is logged as an error, later ones at debug level. Caller does not hold ``lock``.
        """
        if isinstance(e, StorageFull):
            return
        with self.lock:
            self.counters["index_errors"] += 1
            first, self._index_damage = self._index_damage is None, f"{what}: {e}"
        log.log(logging.ERROR if first else logging.DEBUG,
                "ssd index under %s failed while %s: %s", self.root, what, e)

    def damage(self) -> str | None:
        """The index-damage sentence for ``health``, or None."""
        if self._index_damage is None:
            return None
        return (f"index damaged under {self.root} ({self.counters['index_errors']} errors, last "
                f"{self._index_damage}): blocks it cannot give back are misses; the next open "
                "checks it")

    # ---- writes ------------------------------------------------------------------------------
    def room_problem(self, nbytes: int, free: int) -> str | None:
        """Why a put of ``nbytes`` would be refused now (``free``: free disk), or None."""
        with self.lock:
            return self.space.room_problem(self.blocks.used + self.blocks.reserved, nbytes, free)

    def reserve(self, key: bytes, nbytes: int, *, inline: bool, free: int,
                prefer: Segment | None = None) -> Reservation | None:
        """Claim room for a put of ``key`` (``free``: free disk measured by the caller), in
        segment ``prefer`` when it can take it.

        None if ``key`` is stored or being written (the put is a no-op). Raises StorageFull
        (budget, floor, disk) or KVTierError (closed, no segment could be created), counted.
        """
        with self.lock:
            if self._closed:
                raise KVTierError("the ssd tier is closed")
            if self.blocks.taken(key):
                return None
            problem = self.space.room_problem(self.blocks.used + self.blocks.reserved, nbytes,
                                              free)
            if problem and inline and self.space.disk_problem(nbytes, free):
                problem = self.space.room_problem(self.blocks.used + self.blocks.reserved, nbytes,
                                                  free + self._index_room())
            if problem:
                self.counters["put_failures"] += 1
                if self.space.disk_problem(nbytes, free):
                    self._refused_for_disk(nbytes)
                raise StorageFull(problem)
            seg, offset = None, 0
            if not inline:
                try:
                    seg, offset = self.segments.reserve(nbytes, prefer)
                except OSError as e:  # e.g. the segment directory is gone
                    raise self._put_error(e, nbytes) from None
            self.blocks.begin_put(key, nbytes)
            return Reservation(key, nbytes, seg, offset)

    def release(self, res: Reservation, ok: bool) -> None:
        """End a put's reservation: its block written and served (``ok``), or given back."""
        with self.lock:
            self.blocks.end_put(res.key)
            if res.segment is not None:
                if ok:
                    res.segment.writers -= 1
                else:
                    self.segments.unreserve(res.segment, res.offset, res.nbytes)

    def commit(self, puts: list[tuple[Reservation, Record, bytes | None]]) -> None:
        """Commit records (payloads written, and synced as durability asks) in one index
        transaction, then serve their blocks. Raises KVTierError from the index."""
        with self.commit_lock:
            self.deleter.discard(res.key for res, _, _ in puts)
            self.index.commit([(res.key, rec, blob) for res, rec, blob in puts])
            with self.lock:
                for res, rec, _ in puts:
                    self._insert(res.key, rec.loc, res.segment)

    def _index_room(self) -> int:
        """Disk an inline block can use that free space does not show (lock held): pages the
        index freed and reuses, less the inline payloads waiting to commit and the margin a
        commit needs for its own new pages (``COMMIT_SLACK``). Without it a disk
        that inline blocks filled refused every put for good: deleting them frees pages only
        inside the index file, which never shrinks."""
        try:
            reusable = self.index.reusable_bytes()
        except KVTierError:
            return 0
        return max(0, reusable - self.blocks.pending_inline_bytes - COMMIT_SLACK)

    def stage(self, res: Reservation, rec: Record, blob: bytes | None) -> None:
        """Serve a written block now; its record commits with the next batch (``take_batch``)."""
        self.deleter.discard([res.key])
        with self.lock:
            self.blocks.stage(Pending(res.key, rec, blob, res.segment))
            self._inserted(rec.loc)

    def take_batch(self) -> list[Pending]:
        """The puts waiting for a batch commit (caller holds ``commit_lock`` until it calls
        ``batch_done``)."""
        with self.lock:
            return self.blocks.take_batch()

    def batch_failed(self, batch: list[Pending], e: OSError | KVTierError) -> None:
        """A batch commit failed: its blocks are no longer served, counted."""
        with self.lock:
            for p in batch:
                if self.locations.get(p.key) == p.record.loc:
                    self._forget(p.key)
            self.counters["put_failures"] += len(batch)
            if isinstance(e, StorageFull) or getattr(e, "errno", None) in FULL_ERRNOS:
                self._refused_for_disk(max(p.record.loc.length for p in batch))
        if isinstance(e, KVTierError):
            self.index_failed(e, "committing a batch")

    def keep_batch(self, batch: list[Pending], e: KVTierError) -> list[Pending]:
        """A batch whose payloads are synced but whose records did not commit: its blocks stay
        served and wait for the next commit, as acknowledged puts must; returns those not kept
        (deleted meanwhile), whose batch is over. Counted as the disk refusing, or as index
        damage."""
        with self.lock:
            ended = self.blocks.restage(batch)
            if isinstance(e, StorageFull):
                self._refused_for_disk(max(p.record.loc.length for p in batch))
        self.index_failed(e, "committing a batch (kept for the next commit)")
        return ended

    def batch_done(self, batch: list[Pending]) -> None:
        with self.lock:
            self.blocks.batch_ended(batch)

    def _insert(self, key: bytes, loc: Location, seg: Segment | None) -> None:
        self.blocks.insert(key, loc, seg)
        self._inserted(loc)

    def _inserted(self, loc: Location) -> None:
        self.space.stored()
        self.counters["blocks_written"] += 1
        self.counters["bytes_written"] += loc.length

    def put_failed(self, e: OSError | KVTierError, nbytes: int) -> KVTierError:
        """Count a put failed by ``e``; returns the error to raise for it."""
        if isinstance(e, OSError):
            with self.lock:
                return self._put_error(e, nbytes)
        with self.lock:
            self.counters["put_failures"] += 1
            if isinstance(e, StorageFull):  # the index could not grow on a full disk
                self._refused_for_disk(nbytes)
        self.index_failed(e, "committing a block")
        return e

    def refuse(self, nbytes: int, why: str) -> StorageFull:
        """Count a put the disk refused before any room was claimed; returns the error."""
        with self.lock:
            self.counters["put_failures"] += 1
            self._refused_for_disk(nbytes)
        return StorageFull(why)

    def _put_error(self, e: OSError, nbytes: int) -> KVTierError:
        self.counters["put_failures"] += 1
        if e.errno in FULL_ERRNOS:
            self._refused_for_disk(nbytes)
            return StorageFull(f"ssd tier: no space left on the device under {self.root} for a "
                               f"{nbytes}-byte block ({e.strerror})")
        if e.errno == errno.ENOENT:
            return KVTierError(f"ssd tier: segment missing under {self.root} ({e})")
        return KVTierError(f"ssd tier: write of a {nbytes}-byte block under {self.root} failed "
                           f"({e.strerror or e})")

    def _refused_for_disk(self, nbytes: int) -> None:
        self.counters["disk_full"] += 1
        self.space.refused(nbytes)

    # ---- deletes -----------------------------------------------------------------------------
    def delete(self, key: bytes, *, later: bool = False) -> bool:
        """Forget ``key`` and remove its record (now, or by a later ``retry_deletes``; with
        ``later``, by the next one: ``RecordDeleter.defer``)."""
        with self.commit_lock:
            with self.lock:
                committed = not self.blocks.is_pending(key)
                loc = self._forget(key)
            if loc is None:
                return False
            if committed:
                self._remove_records([(key, loc)], "deleting a block", later=later)
        return True

    def delete_many(self, keys: Iterable[bytes], what: str) -> int:
        """Forget these keys and remove their records; returns how many were stored."""
        with self.commit_lock:
            with self.lock:
                gone = [(k, loc) for k in keys if (loc := self._forget(k)) is not None]
            if gone:
                self._remove_records(gone, what)
        return len(gone)

    def retry_deletes(self) -> None:
        """Retry index deletes that could not commit before (caller holds ``commit_lock``)."""
        self.deleter.retry()

    def _remove_records(self, items: list[tuple[bytes, Location]], what: str, *, later: bool = False) -> None:
        error = self.deleter.defer(items) if later else self.deleter.remove(items)
        if error is not None:
            self.index_failed(error, what)

    def _forget(self, key: bytes) -> Location | None:
        """Stop serving ``key`` (caller holds ``lock`` and ``commit_lock``: no batch commit is
        half-way through the pending puts)."""
        loc = self.blocks.forget(key)
        if loc is not None and loc.segment in self.segments.by_id:
            self.space.dead_space = True
        return loc

    # ---- compaction --------------------------------------------------------------------------
    def compaction_candidates(self, threshold: float) -> list[Segment]:
        """Segments puts no longer write whose live fraction is under ``threshold``, pinned."""
        with self.lock:
            segs = self.segments
            found = [s for s in segs.by_id.values()
                     if not segs.is_active(s) and s.writers == 0 and s.uncommitted == 0
                     and s.head and s.live / s.head < threshold]
            for s in found:
                s.readers += 1
        return found

    def dead_bytes(self) -> int:
        """Bytes of segments puts no longer write that hold no live block (deleted or evicted
        blocks, and record padding): what compaction could give back to the file system."""
        with self.lock:
            segs = self.segments
            return sum(s.head - s.live for s in segs.by_id.values() if not segs.is_active(s))

    def blocks_in(self, seg: Segment) -> list[tuple[bytes, Location]]:
        with self.lock:
            return self.blocks.in_segment(seg)

    def reserve_space(self, nbytes: int) -> tuple[Segment, int]:
        """Claim a record of ``nbytes`` at a segment head for a moved block."""
        with self.lock:
            return self.segments.reserve(nbytes)

    def unreserve_space(self, seg: Segment, offset: int, nbytes: int) -> None:
        with self.lock:
            self.segments.unreserve(seg, offset, nbytes)

    def moved(self, segs: Iterable[Segment]) -> None:
        """The writes of moved blocks into ``segs`` (one per claimed record) are over."""
        with self.lock:
            for seg in segs:
                seg.writers -= 1

    def relocate(self, src: Segment, moves: list[tuple[bytes, Location, Location, Segment]]
                 ) -> bool:
        """Commit moved blocks' new locations (only those still where they were copied from),
        serve them there, and retire ``src`` if nothing live is left in it; whether it was.
        Raises KVTierError from the index."""
        with self.commit_lock:
            # Only blocks still served from where they were copied: one deleted meanwhile may
            # have its record still there (a capacity eviction's goes with the next flush), and
            # moving that record would keep it past its delete.
            with self.lock:
                moves = [m for m in moves if self.locations.get(m[0]) == m[1]]
            moved = self.index.relocate([(k, old, new) for k, old, new, _ in moves])
            with self.lock:
                for key, old, new, dst in moves:
                    if key in moved and self.blocks.move(key, old, new, src, dst):
                        self.counters["compacted_bytes"] += new.length
                if src.live != 0:
                    log.warning("segment %s still holds %d live bytes; kept", src.path.name,
                                src.live)
                    return False
                self.segments.retire(src)
                return True

    # ---- reports -----------------------------------------------------------------------------
    def stats(self) -> tuple[dict[str, int | float], dict[str, int], list[Segment]]:
        """Block, byte and segment figures, a copy of the counters, and the open segments."""
        with self.lock:
            segs = list(self.segments.by_id.values())
            head = sum(s.head for s in segs)
            live = sum(s.live for s in segs)
            figures: dict[str, int | float] = {
                "blocks": len(self.locations), "used_bytes": self.blocks.used,
                "segments": len(segs), "segment_bytes": head,
                "live_fraction": live / head if head else 1.0}
            return figures, dict(self.counters), segs
