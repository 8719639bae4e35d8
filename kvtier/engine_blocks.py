"""Engine pages addressed by the engine's own keys, over the cache's parts (see ``kvtier.blocks``
for the format and the validation helpers): exists / put / get-into / evict.
"""

from __future__ import annotations

import functools
import json
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from kvtier.block import PreparedBlock, encode_block_for_put
from kvtier.block import layout as block_layout
from kvtier.blocks import (
    BlockHits,
    canonical_fingerprint,
    engine_keys,
    page_rows,
    pages_codec,
    pages_layout,
)
from kvtier.catalog import NamespaceCatalog
from kvtier.codecs import Codec, get_codec
from kvtier.errors import InvalidRequest, KVTierError
from kvtier.index import BlockEntry
from kvtier.keys import block_key
from kvtier.lookups import Lookups
from kvtier.namespaces import Namespace, validate_name
from kvtier.pieces import Block, contiguous
from kvtier.placement import Placement
from kvtier.readers import shared_readers
from kvtier.recorder import StatsRecorder
from kvtier.reload import Reloads
from kvtier.writes import SLOTS_WINDOW_BYTES
from kvtier.writethrough import DurableWrite, WriteThrough

PAGE_READERS = 8  # engine pages read at once (each a read of its own), across every caller
@functools.cache
def _page_readers() -> ThreadPoolExecutor:
    """The pool shared by every ``get_into``: a job's pages are read at once, not one after
    another (vLLM's ``fs`` tier keeps 16 reads in flight; one job's pages at a time kept one)."""
    return ThreadPoolExecutor(PAGE_READERS, thread_name_prefix="kvtier-pages")


def _host_targets(out: Any, rows: list[torch.Tensor]) -> tuple[list[np.ndarray], list[tuple[int, int]]] | None:
    """For ``Reloads.copy_pages``: host buffers the rows lie in and each row's (buffer, offset):
    one span over a 2-D ``out`` (rows at its row stride), else one buffer per row. None where a
    row is not in host memory."""
    if not rows or any(r.device.type != "cpu" for r in rows):
        return None
    if isinstance(out, torch.Tensor) and out.dim() == 2:
        stride, page = out.stride(0), out.shape[1]
        flat = out.numpy()
        span = np.lib.stride_tricks.as_strided(flat, ((len(rows) - 1) * stride + page,), (1,))
        return [span], [(0, i * stride) for i in range(len(rows))]
    return [r.numpy() for r in rows], [(i, 0) for i in range(len(rows))]


