"""Aligned buffers, the O_DIRECT probe and positional reads straight into caller memory.

O_DIRECT needs the file offset, the length and the memory address aligned (4 KiB covers every
device we target). A read of file bytes ``[start, start + n)`` into memory at address ``A`` can
go O_DIRECT whenever ``A - start`` is a multiple of 4 KiB (``congruent``): the whole pages in
the middle land straight in the caller's memory, and a partial first or last page is read whole
into a small aligned bounce page and only its wanted bytes copied out (``DirectRead``). Segment
records start on 4 KiB boundaries, so a whole-block read into 4 KiB-aligned memory is direct,
and so is a layer range whose offset in the block is 4 KiB-aligned (block format v2). Nothing
outside ``[0, n)`` of the caller's buffer is ever written.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvtier.bytecopy import address

log = logging.getLogger(__name__)

ALIGN = 4096
O_DIRECT = getattr(os, "O_DIRECT", 0)
# module-level so tests can inject faults; buffers are numpy arrays (typed Any: numpy's stubs
# declare no buffer protocol before Python 3.12)
_preadv: Callable[[int, Sequence[Any], int], int] = os.preadv


def padded(n: int) -> int:
    """``n`` rounded up to the alignment unit."""
    return (n + ALIGN - 1) // ALIGN * ALIGN


def aligned_empty(nbytes: int, *, phase: int = 0, pinned: bool = False) -> torch.Tensor:
    """A 1-D uint8 CPU tensor of ``nbytes`` whose data starts ``phase`` bytes past a 4 KiB
    boundary (default: on one). Allocate every buffer an SSD read lands in this way.

    Why: the SSD tier reads O_DIRECT — no page cache, no second copy — only into memory whose
    address is congruent to the file offset modulo 4 KiB. A whole block (records start on
    4 KiB boundaries) needs ``phase=0``; a range starting ``k`` bytes into a block needs
    ``phase=k % 4096`` (0 for every layer of block format v2). ``pinned``: page-locked
    memory for DMA to a GPU (needs CUDA). The tensor keeps its (slightly larger) allocation
    alive; slices of it keep their alignment.
    """
    if nbytes < 0 or not 0 <= phase < ALIGN:
        raise ValueError(f"aligned_empty needs nbytes >= 0 and 0 <= phase < {ALIGN}, got "
                         f"{nbytes} and {phase}")
    raw = torch.empty(padded(nbytes + phase) + ALIGN, dtype=torch.uint8, pin_memory=pinned)
    skip = (-raw.data_ptr()) % ALIGN + phase
    return raw[skip: skip + nbytes]


def is_aligned(arr: np.ndarray) -> bool:
    return address(arr) % ALIGN == 0


_all_aligned: Callable[[Sequence[np.ndarray], int], bool] | None
try:  # kvtier/_fastcopy.c (optional): one call for all the pieces of a scattered read
    from kvtier._fastcopy import aligned as _all_aligned
except ImportError:
    _all_aligned = None


def whole_pages(arrays: Sequence[np.ndarray]) -> bool:
    """Whether every array is whole 4 KiB pages of aligned memory: an O_DIRECT read can go
    straight into them. (A block read into a prefix's tensors is 65 arrays: asked one by one
    from Python, their addresses cost about 1 us each.)"""
    if _all_aligned is not None:
        return _all_aligned(arrays, ALIGN)
    return all(len(a) % ALIGN == 0 and is_aligned(a) for a in arrays)


_local = threading.local()


def bounce_pages(count: int) -> Callable[[], np.ndarray]:
    """Up to ``count`` aligned 4 KiB pages of this thread's bounce buffer, one per call (valid
    until this thread asks again; the buffer grows to the most ever asked for)."""
    buf: np.ndarray | None = getattr(_local, "bounce", None)
    if buf is None or len(buf) < count * ALIGN:
        t = aligned_empty(max(count, 2) * ALIGN)
        _local.tensor, buf = t, t.numpy()  # the tensor keeps the memory alive
        _local.bounce = buf
    pages = iter(range(0, count * ALIGN, ALIGN))
    return lambda: buf[(at := next(pages)):at + ALIGN]


def congruent(arr: np.ndarray, file_offset: int) -> bool:
    """Whether ``arr`` can take file bytes from ``file_offset`` O_DIRECT (see the module
    docstring): its address and the offset lie equally far past a 4 KiB boundary."""
    return (address(arr) - file_offset) % ALIGN == 0


class DirectRead:
    """The O_DIRECT read of file bytes ``[start, start + len(arr))`` into ``arr`` (congruent).

    ``iov`` are the buffers of one ``preadv`` from ``lo`` to ``hi`` (both 4 KiB-aligned): a
    bounce page for a partial first page, ``arr``'s whole pages, a bounce page for a partial
    last page. ``finish(got)`` copies the wanted bytes out of the bounce pages once ``got``
    bytes from ``lo`` have arrived, and says how many bytes of ``arr`` are filled.
    """

    __slots__ = ("arr", "start", "lo", "hi", "iov", "_head", "_tail", "_cut")

    def __init__(self, arr: np.ndarray, start: int, bounce: Callable[[], np.ndarray]) -> None:
        end = start + len(arr)
        self.arr, self.start = arr, start
        self.lo, self.hi = start - start % ALIGN, padded(end)
        first, cut = padded(start), end - end % ALIGN  # arr's whole pages: [first, cut)
        self._head = bounce() if start > self.lo else None
        self._tail = bounce() if end > cut and cut >= first else None
        self._cut = cut
        self.iov: list[np.ndarray] = []
        if self._head is not None:
            self.iov.append(self._head)
        if cut > first:
            self.iov.append(arr[first - start:cut - start])
        if self._tail is not None:
            self.iov.append(self._tail)

    def finish(self, got: int) -> int:
        """Bytes of ``arr`` filled once ``got`` bytes from ``lo`` arrived (short at EOF)."""
        end = min(self.lo + max(got, 0), self.start + len(self.arr))
        if end <= self.start:
            return 0
        if self._head is not None:
            k = min(end, self.lo + ALIGN) - self.start
            at = self.start - self.lo
            self.arr[:k] = self._head[at:at + k]
        if self._tail is not None and end > self._cut:
            self.arr[self._cut - self.start:end - self.start] = self._tail[:end - self._cut]
        return end - self.start


def probe_direct_io(directory: Path) -> bool:
    """Whether the file system under ``directory`` accepts O_DIRECT reads (probed once)."""
    if not O_DIRECT:
        return False
    probe = directory / ".direct-probe"
    buf = mmap.mmap(-1, ALIGN)  # page-aligned
    buf.write(b"k" * ALIGN)
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_TRUNC | O_DIRECT, 0o644)
    except OSError as e:
        log.info("O_DIRECT not supported under %s (%s); using buffered reads", directory, e)
        return False
    try:
        os.pwrite(fd, buf, 0)
        back = mmap.mmap(-1, ALIGN)
        ok = os.preadv(fd, [back], 0) == ALIGN and back[:] == buf[:]
        return ok
    except OSError as e:
        log.info("O_DIRECT reads fail under %s (%s); using buffered reads", directory, e)
        return False
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


def read_exact(fd: int, dfd: int, arr: np.ndarray, file_offset: int) -> tuple[int, bool]:
    """Read ``len(arr)`` bytes at ``file_offset`` into ``arr``; returns (bytes read, used direct).

    Uses ``dfd`` (an O_DIRECT descriptor, or -1) for the aligned bulk when the address and
    offset allow it, buffered ``fd`` for the rest; falls back to buffered on EINVAL.
    """
    n = len(arr)
    bulk = n // ALIGN * ALIGN if dfd >= 0 and file_offset % ALIGN == 0 and is_aligned(arr) else 0
    done = 0
    direct = False
    if bulk:
        try:
            done = _read_loop(dfd, arr[:bulk], file_offset)
            direct = True
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            done = 0
        if done < bulk:  # short: end of file inside the bulk
            return done, direct
    return done + _read_loop(fd, arr[done:], file_offset + done), direct


def _read_loop(fd: int, arr: np.ndarray, offset: int) -> int:
    done, n = 0, len(arr)
    while done < n:
        got = _preadv(fd, [arr[done:]], offset + done)
        if got == 0:
            break
        done += got
    return done


def read_vectored(fd: int, arrays: Sequence[np.ndarray], file_offset: int) -> int:
    """One preadv into several buffers laid end to end in the file; loops on short reads."""
    total = sum(map(len, arrays))
    done = _preadv(fd, arrays, file_offset)
    if done == total or done == 0:
        return done
    # Rare: the kernel returned early. Finish the remainder buffer by buffer.
    skip = done
    for a in arrays:
        if skip >= len(a):
            skip -= len(a)
            continue
        got = _read_loop(fd, a[skip:], file_offset + done)
        done += got
        if got < len(a) - skip:
            break
        skip = 0
    return done
