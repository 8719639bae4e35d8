"""Recycled, 4 KiB-aligned host buffers for encoded blocks, and aligned allocation.

A fresh block-sized allocation (MiBs) is mapped by the C allocator and page-faulted on first
touch; on a VM that costs several times the copy that fills it (about 25 ms per 32 MiB against
4 ms for the copy). Blocks of one namespace all have the same size, so a buffer freed by one put
serves the next. A buffer goes back to the pool when the last tensor viewing it is freed (the
tier copied it, the background write-through finished), never earlier: nothing a caller still
holds is reused.

Every buffer handed out starts on an ``ALIGN`` (4 KiB) boundary, and its allocation extends to
the next boundary past its end, so a block laid out for direct I/O (``kvtier.block``, version 2:
its length a multiple of 4 KiB) can be written or read with ``O_DIRECT`` straight from or into
it, without a bounce copy. (The C allocator aligns to 16 bytes; torch's CPU allocator to 64.)

Buffers of a size asked for again, from ``ARENA_MIN_BYTES`` to half of ``ARENA_BYTES``, are
carved end to end out of arenas in transparent huge pages. An ``O_DIRECT`` write from scattered
4 KiB pages becomes more, smaller device requests (a virtio disk takes at most 254 memory
segments per request): on the development VM a put of 2 MiB blocks from huge pages ran 2-3x
faster than from the C allocator's pages (``python -m kvtier.bench.put_path --durability
none``). Faulting a huge page in costs more than a small one, which recycling pays once; memory
a caller keeps (``mapped_array``) stays in small pages. A buffer held keeps its whole arena
mapped, so arenas are only for sizes that recur (a namespace's blocks), at most
``ARENA_SIZES`` at a time.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import mmap
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

ALIGN = 4096  # the logical block size direct I/O needs: offsets, lengths and memory
DEFAULT_MAX_IDLE_BYTES = 256 * 1024**2
# Allocations from this size on get pages of their own (``mapped_array``): a prefix's KV that
# ``TieredCache.get`` returns, staging rings.
MAPPED_BYTES = 64 * 1024**2
HUGE_PAGE = 2 * 1024**2
ARENA_MIN_BYTES = 1024**2  # pooled buffers of a size used again, from this size...
ARENA_BYTES = 32 * 1024**2  # ... to half this, come from arenas of this many bytes of one size
ARENA_SIZES = 8  # sizes with an arena being carved at once (a namespace's blocks share one size)
SEEN_SIZES = 64  # sizes remembered as asked for before (blocks of varying size: zstd)


def align_up(n: int, align: int = ALIGN) -> int:
    return -(-n // align) * align


def aligned_array(nbytes: int, align: int = ALIGN) -> np.ndarray:
    """A uint8 array of ``nbytes`` (contents undefined) starting on an ``align`` boundary; the
    memory behind it runs on to the next boundary past its end."""
    if nbytes >= MAPPED_BYTES and align <= mmap.PAGESIZE:
        return mapped_array(nbytes)
    base = np.empty(align_up(nbytes, align) + align, dtype=np.uint8)
    start = -base.ctypes.data % align
    return base[start: start + nbytes]


def mapped_array(nbytes: int) -> np.ndarray:
    """``nbytes`` of zeroed anonymous memory mapped for this array alone (unmapped when the last
    view of it is freed), in small pages. Why not transparent huge pages (numpy asks for them for
    large arrays): where the kernel compacts memory on the fault (``defrag=madvise``), faulting in
    2 GiB of huge pages took 1-2 s of system time in half the trials on the development VM,
    against a steady 0.6 s in 4 KiB pages, faulted in by the ``O_DIRECT`` reads that fill it."""
    m = mmap.mmap(-1, align_up(max(nbytes, 1), mmap.PAGESIZE), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(AttributeError, OSError):  # no madvise: the kernel's default pages
        m.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(m, dtype=np.uint8)[:nbytes]


def huge_array(nbytes: int) -> np.ndarray:
    """``nbytes`` of anonymous memory starting on a huge-page boundary, advised to be backed by
    transparent huge pages (where the kernel has them; else small pages, as any memory)."""
    m = mmap.mmap(-1, align_up(nbytes, HUGE_PAGE) + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    arr = np.frombuffer(m, dtype=np.uint8)
    start = -arr.ctypes.data % HUGE_PAGE
    with contextlib.suppress(AttributeError, OSError):
        m.madvise(mmap.MADV_HUGEPAGE, start, align_up(nbytes, HUGE_PAGE))
    return arr[start: start + nbytes]


MADV_POPULATE_WRITE = 23  # Linux 5.14+: page tables populated writable, memory left untouched
PREFAULT_CHUNK = 64 * 1024**2


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def prefault(t: torch.Tensor, stop: threading.Event | None = None, chunk: int = PREFAULT_CHUNK) -> bool:
    """Fault in the host memory behind ``t`` (``MADV_POPULATE_WRITE``: its contents unchanged, so
    others may write into it meanwhile), a chunk at a time until done or ``stop`` is set.

    Why: a fresh page's first write faults, and on a VM that costs 1-3 s of system time per GiB
    (the development VM: a 1 GiB put into a fresh host tier ran at 1.0 GB/s, into one faulted in
    beforehand at 2.0 GB/s). A long-running tier pays it once, but its first puts would pay it
    all. False where the kernel cannot (before 5.14, or not Linux): the first writes fault."""
    madvise = _madvise()
    if madvise is None or t.device.type != "cpu" or not t.numel():
        return False
    page = mmap.PAGESIZE
    start = t.data_ptr() // page * page
    end = t.data_ptr() + t.numel() * t.element_size()
    for at in range(start, end, chunk):
        if stop is not None and stop.is_set():
            return False
        if madvise(at, min(chunk, end - at), MADV_POPULATE_WRITE) != 0:
            return False
    return True


def aligned_empty(nbytes: int, *, pinned: bool = False, align: int = ALIGN) -> torch.Tensor:
    """A 1-D uint8 tensor of ``nbytes`` starting on an ``align`` boundary: destination or staging
    memory for ``O_DIRECT`` reads. Pinned memory (CUDA hosts) comes page-aligned from the driver."""
    if pinned:
        t = torch.empty(align_up(nbytes, align), dtype=torch.uint8, pin_memory=True)[:nbytes]
        if t.data_ptr() % align:  # cudaHostAlloc returns whole pages; never seen otherwise
            raise RuntimeError(f"pinned allocation is not {align}-byte aligned")
        return t
    return torch.from_numpy(aligned_array(nbytes, align))


def is_aligned(t: torch.Tensor, align: int = ALIGN) -> bool:
    return t.data_ptr() % align == 0


class BufferPool:
    """Aligned byte buffers by exact size; idle ones are kept up to ``max_idle_bytes`` in all."""

    def __init__(self, max_idle_bytes: int = DEFAULT_MAX_IDLE_BYTES) -> None:
        self.max_idle_bytes = max_idle_bytes
        self._idle: dict[int, list[np.ndarray]] = {}
        self._idle_bytes = 0
        self._fresh: dict[int, list[np.ndarray]] = {}  # carved from an arena, never handed out
        self._seen: dict[int, None] = {}  # sizes asked for lately, oldest first
        # reentrant: a garbage collection inside ``take`` can run a finalizer (``_give_back``)
        self._lock = threading.RLock()

    @property
    def idle_bytes(self) -> int:
        return self._idle_bytes

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of ``nbytes`` (contents undefined) starting on a 4 KiB boundary,
        recycled once it is garbage."""
        with self._lock:
            free = self._idle.get(nbytes)
            base = free.pop() if free else None
            if base is not None:
                self._idle_bytes -= nbytes
            elif ARENA_MIN_BYTES <= nbytes <= ARENA_BYTES // 2 and self._again(nbytes):
                base = self._carve(nbytes)
        if base is None:
            base = aligned_array(nbytes)
        view = base.view()  # the handle whose death returns ``base``; torch keeps it alive
        weakref.finalize(view, self._give_back, base)
        return torch.from_numpy(view)

    def _again(self, nbytes: int) -> bool:
        """Whether ``nbytes`` was asked for lately (lock held): an arena is for a size that
        recurs (a namespace's blocks), not for blocks of varying size (a lossless codec's)."""
        seen = nbytes in self._seen
        self._seen.pop(nbytes, None)
        self._seen[nbytes] = None  # the most recent last
        while len(self._seen) > SEEN_SIZES:
            del self._seen[next(iter(self._seen))]
        return seen

    def _carve(self, nbytes: int) -> np.ndarray:
        """A never-used buffer of ``nbytes`` from this size's huge-page arena (lock held); a new
        arena when the last is used up. An arena's memory goes back to the system when none of
        its buffers is referenced any more (each one keeps it alive)."""
        fresh = self._fresh.pop(nbytes, [])
        self._fresh[nbytes] = fresh  # the most recently used size last
        while len(self._fresh) > ARENA_SIZES:  # a size not used lately lets its arena go
            del self._fresh[next(iter(self._fresh))]
        if not fresh:
            stride = align_up(nbytes)
            count = max(1, ARENA_BYTES // stride)
            arena = huge_array(count * stride)
            fresh.extend(arena[i * stride: i * stride + nbytes] for i in reversed(range(count)))
        return fresh.pop()

    def _give_back(self, base: np.ndarray) -> None:
        with self._lock:
            if self._idle_bytes + base.nbytes <= self.max_idle_bytes:
                self._idle.setdefault(base.nbytes, []).append(base)
                self._idle_bytes += base.nbytes

    def clear(self) -> None:
        with self._lock:
            self._idle.clear()
            self._fresh.clear()
            self._seen.clear()
            self._idle_bytes = 0


block_buffers = BufferPool()  # one per process: shared by every cache's put path

RELOAD_IDLE_SECONDS = 60.0  # a returned mapping unused this long is unmapped (at the next take or return)
RELOAD_HEADROOM = 4  # a new mapping reserves 1/4 more address space, so a prefix that grew reuses it


@dataclass(slots=True)
class _Idle:
    base: np.ndarray  # the whole mapping
    resident: int  # bytes of it handed out so far (faulted in): what keeping it costs
    since: float


class MappedPool:
    """Large host buffers (``mapped_array``) that come back once their caller drops them: the
    KV ``TieredCache.get`` returns. Why: ``get`` hands out fresh memory, and on a VM faulting it
    in cost 0.6-8 s of system time per 2 GiB on the development VM, more than the disk reads
    that fill it (``python -m kvtier.bench.io_compare``). The next ``get`` writes into pages
    already faulted in, as the sidecar's pooled regions (``kvtier.shm_pool``) and an engine's
    own KV memory are.

    A new mapping reserves ``RELOAD_HEADROOM`` more address space than asked (untouched pages
    cost nothing), so a multi-turn prefix that grew still fits the last turn's. A take gets the
    smallest idle mapping that fits. Idle mappings are kept up to ``max_idle_bytes`` of faulted-in
    memory (the oldest go first) and for at most ``idle_seconds``; ``clear`` (the cache's close)
    lets them all go. A buffer's contents are undefined: whatever the last reload left."""

    def __init__(self, max_idle_bytes: int, idle_seconds: float = RELOAD_IDLE_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_idle_bytes = max_idle_bytes
        self.idle_seconds = idle_seconds
        self._clock = clock
        self._idle: list[_Idle] = []  # the most recently returned last
        self._idle_bytes = 0
        self._closed = False
        self._returned: collections.deque[tuple[np.ndarray, int, float]] = collections.deque()
        self._lock = threading.Lock()

    @property
    def idle_bytes(self) -> int:
        """Faulted-in bytes of the idle mappings kept."""
        with self._lock:
            self._take_returns()
            return self._idle_bytes

    def take(self, nbytes: int) -> np.ndarray:
        """A uint8 array of ``nbytes`` (contents undefined) starting on a page boundary, from a
        mapping of its own that comes back here when the last view of it is freed."""
        with self._lock:
            self._take_returns()
            self._trim(self._clock())
            best = min((m for m in self._idle if m.base.nbytes >= nbytes), key=lambda m: m.base.nbytes,
                       default=None)
            if best is not None:
                self._idle.remove(best)
                self._idle_bytes -= best.resident
        if best is None:
            base, resident = mapped_array(nbytes + nbytes // RELOAD_HEADROOM), 0
        else:
            base, resident = best.base, best.resident
        view = base[:nbytes]  # the handle whose death returns ``base``; torch keeps it alive
        weakref.finalize(view, self._give_back, base, max(resident, align_up(nbytes, mmap.PAGESIZE)))
        return view

    def _give_back(self, base: np.ndarray, resident: int) -> None:
        """The last view of ``base`` was freed. A finalizer: it runs wherever a garbage
        collection does, even inside ``take`` on this thread (picking from the idle list it
        would change: the mapping picked could be trimmed away under it), so it only queues
        the mapping; the next ``take`` keeps it."""
        if not self._closed and resident <= self.max_idle_bytes:
            self._returned.append((base, resident, self._clock()))

    def _take_returns(self) -> None:
        """Keep the mappings returned since the last call (lock held)."""
        while self._returned:
            self._idle.append(_Idle(*self._returned.popleft()))
            self._idle_bytes += self._idle[-1].resident
        while self._idle_bytes > self.max_idle_bytes:
            self._idle_bytes -= self._idle.pop(0).resident

    def _trim(self, now: float) -> None:
        """Unmap idle mappings past ``idle_seconds`` (lock held)."""
        while self._idle and now - self._idle[0].since > self.idle_seconds:
            self._idle_bytes -= self._idle.pop(0).resident

    def clear(self) -> None:
        """Let every idle mapping go; buffers still held are unmapped when freed, not kept."""
        with self._lock:
            self._closed = True
            self._idle.clear()
            self._returned.clear()
            self._idle_bytes = 0
