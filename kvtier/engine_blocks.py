"""Engine pages addressed by the engine's own keys, over the cache's parts (see ``kvtier.blocks``
for the format and the validation helpers): exists / put / get-into / evict.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from kvtier.block import encode_block_for_put
from kvtier.blocks import (
    BlockHits,
    canonical_fingerprint,
    engine_keys,
    page_rows,
    pages_codec,
    pages_layout,
)
from kvtier.catalog import NamespaceCatalog
from kvtier.codecs import get_codec
from kvtier.errors import InvalidRequest, KVTierError
from kvtier.index import BlockEntry
from kvtier.keys import block_key
from kvtier.lookups import Lookups
from kvtier.namespaces import Namespace, validate_name
from kvtier.pieces import Block
from kvtier.placement import Placement
from kvtier.recorder import StatsRecorder
from kvtier.reload import Reloads
from kvtier.writethrough import WriteThrough

PAGE_READERS = 8  # engine pages read at once (each a read of its own), across every caller
@functools.cache
def _page_readers() -> ThreadPoolExecutor:
    """The pool shared by every ``get_into``: a job's pages are read at once, not one after
    another (vLLM's ``fs`` tier keeps 16 reads in flight; one job's pages at a time kept one)."""
    return ThreadPoolExecutor(PAGE_READERS, thread_name_prefix="kvtier-pages")


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
        """Store the pages not stored yet: encoded, then placed together (one ``put_many`` on a
        tier that batches: writes in flight at once, one group commit), written through below;
        returns once every durable tier holds them (raises the first failure after that)."""
        ns, ikeys = self._keys(namespace, keys)
        rows = page_rows(pages, len(ikeys), ns.page_bytes)
        codec = get_codec(ns.codec)
        p = self.placement
        todo: list[tuple[BlockEntry, Block]] = []
        in_pieces = p.takes_pieces(ns.page_bytes)
        for key, row in zip(ikeys, rows, strict=True):
            with p.lock:
                if p.live(key, ns.ttl_s) is not None:
                    continue
            data = encode_block_for_put(codec, [[row.view(1, -1)]], pieces=in_pieces)
            todo.append((BlockEntry(key, ns.name, None, 0, 1, len(data), time.time(), ns.codec), data))
        stored = 0
        failed: KVTierError | None = None
        through: list[tuple[BlockEntry, Block, int]] = []
        for (entry, data), placed in zip(todo, p.place_many_unlocked(todo), strict=True):
            if isinstance(placed, KVTierError):
                failed = failed or placed
            elif placed is not None and placed >= 0:
                stored += 1
                through.append((entry, data, placed))
        self.writes.wait(self.writes.schedule(through))
        self.recorder.count_put(ns, stored)
        if failed is not None:
            raise failed
        return stored

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
            pairs = list(zip(pinned, rows, strict=False))  # rows may be more

            def load(pair: tuple[BlockEntry, torch.Tensor]) -> bool:
                return self.reloads.load_block(pair[0].key, [[pair[1].view(1, -1)]])

            done = list(_page_readers().map(load, pairs)) if len(pairs) > 1 else [load(x) for x in pairs]
        finally:
            p.release(pinned)
        return done.index(False) if False in done else len(done)

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
