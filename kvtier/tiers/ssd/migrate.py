"""Format 1 -> 2 on open: bind every record's checksums to its key.

Format-1 records hold the crc32c of the payload alone, so a record pointing at another block's
bytes would vouch for them. Binding needs the payload, so each one is read back once: checked
against its old crc (a mismatch is a corrupt block: its record is dropped), then its record is
rewritten with ``index.seal``'s key-seeded checksums, in batches. Records already in format 2
(a migration interrupted by a crash) are left alone, and the caller rewrites the version file
only after the last batch committed, so a crash anywhere here loses nothing.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from kvtier.block import checksum
from kvtier.tiers.ssd.directio import read_exact
from kvtier.tiers.ssd.index import Index, Record, seal
from kvtier.tiers.ssd.segments import list_segments

log = logging.getLogger(__name__)
BATCH = 1024  # records rewritten per index transaction


def bind_keys(index: Index, segment_dir: Path) -> tuple[int, int]:
    """Rewrite format-1 records as format 2; returns (rewritten, dropped as corrupt)."""
    files = list_segments(segment_dir)
    fds: dict[int, int] = {}
    rewritten, dropped = 0, 0
    puts: list[tuple[bytes, Record, bytes | None]] = []
    drops: list[bytes] = []
    try:
        for key, rec in index.records(bad=drops):
            if rec.loc.bound:
                continue
            payload = _payload(index, files, fds, key, rec)
            if payload is None or checksum(payload.data) != rec.loc.crc:
                drops.append(key)
                continue
            crc, head = seal(key, payload)
            rec.loc = replace(rec.loc, crc=crc, head=head)
            puts.append((key, rec, None))
            if len(puts) >= BATCH:
                index.commit(puts)
                rewritten, puts = rewritten + len(puts), []
        index.commit(puts, deletes=drops)
        rewritten, dropped = rewritten + len(puts), len(drops)
    finally:
        for fd in fds.values():
            os.close(fd)
    if rewritten or dropped:
        log.info("ssd index: %d records bound to their keys (format 2), %d corrupt ones dropped",
                 rewritten, dropped)
    return rewritten, dropped


def _payload(index: Index, files: dict[int, Path], fds: dict[int, int], key: bytes,
             rec: Record) -> np.ndarray | None:
    """The record's payload as stored, or None where it cannot be read in full."""
    loc = rec.loc
    buf = np.empty(loc.length, dtype=np.uint8)
    if loc.segment == 0:
        return buf if index.read_inline(key, buf, 0) == loc.length else None
    path = files.get(loc.segment)
    if path is None:
        return None
    fd = fds.get(loc.segment)
    if fd is None:
        fd = fds[loc.segment] = os.open(path, os.O_RDONLY)
    got, _ = read_exact(fd, -1, buf, loc.offset)
    return buf if got == loc.length else None
