"""The write path of KV addressed by token ids: encode each new block of a prefix, place it in
the fastest tier that takes it, write it through to the tiers below, and acknowledge the put
once every durable tier holds it.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

from kvtier.block import PreparedBlock
from kvtier.catalog import NamespaceCatalog
from kvtier.codecs import get_codec
from kvtier.errors import UnknownNamespace
from kvtier.index import BlockEntry
from kvtier.keys import TokenIds, as_token_array, prefix_hashes
from kvtier.layout import KV
from kvtier.namespaces import Namespace
from kvtier.pieces import Block, contiguous
from kvtier.placement import Placement
from kvtier.prefixkv import PrefixKV
from kvtier.recorder import StatsRecorder
from kvtier.writethrough import DurableWrite, WriteThrough

B = TypeVar("B", Block, PreparedBlock)  # a block a put places: encoded, or prepared to fill a slot
AHEAD = 2  # blocks encoded ahead of the one being placed
WINDOW_BYTES = 16 << 20  # new blocks a put writes to the SSD tier per put_many (placed, or through)
# New blocks a put copies into a memory tier's slots per call (Placement.fill_chain_in_place):
# enough that each tensor's rows for them are one long read (32 blocks of 2 MiB), and the
# window's Python (claims, headers, publishing) is paid for many blocks. 256 MiB of 2 MiB
# blocks, 30 paired rounds against a memcpy (one core busy / none): windows of 16 MiB 0.82x /
# 0.89x, 32 MiB 0.91x / 0.96x, 64 MiB 0.97x / 1.01x, 256 MiB 1.04x / 1.04x.
SLOTS_WINDOW_BYTES = 64 << 20

@functools.cache
def _encoder_pool() -> ThreadPoolExecutor:
    """The small pool shared by every put that encodes the next blocks while one is written
    (encoding copies with numpy and checksums with crc32c, both outside the GIL)."""
    return ThreadPoolExecutor(AHEAD, thread_name_prefix="kvtier-encode")


class _EncodeAhead:
    """Block ``i`` encoded, with blocks ``i+1..i+ahead`` started on the pool meanwhile: a put's
    encode and checksum of the next blocks overlap the write of this one. Blocks are still
    placed, written and acknowledged in order, one after another, as without it."""

    def __init__(self, encode: Callable[[int], Block], n: int, ahead: int = AHEAD) -> None:
        self.encode = encode
        self.n = n
        self.ahead_blocks = ahead
        self.ahead: dict[int, Future[Block]] = {}
        self.started = 0  # blocks before this one were started (or asked for) already

    def __call__(self, i: int) -> Block:
        f = self.ahead.pop(i, None)
        # Only the blocks not started yet: a window of tiny blocks is thousands ahead, and
        # looking at each of them again on every call made a put quadratic in its blocks
        # (16,000 blocks of 1 KiB: 12 s).
        stop = min(i + 1 + self.ahead_blocks, self.n)
        if self.started < stop:
            pool = _encoder_pool()
            for j in range(max(self.started, i + 1), stop):
                self.ahead[j] = pool.submit(self.encode, j)
            self.started = stop
        return f.result() if f is not None else self.encode(i)

    def batch(self, encode: Callable[[int], Block], ahead: int) -> None:
        """Encode blocks with ``encode`` from now on, ``ahead`` of the one asked for: a window of
        blocks written together while the next is encoded."""
        self.encode = encode
        self.ahead_blocks = ahead

    def close(self) -> None:
        """Wait for encodes still running: none reads the caller's KV once the put returns."""
        for f in self.ahead.values():
            if not f.cancel():
                f.exception()
        self.ahead.clear()


