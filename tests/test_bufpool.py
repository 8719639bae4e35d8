"""BufferPool: a buffer is reused only after every tensor viewing it is gone, within the cap."""

from __future__ import annotations

import gc
import os
import threading

import pytest
import torch

from kvtier.bufpool import ALIGN, BufferPool, aligned_empty, is_aligned


def test_a_freed_buffer_serves_the_next_take_of_its_size():
    pool = BufferPool(max_idle_bytes=1 << 20)
    t = pool.take(4096)
    assert t.numel() == 4096 and pool.idle_bytes == 0
    ptr = t.data_ptr()
    del t
    gc.collect()
    assert pool.idle_bytes == 4096
    again = pool.take(4096)
    assert again.data_ptr() == ptr and pool.idle_bytes == 0
    assert pool.take(8192).data_ptr() != ptr  # another size: a new buffer


def test_a_buffer_still_viewed_is_never_reused():
    pool = BufferPool(max_idle_bytes=1 << 20)
    t = pool.take(4096)
    t.fill_(7)
    tail = t[1024:]  # a slice outlives the tensor it came from
    del t
    gc.collect()
    assert pool.idle_bytes == 0
    other = pool.take(4096)
    other.fill_(1)
    assert int(tail.min()) == 7 == int(tail.max())
    del tail
    gc.collect()
    assert pool.idle_bytes == 4096


def test_idle_buffers_stay_within_the_cap():
    pool = BufferPool(max_idle_bytes=10_000)
    held = [pool.take(4096) for _ in range(4)]
    del held
    gc.collect()
    assert pool.idle_bytes == 8192
    pool.clear()
    assert pool.idle_bytes == 0


def test_buffers_start_on_a_page_and_stay_aligned_when_recycled():
    pool = BufferPool(max_idle_bytes=64 << 20)
    sizes = [1, 4096, 5000, 2 * 1024**2 + 4096, 3 * 1024**2 + 17]
    held = [pool.take(n) for n in sizes]
    assert [t.numel() for t in held] == sizes
    assert all(t.data_ptr() % ALIGN == 0 for t in held)
    ptrs = [t.data_ptr() for t in held]
    del held
    gc.collect()
    again = [pool.take(n) for n in sizes]
    assert [t.data_ptr() for t in again] == ptrs


def test_aligned_empty():
    for n in (0, 1, 4096, 10_000, 1 << 22):
        t = aligned_empty(n)
        assert t.numel() == n and t.dtype == torch.uint8 and is_aligned(t)


def test_large_allocations_map_pages_of_their_own():
    """A prefix-sized destination gets its own mapping (small pages, zeroed, page-aligned)."""
    import mmap

    import numpy as np

    from kvtier.bufpool import MAPPED_BYTES, aligned_array, aligned_empty

    t = aligned_empty(MAPPED_BYTES + 1)
    a = aligned_array(MAPPED_BYTES + 1)
    assert a.ctypes.data % 4096 == 0 and a.flags.writeable and len(a) == MAPPED_BYTES + 1
    base = a
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base.obj if isinstance(base, memoryview) else base, mmap.mmap)
    assert not a[::4096].any()
    t[-1] = 7
    assert int(t[-1]) == 7 and t.data_ptr() % 4096 == 0


