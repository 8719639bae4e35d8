"""Compaction: copy the live blocks out of mostly-dead segments, then remove the old files.

Order makes it safe against readers and crashes: (1) copy each live block to the head of the
active segment and fsync it, (2) commit the new locations in one index transaction (only for
blocks that still point at the old place), (3) retire the old segment — no new reader can
reach it, and its file is unlinked when the last in-flight reader releases it. A crash before
(2) leaves the copies as dead space (recovery truncates or removes them); after (2) the old
file is an orphan that recovery removes.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from kvtier.errors import KVTierError
from kvtier.tiers.ssd.directio import read_exact
from kvtier.tiers.ssd.index import Location, matches
from kvtier.tiers.ssd.segments import Segment

if TYPE_CHECKING:
    from kvtier.tiers.ssd.tier import SSDTier

log = logging.getLogger(__name__)
_one_at_a_time = threading.Lock()


def compact(tier: SSDTier) -> int:
    """Compact every eligible segment; returns how many segment files were removed."""
    with _one_at_a_time:
        tier.flush()
        threshold = tier.config.compaction_live_fraction
        with tier._lock:
            segs = tier._segments
            candidates = [s for s in segs.by_id.values()
                          if s is not segs.active and s.writers == 0 and s.uncommitted == 0
                          and s.head and s.live / s.head < threshold]
            for s in candidates:
                s.readers += 1  # pinned for our own copy reads
        removed = 0
        try:
            for seg in candidates:
                removed += _compact_segment(tier, seg)
        finally:
            with tier._lock:
                for seg in candidates:
                    segs.release(seg)
                if removed:
                    tier._counters["compactions"] += 1
                    tier._counters["compacted_segments"] += removed
        return removed


def _compact_segment(tier: SSDTier, seg: Segment) -> int:
    with tier._lock:
        items = [(k, loc) for k, loc in tier._loc.items() if loc.segment == seg.id]
    moves: list[tuple[bytes, Location, Location, Segment]] = []
    try:
        for key, loc in items:
            buf = np.empty(loc.length, dtype=np.uint8)
            got, _ = read_exact(seg.fd, -1, buf, loc.offset)
            if got != loc.length or not matches(key, loc, buf):
                tier.drop_corrupt(key, loc, "failed its checksum during compaction")
                continue
            with tier._lock:
                dst, off = tier._segments.reserve(loc.length)
            try:
                dst.write(memoryview(buf), off)
            except OSError:
                with tier._lock:
                    tier._segments.unreserve(dst, off, loc.length)
                raise
            new = replace(loc, segment=dst.id, offset=off, durable=tier.durability != "none")
            moves.append((key, loc, new, dst))
        if tier.durability != "none":
            for dst in {m[3] for m in moves}:
                dst.sync()
        with tier._commit_lock:
            moved = tier._index.relocate([(k, old, new) for k, old, new, _ in moves])
            with tier._lock:
                for key, old, new, dst in moves:
                    if key in moved and tier._loc.get(key) == old:
                        tier._loc[key] = new
                        dst.live += new.length
                        seg.live -= old.length
                        tier._counters["compacted_bytes"] += new.length
                if seg.live != 0:
                    log.warning("segment %s still holds %d live bytes; kept", seg.path.name, seg.live)
                    return 0
                tier._segments.retire(seg)
                return 1
    except (OSError, KVTierError) as e:
        log.error("compaction of %s stopped: %s (copies made so far are dead space)", seg.path, e)
        if isinstance(e, KVTierError):
            tier._index_failed(e, f"compacting {seg.path.name}")
        return 0
    finally:
        with tier._lock:
            for *_, dst in moves:
                dst.writers -= 1