class EngineBlocks:
    """The key-addressed block API (``TieredCache.put_blocks`` and friends); thread-safe."""

    def __init__(self, catalog: NamespaceCatalog, placement: Placement, lookups: Lookups,
                 reloads: Reloads, writes: WriteThrough, recorder: StatsRecorder) -> None:
        self.catalog = catalog
        self.placement = placement
        self.lookups = lookups
        self.reloads = reloads
        self.writes = writes
        self.recorder = recorder

    def register(self, name: str, *, page_bytes: int, fingerprint: dict | str, codec: str = "none",
                 ttl_s: float | None = None, tenant: str = "") -> Namespace:
        """See ``TieredCache.register_block_namespace``."""
        validate_name(name)
        fp = canonical_fingerprint(fingerprint)
        model = json.loads(fp).get("model") if fp.startswith("{") else None
        ns = Namespace(name, str(model or name), 1, pages_codec(codec), pages_layout(page_bytes),
                       ttl_s, tenant, "pages", fp)
        return self.catalog.register(ns)

    def exists(self, namespace: str, keys: Sequence[bytes]) -> BlockHits:
        ns, ikeys = self._keys(namespace, keys)
        p = self.placement
        with p.lock:
            entries: list[BlockEntry | None] = [p.live(k, ns.ttl_s) for k in ikeys]
        if p.shared is not None and None in entries:
            self.lookups.find_blocks(ns, ikeys, entries)
        present = [e is not None for e in entries]
        leading = present.index(False) if False in present else len(present)
        with p.lock:
            hit = [e for e in entries[:leading] if e is not None]
            p.touch(hit, pin=False)
            self.recorder.count_lookup(hit, len(ikeys), len(ikeys), ns)
        return BlockHits(leading, present)

    def put(self, namespace: str, keys: Sequence[bytes], pages: Any) -> int:
        """Store the pages not stored yet: written straight into a memory tier's slots where
        they land there (``_put_in_slots``), else encoded, then placed together (one
        ``put_many`` on a tier that batches: writes in flight at once, one group commit);
        written through below; returns once every durable tier holds them (raises the first
        failure after that)."""
        ns, ikeys = self._keys(namespace, keys)
        rows = page_rows(pages, len(ikeys), ns.page_bytes)
        codec = get_codec(ns.codec)
        p = self.placement
        with p.lock:
            new = [i for i, key in enumerate(ikeys) if p.live(key, ns.ttl_s) is None]
        in_slots, held = self._put_in_slots(ns, ikeys, pages, rows, new)
        stored = len(in_slots)
        failed: KVTierError | None = None
        durable: list[DurableWrite] = []
        pinned: list[BlockEntry] = []
        try:
            todo: list[tuple[BlockEntry, Block]] = []
            in_pieces = p.takes_pieces(ns.page_bytes)
            fresh = set(new)
            for i in (i for i in new if i not in in_slots):
                key, row = ikeys[i], rows[i]
                with p.lock:
                    if p.live(key, ns.ttl_s) is not None:  # a concurrent put stored it meanwhile
                        fresh.discard(i)
                        continue
                data = encode_block_for_put(codec, [[row.view(1, -1)]], pieces=in_pieces)
                todo.append((BlockEntry(key, ns.name, None, 0, 1, len(data), time.time(), ns.codec), data))
            stored_already = [i for i in range(len(ikeys)) if i not in fresh]
            durable += self._make_durable(ns, codec, ikeys, rows, stored_already, pinned)
            through: list[tuple[BlockEntry, Block, int]] = []
            for (entry, data), placed in zip(todo, p.place_many_unlocked(todo), strict=True):
                if isinstance(placed, KVTierError):
                    failed = failed or placed
                elif placed is not None and placed >= 0:
                    stored += 1
                    through.append((entry, data, placed))
            for i, entry in held.items():  # the write-through reads the slot while the put pins it
                t = min(entry.tiers)
                view = p.host_view(t, entry.key)
                through.append((entry, view if view is not None else
                                encode_block_for_put(codec, [[rows[i].view(1, -1)]], pieces=False), t))
            self.writes.wait(durable + self.writes.schedule(through))
        finally:
            p.release([*held.values(), *pinned])
        self.recorder.count_put(ns, stored)
        if failed is not None:
            raise failed
        return stored

    def _make_durable(self, ns: Namespace, codec: Codec, ikeys: list[bytes], rows: list[torch.Tensor],
                      stored: list[int], pinned: list[BlockEntry]) -> list[DurableWrite]:
        """The writes that make pages ``stored`` (indices: stored before this put, or by a
        concurrent one) durable where a durable tier lacks them, as ``put`` does for KV: an
        earlier write-through that failed (a full disk) is written again from this put's page,
        one still in flight is joined. Without this a page kept only in the host tier was
        acknowledged as durable, and lost with the process. Each entry written is pinned (added
        to ``pinned``: the caller unpins them once the put ends)."""
        p = self.placement
        todo: list[tuple[int, BlockEntry, list[int]]] = []
        with p.lock:
            for i in stored:
                entry = p.live(ikeys[i], ns.ttl_s)
                missing = self.writes.missing(entry) if entry is not None else []
                if entry is not None and missing:
                    entry.pins += 1
                    pinned.append(entry)
                    todo.append((i, entry, missing))
        waits: list[DurableWrite] = []
        for i, entry, missing in todo:
            data = encode_block_for_put(codec, [[rows[i].view(1, -1)]], pieces=False)
            waits += self.writes.write(entry, contiguous(data), missing)
        return waits

    def _put_in_slots(self, ns: Namespace, ikeys: list[bytes], pages: Any, rows: list[torch.Tensor],
                      new: list[int]) -> tuple[set[int], dict[int, BlockEntry]]:
        """Pages ``new`` (indices) written straight into a memory tier's slots, windows of
        consecutive ones at a time (``write_blocks``, as a KV put: a contiguous ``[n,
        page_bytes]`` tensor's window in one copy-and-checksum pass, separate rows, as the
        connectors hand them over, one such call each). Returns the indices placed, and of
        those the ones a write-through below is still to read from their slots (index ->
        entry, pinned; the rest are unpinned at once, so a later window may evict them as a
        put one by one would). Only for host pages of codec ``none``, where the put waits for
        every write-through; the caller encodes the others one by one. Why: that way each page
        was copied twice, with ~130 us of Python around it (4.4 s a GiB of 128 KiB pages on the
        development VM)."""
        if (ns.codec != "none" or not new or not self.writes.all_awaited
                or any(rows[i].device.type != "cpu" for i in new)):
            return set(), {}
        p = self.placement
        version, offsets, total = block_layout("none", [ns.page_bytes])
        lengths = [ns.page_bytes]
        if isinstance(pages, torch.Tensor) and pages.is_contiguous():
            whole = [[pages.numpy()[:len(ikeys)]]]  # block i is row i: no view made per page

            def prepared(i: int) -> PreparedBlock:
                return PreparedBlock("none", version, 1, total, offsets, lengths, whole, row=i)
        else:
            def prepared(i: int) -> PreparedBlock:
                return PreparedBlock("none", version, 1, total, offsets, lengths, [[rows[i].numpy()]])
        window = max(1, SLOTS_WINDOW_BYTES // total)
        runs: deque[list[int]] = deque()
        for i in new:
            if runs and runs[-1][-1] == i - 1 and len(runs[-1]) < window:
                runs[-1].append(i)
            else:
                runs.append([i])
        placed: set[int] = set()
        held: dict[int, BlockEntry] = {}
        try:
            while runs:
                run = runs.popleft()
                blocks = [(BlockEntry(ikeys[i], ns.name, None, 0, 1, total, time.time(), ns.codec), prepared(i))
                          for i in run]
                done = p.fill_chain_in_place(blocks, lambda: self.catalog.check_live(ns))
                placed.update(run[:len(done)])
                keep = {i: e for i, e in zip(run, done, strict=False) if self.writes.writes_below(min(e.tiers))}
                held.update(keep)
                p.release(e for i, e in zip(run, done, strict=False) if i not in keep)
                if not done:
                    break  # no room (what is there is pinned), or a concurrent put: one by one
                if len(done) < len(run):  # the tier filled up: the next window evicts to go on
                    runs.appendleft(run[len(done):])
        except BaseException:
            p.release(held.values())
            raise
        return placed, held

    def get_into(self, namespace: str, keys: Sequence[bytes], out: Any) -> int:
        ns, ikeys = self._keys(namespace, keys)
        rows = page_rows(out, len(ikeys), ns.page_bytes, writable=True)
        p = self.placement
        pinned: list[BlockEntry] = []
        with p.lock:
            for key in ikeys:
                e = p.live(key, ns.ttl_s)
                if e is None:
                    break
                e.pins += 1
                pinned.append(e)
        if p.shared is not None and len(pinned) < len(ikeys):
            found: list[BlockEntry | None] = [*pinned, *([None] * (len(ikeys) - len(pinned)))]
            self.lookups.find_blocks(ns, ikeys, found, pin=True, start=len(pinned))
            for e in found[len(pinned):]:
                if e is None:
                    break
                pinned.append(e)
        try:
            targets = _host_targets(out, rows[:len(pinned)])
            copied = self.reloads.copy_pages(pinned, ns.page_bytes, *targets) if targets else 0
            pairs = list(zip(pinned[copied:], rows[copied:], strict=False))  # rows may be more

            done = [False] * len(pairs)

            def load(todo: Iterator[tuple[int, tuple[BlockEntry, torch.Tensor]]]) -> None:
                for j, (e, row) in todo:
                    done[j] = self.reloads.load_block(e.key, [[row.view(1, -1)]])

            shared_readers(_page_readers(), min(PAGE_READERS, len(pairs)), enumerate(pairs), load)
        finally:
            p.release(pinned)
        return copied + (done.index(False) if False in done else len(done))

    def evict(self, namespace: str, keys: Sequence[bytes]) -> int:
        ns, ikeys = self._keys(namespace, keys)
        p = self.placement
        with p.lock:
            dropped = sum(p.drop(k, "evicted") for k in ikeys if k in p.index)
        p.flush_remote_deletes()
        return dropped

    def _keys(self, namespace: str, keys: Sequence[bytes]) -> tuple[Namespace, list[bytes]]:
        ns = self.catalog.get(namespace)
        if ns.kind != "pages":
            raise InvalidRequest(f"namespace {namespace!r} holds KV by token ids: register a block "
                                 "namespace (register_block_namespace) for engine pages")
        digest = ns.digest
        return ns, [block_key(digest, k) for k in engine_keys(keys)]