def vm_flags(address: int) -> list[str]:
    """The kernel's VmFlags of the mapping holding ``address`` (``/proc/self/smaps``)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def thp_available() -> bool:
    """Transparent huge pages on, in some mode (``madvise`` is enough), and smaps to see them."""
    thp = "/sys/kernel/mm/transparent_hugepage/enabled"
    if not (os.path.exists("/proc/self/smaps") and os.path.exists(thp)):
        return False
    with open(thp) as f:
        return "[never]" not in f.read()


@pytest.mark.skipif(not thp_available(), reason="needs Linux with transparent huge pages")
def test_large_buffers_are_carved_from_huge_page_arenas_and_reused():
    pool = BufferPool(max_idle_bytes=64 << 20)
    size = (2 << 20) + 4096  # a 2 MiB block with its header page
    once = pool.take(size)  # a size asked for once: the C allocator's memory
    first, second = pool.take(size), pool.take(size)  # asked for again: an arena
    assert once.data_ptr() not in (first.data_ptr() - size, second.data_ptr() + size)
    assert is_aligned(first) and is_aligned(second)
    assert second.data_ptr() - first.data_ptr() == size  # end to end in one arena
    assert "hg" in vm_flags(first.data_ptr())  # advised to be backed by huge pages
    first.fill_(1)
    second.fill_(2)  # neighbours never overlap
    assert int(first.max()) == 1
    ptr = first.data_ptr()
    del first
    gc.collect()
    assert pool.take(size).data_ptr() == ptr  # a freed buffer is reused before a fresh one


def test_an_arena_size_not_used_lately_is_let_go():
    from kvtier import bufpool

    pool = BufferPool()
    sizes = [(1 << 20) + i * 4096 for i in range(bufpool.ARENA_SIZES + 3)]
    held = []
    for s in sizes:
        held += [pool.take(s), pool.take(s)]  # the second of a size comes from an arena
    assert len(pool._fresh) == bufpool.ARENA_SIZES
    assert sizes[-1] in pool._fresh and sizes[0] not in pool._fresh


def test_a_buffer_the_garbage_collector_frees_inside_take_goes_back_without_deadlock(monkeypatch):
    """A cycle holding a pooled buffer can be collected while ``take`` holds the pool's lock
    (any allocation there may run the collector); its finalizer gives the buffer back."""
    from kvtier import bufpool

    pool = BufferPool(max_idle_bytes=64 << 20)
    size = 1 << 20
    warm = pool.take(size)  # held: the next take of this size carves an arena

    class Holder:
        pass

    cycle = Holder()
    cycle.me, cycle.buf = cycle, pool.take(4096)
    del cycle
    real = bufpool.huge_array
    monkeypatch.setattr(bufpool, "huge_array", lambda n: (gc.collect(), real(n))[1])
    done: list[torch.Tensor] = []
    t = threading.Thread(target=lambda: done.append(pool.take(size)), daemon=True)
    t.start()
    t.join(timeout=120)
    assert done, "take() deadlocked giving back a buffer the collector freed"
    assert pool.idle_bytes == 4096
    assert warm.numel() == size


# ---- MappedPool: get()'s large KV, recycled once its caller drops it ----------------------------
class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _mapped_pool(max_idle_bytes: int = 1 << 30, clock: _Clock | None = None):
    from kvtier.bufpool import MappedPool

    return MappedPool(max_idle_bytes, idle_seconds=60.0, clock=clock or _Clock())


def test_a_dropped_mapping_serves_the_next_take_that_fits_and_never_while_viewed():
    pool = _mapped_pool()
    a = torch.from_numpy(pool.take(8 << 20))
    assert a.numel() == 8 << 20 and a.data_ptr() % ALIGN == 0
    a.fill_(7)
    tail = a[1 << 20:]  # a view outlives the tensor it came from: the mapping stays taken
    ptr = a.data_ptr()
    del a
    gc.collect()
    b = torch.from_numpy(pool.take(8 << 20))
    assert b.data_ptr() != ptr and pool.idle_bytes == 0
    b.fill_(1)
    assert int(tail.min()) == 7 == int(tail.max())  # another caller's writes never reach it
    del tail
    gc.collect()
    assert pool.idle_bytes == 8 << 20  # the pages it faulted in
    grown = pool.take((8 << 20) + (1 << 20))  # a prefix that grew by 1/8 fits the headroom
    assert grown.ctypes.data == ptr and pool.idle_bytes == 0


def test_the_smallest_idle_mapping_that_fits_is_taken():
    pool = _mapped_pool()
    small, big = pool.take(4 << 20), pool.take(32 << 20)
    ptrs = small.ctypes.data, big.ctypes.data
    del small, big
    gc.collect()
    held = [pool.take(2 << 20)]
    assert held[0].ctypes.data == ptrs[0]
    held.append(pool.take(6 << 20))  # 4 MiB and its headroom (5 MiB) is too small for 6
    assert held[1].ctypes.data == ptrs[1]


def _marked(pool, nbytes: int, mark: int):
    a = pool.take(nbytes)
    a[:] = mark
    return a


def test_idle_mappings_stay_within_the_cap_and_the_oldest_go_first():
    pool = _mapped_pool(max_idle_bytes=10 << 20)
    first, second, third = (_marked(pool, 4 << 20, k) for k in (1, 2, 3))
    del first
    gc.collect()
    del second
    gc.collect()
    del third
    gc.collect()
    assert pool.idle_bytes == 8 << 20  # the first one returned was let go
    held = [pool.take(4 << 20) for _ in range(3)]
    assert sorted(int(a[0]) for a in held) == [0, 2, 3]  # two recycled, one fresh (zeroed)
    too_big = pool.take(16 << 20)
    del too_big
    gc.collect()
    assert pool.idle_bytes == 0  # larger than the whole cap: never kept


def test_an_idle_mapping_is_let_go_after_idle_seconds():
    clock = _Clock()
    pool = _mapped_pool(clock=clock)
    a = _marked(pool, 4 << 20, 9)
    del a
    gc.collect()
    clock.now = 59.0
    b = pool.take(4 << 20)
    assert int(b[0]) == 9  # within the idle time: the same memory
    del b
    gc.collect()
    clock.now = 59.0 + 61.0
    c = pool.take(4 << 20)
    assert pool.idle_bytes == 0 and int(c.max()) == 0  # past it: fresh, zeroed memory


def test_a_cleared_pool_keeps_nothing_returned_later():
    pool = _mapped_pool()
    a, b = pool.take(4 << 20), pool.take(4 << 20)
    del a
    gc.collect()
    pool.clear()
    assert pool.idle_bytes == 0
    del b
    gc.collect()
    assert pool.idle_bytes == 0


class _CollectingList(list):
    """An idle list whose iteration runs a garbage collection after its first item: Python
    collects at whatever allocation crosses its threshold, so one can run mid-choice."""

    def __iter__(self):
        for i, item in enumerate(super().__iter__()):
            yield item
            if i == 0:
                gc.collect()


def test_a_mapping_freed_by_a_collection_while_a_take_chooses_never_breaks_it():
    """A take was choosing among the idle mappings when a collection freed a view whose
    mapping then came back: its finalizer appended it and, over the byte limit, trimmed the
    oldest, which was the one being chosen. The take then failed (ValueError) on a mapping
    no longer there. A finalizer now only queues the mapping; the next take keeps it."""
    pool = _mapped_pool(max_idle_bytes=6 << 20)
    a, b = torch.from_numpy(pool.take(4 << 20)), torch.from_numpy(pool.take(4 << 20))
    a_ptr = a.data_ptr()
    del a
    gc.collect()
    cycle: list = [b]
    cycle.append(cycle)
    del b, cycle  # only a collection frees it now
    pool._idle = _CollectingList(pool._idle)
    c = torch.from_numpy(pool.take(4 << 20))
    assert c.data_ptr() == a_ptr  # the one it chose
    assert pool.idle_bytes == 4 << 20  # the freed one came back (within the limit)
