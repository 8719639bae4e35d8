"""Append-only segment files: space reservation, writes, pinning for readers, retirement.

Records start on 4 KiB boundaries (so O_DIRECT can read them). A segment is written only at its
head; once compaction has moved its live blocks it is retired: no new reader can find it, and
its file is closed and unlinked when the last in-flight reader releases it.

Where O_DIRECT works, records are written with it too: the payload goes from the caller's buffer
(when 4 KiB-aligned) or a per-thread aligned staging buffer straight to the device, padded with
zeros to the record's 4 KiB boundary — no page-cache copy, no write-back, and a later
``fdatasync`` has only the device cache and the file size to flush.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kvtier.tiers.ssd.directio import ALIGN, O_DIRECT, aligned_empty, is_aligned, padded

log = logging.getLogger(__name__)

# module-level so tests can inject faults (ENOSPC, EIO); buffers may be numpy arrays
_pwrite: Callable[[int, Any, int], int] = os.pwrite
_pwritev: Callable[[int, Sequence[Any], int], int] = os.pwritev  # gathered writes (write_many)
_fdatasync = os.fdatasync  # module-level so tests can record what was made durable, and when
STAGING_BYTES = 8 * 1024**2  # per writing thread; larger records are written in pieces
MAX_IOV = min(1024, os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024)
_staging = threading.local()


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
    """One open segment file. Counters are guarded by the store's lock."""

    id: int
    path: Path
    fd: int
    head: int = 0  # next record offset (aligned)
    live: int = 0  # payload bytes of live blocks
    readers: int = 0  # in-flight reads pinning the file
    writers: int = 0  # reserved records not yet in the index
    uncommitted: int = 0  # blocks in the index waiting for a batch commit
    retired: bool = False
    dfd: int = -1  # O_DIRECT descriptor (reads, and writes while direct_writes), or -1
    direct_writes: bool = False

    @classmethod
    def open(cls, directory: Path, seg_id: int, *, create: bool, direct: bool) -> Segment:
        """Open (or create) a segment; ``direct`` also opens an O_DIRECT read descriptor."""
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        path = segment_path(directory, seg_id)
        seg = cls(seg_id, path, os.open(path, flags, 0o644))
        if direct and O_DIRECT:
            try:
                seg.dfd = os.open(path, os.O_RDWR | O_DIRECT)
                seg.direct_writes = True
            except OSError as e:
                log.warning("O_DIRECT open of %s failed (%s); using it buffered", path, e)
        return seg

    def write(self, data: memoryview, offset: int) -> None:
        """Write all of ``data`` at ``offset`` (raises OSError, e.g. ENOSPC or EIO).

        With O_DIRECT the record's padding up to the next 4 KiB boundary is written as zeros.
        """
        done = 0
        if self.direct_writes and offset % ALIGN == 0:
            try:
                done = self._write_direct(np.frombuffer(data, dtype=np.uint8), offset)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                log.warning("O_DIRECT write to %s refused (%s); writing it buffered", self.path, e)
                self.direct_writes = False
                done = 0
        while done < len(data):
            done += _pwrite(self.fd, data[done:], offset + done)

    def _write_direct(self, arr: np.ndarray, offset: int) -> int:
        """O_DIRECT writes of ``arr`` from ``offset``; returns the bytes of ``arr`` written.

        Stops early (the caller finishes buffered) only if a short write leaves the position
        unaligned.
        """
        n, done = len(arr), 0
        if is_aligned(arr):  # the aligned bulk goes straight from the caller's memory
            bulk = n - n % ALIGN
            while done < bulk:
                done += _pwrite(self.dfd, arr[done:bulk], offset + done)
                if done % ALIGN:
                    return done
        if done == n:
            return n
        stage = _stage_buffer()
        while done < n:
            k = min(n - done, len(stage))
            kp = padded(k)
            stage[:k] = arr[done:done + k]
            stage[k:kp] = 0
            got = _pwrite(self.dfd, stage[:kp], offset + done)
            done += min(got, k)
            if done < n and done % ALIGN:
                return done
        return n

    def write_many(self, records: Sequence[tuple[Sequence[np.ndarray], int]]) -> None:
        """Write records lying end to end (each at the previous one's padded end), as few
        gathered writes as possible. A record is its pieces end to end (``kvtier.pieces``: every
        piece but the last whole, aligned 4 KiB pages). One O_DIRECT ``pwritev`` carries each
        record's aligned bulk straight from its memory, and its last partial page (or the whole
        last piece, when its memory is not 4 KiB-aligned) through this thread's staging buffer,
        zero-padded. A big write lets the kernel keep several device requests in flight where
        one record at a time keeps one. Raises OSError (ENOSPC, EIO); without O_DIRECT, writes
        each record.
        """
        if not records:
            return
        if not self.direct_writes or records[0][1] % ALIGN:
            for pieces, offset in records:
                self._write_pieces(pieces, offset)
            return
        stage = _stage_buffer()
        iov: list[np.ndarray] = []
        base, used = records[0][1], 0
        for pieces, offset in records:
            *whole, arr = pieces
            n = len(arr)
            staged = n % ALIGN if is_aligned(arr) else n
            if padded(staged) > len(stage) or len(whole) + 2 > MAX_IOV:  # a record of its own
                self._write_gathered(iov, base)
                iov, used = [], 0
                self._write_pieces(pieces, offset)
                base = offset + padded(sum(len(p) for p in pieces))
                continue
            if used + padded(staged) > len(stage) or len(iov) + len(whole) + 2 > MAX_IOV:
                self._write_gathered(iov, base)
                iov, used, base = [], 0, offset
            iov += whole
            if n > staged:
                iov.append(arr[:n - staged])
            if staged:
                k = padded(staged)
                stage[used:used + staged] = arr[n - staged:]
                stage[used + staged:used + k] = 0
                iov.append(stage[used:used + k])
                used += k
        self._write_gathered(iov, base)

    def _write_pieces(self, pieces: Sequence[np.ndarray], offset: int) -> None:
        """Write a record piece by piece (``write``: O_DIRECT where it can)."""
        for piece in pieces:
            self.write(piece.data, offset)
            offset += len(piece)

    def _write_gathered(self, iov: list[np.ndarray], offset: int) -> None:
        """Write ``iov`` at ``offset``: O_DIRECT while the kernel takes it, the rest buffered."""
        done = 0
        if self.direct_writes and iov:
            try:
                done = _pwritev(self.dfd, iov, offset)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                log.warning("O_DIRECT write to %s refused (%s); writing it buffered", self.path, e)
                self.direct_writes = False
        pos = offset
        for a in iov:  # rare: a short write (or no O_DIRECT): the rest buffered, piece by piece
            skip = min(done, len(a))
            done -= skip
            rest, at = a[skip:], pos + skip
            while len(rest):
                got = _pwrite(self.fd, rest, at)
                rest, at = rest[got:], at + got
            pos += len(a)

    def sync(self) -> None:
        """Make every record written so far durable (O_DIRECT writes too: the device cache)."""
        _fdatasync(self.fd)

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


