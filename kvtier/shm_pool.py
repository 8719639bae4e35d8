"""Client-owned shared-memory regions for the sidecar's same-host data plane.

Creating a region and faulting its pages in is slow, so regions are pooled and reused. A region
is free, in use for one request, or loaned: tensors viewing it were handed to the caller
(``kv_buffer`` or ``get``), and it returns to the pool only when the last of them is freed.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass
from math import prod
from multiprocessing import shared_memory

import numpy as np
import torch

from kvtier.layout import KV, KVLayout
from kvtier.wire import packed_views

_LOANED_AFTER_CLOSE: list[shared_memory.SharedMemory] = []  # never closed under a live view


@dataclass(slots=True, eq=False)
class Loan:
    """A pooled region the caller holds tensors of (``kv_buffer`` or ``get``): KV in the packed
    layout with ``slot_tokens`` rows per tensor, starting at address ``base``."""

    shm: shared_memory.SharedMemory
    base: int
    layout: KVLayout
    slot_tokens: int


class ShmPool:
    """Reusable client-owned shared-memory regions (creating and faulting in pages is slow).

    A region is either free, in use for one request, or loaned: tensors viewing it were handed
    to the caller, and it returns to the pool only when the last of them is freed.
    """

    def __init__(self) -> None:
        self._free: list[shared_memory.SharedMemory] = []
        self._all: list[shared_memory.SharedMemory] = []
        self._loans: dict[int, Loan] = {}
        self._lock = threading.Lock()

    def acquire(self, nbytes: int) -> shared_memory.SharedMemory:
        with self._lock:
            fits = [s for s in self._free if s.size >= nbytes]
            if fits:
                shm = min(fits, key=lambda s: s.size)
                self._free.remove(shm)
                return shm
        size = max(1 << 20, 1 << (max(nbytes, 1) - 1).bit_length())
        shm = shared_memory.SharedMemory(create=True, size=size)
        with self._lock:
            self._all.append(shm)
        return shm

    def release(self, shm: shared_memory.SharedMemory) -> None:
        with self._lock:
            if any(s is shm for s in self._all):  # not after close(): that region is unlinked
                self._free.append(shm)

    def loan(self, shm: shared_memory.SharedMemory, layout: KVLayout,
             slot_tokens: int) -> list[tuple[torch.Tensor, ...]]:
        """KV views ``[slot_tokens, *shape]`` of ``shm``; the region comes back when they are freed."""
        arr = np.frombuffer(shm.buf, dtype=np.uint8)
        flat = torch.from_numpy(arr)  # torch's storage keeps arr alive
        loan = Loan(shm, flat.data_ptr(), layout, slot_tokens)
        with self._lock:
            self._loans[loan.base] = loan
        weakref.finalize(arr, self._return, loan)
        return packed_views(flat, layout, slot_tokens)

    def _return(self, loan: Loan) -> None:
        with self._lock:
            if self._loans.get(loan.base) is loan:
                del self._loans[loan.base]
        self.release(loan.shm)

    def find_loan(self, kv: KV) -> Loan | None:
        """The loaned region ``kv`` lies in, in the packed layout (each tensor's first rows);
        None if ``kv`` is anything else, so the caller packs it."""
        try:
            first = kv[0][0]
            ptr = first.data_ptr() if first.device.type == "cpu" and first.dim() else 0
        except (TypeError, IndexError, AttributeError):
            return None
        with self._lock:
            loan = self._loans.get(ptr)
        if loan is None:
            return None
        layout, n = loan.layout, first.shape[0]
        if not 0 < n <= loan.slot_tokens or len(kv) != layout.num_layers:
            return None
        dtype, addr = layout.torch_dtype, loan.base
        for layer in kv:
            if len(layer) != len(layout.tensor_shapes):
                return None
            for t, shape in zip(layer, layout.tensor_shapes, strict=True):
                if (not isinstance(t, torch.Tensor) or t.dtype != dtype or t.data_ptr() != addr
                        or tuple(t.shape) != (n, *shape) or not t.is_contiguous()):
                    return None
                addr += loan.slot_tokens * prod(shape) * dtype.itemsize
        return loan

    def close(self) -> None:
        """Unlink every region; mappings still viewed by returned tensors stay until those go."""
        with self._lock:
            regions, self._all, self._free = self._all, [], []
        for shm in regions:
            with contextlib.suppress(FileNotFoundError):
                shm.unlink()
            try:
                shm.close()
            except BufferError:  # tensors from get() or kv_buffer() still view it: keep it mapped
                _LOANED_AFTER_CLOSE.append(shm)
