"""A block's bytes as pieces lying end to end: its header page, then the caller's own pages.

An engine page (a row of vLLM's CPU tier, a page of SGLang's host pool, a page in a tenant's
shared-memory region) is already 4 KiB-aligned memory of whole 4 KiB pages, and a block laid out
for direct I/O (``kvtier.block``, version 2) puts each payload right after a header page. So the
block need not be copied behind its header to be written: the SSD tier's ``put_many`` takes the
pieces and writes them in one gathered ``O_DIRECT`` write, straight from the engine's memory.
That saves a copy per page, and more than its CPU: on the development VM an ``O_DIRECT`` write
from recycled block-pool memory ran at about half the speed of the same write from the engine's
own pages (``python -m kvtier.bench.engines`` reports the store path). Every other consumer
(memory tiers, write-through) asks for ``contiguous``: the one copy a block always had.

The caller's pages must not change while the put runs, as with any engine's store. A page that
does change is still never served changed: each payload is checksummed once, when the block is
encoded, and the record's checksum is combined from those (``BlockPieces.crcs``), so bytes that
reach the disk after a change fail it and the block is dropped on read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvtier.bufpool import ALIGN, block_buffers
from kvtier.bytecopy import address


@dataclass(frozen=True, slots=True)
class BlockPieces:
    """``pieces`` (1-D uint8 arrays) end to end are the block's ``nbytes``; every piece but the
    last starts on an ``ALIGN`` boundary and is whole ``ALIGN`` pages (so they can go into one
    ``O_DIRECT`` gathered write as they are)."""

    pieces: tuple[np.ndarray, ...]
    nbytes: int
    # each piece's crc32c (seed 0) where the encoder computed it (None: not known), or (): none
    # known. A tier's record checksum is combined from these rather than read again, so it and
    # the block's own layer checksums come from one pass over memory the caller still owns.
    crcs: tuple[int | None, ...] = ()

    def __post_init__(self) -> None:
        if self.crcs and len(self.crcs) != len(self.pieces):
            raise ValueError(f"{len(self.crcs)} checksums for {len(self.pieces)} pieces")
        if sum(p.nbytes for p in self.pieces) != self.nbytes:
            raise ValueError(f"pieces of {sum(p.nbytes for p in self.pieces)} bytes for a "
                             f"{self.nbytes}-byte block")
        if any(p.nbytes % ALIGN or address(p) % ALIGN for p in self.pieces[:-1]):
            raise ValueError("every piece but the last must be whole, aligned 4 KiB pages")

    def __len__(self) -> int:
        return self.nbytes

    def tobytes(self) -> bytes:
        return b"".join(p.data for p in self.pieces)

    def contiguous(self) -> torch.Tensor:
        """The block in one recycled, aligned buffer (``kvtier.bufpool``): one copy."""
        out = block_buffers.take(self.nbytes)
        np.concatenate(self.pieces, out=out.numpy())
        return out


Block = torch.Tensor | BlockPieces  # an encoded block on the put path


def contiguous(block: Block) -> torch.Tensor:
    """``block`` as one uint8 tensor: pieces are copied together, a tensor is returned as is."""
    return block.contiguous() if isinstance(block, BlockPieces) else block
