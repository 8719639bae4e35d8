"""The garbage collector's pauses on ``/metrics`` and the startup heap frozen by ``kvtier serve``
(``kvtier.gcpauses``): counted collections and tracked objects, never the machine's speed."""

from __future__ import annotations

import gc
import re

import httpx
import pytest
from prometheus_client import generate_latest

from kvtier.config import CacheConfig, HostTierConfig
from kvtier.gcpauses import PAUSE_BUCKETS, GCPauses, freeze_startup_heap, gc_pauses
from kvtier.manager import TieredCache
from kvtier.metrics import anonymous_registry, make_registry


def test_each_collection_is_timed_into_its_generation_with_an_injected_clock():
    now = [10.0]
    pauses = GCPauses(clock=lambda: now[0])
    for generation, seconds in ((0, 2e-5), (2, 0.09), (2, 0.3), (1, 0.004)):
        pauses.callback("start", {"generation": generation})
        now[0] += seconds
        pauses.callback("stop", {"generation": generation, "collected": 0, "uncollectable": 0})
    young, middle, full = pauses.generations
    assert (young.count, middle.count, full.count) == (1, 1, 2)
    assert full.total == pytest.approx(0.39)
    assert full.counts[PAUSE_BUCKETS.index(0.1)] == 1 and full.counts[PAUSE_BUCKETS.index(0.5)] == 1
    assert young.counts[0] == 1 and middle.counts[PAUSE_BUCKETS.index(0.005)] == 1


def test_real_collections_are_counted_once_by_one_installed_callback():
    pauses = gc_pauses()
    assert gc_pauses() is pauses and gc.callbacks.count(pauses.callback) == 1
    before = [h.count for h in pauses.generations]
    for _ in range(3):
        gc.collect()
    gc.collect(0)
    after = [h.count for h in pauses.generations]
    assert after[2] >= before[2] + 3 and after[0] >= before[0] + 1
    assert all(h.total >= 0 for h in pauses.generations)


def test_freezing_leaves_a_full_collection_little_to_walk():
    assert len(gc.get_objects()) > 10_000  # torch and kvtier imported: the startup heap
    try:
        frozen = freeze_startup_heap()
        # Threads earlier tests left running may free a few frozen objects meanwhile (each
        # leaves the count): never more, and never many.
        assert frozen - frozen // 100 <= gc.get_freeze_count() <= frozen
        assert frozen > 10_000
        assert len(gc.get_objects()) < frozen / 10  # what a full collection still walks
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0


def _sample(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert m, f"{name} not in the exposition"
    return float(m.group(1))


def test_both_registries_export_the_pause_histogram_and_the_frozen_count():
    with TieredCache(CacheConfig(block_tokens=16, host=HostTierConfig(capacity_bytes="1MiB"))) as cache:
        registry, http = make_registry(cache.stats)
        gc.collect()  # the registry installed the callback: at least this one is counted
        for reg in (registry, anonymous_registry(cache.stats, http)):
            text = generate_latest(reg).decode()
            full = _sample(text, 'kvtier_gc_pause_seconds_count{generation="2"}')
            assert full >= 1
            assert _sample(text, 'kvtier_gc_pause_seconds_bucket{generation="2",le="+Inf"}') == full
            assert _sample(text, "kvtier_gc_frozen_objects") == gc.get_freeze_count()


def test_kvtier_serve_freezes_its_startup_heap(kvtier_serve):
    """A real ``kvtier serve`` subprocess: by the time it answers, what startup left is frozen."""
    text = httpx.get(f"{kvtier_serve}/metrics", timeout=30).text
    assert _sample(text, "kvtier_gc_frozen_objects") > 10_000
    assert 'kvtier_gc_pause_seconds_bucket{generation="2",le="+Inf"}' in text
