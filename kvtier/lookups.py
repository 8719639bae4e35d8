"""Finding the longest cached prefix: walk a prefix's chained keys through the index, then ask
the shared tier (one batched existence query) for the blocks past the local prefix.

Blocks the shared tier holds but this instance never indexed are indexed on the way (their size
is learned on first read). Every walk is counted as a lookup.
"""

from __future__ import annotations

import time

from kvtier.catalog import NamespaceCatalog
from kvtier.index import BlockEntry, Lease, LeasedBlock
from kvtier.keys import TokenIds, as_token_array, prefix_hashes
from kvtier.namespaces import Namespace
from kvtier.placement import Placement
from kvtier.recorder import StatsRecorder
from kvtier.records import BlockLocation, Hit
from kvtier.tiers.base import SharedIndex


class Lookups:
    """Prefix walks over a ``Placement``; thread-safe."""

    def __init__(self, placement: Placement, catalog: NamespaceCatalog, recorder: StatsRecorder,
                 default_block_tokens: int) -> None:
        self.placement = placement
        self.catalog = catalog
        self.recorder = recorder
        self.default_block_tokens = default_block_tokens

    def walk(self, namespace: str, token_ids: TokenIds, *,
             pin: bool) -> tuple[Namespace | None, list[BlockEntry], int]:
        """Entries of the longest cached prefix (pinned if asked; the caller releases them),
        the namespace (None if unknown) and the tokens asked; counted as a lookup."""
        tokens = as_token_array(token_ids)
        ns = self.catalog.find(namespace)
        p = self.placement
        entries: list[BlockEntry] = []
        keys: list[bytes] = []
        ttl_s: float | None = None
        if ns is not None and ns.layout is not None:
            keys = prefix_hashes(ns.digest, tokens, ns.block_tokens)
            ttl_s = ns.ttl_s
        with p.lock:
            for key in keys:
                e = p.live(key, ttl_s)
                if e is None:
                    break
                entries.append(e)
            p.touch(entries, pin=pin)
        shared = p.shared
        if ns is not None and len(entries) < len(keys) and shared is not None:
            self._extend_from_shared(shared, ns, keys, entries, pin)
        with p.lock:
            self.recorder.count_lookup(entries, len(keys), len(tokens), ns)
        return ns, entries, len(tokens)

    def _extend_from_shared(self, shared: SharedIndex, ns: Namespace, keys: list[bytes],
                            entries: list[BlockEntry], pin: bool) -> None:
        """Ask the shared tier, in one batched query, for the blocks past the local prefix."""
        p = self.placement
        start = len(entries)
        found = shared.contains_many(keys[start:])  # network call: outside the lock
        now = time.time()
        with p.lock:
            for i, present in enumerate(found, start):
                if not present:
                    break
                key = keys[i]
                parent = entries[-1] if entries else None
                if parent is not None and parent.doomed:
                    break
                e = p.index.get(key)
                if e is None:
                    e = BlockEntry(key, ns.name, parent.key if parent else None, i, ns.block_tokens,
                                   0, now, ns.codec)
                    p.index[key] = e
                    e.add_tier(p.shared_idx)
                    p.policies[p.shared_idx].insert(key)
                    if parent is not None:
                        parent.add_child(key)
                e.hits += 1
                if pin:
                    e.pins += 1
                entries.append(e)

    def find_blocks(self, ns: Namespace, keys: list[bytes], entries: list[BlockEntry | None], *,
                    pin: bool = False, start: int = 0) -> None:
        """Fill the ``None`` slots of ``entries`` (from ``start``) with parentless blocks (engine
        pages) the shared tier holds, asked in one batched query outside the lock; with ``pin``
        only the run from ``start`` is filled (and pinned)."""
        p = self.placement
        missing = [i for i in range(start, len(keys)) if entries[i] is None]
        shared = p.shared
        assert shared is not None, "callers ask only a cache with a shared tier"
        found = shared.contains_many([keys[i] for i in missing])
        now = time.time()
        with p.lock:
            for i, present in zip(missing, found, strict=True):
                e = p.index.get(keys[i]) if present else None
                if present and e is None:
                    e = BlockEntry(keys[i], ns.name, None, 0, 1, 0, now, ns.codec)
                    p.index[e.key] = e
                    e.add_tier(p.shared_idx)
                    p.policies[p.shared_idx].insert(e.key)
                if e is None or e.doomed:
                    if pin:
                        break
                    continue
                if pin:
                    e.pins += 1
                entries[i] = e

    def lease(self, namespace: str, token_ids: TokenIds) -> Lease:
        """Pin the longest cached prefix for a reader (see ``TieredCache.acquire``)."""
        ns, entries, n = self.walk(namespace, token_ids, pin=True)
        tiers = self.placement.tiers
        blocks = [LeasedBlock(e.index, e.key, e.nbytes, [tiers[t].name for t in sorted(e.tiers)], e.created)
                  for e in entries]
        return Lease(ns, blocks, n, entries)

    def lookup(self, namespace: str, token_ids: TokenIds) -> Hit:
        ns, entries, n = self.walk(namespace, token_ids, pin=False)
        bt = ns.block_tokens if ns else self.default_block_tokens
        tiers = self.placement.tiers
        blocks = [BlockLocation(e.index, e.key, tiers[min(e.tiers)].name) for e in entries if e.tiers]
        return Hit(namespace, len(blocks) * bt, bt, n, blocks)
