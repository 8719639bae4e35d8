"""Whole-block reloads and promotion: read a pinned block from its fastest copy, verified,
drop copies that fail their checksum, and copy blocks read from a slower tier up.

The loader streams prefixes layer by layer (``kvtier.loader``); this is the block-at-a-time
path it falls back on for a block it could not stream, and the one engine pages use.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Sequence

import numpy as np
import torch

from kvtier.block import decode_block_into, parse_header, parse_table
from kvtier.bufpool import block_buffers
from kvtier.bytecopy import byte_view, copy_plan
from kvtier.errors import CorruptBlock, StorageFull
from kvtier.index import BlockEntry
from kvtier.placement import Placement
from kvtier.tiers.base import MemoryTier, ScatterReads, Tier

log = logging.getLogger(__name__)


class Reloads:
    """Reads and promotions over a ``Placement``; ``promote_on_get`` copies blocks read from a
    slower tier into the fastest one. Thread-safe (takes the placement lock where needed)."""

    def __init__(self, placement: Placement, *, promote_on_get: bool) -> None:
        self.placement = placement
        self.promote_on_get = promote_on_get
        self.closed = False

    def load_block(self, key: bytes, outs: Sequence[Sequence[torch.Tensor]]) -> bool:
        """Decode one pinned block from its fastest tier into ``outs``; promote it if configured.

        A corrupt or lost copy is dropped from its tier and the next tier is tried; False if
        none is left. Verified once: a whole-block ``read_into`` checks the tier's checksum (the
        Tier contract) and memory tiers hold bytes verified on their way in.
        """
        p = self.placement
        entry = p.index.get(key)
        while entry is not None and entry.tiers:
            t = min(entry.tiers)
            tier = p.tiers[t]
            start = time.perf_counter()
            promoting = t > 0 and self.promote_on_get
            data: torch.Tensor | None = None
            try:
                if isinstance(tier, MemoryTier):
                    data, copied = tier.view(key), False
                else:
                    if not entry.nbytes:  # found by a shared tier's existence query: size unknown
                        entry.nbytes = tier.size(key) or 0
                        if not entry.nbytes:
                            raise KeyError(key)
                    copied = True
                    if promoting or not read_in_place(tier, key, entry.nbytes, outs):
                        data = torch.empty(entry.nbytes, dtype=torch.uint8)
                        tier.read_into(key, data)
                if data is not None:
                    decode_block_into(data, outs, verify=False)
            except (CorruptBlock, KeyError) as e:
                self.lose_copy(entry, t, e)
                continue
            elapsed = time.perf_counter() - start
            with p.lock:
                s = p.stats.tiers[tier.name]
                s.blocks_read += 1
                s.bytes_read += entry.nbytes
                s.reload_seconds.observe(elapsed)
            if promoting:
                self.promote(entry, data if copied else None)
            return True
        return False

    def copy_pages(self, entries: Sequence[BlockEntry], page_bytes: int, dsts: Sequence[np.ndarray],
                   at: Sequence[tuple[int, int]]) -> int:
        """Copy the payloads of leading pinned engine pages (blocks of one ``none`` layer of
        ``page_bytes``) that the fastest tier holds in host memory, page ``i`` to ``dsts[d]`` at
        offset ``o`` (``at[i] == (d, o)``), in one call without a thread or a tensor per page;
        returns how many leading pages were copied (the caller loads the rest with
        ``load_block``: a page elsewhere, compressed, or whose header does not parse).

        Why: through ``load_block`` (a pool hand-off, tensors and records per page) 1 GiB of
        32 KiB pages took 10 s on the development VM; each copies in ~3 us. Not verified again,
        as ``load_block`` does not for memory tiers: they hold bytes verified on their way in.
        Each header is parsed (its own checksum checked)."""
        p = self.placement
        if not p.tiers or not entries or not isinstance(tier := p.tiers[0], MemoryTier):
            return 0
        src = tier.host_bytes
        if src is None:
            return 0
        start = time.perf_counter()
        plan: list[tuple[int, int, int, int]] = []
        nbytes = 0
        for entry, (d, o) in zip(entries, at, strict=False):
            slot = tier.slot(entry.key) if 0 in entry.tiers else None
            if slot is None:
                break
            offset, n = slot
            try:
                codec, _, _, _, table = parse_table(src[offset: offset + n].data)
            except CorruptBlock:
                break  # load_block drops that copy and tries the next tier
            if codec != "none" or len(table) != 1 or table[0][1] != page_bytes:
                break
            plan.append((d, o, offset + table[0][0], page_bytes))
            nbytes += n
        if plan:
            copy_plan(dsts, src, np.array(plan, dtype=np.int64))
            per_page = (time.perf_counter() - start) / len(plan)
            with p.lock:
                s = p.stats.tiers[tier.name]
                s.blocks_read += len(plan)
                s.bytes_read += nbytes
                for _ in plan:
                    s.reload_seconds.observe(per_page)
        return len(plan)

    def lose_copy(self, entry: BlockEntry, t: int, err: Exception) -> None:
        """Forget tier ``t``'s copy of ``entry`` after it failed (corrupt or gone)."""
        p = self.placement
        with p.lock:
            if isinstance(err, CorruptBlock):
                p.stats.tiers[p.tiers[t].name].corrupt_blocks += 1
                log.warning("corrupt block %s in %s: %s", entry.key.hex(), p.tiers[t].name, err)
            if t != p.shared_idx:  # no network call under the lock
                p.tiers[t].delete(entry.key)
            p.policies[t].remove(entry.key)
            entry.discard_tier(t)
            if not entry.tiers:
                p.drop(entry.key, "corrupt" if isinstance(err, CorruptBlock) else "lost")

    def promote(self, entry: BlockEntry, data: torch.Tensor | None, target: int = 0, *,
                keep: Collection[bytes] = ()) -> bool:
        """Copy a pinned block into tier ``target`` (a faster one), from ``data`` (its verified
        bytes) or read from its fastest copy; True if it lives there now. Never evicts a key
        in ``keep``. A tier that refuses it (a full disk) only costs the promotion."""
        p = self.placement
        if data is None:
            data = torch.empty(entry.nbytes, dtype=torch.uint8)
            p.tiers[min(entry.tiers)].read_into(entry.key, data)
        with p.lock:
            if entry.doomed or target in entry.tiers:
                return target in entry.tiers
            tier = p.tiers[target]
            if not (tier.fits_ever(entry.nbytes) and p.make_room(target, entry.nbytes, keep)):
                return False
            try:
                tier.put(entry.key, data, entry.meta())
            except StorageFull as e:
                p.stats.tiers[tier.name].put_failures += 1
                log.debug("promotion to %s failed: %s", tier.name, e)
                return False
            p.publish(entry, target, entry.nbytes)
            p.stats.tiers[tier.name].promotions += 1
            return True

    def promote_loaded(self, key: bytes, data: torch.Tensor, *, keep: Collection[bytes] = (),
                       created: float = 0.0) -> bool:
        """Promote a block whose verified bytes a loader just read from a slower tier.

        Called after the fact (the lease may be released): a block dropped or already promoted
        meanwhile is left alone, and making room never evicts a key in ``keep`` (the rest of the
        prefix). ``created`` (the leased entry's, 0 if unknown) leaves alone another entry under
        the same key: a namespace dropped and registered again reuses its keys for other bytes,
        and promoting the old ones under the new entry served the dropped namespace's KV. True
        if the block lives in the fastest tier now.
        """
        entry = self.placement.index.get(key)
        if self.closed or entry is None or (created and entry.created != created):
            return False
        with self.placement.lock:
            tiers = entry.tiers  # once: a concurrent drop (a close) may empty it after the lock
            if not tiers:
                return False
            if not entry.nbytes:  # found by a shared tier's existence query: now it is known
                entry.nbytes = data.numel()
        if entry.nbytes != data.numel():
            return False
        return tiers[0] == 0 or self.promote(entry, data, keep=keep)


