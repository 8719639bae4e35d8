"""Aligned buffers, the O_DIRECT probe and positional reads straight into caller memory.

O_DIRECT needs the file offset, the length and the memory address aligned (4 KiB covers every
device we target). Segment records start on 4 KiB boundaries, so a whole-block read into an
aligned buffer goes direct for its aligned bulk; the last partial page is read buffered. Nothing
outside ``[0, n)`` of the caller's buffer is ever written.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

ALIGN = 4096
O_DIRECT = getattr(os, "O_DIRECT", 0)
# module-level so tests can inject faults; buffers are numpy arrays (typed Any: numpy's stubs
# declare no buffer protocol before Python 3.12)
_preadv: Callable[[int, Sequence[Any], int], int] = os.preadv


def padded(n: int) -> int:
    """``n`` rounded up to the alignment unit."""
    return (n + ALIGN - 1) // ALIGN * ALIGN


def aligned_empty(nbytes: int) -> torch.Tensor:
    """A 1-D uint8 CPU tensor of ``nbytes`` whose data starts on a 4 KiB boundary.

    Reads into such a buffer can use O_DIRECT (benchmarks and staging buffers want this).
    """
    raw = torch.empty(padded(nbytes) + ALIGN, dtype=torch.uint8)
    skip = (-raw.data_ptr()) % ALIGN
    return raw[skip: skip + nbytes]


def is_aligned(arr: np.ndarray) -> bool:
    return arr.ctypes.data % ALIGN == 0


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


def read_vectored(fd: int, arrays: list[np.ndarray], file_offset: int) -> int:
    """One preadv into several buffers laid end to end in the file; loops on short reads."""
    total = sum(len(a) for a in arrays)
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
