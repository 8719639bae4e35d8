"""Prometheus export of ``CacheStats``: a collector that reads one snapshot at scrape time.

Reading ``cache.stats()`` when scraped (instead of mirroring every increment into
prometheus-client objects) keeps one source of truth, so ``/v1/stats`` and ``/metrics`` agree.
Every metric is listed with type, labels and meaning in the README ("Metrics").
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from kvtier.gcpauses import GCPauses, gc_pauses
from kvtier.stats import CacheStats, TierStats
from kvtier.stats import Histogram as StatsHistogram

HTTP_BUCKETS = (5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# (name without _total, help, TierStats attribute) for the per-tier counters.
_TIER_COUNTERS = (
    ("kvtier_block_hits", "Blocks a lookup found in this tier.", "hits"),
    ("kvtier_block_misses", "Blocks a lookup looked for in this tier and fell through.", "misses"),
    ("kvtier_hit_tokens", "Tokens served from this tier's blocks by lookups.", "hit_tokens"),
    ("kvtier_blocks_read", "Blocks read from this tier.", "blocks_read"),
    ("kvtier_blocks_written", "Blocks written into this tier.", "blocks_written"),
    ("kvtier_read_bytes", "Bytes read from this tier.", "bytes_read"),
    ("kvtier_written_bytes", "Bytes written into this tier.", "bytes_written"),
    ("kvtier_promotions", "Blocks copied into this tier from a slower one.", "promotions"),
    ("kvtier_demotions", "Blocks moved from this tier to a slower one.", "demotions"),
    ("kvtier_corrupt_blocks", "Blocks whose checksum failed in this tier (dropped, never served).",
     "corrupt_blocks"),
    ("kvtier_put_failures", "Writes this tier refused (full, I/O error).", "put_failures"),
)
_TIER_GAUGES = (
    ("kvtier_tier_used_bytes", "Bytes of blocks stored in this tier.", "used_bytes"),
    ("kvtier_tier_capacity_bytes", "Configured capacity of this tier.", "capacity_bytes"),
    ("kvtier_tier_blocks", "Blocks stored in this tier.", "blocks"),
)
_CACHE_COUNTERS = (
    ("kvtier_lookups", "Lookups served.", "lookups"),
    ("kvtier_lookup_hits", "Lookups that found at least one block.", "lookup_hits"),
    ("kvtier_lookup_tokens", "Tokens looked up.", "tokens_looked_up"),
    ("kvtier_lookup_hit_tokens", "Looked-up tokens found in any tier.", "tokens_hit"),
    ("kvtier_puts", "Put calls.", "puts"),
    ("kvtier_put_tokens", "Tokens stored by put calls.", "tokens_put"),
    ("kvtier_blocks_dropped", "Blocks that left the last tier (gone from the cache).",
     "blocks_dropped"),
)

# (name without _total, help, NamespaceStats attribute) for the per-namespace counters.
_NAMESPACE_COUNTERS = (
    ("kvtier_namespace_lookups", "Lookups served, by namespace.", "lookups"),
    ("kvtier_namespace_lookup_tokens", "Tokens looked up, by namespace.", "tokens_looked_up"),
    ("kvtier_namespace_lookup_hit_tokens", "Looked-up tokens found in any tier, by namespace.",
     "tokens_hit"),
    ("kvtier_namespace_put_tokens", "Tokens stored by put calls, by namespace.", "tokens_put"),
)


def _buckets(h: StatsHistogram) -> list[tuple[str, float]]:
    """Cumulative ``(le, count)`` pairs ending with +Inf, from per-bucket counts."""
    out: list[tuple[str, float]] = []
    running = 0
    for bound, c in zip(h.buckets, h.counts, strict=False):
        running += c
        out.append((repr(float(bound)), running))
    out.append(("+Inf", sum(h.counts)))  # not ``count``: a scrape between two updates stays monotonic
    return out


class GCCollector(Collector):
    """The garbage collector's pauses by generation (``kvtier.gcpauses``) and how many objects
    its collections skip (frozen at startup): process facts, no tenant's name in them."""

    def __init__(self, pauses: GCPauses) -> None:
        self.pauses = pauses

    def collect(self) -> Iterator[Metric]:
        pause = HistogramMetricFamily(
            "kvtier_gc_pause_seconds", "Time Python's garbage collector held the process, per "
            "collection, by generation (2: a full collection).", labels=["generation"])
        for generation, h in enumerate(self.pauses.generations):
            pause.add_metric([str(generation)], _buckets(h), h.total)
        yield pause
        yield GaugeMetricFamily("kvtier_gc_frozen_objects", "Objects frozen at startup, which "
                                "collections skip (gc.freeze; 0 where not frozen).", value=gc.get_freeze_count())