def read_in_place(tier: Tier, key: bytes, nbytes: int, outs: Sequence[Sequence[torch.Tensor]]) -> bool:
    """Read a block of one host tensor whose payload ends it (an engine page: header page, then
    the page) straight into that tensor, from a tier that reads scattered (the SSD tier): the
    header into a small buffer and the payload into the caller's memory, in one read verified
    by the block's checksum, so there is no staging buffer and no decode copy. False where the
    block is not that (the caller reads and decodes it; the tensor's contents are then
    undefined until it does); raises as a read does (``CorruptBlock``, ``KeyError``), the tensor
    zeroed."""
    if not isinstance(tier, ScatterReads) or len(outs) != 1 or len(outs[0]) != 1:
        return False
    out = outs[0][0]
    if out.device.type != "cpu" or not out.is_contiguous():
        return False
    size = out.numel() * out.element_size()
    head_len = nbytes - size
    if not 0 < head_len <= MAX_HEAD_BYTES:
        return False
    head = block_buffers.take(head_len).numpy()
    try:
        if tier.read_scatter_into(key, 0, [head, byte_view(out).numpy()]) != nbytes:
            raise KeyError(key)  # shorter than its record: gone
        header = parse_header(head.data)
    except (CorruptBlock, KeyError):
        byte_view(out).zero_()  # bytes that failed their checksum never stay in the caller's memory
        raise
    layer = header.layers[0] if len(header.layers) == 1 else None
    return header.codec == "none" and layer is not None and layer.offset == head_len and layer.length == size


MAX_HEAD_BYTES = 64 * 1024  # a one-layer block's header, padded to its page, is far smaller