class Puts:
    """``put`` over the cache's parts; thread-safe (concurrent puts of one prefix store each
    block once, and each waits until the blocks it acknowledges are durable)."""

    def __init__(self, catalog: NamespaceCatalog, placement: Placement, writes: WriteThrough,
                 recorder: StatsRecorder) -> None:
        self.catalog = catalog
        self.placement = placement
        self.writes = writes
        self.recorder = recorder

    def put(self, namespace: str, token_ids: TokenIds, kv: KV, *, create: bool) -> int:
        """See ``TieredCache.put``."""
        tokens = as_token_array(token_ids)
        ns = self.catalog.for_put(namespace, kv, create=create)
        assert ns.layout is not None  # for_put registers it
        ns.layout.validate(kv, len(tokens))
        bt = ns.block_tokens
        keys = prefix_hashes(ns.digest, tokens, bt)
        codec = get_codec(ns.codec)
        p = self.placement
        stored = 0
        new: set[bytes] = set()
        chain: list[BlockEntry] = []  # pinned as we go: eviction never takes this put's ancestors
        durable: list[DurableWrite] = []
        # PrefixKV: a block's slices of host tensors as numpy views, without torch per tensor
        # (torch views cost more Python than a 2 MiB block's copy takes).
        prefix = PrefixKV(kv, bt)
        # In place: each new block is encoded straight into its memory tier's slot (one copy,
        # no encoding ahead), and write-throughs read it from there while the put holds it
        # pinned, which it does until they are done only if it waits for every one of them.
        in_place = self.writes.all_awaited
        encoded = _EncodeAhead(lambda i: prefix.prepare(i, codec).pooled(), len(keys),
                               ahead=0 if in_place else AHEAD)
        window = -1  # new blocks placed per put_many (0: one by one; -1: not known yet)
        in_slots = False  # the window is written into a memory tier's slots, not to the SSD
        placed_to = 0  # blocks before this one were placed by a window
        alone = -1  # a block that stopped a window is placed one by one
        # New blocks placed one by one are written through below a window at a time, together
        # where that tier stores batches (the put waits for durable tiers: in-flight pins hold).
        through: list[tuple[BlockEntry, Block, int]] = []
        through_bytes = WINDOW_BYTES if self.writes.batches else 0

        def write_through(entry: BlockEntry, block: Block | PreparedBlock, placed: int) -> None:
            """Queue a new block's write-through below tier ``placed``, a window at a time."""
            if not self.writes.writes_below(placed):
                return
            if isinstance(block, PreparedBlock):  # written in place: the write reads the slot
                view = p.host_view(placed, entry.key)
                block = view if view is not None else contiguous(encoded(entry.index))
            through.append((entry, block, placed))
            if len(through) * len(block) >= through_bytes:
                durable.extend(self.writes.schedule(through))
                through.clear()
        try:
            for i, key in enumerate(keys):
                if i < placed_to:
                    continue
                with p.lock:
                    self.catalog.check_live(ns)
                    existing = p.index.get(key)
                    missing: Sequence[int] = ()
                    if existing is not None and not existing.doomed:
                        existing.pins += 1
                        chain.append(existing)
                        missing = self.writes.missing(existing)
                        if not missing:
                            continue
                if missing:
                    # Stored, but not yet on a durable tier (an earlier write-through failed, or
                    # one is in flight): write it (or wait for that write) before acknowledging.
                    durable += self.writes.write(chain[-1], contiguous(encoded(i)), missing)
                    continue
                if window < 0:  # the first new block: does it land in a tier storing batches?
                    nbytes = prefix.prepare(i, codec).nbytes
                    window = self._window(nbytes)
                    if window:
                        encoded.batch(lambda j: prefix.prepare(j, codec).for_put(pieces=True), window)
                    elif in_place:  # into a memory tier's slots (if it lands in one), a window at a time
                        window, in_slots = max(1, SLOTS_WINDOW_BYTES // nbytes), True
                if window and i != alone:
                    if in_slots:
                        filled = self._place_window(ns, chain, keys, i, window, lambda j: prefix.prepare(j, codec),
                                                    self.placement.fill_chain_in_place)
                        for e, prepared in filled:
                            write_through(e, prepared, min(e.tiers))
                        run = [e for e, _ in filled]
                    else:
                        batch = self._place_window(ns, chain, keys, i, window, encoded,
                                                   self.placement.place_chain_unlocked)
                        durable += self.writes.schedule([(e, data, min(e.tiers)) for e, data in batch])
                        run = [e for e, _ in batch]
                    new.update(e.key for e in run)
                    stored += bt * len(run)
                    if run:
                        placed_to = i + len(run)
                        if len(run) < min(window, len(keys) - i):
                            alone = placed_to  # the block that stopped the window: one by one
                        continue
                    window = 0  # none placed together (a concurrent put of them, no room): one by one
                block = prefix.prepare(i, codec) if in_place else contiguous(encoded(i))
                placed, entry = self._place(ns, chain, key, i, block)
                if entry is None:
                    break
                chain.append(entry)
                if placed is not None:  # outside the lock: the backlog bound may wait
                    new.add(key)
                    stored += bt
                    write_through(entry, block, placed)
                else:
                    with p.lock:
                        missing = self.writes.missing(entry)
                    if missing:
                        durable += self.writes.write(entry, contiguous(encoded(i)), missing)
            durable += self.writes.schedule(through)
            self.writes.wait(durable)
            with p.lock:
                self.catalog.check_live(ns)
        finally:
            encoded.close()
            for w in durable:  # a put that failed: writes may read blocks its pins keep in place
                w.future.exception()
            p.release(chain)
        with p.lock:
            p.order_after_put(keys, new)
        self.recorder.count_put(ns, stored)
        return stored

    def _window(self, nbytes: int) -> int:
        """New blocks of ``nbytes`` a put places per ``put_many`` where they land in a tier that
        stores batches (the SSD tier with no memory tier in front): enough for the disk to keep
        several writes in flight. 0 elsewhere: they are placed one by one."""
        return max(1, WINDOW_BYTES // nbytes) if self.placement.takes_pieces(nbytes) else 0

    def _place_window(self, ns: Namespace, chain: list[BlockEntry], keys: Sequence[bytes], start: int,
                      window: int, block_of: Callable[[int], B],
                      place: Callable[[list[tuple[BlockEntry, B]], Callable[[], None]], list[BlockEntry]],
                      ) -> list[tuple[BlockEntry, B]]:
        """Place new blocks ``start``.. (up to ``window``; ``block_of(j)`` is block j) together:
        with ``Placement.place_chain_unlocked`` (encoded blocks: their writes in flight at once,
        outside the lock, while the next window is encoded on the pool) or
        ``Placement.fill_chain_in_place`` (prepared blocks copied straight into a memory tier's
        slots by one call). Returns the blocks placed, pinned and appended to ``chain``; fewer
        (none) where the rest are to be placed one by one."""
        parent = chain[-1].key if chain else None
        blocks: list[tuple[BlockEntry, B]] = []
        for j in range(start, min(start + window, len(keys))):
            block = block_of(j)
            blocks.append((BlockEntry(keys[j], ns.name, parent, j, ns.block_tokens, block.nbytes, time.time(),
                                      ns.codec), block))
            parent = keys[j]
        placed = place(blocks, lambda: self.catalog.check_live(ns))
        chain.extend(placed)
        return blocks[:len(placed)]

    def _place(self, ns: Namespace, chain: list[BlockEntry], key: bytes, i: int,
               data: torch.Tensor | PreparedBlock, claim: bool = True) -> tuple[int | None, BlockEntry | None]:
        """Place block ``i`` (or find it placed by a concurrent put); returns (the tier it was
        placed in, or None if it already was; its entry, pinned — None: stop the put here).

        A ``PreparedBlock`` bound for a memory tier is written into its slot outside the
        placement lock (``Placement.claim_in_place``): a 2 MiB block's copy and checksums take
        ~0.5 ms, which lookups and the write-throughs of earlier blocks would otherwise wait."""
        p = self.placement
        parent = chain[-1] if chain else None
        nbytes = data.nbytes if isinstance(data, PreparedBlock) else len(data)
        entry = BlockEntry(key, ns.name, parent.key if parent else None, i, ns.block_tokens,
                           nbytes, time.time(), ns.codec)
        with p.lock:
            while True:
                self.catalog.check_live(ns)
                if parent is not None and parent.doomed:
                    return None, None  # the parent was dropped meanwhile: a child alone is useless
                if key in p.index or not p.placing(key):
                    break
                p.placed.wait()  # a concurrent put is writing this block: take what it placed
            claimed = None
            if key not in p.index:
                if claim and isinstance(data, PreparedBlock):
                    claimed = p.claim_in_place(entry, nbytes)
                if claimed is None:
                    placed = p.place_new(entry, data)
                    if placed is None:
                        return None, None
                    entry = p.index[key]
                    entry.pins += 1
                    return placed, entry
            else:
                entry = p.index[key]
                entry.pins += 1
                return None, entry
        assert isinstance(data, PreparedBlock)
        if not p.fill_claimed(claimed, entry, data):
            return self._place(ns, chain, key, i, data, claim=False)
        with p.lock:
            try:
                self.catalog.check_live(ns)
            except UnknownNamespace:
                p.unclaim(key, claimed)
                raise
            if parent is not None and parent.doomed:
                p.unclaim(key, claimed)
                return None, None
            p.publish_claimed(entry, claimed, nbytes)
            entry.pins += 1
            return claimed, entry
