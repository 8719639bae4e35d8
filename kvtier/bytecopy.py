"""Bulk byte copies whose speed does not depend on torch's intra-op thread pool.

``torch.Tensor.copy_`` between CPU tensors splits a large copy across torch's OpenMP threads and
waits for the slowest. On a busy host (a serving host always is) one of them is often descheduled:
on the 2-core development machine with its cores kept busy, 512 KiB copies had a median of ~47 us
either way, but a p99 of 6-33 ms with torch's 2 threads against 0.25-0.7 ms for a numpy copy, and
a 32 MiB block (64 such copies) took 17-77 ms against 5-10 ms (``python -m bench.codecs --copies``).
numpy's copy is one ``memcpy`` on the calling thread, and it releases the GIL, so copies of
several loader threads overlap.

Copies with a device (CUDA) tensor on either side keep ``copy_(non_blocking=True)``: the DMA engine
does those, asynchronously on the current stream.
"""

from __future__ import annotations

import numpy as np
import torch


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """A 1-D uint8 view of a contiguous tensor's bytes (a view, never a copy: raises if ``t``
    is not contiguous, since writing into a silent copy would lose the data)."""
    if not t.is_contiguous():
        raise ValueError(f"expected a contiguous tensor, got shape {tuple(t.shape)} "
                         f"strides {t.stride()}")
    return t.detach().view(-1).view(torch.uint8)


def copy_bytes(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy ``src``'s bytes into ``dst`` (both contiguous, the same number of bytes).

    CPU to CPU is one numpy memcpy on this thread; a copy involving a device tensor is queued
    with ``copy_(non_blocking=True)`` (the caller synchronizes before reusing ``src``).
    """
    d, s = byte_view(dst), byte_view(src)
    if d.numel() != s.numel():
        raise ValueError(f"copy of {s.numel()} bytes into {d.numel()}")
    if not d.numel():
        return
    if d.device.type == "cpu" and s.device.type == "cpu":
        np.copyto(d.numpy(), s.numpy())
    else:
        d.copy_(s, non_blocking=True)
