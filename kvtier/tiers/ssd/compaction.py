"""Compaction: copy the live blocks out of mostly-dead segments, then remove the old files.

Order makes it safe against readers and crashes: (1) copy each live block to a segment head and
fsync it, (2) commit the new locations in one index transaction (only for blocks that still
point at the old place), (3) retire the old segment — no new reader can reach it, and its file
is unlinked when the last in-flight reader releases it. A crash before (2) leaves the copies as
dead space (recovery truncates or removes them); after (2) the old file is an orphan that
recovery removes.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace

import numpy as np

from kvtier.errors import KVTierError
from kvtier.tiers.ssd.directio import read_exact
from kvtier.tiers.ssd.index import Location, matches
from kvtier.tiers.ssd.segments import Segment
from kvtier.tiers.ssd.store import Store

log = logging.getLogger(__name__)
_one_at_a_time = threading.Lock()


def compact(store: Store, live_fraction: float) -> int:
    """Compact every segment whose live fraction is below ``live_fraction``; returns how many
    segment files were removed. The caller commits pending batches first (their segments are
    skipped while they wait)."""
    with _one_at_a_time:
        candidates = store.compaction_candidates(live_fraction)  # pinned for our own reads
        removed = 0
        try:
            for seg in candidates:
                removed += _compact_segment(store, seg)
        finally:
            store.unpin(candidates)
            if removed:
                store.count(compactions=1, compacted_segments=removed)
        return removed


def _compact_segment(store: Store, seg: Segment) -> int:
    moves: list[tuple[bytes, Location, Location, Segment]] = []
    durable = store.durability != "none"
    try:
        for key, loc in store.blocks_in(seg):
            buf = np.empty(loc.length, dtype=np.uint8)
            got, _ = read_exact(seg.fd, -1, buf, loc.offset)
            if got != loc.length or not matches(key, loc, buf):
                store.drop_corrupt(key, loc, "failed its checksum during compaction")
                continue
            dst, off = store.reserve_space(loc.length)
            try:
                dst.write(buf.data, off)
            except OSError:
                store.unreserve_space(dst, off, loc.length)
                raise
            moves.append((key, loc, replace(loc, segment=dst.id, offset=off, durable=durable), dst))
        if durable:
            for dst in {m[3] for m in moves}:
                dst.sync()
        return int(store.relocate(seg, moves))
    except (OSError, KVTierError) as e:
        log.error("compaction of %s stopped: %s (copies made so far are dead space)", seg.path, e)
        if isinstance(e, KVTierError):
            store.index_failed(e, f"compacting {seg.path.name}")
        return 0
    finally:
        store.moved(m[3] for m in moves)
