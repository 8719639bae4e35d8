"""Reconcile the index with the segment files on open, and an fsck-style consistency check.

After a crash the index may name bytes that never reached the disk (durability ``none``), or a
segment may have been truncated or removed by hand. Records pointing past a segment's end, at a
missing segment, or (when the last run did not close cleanly and the payload was not fsync'd
before its record committed) failing their checksum are dropped. Each segment's write head is
set just after its last valid record and the file truncated there, so that space is reused;
segments with no live record, and files the index does not know, are removed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvtier.errors import DataDirError, StorageFull
from kvtier.tiers.ssd.directio import padded, read_exact
from kvtier.tiers.ssd.index import Index, Location, matches
from kvtier.tiers.ssd.indexcheck import file_problem, walk_problem
from kvtier.tiers.ssd.segments import Segment, SegmentSet, list_segments

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Recovered:
    locations: dict[bytes, Location] = field(default_factory=dict)
    dropped: int = 0
    verified: int = 0
    removed_segments: int = 0
    clean: bool = True


START_EMPTY = "move the directory aside (or delete its index/ and segments/) to start empty"


def open_index(root: Path, map_size: int, sync: bool) -> Index:
    """Open ``root/index`` once it is known not to crash this process; else DataDirError.

    LMDB maps the file and trusts it (see ``indexcheck``): a truncated or damaged file is
    refused in one line naming the directory, before any page of it is touched here.
    """
    path = root / "index" / "data.mdb"
    problem = file_problem(path, len(list_segments(root / "segments")))
    if problem is None and path.exists() and path.stat().st_size:
        problem = walk_problem(root / "index")
    if problem:
        raise DataDirError(f"data directory {root}: index unreadable: {problem}; {START_EMPTY}")
    try:
        return Index(root / "index", map_size, sync=sync)
    except Exception as e:  # noqa: BLE001  whatever LMDB says, the directory cannot be opened
        raise DataDirError(f"data directory {root}: index unreadable ({e})") from None


def payload_ok(fd: int, key: bytes, loc: Location) -> bool:
    """Read a record's payload back and check it is ``key``'s block."""
    buf = np.empty(loc.length, dtype=np.uint8)
    got, _ = read_exact(fd, -1, buf, loc.offset)
    return got == loc.length and matches(key, loc, buf)


def recover(index: Index, segments: SegmentSet) -> Recovered:
    """Load the index into memory, dropping what the segments cannot back; fills ``segments``."""
    out = Recovered(clean=index.get_flag(b"clean") in (None, b"1"))
    files = list_segments(segments.directory)
    sizes = {i: os.stat(p).st_size for i, p in files.items()}
    opened: dict[int, Segment] = {}
    drop: list[bytes] = []
    for key, rec in index.records(bad=drop):  # undecodable records are dropped too
        loc = rec.loc
        if loc.segment == 0:
            out.locations[key] = loc
            continue
        if loc.segment not in files or loc.offset + loc.length > sizes[loc.segment]:
            drop.append(key)
            continue
        seg = opened.get(loc.segment)
        if seg is None:
            seg = opened[loc.segment] = Segment.open(
                segments.directory, loc.segment, create=False, direct=segments.direct)
        if not out.clean and not loc.durable:
            out.verified += 1
            if not payload_ok(seg.fd, key, loc):
                drop.append(key)
                continue
        out.locations[key] = loc
        seg.live += loc.length
        seg.head = max(seg.head, padded(loc.offset + loc.length))
    if drop:
        out.dropped = len(drop)
        log.warning("ssd recovery dropped %d index records the segments cannot back", len(drop))
        try:
            index.commit(deletes=drop)
        except StorageFull as e:  # a full disk: they are not served, and dropped again next time
            log.warning("ssd recovery could not remove them from the index yet: %s", e)
    for seg_id, path in files.items():
        seg = opened.get(seg_id)
        if seg is None or seg.live == 0:
            if seg is not None:
                seg.close()
            path.unlink(missing_ok=True)
            out.removed_segments += 1
            continue
        if sizes[seg_id] > seg.head:
            os.ftruncate(seg.fd, seg.head)
        segments.add(seg)
    segments.next_id = max([segments.next_id, *[i + 1 for i in files]])
    last = max(segments.by_id, default=None)
    if last is not None and segments.by_id[last].head < segments.segment_bytes:
        segments.active = [segments.by_id[last]]
    return out


def check(index: Index, directory: Path, locations: dict[bytes, Location]) -> list[str]:
    """Problems found comparing index, memory and segment files (empty when consistent).

    Reads every payload (segments and inline) and verifies its checksum; call on a quiet tier.
    """
    problems = []
    committed = {k: rec.loc for k, rec in index.records()}
    for key in committed.keys() - locations.keys():
        problems.append(f"index record {key.hex()} is not served")
    for key in locations.keys() - committed.keys():
        problems.append(f"served block {key.hex()} has no index record")
    files = list_segments(directory)
    used = set()
    for key, loc in committed.items():
        if loc.segment == 0:
            buf = np.empty(loc.length, dtype=np.uint8)
            if index.read_inline(key, buf, 0) != loc.length or not matches(key, loc, buf):
                problems.append(f"inline block {key.hex()} fails its checksum")
            continue
        used.add(loc.segment)
        path = files.get(loc.segment)
        if path is None:
            problems.append(f"block {key.hex()} points at missing segment {loc.segment}")
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            if not payload_ok(fd, key, loc):
                problems.append(f"block {key.hex()} fails its checksum in segment {loc.segment}")
        finally:
            os.close(fd)
    for seg_id in files.keys() - used:
        problems.append(f"segment file {files[seg_id].name} holds no indexed block")
    return problems
