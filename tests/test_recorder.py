"""The stats recorder (``kvtier.recorder``) over real tiers: a lookup's hit counted in the
fastest tier holding each block and a miss in every tier above it, loads and cost decisions,
and a snapshot that is consistent with the index and independent of later counting."""

from __future__ import annotations

import threading

import pytest

from kvtier.namespaces import Namespace
from kvtier.recorder import LoadResult, StatsRecorder, TierReads
from tests.parts import BLOCK, device, entry, host, place, placement, ssd

NS = Namespace("ns", "model", 16, "none")


@pytest.fixture
def three(tmp_path):
    """device, host and SSD tiers (fastest first)."""
    disk = ssd(tmp_path / "ssd")
    yield [device(4 * BLOCK), host(8 * BLOCK), disk]
    disk.close()


def test_a_hit_counts_in_the_fastest_tier_holding_it_and_a_miss_in_each_faster_one(three):
    p = placement(three)
    r = StatsRecorder(p)
    in_host_and_ssd, in_ssd = entry("a"), entry("b")
    in_host_and_ssd.tiers, in_ssd.tiers = (1, 2), (2,)
    with p.lock:
        r.count_lookup([in_host_and_ssd, in_ssd], n_blocks=4, n_tokens=70, ns=NS)
    t = p.stats.tiers
    # 2 blocks asked for were found nowhere: a miss in every tier
    assert (t["device"].hits, t["device"].misses) == (0, 2 + 2)
    assert (t["host"].hits, t["host"].misses) == (1, 1 + 2)
    assert (t["ssd"].hits, t["ssd"].misses) == (1, 0 + 2)
    assert t["host"].hit_tokens == t["ssd"].hit_tokens == 16
    s = p.stats
    assert (s.lookups, s.lookup_hits, s.tokens_looked_up, s.tokens_hit) == (1, 1, 70, 32)
    n = s.namespaces["ns"]
    assert (n.lookups, n.lookup_hits, n.tokens_looked_up, n.tokens_hit) == (1, 1, 70, 32)


def test_a_lookup_that_finds_nothing_or_a_block_dropped_since_is_no_hit(three):
    p = placement(three)
    r = StatsRecorder(p)
    gone = entry("gone")  # dropped between the walk and the count: no tier left
    with p.lock:
        r.count_lookup([], n_blocks=2, n_tokens=32, ns=NS)
        r.count_lookup([gone], n_blocks=1, n_tokens=16, ns=None)  # unknown namespace
    s = p.stats
    assert s.lookups == 2 and s.tokens_looked_up == 48 and s.tokens_hit == 16
    assert s.lookup_hits == 1  # the walk found it: counted as a lookup hit, but in no tier
    assert sum(ts.hits for ts in s.tiers.values()) == 0
    assert s.namespaces["ns"].lookups == 1 and s.namespaces["ns"].lookup_hits == 0
    assert list(s.namespaces) == ["ns"]  # no counters for an unknown namespace


def test_a_finished_load_counts_reads_per_tier_sizes_and_its_decision(three):
    p = placement(three)
    r = StatsRecorder(p)
    found = entry("found", nbytes=0)  # a shared tier's existence query: size unknown yet
    known = entry("known")
    p.index[found.key], p.index[known.key] = found, known
    r.load_finished(LoadResult(
        reads={"ssd": TierReads(blocks=4, nbytes=4 * BLOCK, seconds=0.4),
               "host": TierReads(blocks=1, nbytes=BLOCK, seconds=0.001)},
        sizes={found.key: 3 * BLOCK, known.key: 1},
        decision="partial", decision_detail={"verdict": "partial"}))
    t = p.stats.tiers
    assert (t["ssd"].blocks_read, t["ssd"].bytes_read) == (4, 4 * BLOCK)
    assert t["ssd"].reload_seconds.count == 4  # one sample per block
    assert t["ssd"].reload_seconds.total == pytest.approx(0.4)
    assert (t["host"].blocks_read, t["device"].blocks_read) == (1, 0)
    assert found.nbytes == 3 * BLOCK and known.nbytes == BLOCK  # a known size is kept
    assert p.stats.cost_decisions == {"partial": 1}
    assert p.stats.extra["cost_model"] == {"verdict": "partial"}
    r.load_finished(LoadResult())  # a load that read nothing and decided nothing changes nothing
    assert p.stats.cost_decisions == {"partial": 1} and t["ssd"].blocks_read == 4


def test_puts_prefetches_and_a_dropped_namespace(three):
    p = placement(three)
    r = StatsRecorder(p)
    r.count_put(NS, 32)
    r.count_put(NS, 0)
    r.prefetch_finished("done")
    r.prefetch_finished("timeout")
    s = p.stats
    assert (s.puts, s.tokens_put) == (2, 32) and s.namespaces["ns"].tokens_put == 32
    assert s.prefetch == {"done": 1, "timeout": 1}
    with p.lock:
        r.forget_namespace("ns")
    assert "ns" not in r.snapshot().namespaces


def test_a_snapshot_reports_fill_and_ages_and_keeps_its_values(three):
    dev, hst, disk = three
    p = placement(three)
    r = StatsRecorder(p)
    a, b = entry("a"), entry("b")
    place(p, a)
    place(p, b)
    with p.lock:
        p.touch([a], pin=False)  # b is the device tier's victim
    place(p, entry("c"))
    place(p, entry("d"))
    place(p, entry("e"))  # device full (4 slots): b demoted to host
    a.created -= 100
    with p.lock:
        r.count_lookup([a], n_blocks=1, n_tokens=16, ns=NS)
    snap = r.snapshot()
    d = snap.tiers["device"]
    assert (d.capacity_bytes, d.used_bytes, d.blocks) == (dev.capacity_bytes, dev.used_bytes, 4)
    assert snap.tiers["host"].blocks == 1 and snap.tiers["host"].used_bytes == BLOCK
    assert d.age_seconds.count == 4 and snap.tiers["host"].age_seconds.count == 1
    assert d.age_seconds.total >= 100  # a's age
    assert d.demotions == 1 and d.evictions == {"capacity": 1}
    assert snap.tiers["ssd"].extra["durability"] == "sync"  # the tier's own figures (ReportsStats)
    # later counting never shows in a snapshot taken before it
    with p.lock:
        r.count_lookup([a], n_blocks=1, n_tokens=16, ns=NS)
    p.stats.tiers["device"].evictions["capacity"] += 5
    assert snap.lookups == 1 and snap.namespaces["ns"].lookups == 1
    assert d.hits == 1 and d.evictions == {"capacity": 1}
    assert r.snapshot().lookups == 2


def test_a_snapshot_waits_for_a_change_in_progress(three):
    """Taken under the placement lock: never half of a change made under it."""
    p = placement(three)
    r = StatsRecorder(p)
    snaps = []
    with p.lock:
        t = threading.Thread(target=lambda: snaps.append(r.snapshot()))
        t.start()
        t.join(0.2)  # the snapshot cannot finish while the lock is held
        p.stats.lookups += 1
        place(p, entry("a"))
    t.join(30)
    snap = snaps[0]
    assert snap.lookups == 1 and snap.tiers["device"].blocks == 1
    assert snap.tiers["device"].age_seconds.count == 1 and snap.tiers["device"].blocks_written == 1