def sync_each(segs: Collection[Segment], pool: Executor | None = None) -> dict[Segment, OSError]:
    """``sync`` every segment in ``segs``, on ``pool`` at once when there are several; returns
    the failures by segment.

    Why at once: each fdatasync waits for a journal commit and a device cache flush; issued
    together they share one (the file system batches them), issued in turn each pays its own.
    """
    segs = list(segs)
    failed: dict[Segment, OSError] = {}
    futures = [(seg, pool.submit(seg.sync)) for seg in segs[1:]] if pool is not None else []
    for seg in segs if pool is None else segs[:1]:
        try:
            seg.sync()
        except OSError as e:
            failed[seg] = e
    for seg, f in futures:
        try:
            f.result()
        except OSError as e:
            failed[seg] = e
    return failed


def sync_all(segs: Collection[Segment], pool: Executor | None = None) -> None:
    """``sync_each``, raising the first failure once every sync has finished."""
    failed = sync_each(segs, pool)
    if failed:
        raise next(iter(failed.values()))


def _stage_buffer() -> np.ndarray:
    """This thread's aligned staging buffer for O_DIRECT writes (allocated once per thread)."""
    buf = getattr(_staging, "buf", None)
    if buf is None:
        t = aligned_empty(STAGING_BYTES)
        buf = _staging.buf = t.numpy()
        _staging.tensor = t  # keeps the memory alive
    return buf


class SegmentSet:
    """The open segments and their write heads. Callers hold the store's lock around every
    method.

    Up to ``streams`` segments are active at once, so concurrent puts append to different
    files: on ext4 (and most file systems) a write that extends a file holds that file's inode
    lock for the whole O_DIRECT write, so writers appending to one file queue behind each
    other, and the device sees one write at a time.
    """

    def __init__(self, directory: Path, segment_bytes: int, direct: bool,
                 on_create: Callable[[], None], streams: int = 1) -> None:
        self.directory = directory
        self.direct = direct
        self.segment_bytes = segment_bytes
        self.streams = max(1, streams)
        self.by_id: dict[int, Segment] = {}
        self.active: list[Segment] = []  # the segments puts append to
        self.next_id = 1
        self._on_create = on_create  # called after a new segment file exists (dir fsync)

    def is_active(self, seg: Segment) -> bool:
        """Whether puts may still append to ``seg``."""
        return seg in self.active

    def add(self, seg: Segment) -> None:
        self.by_id[seg.id] = seg
        self.next_id = max(self.next_id, seg.id + 1)

    def reserve(self, nbytes: int, prefer: Segment | None = None) -> tuple[Segment, int]:
        """Claim an aligned record of ``nbytes`` at the head of an active segment: ``prefer``
        (a batch keeps its records end to end), else the first with no write in flight, else a
        new one while fewer than ``streams`` are active, else the least busy. A segment that
        cannot take the record is no longer active."""
        need = padded(nbytes)
        self.active = [s for s in self.active if not s.head or s.head + need <= self.segment_bytes]
        seg = prefer if prefer in self.active else min(self.active, key=_writers, default=None)
        if seg is None or (seg.writers and seg is not prefer and len(self.active) < self.streams):
            seg = Segment.open(self.directory, self.next_id, create=True, direct=self.direct)
            self.add(seg)
            self.active.append(seg)
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
        if seg in self.active:
            self.active.remove(seg)
        if seg.readers == 0:
            seg.close(unlink=True)

    def release(self, seg: Segment) -> None:
        seg.readers -= 1
        if seg.retired and seg.readers == 0 and seg.fd >= 0:
            seg.close(unlink=True)


def _writers(seg: Segment) -> int:
    return seg.writers