class CacheCollector(Collector):
    """Yields every ``kvtier_*`` cache metric from one ``stats()`` snapshot per scrape;
    without the per-namespace families when ``namespaces`` is false (their labels name
    tenants' namespaces)."""

    def __init__(self, stats: Callable[[], CacheStats], namespaces: bool = True) -> None:
        self._stats = stats
        self._namespaces = namespaces

    def describe(self) -> list[Metric]:
        return []  # unchecked collector: families are produced at scrape time

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        tiers: list[TierStats] = list(s.tiers.values())
        for name, doc, attr in _CACHE_COUNTERS:
            yield CounterMetricFamily(name, doc, value=getattr(s, attr))
        for name, doc, attr in _NAMESPACE_COUNTERS if self._namespaces else ():
            fam = CounterMetricFamily(name, doc, labels=["namespace"])
            for ns, nst in sorted(s.namespaces.items()):
                fam.add_metric([ns], getattr(nst, attr))
            yield fam
        for name, doc, attr in _TIER_COUNTERS:
            fam = CounterMetricFamily(name, doc, labels=["tier"])
            for t in tiers:
                fam.add_metric([t.name], getattr(t, attr))
            yield fam
        for name, doc, attr in _TIER_GAUGES:
            gauge = GaugeMetricFamily(name, doc, labels=["tier"])
            for t in tiers:
                gauge.add_metric([t.name], getattr(t, attr))
            yield gauge
        ev = CounterMetricFamily("kvtier_evictions", "Blocks evicted from a tier, by reason.",
                                 labels=["tier", "reason"])
        for t in tiers:
            for reason, n in sorted(t.evictions.items()):
                ev.add_metric([t.name, str(reason)], n)
        yield ev
        reload = HistogramMetricFamily(
            "kvtier_reload_seconds", "Latency of reading and decoding one block back from a tier.",
            labels=["tier"])
        # Ages of the blocks stored now: a snapshot that can go down, hence a gauge histogram.
        age = GaugeHistogramMetricFamily(
            "kvtier_block_age_seconds", "Age of the blocks stored in a tier (retention).",
            labels=["tier"])
        for t in tiers:
            reload.add_metric([t.name], _buckets(t.reload_seconds), t.reload_seconds.total)
            age.add_metric([t.name], _buckets(t.age_seconds), t.age_seconds.total)
        yield reload
        yield age
        pf = CounterMetricFamily("kvtier_prefetches", "Finished prefetches by outcome.",
                                 labels=["outcome"])
        for outcome, n in sorted(s.prefetch.items()):
            pf.add_metric([str(outcome)], n)
        yield pf
        cd = CounterMetricFamily("kvtier_cost_decisions", "Reload-vs-recompute decisions.",
                                 labels=["decision"])
        for decision, n in sorted(s.cost_decisions.items()):
            cd.add_metric([str(decision)], n)
        yield cd
        errs = CounterMetricFamily("kvtier_tier_errors", "Failed calls to a tier's backend, by kind "
                                   "(errors, timeouts, short_circuits while its breaker is open).",
                                   labels=["tier", "kind"])
        breaker = GaugeMetricFamily("kvtier_tier_breaker_open", "1 while a tier's circuit breaker is "
                                    "open (calls short-circuit to misses), else 0.", labels=["tier"])
        for t in tiers:
            for kind in ("errors", "timeouts", "short_circuits"):
                if kind in t.extra:
                    errs.add_metric([t.name, kind], t.extra[kind])
            if isinstance(t.extra.get("breaker"), dict):
                breaker.add_metric([t.name], float(t.extra["breaker"].get("state") == "open"))
        yield errs
        yield breaker
        yield GaugeMetricFamily("kvtier_hit_rate_tokens", "Looked-up tokens hit / looked up.",
                                value=s.hit_rate_tokens)
        yield GaugeMetricFamily("kvtier_hit_rate_lookups", "Lookups with a hit / lookups.",
                                value=s.hit_rate_lookups)


def make_registry(stats: Callable[[], CacheStats]) -> tuple[CollectorRegistry, Histogram]:
    """A registry with the cache collector, and the HTTP latency histogram the server feeds."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CacheCollector(stats))
    registry.register(GCCollector(gc_pauses()))
    http = Histogram("kvtier_http_request_duration_seconds",
                     "HTTP request latency by route template, method and status.",
                     ["route", "method", "status"], registry=registry, buckets=HTTP_BUCKETS)
    return registry, http


def anonymous_registry(stats: Callable[[], CacheStats], http: Histogram) -> CollectorRegistry:
    """The same metrics without any namespace name: what ``/metrics`` shows a caller who may
    not learn the tenants' namespaces (auth on, no scrape token)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CacheCollector(stats, namespaces=False))
    registry.register(GCCollector(gc_pauses()))
    registry.register(http)
    return registry
