"""A bounded ring of staging buffers: where SSD reads land before they are decoded or copied on.

One allocation (pinned when CUDA is available, so host->device copies are real DMA), carved into
fixed-size slots that start on 4 KiB boundaries (so O_DIRECT reads can land in them). ``acquire``
blocks while every slot is in use: a reader can never run ahead of the decoder by more than the
ring holds, which bounds staging memory and applies back-pressure to the I/O path.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import torch

from kvtier.errors import InvalidRequest

ALIGN = 4096


@dataclass(frozen=True, slots=True)
class StagingSlot:
    """One staging buffer; ``tensor`` is a 1-D uint8 view of ``slot_bytes`` bytes."""

    index: int
    tensor: torch.Tensor


class StagingRing:
    """``slots`` reusable buffers of ``slot_bytes`` each. Thread-safe."""

    def __init__(self, slots: int, slot_bytes: int, *, pinned: bool | None = None) -> None:
        if slots <= 0 or slot_bytes <= 0:
            raise InvalidRequest(f"staging ring needs slots > 0 and slot_bytes > 0, got {slots} x {slot_bytes}")
        self.pinned = torch.cuda.is_available() if pinned is None else pinned
        self.slot_bytes = (slot_bytes + ALIGN - 1) // ALIGN * ALIGN
        self.slots = slots
        raw = torch.empty(slots * self.slot_bytes + ALIGN, dtype=torch.uint8, pin_memory=self.pinned)
        skip = (-raw.data_ptr()) % ALIGN
        self.buffer = raw[skip: skip + slots * self.slot_bytes]
        self._slots = [StagingSlot(i, self.buffer[i * self.slot_bytes:(i + 1) * self.slot_bytes])
                       for i in range(slots)]
        self._free: deque[int] = deque(range(slots))
        self._cond = threading.Condition()
        self.high_water = 0  # most slots ever in use at once

    @property
    def in_use(self) -> int:
        return self.slots - len(self._free)

    def acquire(self, timeout: float | None = None) -> StagingSlot:
        """A free slot, waiting while all are in use; raises TimeoutError after ``timeout`` s."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._free, timeout):
                raise TimeoutError(f"no staging slot became free within {timeout} s ({self.slots} in use)")
            slot = self._slots[self._free.popleft()]
            self.high_water = max(self.high_water, self.in_use)
            return slot

    def release(self, slot: StagingSlot) -> None:
        """Give a slot back (its contents may be overwritten at once)."""
        with self._cond:
            if slot.index in self._free:
                raise InvalidRequest(f"staging slot {slot.index} released twice")
            self._free.append(slot.index)
            self._cond.notify()
