"""Slab allocator carving one preallocated buffer into size-classed slots.

The buffer is cut into pages; a page is given to one size class on demand and carved into
slots of that class, and returns to the free-page pool when its last slot is freed. Classes
step by 1.5x/2x from ``min_slot`` (waste per block <= 1/3), so blocks of one namespace share a
class and a put never fails while its class has a free slot. Blocks larger than a page take a
run of contiguous pages. Offsets are plain ints into the caller's buffer; the allocator never
touches memory. Not thread-safe: the owning tier locks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MIN_SLOT = 4096


def size_classes(page_bytes: int, min_slot: int = MIN_SLOT) -> list[int]:
    classes: list[int] = []
    size = min_slot
    while size < page_bytes:
        classes += [size, size * 3 // 2]
        size *= 2
    return [c for c in classes if c <= page_bytes // 2] + [page_bytes]


@dataclass(slots=True)
class _Class:
    slot: int
    free: dict[int, list[int]] = field(default_factory=dict)  # page -> free slot offsets


class SlabAllocator:
    def __init__(self, capacity: int, page_bytes: int, *, fixed_slot: bool = False) -> None:
        page_bytes = max(MIN_SLOT, min(page_bytes, capacity) // MIN_SLOT * MIN_SLOT)
        self.page_bytes = page_bytes
        self.n_pages = capacity // page_bytes if capacity >= MIN_SLOT else 0
        self.capacity = self.n_pages * page_bytes
        self.fixed_slot = fixed_slot
        self._classes = [page_bytes] if fixed_slot else size_classes(page_bytes)
        self._by_slot = {c: _Class(c) for c in self._classes}
        self._free_pages: set[int] = set(range(self.n_pages))
        self._page_class: dict[int, int] = {}  # page -> slot size (classed pages)
        self._page_used: dict[int, int] = {}  # page -> slots in use
        self._runs: dict[int, int] = {}  # first page of a multi-page run -> pages

    def slot_size(self, nbytes: int) -> int:
        """Bytes actually reserved for a block of ``nbytes``."""
        for c in self._classes:
            if nbytes <= c:
                return c
        if self.fixed_slot:
            return 0
        return -(-nbytes // self.page_bytes) * self.page_bytes

    def fits_ever(self, nbytes: int) -> bool:
        size = self.slot_size(nbytes)
        return 0 < size <= self.capacity

    def can_alloc(self, nbytes: int) -> bool:
        size = self.slot_size(nbytes)
        if size <= 0:
            return False
        if size <= self.page_bytes:
            return bool(self._by_slot[size].free) or bool(self._free_pages)
        return self._find_run(size // self.page_bytes) is not None

    def alloc(self, nbytes: int) -> int | None:
        """Offset of a slot for ``nbytes``, or None (and no change) if none is free."""
        size = self.slot_size(nbytes)
        if size <= 0:
            return None
        if size > self.page_bytes:
            pages = size // self.page_bytes
            first = self._find_run(pages)
            if first is None:
                return None
            self._free_pages.difference_update(range(first, first + pages))
            self._runs[first] = pages
            return first * self.page_bytes
        cls = self._by_slot[size]
        if not cls.free:
            if not self._free_pages:
                return None
            page = min(self._free_pages)
            self._free_pages.remove(page)
            base = page * self.page_bytes
            cls.free[page] = [base + i * size for i in range(self.page_bytes // size - 1, -1, -1)]
            self._page_class[page] = size
            self._page_used[page] = 0
        page, slots = next(iter(cls.free.items()))
        offset = slots.pop()
        if not slots:
            del cls.free[page]
        self._page_used[page] += 1
        return offset

    def free(self, offset: int) -> None:
        page = offset // self.page_bytes
        pages = self._runs.pop(page, None)
        if pages is not None:
            self._free_pages.update(range(page, page + pages))
            return
        size = self._page_class[page]
        cls = self._by_slot[size]
        self._page_used[page] -= 1
        if self._page_used[page] == 0:
            cls.free.pop(page, None)
            del self._page_class[page], self._page_used[page]
            self._free_pages.add(page)
        else:
            cls.free.setdefault(page, []).append(offset)

    def _find_run(self, pages: int) -> int | None:
        run = 0
        for p in range(self.n_pages):
            run = run + 1 if p in self._free_pages else 0
            if run == pages:
                return p - pages + 1
        return None
