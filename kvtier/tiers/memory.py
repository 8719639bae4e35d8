"""Memory tiers: host DRAM (pinned when CUDA is present) and GPU device memory.

Both are one preallocated uint8 tensor carved by the extent allocator; a put copies the block's
bytes into its slot and allocates no tensors. Host slots fit each block to 4 KiB and start on a
page boundary; the device tier uses fixed-size slots and runs on a CPU tensor when there is no
GPU, so the same code is tested everywhere. Copies between host memory are one numpy memcpy
(``kvtier.bytecopy``: their speed does not hang on torch's thread pool); copies to or from
device memory are queued with ``copy_(non_blocking=True)``.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from kvtier.bufpool import aligned_empty, block_buffers, prefault
from kvtier.bytecopy import as_uint8, copy_bytes
from kvtier.config import DeviceTierConfig, HostTierConfig
from kvtier.errors import StorageFull
from kvtier.tiers.allocator import UNIT, ExtentAllocator
from kvtier.tiers.base import BlockMeta


class MemoryTier:
    """A tier in one preallocated buffer. Thread-safe; the lock covers bookkeeping only."""

    persistent = False
    durable = False

    def __init__(self, name: str, buffer: torch.Tensor, allocator: ExtentAllocator) -> None:
        self.name = name
        self.buffer = buffer
        self._alloc = allocator
        self._slots: dict[bytes, tuple[int, int]] = {}  # key -> (offset, nbytes)
        self._used = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._prefaulting: threading.Thread | None = None

    def start_prefault(self) -> None:
        """Fault the buffer's memory in on a background thread (``bufpool.prefault``), so puts
        into a fresh tier do not pay the page faults; ``close`` stops it."""
        self._prefaulting = threading.Thread(target=prefault, args=(self.buffer, self._stop),
                                             name=f"kvtier-{self.name}-prefault", daemon=True)
        self._prefaulting.start()

    def wait_prefaulted(self, timeout: float | None = None) -> bool:
        """Wait until the memory is faulted in (or the kernel could not); False on timeout."""
        if self._prefaulting is not None:
            self._prefaulting.join(timeout)
            return not self._prefaulting.is_alive()
        return True

    @property
    def capacity_bytes(self) -> int:
        return self._alloc.capacity

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def pinned(self) -> bool:
        return self.buffer.device.type == "cpu" and self.buffer.is_pinned()

    def can_fit(self, nbytes: int) -> bool:
        with self._lock:
            return self._alloc.can_alloc(nbytes)

    def fits_ever(self, nbytes: int) -> bool:
        return self._alloc.fits_ever(nbytes)

    def put(self, key: bytes, data: bytes | memoryview | torch.Tensor, meta: BlockMeta | None = None) -> None:
        src = as_uint8(data)
        self.put_with(key, src.numel(), lambda slot: copy_bytes(slot, src), meta)

    def put_with(self, key: bytes, nbytes: int, write: Callable[[torch.Tensor], None],
                 meta: BlockMeta | None = None) -> bool:
        """Store a block that ``write`` writes straight into its slot: a put without a staging
        copy (``kvtier.block.prepare_block(...).write_into`` encodes into the slot itself).

        ``write`` gets the slot, ``nbytes`` of uint8 starting on a 4 KiB boundary of the host
        tier (host memory: on the device tier it gets a host buffer copied up after it returns).
        False, with nothing written, if ``key`` is already stored (the first writer wins);
        StorageFull if no slot is free. If ``write`` raises, the slot is freed and the put never
        happened.
        """
        taken = self._take([(key, nbytes, meta)])
        if not taken:
            if key in self._slots:
                return False
            raise StorageFull(f"{self.name} tier has no free slot for a {nbytes}-byte block "
                              f"({self._used} of {self.capacity_bytes} bytes used)")
        self._fill(taken, lambda slots: write(slots[0]))
        return True

    def put_many_with(self, blocks: Sequence[tuple[bytes, int, BlockMeta | None]],
                      write: Callable[[list[torch.Tensor]], None]) -> int:
        """``put_with`` for a run of (key, nbytes, meta) filled by one call: slots are taken for
        the leading blocks, in order, up to the first already stored or with no slot free;
        ``write`` gets them all (``kvtier.block.write_blocks`` copies a prefix's blocks in one
        pass over its tensors). Returns how many were stored (0: ``write`` was not called). If
        ``write`` raises, none of them is stored."""
        taken = self._take(blocks)
        if taken:
            self._fill(taken, write)
        return len(taken)

    def _take(self, blocks: Sequence[tuple[bytes, int, BlockMeta | None]]) -> list[tuple[bytes, int, int]]:
        """Take slots for the leading blocks, up to the first already stored or with no slot
        free: their (key, offset, nbytes)."""
        taken: list[tuple[bytes, int, int]] = []
        with self._lock:
            for key, nbytes, _ in blocks:
                if key in self._slots:
                    break
                offset = self._alloc.alloc(nbytes)
                if offset is None:
                    break
                self._slots[key] = (offset, nbytes)
                self._used += nbytes
                taken.append((key, offset, nbytes))
        return taken

    def _fill(self, taken: Sequence[tuple[bytes, int, int]], write: Callable[[list[torch.Tensor]], None]) -> None:
        """Have ``write`` fill the slots just taken (key, offset, nbytes): in place on the host,
        through host buffers copied up on the device. If it raises, the slots are freed."""
        # Writing after taking the slot is safe: the manager exposes a block only after put returns.
        slots = [self.buffer[offset: offset + nbytes] for _, offset, nbytes in taken]
        try:
            if self.buffer.device.type == "cpu":
                write(slots)
            else:
                staged = [block_buffers.take(nbytes) for _, _, nbytes in taken]  # pageable: the
                write(staged)  # upload has read it on return
                for slot, buf in zip(slots, staged, strict=True):
                    copy_bytes(slot, buf)
        except BaseException:
            for key, _, _ in taken:
                self.delete(key)
            raise

    def contains(self, key: bytes) -> bool:
        return key in self._slots

    def size(self, key: bytes) -> int | None:
        slot = self._slots.get(key)
        return slot[1] if slot else None

    def slot(self, key: bytes) -> tuple[int, int] | None:
        """(offset into ``buffer``, nbytes) of a stored block, or None."""
        return self._slots.get(key)

    @functools.cached_property
    def host_bytes(self) -> np.ndarray | None:
        """``buffer`` as a numpy byte array where it is host memory (None on a device): blocks
        at their ``slot`` offsets, for copies that gather many of them in one call."""
        return self.buffer.numpy() if self.buffer.device.type == "cpu" else None

    def view(self, key: bytes) -> torch.Tensor:
        """Zero-copy view of a stored block; valid while the manager holds it pinned."""
        offset, n = self._slots[key]
        return self.buffer[offset: offset + n]

    def read_into(self, key: bytes, out: torch.Tensor, offset: int = 0) -> int:
        """Copy the block's bytes from ``offset`` into ``out`` (1-D uint8); returns the count."""
        start, n = self._slots[key]
        count = max(0, min(out.numel(), n - offset))
        copy_bytes(out[:count], self.buffer[start + offset: start + offset + count])
        return count

    def delete(self, key: bytes) -> bool:
        with self._lock:
            slot = self._slots.pop(key, None)
            if slot is None:
                return False
            self._alloc.free(slot[0])
            self._used -= slot[1]
            return True

    def keys(self) -> list[bytes]:
        return list(self._slots)

    def scan(self) -> Iterator[tuple[bytes, BlockMeta, int]]:
        return iter(())

    def close(self) -> None:
        self._stop.set()
        if self._prefaulting is not None:
            self._prefaulting.join()  # a chunk at most: the memory outlives it
        with self._lock:
            self._slots.clear()
            self._used = 0


def make_host_tier(cfg: HostTierConfig) -> MemoryTier:
    """The host tier: slots fitted to each block (``cfg.page_bytes`` no longer matters)."""
    pinned = torch.cuda.is_available() if cfg.pinned is None else cfg.pinned
    alloc = ExtentAllocator(cfg.capacity_bytes)
    tier = MemoryTier("host", aligned_empty(alloc.capacity, pinned=pinned), alloc)
    if cfg.prefault and not pinned:  # pinned memory is faulted in and locked when allocated
        tier.start_prefault()
    return tier


def make_device_tier(cfg: DeviceTierConfig) -> MemoryTier:
    """The device tier: one fixed slot of ``cfg.slot_bytes`` (at most the capacity) per block."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    slot = max(UNIT, min(cfg.slot_bytes, cfg.capacity_bytes) // UNIT * UNIT)
    alloc = ExtentAllocator(cfg.capacity_bytes, slot, max_block=slot)
    buffer = torch.empty(alloc.capacity, dtype=torch.uint8, device=device)
    return MemoryTier("device", buffer, alloc)


