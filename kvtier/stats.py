"""Counters and latency histograms the manager keeps; ``metrics.py`` exports them.

Plain, lock-protected records: the manager mutates them, ``CacheStats.to_dict()`` gives a
JSON-able snapshot, and the Prometheus collector reads the same snapshot at scrape time so
``/v1/stats`` and ``/metrics`` never disagree.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field, fields

# Reload latency buckets (seconds): 50 us .. 30 s.
LATENCY_BUCKETS: tuple[float, ...] = (
    5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
)
# Block age buckets (seconds): 1 s .. 7 days.
AGE_BUCKETS: tuple[float, ...] = (1, 10, 60, 300, 900, 3600, 3 * 3600, 12 * 3600, 86400, 7 * 86400)


@dataclass(slots=True)
class Histogram:
    """Cumulative-bucket histogram with percentile estimates (linear within a bucket)."""

    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def percentile(self, q: float) -> float | None:
        """Estimated q-quantile (0..1); None when empty."""
        if self.count == 0:
            return None
        rank = q * self.count
        seen = 0
        for i, c in enumerate(self.counts):
            if c and seen + c >= rank:
                lo = self.buckets[i - 1] if i > 0 else 0.0
                hi = self.buckets[i] if i < len(self.buckets) else self.buckets[-1]
                return lo + (hi - lo) * max(0.0, rank - seen) / c
            seen += c
        return self.buckets[-1]

    def copy(self) -> Histogram:
        return Histogram(self.buckets, list(self.counts), self.total, self.count)

    def to_dict(self) -> dict:
        return {"count": self.count, "sum": self.total, "p50": self.percentile(0.5),
                "p99": self.percentile(0.99), "buckets": list(self.buckets), "counts": list(self.counts)}


@dataclass(slots=True)
class TierStats:
    """Per-tier counters. ``hits``/``misses`` count blocks a lookup found / fell through."""

    name: str
    capacity_bytes: int = 0
    used_bytes: int = 0
    blocks: int = 0
    hits: int = 0
    misses: int = 0
    hit_tokens: int = 0
    blocks_read: int = 0
    blocks_written: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    promotions: int = 0  # blocks copied into this tier from a slower one
    demotions: int = 0  # blocks moved from this tier to a slower one
    evictions: Counter = field(default_factory=Counter)  # reason -> blocks
    corrupt_blocks: int = 0
    put_failures: int = 0
    reload_seconds: Histogram = field(default_factory=Histogram)
    age_seconds: Histogram = field(default_factory=lambda: Histogram(AGE_BUCKETS))
    extra: dict = field(default_factory=dict)  # tier-specific figures (direct_io, compactions...)

    def copy(self) -> TierStats:
        """A copy whose counters and histograms are its own (``age_seconds`` starts empty:
        a snapshot fills it from the blocks' ages)."""
        out = TierStats(**{f.name: getattr(self, f.name) for f in fields(self)})
        out.evictions = self.evictions.copy()
        out.reload_seconds = self.reload_seconds.copy()
        out.age_seconds = Histogram(self.age_seconds.buckets)
        out.extra = dict(self.extra)
        return out

    def to_dict(self) -> dict:
        out: dict = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Histogram):
                value = value.to_dict()
            elif isinstance(value, Counter):
                value = dict(value)
            out[f.name] = value
        if not self.extra:
            del out["extra"]
        return out


@dataclass(slots=True)
class NamespaceStats:
    """Lookup and put counters of one namespace: hit rate per model/tenant, not only overall."""

    lookups: int = 0
    lookup_hits: int = 0
    tokens_looked_up: int = 0
    tokens_hit: int = 0
    puts: int = 0
    tokens_put: int = 0

    @property
    def hit_rate_tokens(self) -> float:
        return self.tokens_hit / self.tokens_looked_up if self.tokens_looked_up else 0.0

    def copy(self) -> NamespaceStats:
        return NamespaceStats(self.lookups, self.lookup_hits, self.tokens_looked_up,
                              self.tokens_hit, self.puts, self.tokens_put)

    def to_dict(self) -> dict:
        return {"lookups": self.lookups, "lookup_hits": self.lookup_hits,
                "tokens_looked_up": self.tokens_looked_up, "tokens_hit": self.tokens_hit,
                "hit_rate_tokens": self.hit_rate_tokens, "puts": self.puts,
                "tokens_put": self.tokens_put}

    @classmethod
    def from_dict(cls, d: dict) -> NamespaceStats:
        return cls(d["lookups"], d["lookup_hits"], d["tokens_looked_up"], d["tokens_hit"],
                   d["puts"], d["tokens_put"])


@dataclass(slots=True)
class CacheStats:
    """A snapshot of the whole cache's counters."""

    tiers: dict[str, TierStats]
    lookups: int = 0
    lookup_hits: int = 0  # lookups that found at least one block
    tokens_looked_up: int = 0
    tokens_hit: int = 0
    puts: int = 0
    tokens_put: int = 0
    blocks_dropped: int = 0  # left the last tier
    prefetch: Counter = field(default_factory=Counter)  # outcome -> count
    cost_decisions: Counter = field(default_factory=Counter)  # accepted/declined/partial
    extra: dict = field(default_factory=dict)
    namespaces: dict[str, NamespaceStats] = field(default_factory=dict)  # registered ones only

    @property
    def hit_rate_lookups(self) -> float:
        return self.lookup_hits / self.lookups if self.lookups else 0.0

    @property
    def hit_rate_tokens(self) -> float:
        return self.tokens_hit / self.tokens_looked_up if self.tokens_looked_up else 0.0

    def to_dict(self) -> dict:
        return {
            "lookups": self.lookups, "lookup_hits": self.lookup_hits,
            "tokens_looked_up": self.tokens_looked_up, "tokens_hit": self.tokens_hit,
            "hit_rate_lookups": self.hit_rate_lookups, "hit_rate_tokens": self.hit_rate_tokens,
            "puts": self.puts, "tokens_put": self.tokens_put, "blocks_dropped": self.blocks_dropped,
            "prefetch": dict(self.prefetch), "cost_decisions": dict(self.cost_decisions),
            "tiers": {k: v.to_dict() for k, v in self.tiers.items()},
            "namespaces": {k: v.to_dict() for k, v in self.namespaces.items()}, **self.extra,
        }
