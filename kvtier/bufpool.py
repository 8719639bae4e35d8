"""Recycled host buffers for encoded blocks on the put path.

A fresh block-sized allocation (MiBs) is mapped by the C allocator and page-faulted on first
touch; on a VM that costs several times the copy that fills it (about 25 ms per 32 MiB against
4 ms for the copy). Blocks of one namespace all have the same size, so a buffer freed by one put
serves the next. A buffer goes back to the pool when the last tensor viewing it is freed (the
tier copied it, the background write-through finished), never earlier: nothing a caller still
holds is reused.
"""

from __future__ import annotations

import threading
import weakref

import numpy as np
import torch

DEFAULT_MAX_IDLE_BYTES = 256 * 1024**2


class BufferPool:
    """Byte buffers by exact size; idle ones are kept up to ``max_idle_bytes`` in all."""

    def __init__(self, max_idle_bytes: int = DEFAULT_MAX_IDLE_BYTES) -> None:
        self.max_idle_bytes = max_idle_bytes
        self._idle: dict[int, list[np.ndarray]] = {}
        self._idle_bytes = 0
        self._lock = threading.Lock()

    @property
    def idle_bytes(self) -> int:
        return self._idle_bytes

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of ``nbytes`` (contents undefined), recycled once it is garbage."""
        with self._lock:
            free = self._idle.get(nbytes)
            base = free.pop() if free else None
            if base is not None:
                self._idle_bytes -= nbytes
        if base is None:
            base = np.empty(nbytes, dtype=np.uint8)
        view = base.view()  # the handle whose death returns ``base``; torch keeps it alive
        weakref.finalize(view, self._give_back, base)
        return torch.from_numpy(view)

    def _give_back(self, base: np.ndarray) -> None:
        with self._lock:
            if self._idle_bytes + base.nbytes <= self.max_idle_bytes:
                self._idle.setdefault(base.nbytes, []).append(base)
                self._idle_bytes += base.nbytes

    def clear(self) -> None:
        with self._lock:
            self._idle.clear()
            self._idle_bytes = 0


block_buffers = BufferPool()  # one per process: shared by every cache's put path
