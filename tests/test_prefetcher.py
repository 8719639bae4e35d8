"""The prefetcher (``kvtier.prefetcher``) over real tiers: a prefix on disk promoted to the host
tier in the background, the budget cutting it short, cancellation and timeouts counted once,
pins always released, and bad requests refused before anything runs."""

from __future__ import annotations

import threading
import time

import pytest

from kvtier.catalog import NamespaceCatalog
from kvtier.errors import InvalidRequest
from kvtier.index import BlockEntry
from kvtier.keys import as_token_array, prefix_hashes
from kvtier.layout import KVLayout
from kvtier.lookups import Lookups
from kvtier.namespaces import Namespace, NamespaceRegistry
from kvtier.prefetcher import Prefetcher
from kvtier.recorder import StatsRecorder
from kvtier.reload import Reloads
from tests.conftest import random_kv
from tests.parts import BLOCK, data, host, placement, ssd

BT = 16
TOKENS = list(range(6 * BT))
NS = Namespace("m", "llama", BT, "none", KVLayout.from_kv(random_kv(BT)))


@pytest.fixture
def parts(tmp_path):
    """A host tier of 8 blocks over an SSD tier holding the 6 blocks of ``TOKENS``."""
    p = placement([host(8 * BLOCK), ssd(tmp_path / "ssd")])
    catalog = NamespaceCatalog(NamespaceRegistry(), None, block_tokens=BT, codec="none")
    catalog.register(NS)
    recorder = StatsRecorder(p)
    lookups = Lookups(p, catalog, recorder, BT)
    reloads = Reloads(p, promote_on_get=False)
    entries: list[BlockEntry] = []
    for i, k in enumerate(prefix_hashes(NS.digest, as_token_array(TOKENS), BT)):
        e = BlockEntry(k, "m", entries[-1].key if entries else None, i, BT, BLOCK, time.time())
        p.tiers[1].put(k, data(BLOCK, i), e.meta())
        with p.lock:
            p.publish(e, 1, BLOCK)
            if entries:
                entries[-1].add_child(k)
        entries.append(e)
    yield p, lookups, reloads, recorder, entries


def prefetcher(parts, budget_share: float = 1.0) -> Prefetcher:
    p, lookups, reloads, recorder, _ = parts
    return Prefetcher(lookups, reloads, recorder, budget_share)


def test_wait_complete_promotes_the_whole_prefix_and_releases_it(parts):
    p, *_, entries = parts
    pf = prefetcher(parts)
    try:
        h = pf.start("m", TOKENS, "host", policy="wait_complete", timeout_s=None)
        assert h.state == "done" and h.ready_tokens == len(TOKENS) and h.stopped_by is None
        assert all(e.tiers == (0, 1) and e.pins == 0 for e in entries)
        assert p.stats.tiers["host"].promotions == 6 and p.stats.prefetch["done"] == 1
        assert pf.status(h.id) is h
        assert pf.budget("host").held_bytes == 6 * BLOCK
    finally:
        pf.close()


def test_the_budget_cuts_a_prefetch_short_and_frees_blocks_a_reader_used(parts):
    p, *_, entries = parts
    pf = prefetcher(parts, budget_share=0.5)  # 4 of the host tier's 8 blocks
    try:
        h = pf.start("m", TOKENS, "host", policy="wait_complete", timeout_s=None)
        assert h.state == "done" and h.stopped_by == "budget" and h.ready_tokens == 4 * BT
        assert [0 in e.tiers for e in entries] == [True] * 4 + [False] * 2
        assert pf.budget("host").held_bytes == 4 * BLOCK
        with p.lock:
            p.touch(entries[:2], pin=False)  # a reader used two of them: no longer held
        assert pf.budget("host").held_bytes == 2 * BLOCK
        h = pf.start("m", TOKENS, "host", policy="wait_complete", timeout_s=None)
        assert h.ready_tokens == 6 * BT and all(0 in e.tiers for e in entries)
        assert all(e.pins == 0 for e in entries)
    finally:
        pf.close()


def test_a_cancelled_prefetch_stops_keeps_what_it_promoted_and_is_counted_once(parts):
    p, _, reloads, _, entries = parts
    pf = prefetcher(parts)
    real = reloads.promote
    handles = []

    def promote_then_cancel(*args, **kw):
        ok = real(*args, **kw)
        handles[0].cancel()  # the reader went away after the first block
        return ok

    reloads.promote = promote_then_cancel  # type: ignore[method-assign]
    gate = threading.Event()
    pf._pool.submit(gate.wait)  # hold one worker so the handle exists before the run starts
    pf._pool.submit(gate.wait)
    try:
        handles.append(pf.start("m", TOKENS, "host", policy="best_effort", timeout_s=None))
        gate.set()
        assert handles[0].wait(30)
        assert handles[0].state == "cancelled" and handles[0].ready_tokens == BT
        assert [0 in e.tiers for e in entries] == [True] + [False] * 5
        assert all(e.pins == 0 for e in entries)
        assert not handles[0].cancel() and p.stats.prefetch["cancelled"] == 1
    finally:
        gate.set()
        pf.close()


def test_a_timed_out_prefetch_reports_timeout_and_its_worker_stops(parts):
    p, *_, entries = parts
    pf = prefetcher(parts)
    gate = threading.Event()
    pf._pool.submit(gate.wait)  # both workers busy: the prefetch cannot start in time
    pf._pool.submit(gate.wait)
    try:
        h = pf.start("m", TOKENS, "host", policy="timeout", timeout_s=0.01)
        assert h.state == "timeout" and "timed out" in (h.error or "")
        gate.set()
        both = threading.Barrier(2, timeout=30)  # both workers free: the queued run has ended
        done = [pf._pool.submit(both.wait) for _ in range(2)]
        assert all(f.result(30) is not None for f in done)  # the run found its handle finished
        assert h.state == "timeout" and h.ready_tokens == 0
        assert all(e.tiers == (1,) and e.pins == 0 for e in entries)
        assert dict(p.stats.prefetch) == {"timeout": 1} and p.stats.lookups == 0  # never walked
    finally:
        gate.set()
        pf.close()


def test_a_bad_policy_or_tier_is_refused_before_anything_runs(parts):
    p, *_, entries = parts
    pf = prefetcher(parts)
    try:
        with pytest.raises(InvalidRequest, match="prefetch policy"):
            pf.start("m", TOKENS, "host", policy="eventually", timeout_s=None)
        with pytest.raises(InvalidRequest, match="unknown tier 'gpu'"):
            pf.start("m", TOKENS, "gpu", policy="best_effort", timeout_s=None)
        assert not pf._handles and all(e.tiers == (1,) for e in entries)
        with pytest.raises(KeyError):
            pf.status("no such id")
    finally:
        pf.close()


def test_a_prefix_that_cannot_be_promoted_ends_early_and_unpins(parts):
    p, *_, entries = parts
    pf = prefetcher(parts)
    blockers = [BlockEntry(bytes([i]) * 16, "x", None, 0, BT, BLOCK, time.time()) for i in range(8)]
    with p.lock:  # the host tier is full of blocks being read: no room for the prefix
        for b in blockers:
            assert p.place_new(b, data(BLOCK)) == 0
            b.pins += 1
    try:
        h = pf.start("m", TOKENS, "host", policy="wait_complete", timeout_s=None)
        assert h.state == "done" and h.ready_tokens == 0
        assert all(e.tiers == (1,) and e.pins == 0 for e in entries)
        assert pf._budgets[0].held_bytes == 0  # the failed promotion's reservation is undone
    finally:
        pf.close()
