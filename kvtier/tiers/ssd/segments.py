"""Append-only segment files: space reservation, writes, pinning for readers, retirement.

Records start on 4 KiB boundaries (so O_DIRECT can read them). A segment is written only at its
head; once compaction has moved its live blocks it is retired: no new reader can find it, and
its file is closed and unlinked when the last in-flight reader releases it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from kvtier.tiers.ssd.directio import O_DIRECT, padded

log = logging.getLogger(__name__)

_pwrite = os.pwrite  # module-level so tests can inject faults (ENOSPC, EIO)


def segment_path(directory: Path, seg_id: int) -> Path:
    return directory / f"{seg_id:08d}.seg"


def list_segments(directory: Path) -> dict[int, Path]:
    """Segment files on disk by id (other names are ignored)."""
    found = {}
    for name in os.listdir(directory):
        stem, dot, ext = name.partition(".")
        if ext == "seg" and dot and stem.isdigit():
            found[int(stem)] = directory / name
    return found


@dataclass(slots=True, eq=False)
class Segment:
    """One open segment file. Counters are guarded by the tier's lock."""

    id: int
    path: Path
    fd: int
    head: int = 0  # next record offset (aligned)
    live: int = 0  # payload bytes of live blocks
    readers: int = 0  # in-flight reads pinning the file
    writers: int = 0  # reserved records not yet in the index
    uncommitted: int = 0  # blocks in the index waiting for a batch commit
    retired: bool = False
    dfd: int = -1  # O_DIRECT read descriptor, or -1

    @classmethod
    def open(cls, directory: Path, seg_id: int, *, create: bool, direct: bool) -> Segment:
        """Open (or create) a segment; ``direct`` also opens an O_DIRECT read descriptor."""
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        path = segment_path(directory, seg_id)
        seg = cls(seg_id, path, os.open(path, flags, 0o644))
        if direct and O_DIRECT:
            try:
                seg.dfd = os.open(path, os.O_RDONLY | O_DIRECT)
            except OSError as e:
                log.warning("O_DIRECT open of %s failed (%s); reading it buffered", path, e)
        return seg

    def write(self, data: memoryview, offset: int) -> None:
        """Write all of ``data`` at ``offset`` (raises OSError, e.g. ENOSPC or EIO)."""
        done = 0
        while done < len(data):
            done += _pwrite(self.fd, data[done:], offset + done)

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def disk_bytes(self) -> int:
        """Bytes the file occupies on disk (allocated blocks)."""
        try:
            return os.fstat(self.fd).st_blocks * 512
        except OSError:
            return 0

    def close(self, unlink: bool = False) -> None:
        for fd in (self.fd, self.dfd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.dfd = -1
        if unlink:
            self.path.unlink(missing_ok=True)


class SegmentSet:
    """The open segments and the write head. Callers hold the tier's lock around every method."""

    def __init__(self, directory: Path, segment_bytes: int, direct: bool, on_create) -> None:
        self.directory = directory
        self.direct = direct
        self.segment_bytes = segment_bytes
        self.by_id: dict[int, Segment] = {}
        self.active: Segment | None = None
        self.next_id = 1
        self._on_create = on_create  # called after a new segment file exists (dir fsync)

    def add(self, seg: Segment) -> None:
        self.by_id[seg.id] = seg
        self.next_id = max(self.next_id, seg.id + 1)

    def reserve(self, nbytes: int) -> tuple[Segment, int]:
        """Claim an aligned record of ``nbytes`` at the head of the active segment."""
        need = padded(nbytes)
        seg = self.active
        if seg is None or (seg.head and seg.head + need > self.segment_bytes):
            seg = Segment.open(self.directory, self.next_id, create=True, direct=self.direct)
            self.add(seg)
            self.active = seg
            self._on_create()
        offset = seg.head
        seg.head += need
        seg.writers += 1
        return seg, offset

    def unreserve(self, seg: Segment, offset: int, nbytes: int) -> None:
        """Give back a failed record's space if nothing was reserved after it."""
        seg.writers -= 1
        if seg.head == offset + padded(nbytes):
            seg.head = offset
            try:
                os.ftruncate(seg.fd, offset)
            except OSError as e:
                log.warning("could not truncate %s after a failed write: %s", seg.path, e)

    def retire(self, seg: Segment) -> None:
        """Make ``seg`` unreachable; its file goes when the last reader releases it."""
        seg.retired = True
        self.by_id.pop(seg.id, None)
        if self.active is seg:
            self.active = None
        if seg.readers == 0:
            seg.close(unlink=True)

    def release(self, seg: Segment) -> None:
        seg.readers -= 1
        if seg.retired and seg.readers == 0 and seg.fd >= 0:
            seg.close(unlink=True)
