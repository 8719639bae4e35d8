"""Extent allocator carving one preallocated buffer into slots sized to each block.

A block of ``n`` bytes reserves ``slot_size(n)``: ``n`` rounded up to the ``unit`` (4 KiB for
the host tier), so a slot wastes less than one unit: at most 1/8 for any block of 8 units
(32 KiB) or more, 0.2% for a 2 MiB block. Every slot starts on a unit boundary (a host slot is
page-aligned, so a block in it can be written ``O_DIRECT`` as is). The size classes are the
exact slot sizes in use: free space is kept as extents, each carved best-fit (the smallest free
extent that holds the slot, lowest offset first) and merged with its free neighbours when freed.
So blocks of one size fill the buffer back to back (a 1 GiB host tier holds 511 blocks of 2 MiB
of KV plus their header page: all but 4 KiB of it), and:

- usage never exceeds capacity, and slots never overlap;
- a put never fails while a free extent holds its slot: in particular, freeing any slot of a
  size ``s`` makes room for a block needing ``s`` (freeing a block of its own size class always
  makes room for the next);
- everything freed is one extent again (no space stays bound to a size that is gone).

``max_block`` caps the slot size (the device tier: ``unit = max_block = slot``, one fixed-size
slot per block). Offsets are plain ints into the caller's buffer; the allocator never touches
memory. Not thread-safe: the owning tier locks.
"""

from __future__ import annotations

import bisect

UNIT = 4096


class ExtentAllocator:
    def __init__(self, capacity: int, unit: int = UNIT, *, max_block: int | None = None) -> None:
        if unit <= 0:
            raise ValueError(f"allocation unit must be positive, got {unit}")
        self.unit = unit
        self.capacity = max(0, capacity) // unit * unit
        self.max_block = self.capacity if max_block is None else min(max_block, self.capacity)
        self._by_size: list[tuple[int, int]] = []  # free extents as (size, offset), sorted
        self._free_at: dict[int, int] = {}  # offset -> size of a free extent
        self._free_end: dict[int, int] = {}  # end -> offset of a free extent
        self._used: dict[int, int] = {}  # offset -> size of a reserved slot
        if self.capacity:
            self._add(0, self.capacity)

    @property
    def reserved_bytes(self) -> int:
        return sum(self._used.values())

    @property
    def largest_free(self) -> int:
        return self._by_size[-1][0] if self._by_size else 0

    def slot_size(self, nbytes: int) -> int:
        """Bytes reserved for a block of ``nbytes``; 0 if no slot can ever hold it."""
        size = max(1, -(-nbytes // self.unit)) * self.unit
        return size if size <= self.max_block else 0

    def fits_ever(self, nbytes: int) -> bool:
        return self.slot_size(nbytes) > 0

    def can_alloc(self, nbytes: int) -> bool:
        size = self.slot_size(nbytes)
        return 0 < size <= self.largest_free

    def alloc(self, nbytes: int) -> int | None:
        """Offset of a slot for ``nbytes``, or None (and no change) if no free extent holds it."""
        size = self.slot_size(nbytes)
        if not size:
            return None
        i = bisect.bisect_left(self._by_size, (size, -1))
        if i == len(self._by_size):
            return None
        extent, offset = self._by_size[i]
        self._remove(offset, extent)
        if extent > size:
            self._add(offset + size, extent - size)
        self._used[offset] = size
        return offset

    def free(self, offset: int) -> None:
        size = self._used.pop(offset)
        start, end = offset, offset + size
        before = self._free_end.get(start)
        if before is not None:
            self._remove(before, start - before)
            start = before
        after = self._free_at.get(end)
        if after is not None:
            self._remove(end, after)
            end += after
        self._add(start, end - start)

    def _add(self, offset: int, size: int) -> None:
        bisect.insort(self._by_size, (size, offset))
        self._free_at[offset] = size
        self._free_end[offset + size] = offset

    def _remove(self, offset: int, size: int) -> None:
        del self._by_size[bisect.bisect_left(self._by_size, (size, offset))]
        del self._free_at[offset], self._free_end[offset + size]
