"""A Mooncake value as kvtier stores it, and how a read verifies it.

A value is the block followed by a 4-byte crc32c ``TRAILER`` bound to its key
(``kvtier.tiers.remote.base.key_bound``: a value moved under another key fails it). Reads check
every byte before returning: in pieces that are checksummed and copied while still in cache, and
on two cores for values of ``PARALLEL_VERIFY`` bytes or more.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import torch

from kvtier.block import checksum, checksum_combine
from kvtier.tiers.remote.base import Workers

TRAILER = struct.Struct("<I")
VERIFY_PIECE = 256 * 1024  # checksum-then-copy unit: well inside a core's L2
PARALLEL_VERIFY = 4 * 1024**2  # from this many bytes, verification is split over two cores


def checksums(views: Sequence[memoryview], helper_worker: Workers) -> list[int]:
    """crc32c of each view; with ``PARALLEL_VERIFY`` bytes or more, on two cores (this thread
    and ``helper_worker``: crc32c releases the GIL)."""
    if sum(v.nbytes for v in views) < PARALLEL_VERIFY:
        return [checksum(v) for v in views]
    pieces = []  # (view index, piece): a lone view is cut in two, several go whole
    for i, v in enumerate(views):
        half = v.nbytes // 2 if len(views) == 1 else v.nbytes
        pieces += [(i, v[:half]), (i, v[half:])] if half < v.nbytes else [(i, v)]
    helper = helper_worker.submit(lambda: [checksum(p) for _, p in pieces[1::2]])
    crcs = [0] * len(pieces)
    crcs[0::2] = [checksum(p) for _, p in pieces[0::2]]
    helper.wait()
    crcs[1::2] = helper.result()
    out: dict[int, int] = {}  # view index -> crc of its pieces so far
    for (i, p), c in zip(pieces, crcs, strict=True):
        out[i] = checksum_combine(out[i], c, p.nbytes) if i in out else c
    return [out[i] for i in range(len(views))]


def verify_copy(data: memoryview, length: int, out: torch.Tensor, offset: int) -> int:
    """crc32c of ``data[:length]``, copying ``[offset, offset + out.numel())`` into ``out``.

    Why piecewise: each piece is checksummed and then copied while still in cache, one pass
    over memory instead of two; and a plain memoryview copy, because ``torch.copy_`` of a few
    MiB wakes its intra-op threads, which on a busy host costs more than the copy.
    """
    end = offset + out.numel()
    dst = out.numpy().data.cast("B") if out.device.type == "cpu" and \
        out.is_contiguous() else None
    crc = 0
    for lo in range(0, length, VERIFY_PIECE):
        hi = min(lo + VERIFY_PIECE, length)
        crc = checksum(data[lo:hi], crc)
        a, b = max(lo, offset), min(hi, end)
        if a < b and dst is not None:
            dst[a - offset:b - offset] = data[a:b]
    if dst is None and end > offset:
        out.copy_(torch.frombuffer(data[offset:end], dtype=torch.uint8))
    return crc
