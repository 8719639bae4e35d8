"""Counting what the cache does: lookups and hits per tier and namespace, puts, reloads, cost
decisions and prefetch outcomes, and the consistent snapshot ``TieredCache.stats()`` returns.

The counters live in one ``CacheStats`` guarded by the placement lock (the placement counts
tier events under it too), so a snapshot is consistent with the index it reports ages from.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvtier.index import BlockEntry
from kvtier.namespaces import Namespace
from kvtier.placement import Placement
from kvtier.stats import CacheStats, NamespaceStats
from kvtier.tiers.base import ReportsStats


@dataclass(slots=True)
class TierReads:
    """Blocks, bytes and wall seconds one load read from one tier."""

    blocks: int = 0
    nbytes: int = 0
    seconds: float = 0.0


@dataclass(slots=True)
class LoadResult:
    """What one load (or one cost decision) did, reported once when it ends: reads per tier,
    block sizes it learned (blocks a shared tier's existence query found come without one),
    and the reload-vs-recompute decision, with the cost model's state, if one was made."""

    reads: dict[str, TierReads] = field(default_factory=dict)
    sizes: dict[bytes, int] = field(default_factory=dict)
    corrupt: dict[str, int] = field(default_factory=dict)  # per tier: copies its reads dropped
    decision: str | None = None
    decision_detail: dict | None = None


class StatsRecorder:
    """Counts into the placement's ``CacheStats``."""

    def __init__(self, placement: Placement) -> None:
        self.placement = placement
        self.stats: CacheStats = placement.stats

    def namespace(self, name: str) -> NamespaceStats:
        """The counters of namespace ``name`` (lock held)."""
        nst = self.stats.namespaces.get(name)
        if nst is None:
            nst = self.stats.namespaces[name] = NamespaceStats()
        return nst

    def forget_namespace(self, name: str) -> None:
        """Drop a dropped namespace's counters: the label set stays bounded (lock held)."""
        self.stats.namespaces.pop(name, None)

    def count_put(self, ns: Namespace, stored_tokens: int) -> None:
        with self.placement.lock:
            st = self.stats
            st.puts += 1
            st.tokens_put += stored_tokens
            nst = self.namespace(ns.name)
            nst.puts += 1
            nst.tokens_put += stored_tokens

    def count_lookup(self, entries: Sequence[BlockEntry], n_blocks: int, n_tokens: int,
                     ns: Namespace | None) -> None:
        """A lookup of ``n_blocks`` blocks (``n_tokens`` tokens asked) that found ``entries``
        (a prefix): per cache, namespace and tier (the fastest copy is the hit; each faster
        tier a miss) (lock held)."""
        st, tiers = self.stats, self.placement.tiers
        st.lookups += 1
        st.tokens_looked_up += n_tokens
        hit_tokens = sum(e.tokens for e in entries)
        if entries:
            st.lookup_hits += 1
            st.tokens_hit += hit_tokens
        if ns is not None:
            nst = self.namespace(ns.name)
            nst.lookups += 1
            nst.tokens_looked_up += n_tokens
            if entries:
                nst.lookup_hits += 1
                nst.tokens_hit += hit_tokens
        for e in entries:
            if not e.tiers:  # dropped since the walk (an unpinned lookup races with eviction)
                continue
            fastest = min(e.tiers)
            for t in range(fastest):
                st.tiers[tiers[t].name].misses += 1
            ts = st.tiers[tiers[fastest].name]
            ts.hits += 1
            ts.hit_tokens += e.tokens
        for tier in tiers:
            st.tiers[tier.name].misses += n_blocks - len(entries)

    def load_finished(self, result: LoadResult) -> None:
        """Count a load's reads and learned sizes, and its cost decision if it made one."""
        p = self.placement
        with p.lock:
            for name, r in result.reads.items():
                s = self.stats.tiers[name]
                s.blocks_read += r.blocks
                s.bytes_read += r.nbytes
                for _ in range(r.blocks):  # one sample per block: its share of the load's time
                    s.reload_seconds.observe(r.seconds / r.blocks)
            for key, nbytes in result.sizes.items():
                p.record_size(key, nbytes)
            for name, n in result.corrupt.items():
                self.stats.tiers[name].corrupt_blocks += n
            if result.decision is not None:
                self.stats.cost_decisions[result.decision] += 1
                if result.decision_detail is not None:
                    self.stats.extra["cost_model"] = result.decision_detail

    def prefetch_finished(self, state: str) -> None:
        with self.placement.lock:
            self.stats.prefetch[state] += 1

    def snapshot(self) -> CacheStats:
        """A consistent snapshot of every counter, with tier fill and block ages."""
        p, st = self.placement, self.stats
        now = time.time()
        with p.lock:
            snap = CacheStats({}, st.lookups, st.lookup_hits, st.tokens_looked_up, st.tokens_hit,
                              st.puts, st.tokens_put, st.blocks_dropped, st.prefetch.copy(),
                              st.cost_decisions.copy(), dict(st.extra),
                              {n: v.copy() for n, v in st.namespaces.items()})
            for t, tier in enumerate(p.tiers):
                ts = st.tiers[tier.name].copy()
                ts.capacity_bytes, ts.used_bytes, ts.blocks = tier.capacity_bytes, tier.used_bytes, len(p.policies[t])
                snap.tiers[tier.name] = ts
            for e in p.index.values():
                for t in e.tiers:
                    snap.tiers[p.tiers[t].name].age_seconds.observe(now - e.created)
        for tier in p.tiers:  # the tiers' own figures: outside the lock (they may do I/O)
            if isinstance(tier, ReportsStats):
                snap.tiers[tier.name].extra = tier.stats()
        return snap
