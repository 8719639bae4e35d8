"""Bulk byte copies whose speed does not depend on torch's intra-op thread pool.

``torch.Tensor.copy_`` between CPU tensors splits a copy of more than 32 Ki elements across
torch's OpenMP threads and waits for the slowest. On a busy host (a serving host always is) one
of them is often descheduled: on the 2-core development machine with ``stress-ng --cpu 2``
running, a 512 KiB ``copy_`` took 15.8 ms (median; p99 27.8 ms) against 81 us for a plain
memcpy, and the 64 copies of a 32 MiB block 717 ms against 6.2 ms
(``python -m kvtier.bench.codecs --copies``). A host-to-host copy here is one ``memmove`` on the
calling thread (ctypes releases the GIL around it, so copies of several loader threads overlap),
after checking both sides are contiguous and the same size: cheaper per call than torch's
(~4 us against ~6 us), so small copies gain too.

Copies of ``STREAM_BYTES`` or more go through ``kvtier._fastcopy.copy_runs`` where it is built:
the same one copy on the calling thread (the GIL released), with streaming stores, which do not
read the destination into the cache before overwriting it (1.5x a memcpy's speed on the
development VM: ``python -m kvtier.bench.host_tier``, "memcpy with streaming stores").

Copies with a device (CUDA) tensor on either side keep ``copy_(non_blocking=True)``: the DMA engine
does those, asynchronously on the current stream.
"""

from __future__ import annotations

import ctypes
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch

Bytes = bytes | bytearray | memoryview | torch.Tensor  # what a tier's put accepts
CopyRuns = Callable[[Sequence[np.ndarray], np.ndarray, np.ndarray], None]

copy_runs: CopyRuns | None  # runs of one buffer into others (C, kvtier/_fastcopy.c); None: not built
try:
    from kvtier._fastcopy import copy_runs
    from kvtier._fastcopy import stream_bytes as STREAM_BYTES
except ImportError:
    copy_runs, STREAM_BYTES = None, 1 << 62  # never: every copy is a memmove


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """A 1-D uint8 view of a contiguous tensor's bytes (a view, never a copy: raises if ``t``
    is not contiguous, since writing into a silent copy would lose the data)."""
    _check_contiguous(t)
    return t.detach().view(-1).view(torch.uint8)


def as_uint8(data: Bytes) -> torch.Tensor:
    """A 1-D uint8 tensor over ``data`` without copying (read-only buffers are not written)."""
    if isinstance(data, torch.Tensor):
        return data.reshape(-1).view(torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only buffer: we only read it
        return torch.frombuffer(data, dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)


def as_byte_view(data: Bytes) -> memoryview:
    """A flat byte memoryview of ``data`` (for sockets and client libraries); tensors are copied
    to host memory, or made contiguous, only if needed."""
    if isinstance(data, torch.Tensor):
        t = data.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        return t.contiguous().view(-1).view(torch.uint8).numpy().data.cast("B")
    return memoryview(data).cast("B")


def address(arr: np.ndarray) -> int:
    """The address of ``arr``'s first byte. Why not ``arr.ctypes.data``: that builds a ctypes
    helper object per call (2 us); a scattered read of a 2 MiB block checks 65 pages' alignment,
    and this is 0.9 us where the array is writable and contiguous (read-only arrays take the
    slow way)."""
    try:
        return ctypes.addressof(_char.from_buffer(arr.data))
    except (TypeError, ValueError, BufferError):
        return arr.ctypes.data


_char = ctypes.c_char


def copy_bytes(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy ``src``'s bytes into ``dst`` (both contiguous, the same number of bytes).

    Host to host is one copy on this thread (streamed from ``STREAM_BYTES`` on; overlapping
    ranges are memmoved); a copy involving a device tensor is queued with
    ``copy_(non_blocking=True)`` (the caller synchronizes before reusing ``src``).
    """
    _check_contiguous(dst)
    _check_contiguous(src)
    n = dst.numel() * dst.element_size()
    if n != src.numel() * src.element_size():
        raise ValueError(f"copy of {src.numel() * src.element_size()} bytes into {n}")
    if not n:
        return
    if dst.is_cpu and src.is_cpu:
        to, at = dst.data_ptr(), src.data_ptr()
        if copy_runs is not None and n >= STREAM_BYTES and (to >= at + n or at >= to + n):
            copy_runs([byte_view(dst).numpy()], byte_view(src).numpy(), np.array((0, 0, 0, n), np.int64))
        else:
            ctypes.memmove(to, at, n)
    else:
        byte_view(dst).copy_(byte_view(src), non_blocking=True)


def copy_plan(dsts: Sequence[np.ndarray], src: np.ndarray, plan: np.ndarray) -> None:
    """Copy runs of ``src`` into ``dsts`` as ``copy_runs`` does (``plan``: int64 rows of
    destination index, destination offset, source offset, length); one numpy copy per run
    where ``kvtier._fastcopy`` is not built."""
    if copy_runs is not None:
        copy_runs(dsts, src, plan)
        return
    for d, to, at, n in plan.tolist():
        dsts[d][to: to + n] = src[at: at + n]


ELEMENT_INTS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # a dtype's bits, any strides


def host_elements(t: torch.Tensor) -> np.ndarray:
    """A numpy view of host tensor ``t``'s elements, its shape and strides kept, as integers of
    the element's size (numpy has no bfloat16): for copies of strided tensors without torch.
    Raises ValueError for a device tensor or an element size numpy has no integer for."""
    if t.device.type != "cpu" or t.element_size() not in ELEMENT_INTS:
        raise ValueError(f"no host integer view of a {t.dtype} tensor on {t.device}")
    return t.detach().view(ELEMENT_INTS[t.element_size()]).numpy()


def _check_contiguous(t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"expected a contiguous tensor, got shape {tuple(t.shape)} strides {t.stride()}")
