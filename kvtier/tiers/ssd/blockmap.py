"""The SSD tier's in-memory map: where each served block lives, and the puts in between.

Plain containers and the rules that keep them consistent — live bytes per segment, bytes
reserved by puts in flight, the batch waiting for its commit, access times not yet persisted —
with no lock and no I/O: the store calls every method with its lock held.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvtier.tiers.ssd.index import Location, Record
from kvtier.tiers.ssd.segments import Segment, SegmentSet


@dataclass(slots=True, eq=False)
class Pending:
    """A put written and served whose record waits for the next batch commit."""

    key: bytes
    record: Record
    inline: bytes | None  # an inline payload (it commits with the record)
    segment: Segment | None


class BlockMap:
    """Key -> ``Location`` of every served block, with the accounting that goes with it."""

    def __init__(self, locations: dict[bytes, Location], segments: SegmentSet) -> None:
        self.locations = locations
        self.segments = segments
        self.used = sum(loc.length for loc in locations.values())  # live payload bytes
        self.reserved = 0  # bytes of puts in flight
        # Keys being written, with the bytes each holds in ``reserved`` until it is served
        # (``insert`` moves them to ``used`` at once: counted twice, a put's staged blocks
        # made a concurrent put into a full tier fail for room that was there).
        self._inflight: dict[bytes, int] = {}
        self._pending: dict[bytes, Pending] = {}
        self._pending_inline: dict[bytes, bytes] = {}  # until its batch commit has ended
        self._touches: dict[bytes, tuple[float, int]] = {}

    def taken(self, key: bytes) -> bool:
        """Whether ``key`` is served or being written (a put of it is a no-op)."""
        return key in self.locations or key in self._inflight

    def begin_put(self, key: bytes, nbytes: int) -> None:
        self._inflight[key] = nbytes
        self.reserved += nbytes

    def end_put(self, key: bytes) -> None:
        """The put of ``key`` is over (its block served, or given up)."""
        self.reserved -= self._inflight.pop(key, 0)

    def insert(self, key: bytes, loc: Location, seg: Segment | None) -> None:
        """Serve ``key`` from ``loc`` (its payload is written); its reservation, if a put holds
        one, becomes used bytes in the same step."""
        self.locations[key] = loc
        self.used += loc.length
        if key in self._inflight:
            self.reserved -= self._inflight[key]
            self._inflight[key] = 0  # still being written (taken) until end_put
        if seg is not None:
            seg.live += loc.length

    def stage(self, p: Pending) -> None:
        """Serve a written block whose record commits with the next batch."""
        self._pending[p.key] = p
        if p.inline is not None:
            self._pending_inline[p.key] = p.inline
        if p.segment is not None:
            p.segment.uncommitted += 1  # compaction leaves the segment alone meanwhile
        self.insert(p.key, p.record.loc, p.segment)

    @property
    def pending(self) -> int:
        """Blocks served whose records wait for a batch commit."""
        return len(self._pending)

    @property
    def pending_inline_bytes(self) -> int:
        """Inline payloads waiting for a batch commit (they will take index pages)."""
        return sum(len(b) for b in self._pending_inline.values())

    def is_pending(self, key: bytes) -> bool:
        return key in self._pending

    def pending_inline(self, key: bytes) -> bytes | None:
        """The payload of an inline block whose record is not committed yet."""
        return self._pending_inline.get(key)

    def take_batch(self) -> list[Pending]:
        batch = list(self._pending.values())
        self._pending.clear()
        return batch

    def restage(self, batch: list[Pending]) -> list[Pending]:
        """Stage again the blocks of a batch whose commit the disk refused and that are still
        served from the same place (deleted or replaced ones are not); returns the others,
        whose batch is over (``batch_ended``)."""
        ended = []
        for p in batch:
            if self.locations.get(p.key) == p.record.loc and p.key not in self._pending:
                self._pending[p.key] = p  # its inline payload and segment count stay held
            else:
                ended.append(p)
        return ended

    def batch_ended(self, batch: list[Pending]) -> None:
        """The batch's commit is over: its inline payloads are in the index (or dropped)."""
        for p in batch:
            self._pending_inline.pop(p.key, None)
            if p.segment is not None:
                p.segment.uncommitted -= 1

    def forget(self, key: bytes) -> Location | None:
        """Stop serving ``key``; its location, or None if it was not served."""
        loc = self.locations.pop(key, None)
        if loc is None:
            return None
        self.used -= loc.length
        seg = self.segments.by_id.get(loc.segment)
        if seg is not None:
            seg.live -= loc.length
        if self._pending.pop(key, None) is not None:
            self._pending_inline.pop(key, None)
            if seg is not None:
                seg.uncommitted -= 1
        self._touches.pop(key, None)
        return loc

    def touch(self, key: bytes, now: float) -> None:
        _, hits = self._touches.get(key, (0.0, 0))
        self._touches[key] = (now, hits + 1)

    def take_touches(self) -> dict[bytes, tuple[float, int]]:
        touches, self._touches = self._touches, {}
        return touches

    def in_segment(self, seg: Segment) -> list[tuple[bytes, Location]]:
        return [(k, loc) for k, loc in self.locations.items() if loc.segment == seg.id]

    def move(self, key: bytes, old: Location, new: Location, src: Segment, dst: Segment) -> bool:
        """Serve ``key`` from ``new`` if it is still served from ``old``; whether it was."""
        if self.locations.get(key) != old:
            return False
        self.locations[key] = new
        dst.live += new.length
        src.live -= old.length
        return True
