"""Prefix walks (``kvtier.lookups``) over real tiers: the longest cached prefix, leases that pin
it, expired and dropped blocks never served, and the shared tier asked once, batched, for the
blocks past the local prefix."""

from __future__ import annotations

import time

import pytest

from kvtier.catalog import NamespaceCatalog
from kvtier.index import BlockEntry
from kvtier.keys import as_token_array, prefix_hashes
from kvtier.layout import KVLayout
from kvtier.lookups import Lookups
from kvtier.namespaces import Namespace, NamespaceRegistry
from kvtier.recorder import StatsRecorder
from tests.conftest import random_kv
from tests.parts import BLOCK, data, host, place, placement, remote

BT = 16
LAYOUT = KVLayout.from_kv(random_kv(BT))
TOKENS = list(range(100))  # 6 full blocks


def lookups_over(p, namespaces=(), default_block_tokens: int = 64) -> Lookups:
    catalog = NamespaceCatalog(NamespaceRegistry(), None, block_tokens=BT, codec="none")
    for ns in namespaces:
        catalog.register(ns)
    return Lookups(p, catalog, StatsRecorder(p), default_block_tokens)


def namespace(name: str = "m", ttl_s: float | None = None) -> Namespace:
    return Namespace(name, "llama", BT, "none", LAYOUT, ttl_s)


def keys_of(ns: Namespace, tokens=TOKENS) -> list[bytes]:
    return prefix_hashes(ns.digest, as_token_array(tokens), ns.block_tokens)


def store(p, ns: Namespace, n_blocks: int, tokens=TOKENS) -> list[BlockEntry]:
    """Place the first ``n_blocks`` blocks of ``tokens`` as a put would."""
    out: list[BlockEntry] = []
    for i, key in enumerate(keys_of(ns, tokens)[:n_blocks]):
        e = BlockEntry(key, ns.name, out[-1].key if out else None, i, BT, BLOCK, time.time())
        assert place(p, e) is not None
        out.append(e)
    return out


def test_a_lookup_finds_the_longest_cached_prefix_and_counts_one_lookup():
    ns = namespace()
    p = placement([host(16 * BLOCK)])
    lk = lookups_over(p, [ns])
    store(p, ns, 4)
    hit = lk.lookup("m", TOKENS)
    assert (hit.tokens, hit.block_tokens, hit.requested_tokens) == (64, BT, 100)
    assert [b.index for b in hit.blocks] == [0, 1, 2, 3] and hit.tiers == {"host": 4}
    assert [b.key for b in hit.blocks] == keys_of(ns)[:4]
    other = TOKENS[:40] + [7] * 60  # differs from block 2 on
    assert lk.lookup("m", other).tokens == 32
    s = p.stats
    assert (s.lookups, s.tokens_looked_up, s.tokens_hit) == (2, 200, 96)
    assert s.namespaces["m"].lookups == 2 and s.tiers["host"].hits == 6


def test_an_unknown_namespace_or_one_never_stored_into_is_a_counted_miss():
    p = placement([host()])
    lk = lookups_over(p, [Namespace("no layout", "llama", BT, "none")], default_block_tokens=64)
    for name in ("unknown", "no layout"):
        hit = lk.lookup(name, TOKENS)
        assert (hit.tokens, hit.requested_tokens, hit.blocks) == (0, 100, [])
    assert lk.lookup("unknown", TOKENS).block_tokens == 64  # the default: nothing else is known
    assert p.stats.lookups == 3 and p.stats.lookup_hits == 0


def test_a_lease_pins_its_prefix_until_released():
    ns = namespace()
    tier = host(4 * BLOCK)
    p = placement([tier])
    lk = lookups_over(p, [ns])
    stored = store(p, ns, 4)
    assert all(e.pins == 0 for e in stored)
    lk.lookup("m", TOKENS)  # a lookup pins nothing
    lease = lk.lease("m", TOKENS)
    assert lease.tokens == 64 and lease.namespace == ns and lease.requested_tokens == 100
    assert [b.tiers for b in lease.blocks] == [["host"]] * 4
    assert all(e.pins == 1 for e in stored)
    assert place(p, BlockEntry(b"x" * 16, "m", None, 0, BT, BLOCK, time.time())) is None
    p.release(lease._entries)
    assert all(e.pins == 0 for e in stored)
    assert place(p, BlockEntry(b"x" * 16, "m", None, 0, BT, BLOCK, time.time())) == 0


def test_expired_and_dropped_blocks_end_the_prefix():
    ns = namespace(ttl_s=60.0)
    p = placement([host(16 * BLOCK)])
    lk = lookups_over(p, [ns])
    stored = store(p, ns, 4)
    with p.lock:
        p.touch([stored[3]], pin=True)
        p.drop(stored[3].key, "evicted")  # doomed: its reader may finish, no new one starts
    assert lk.lookup("m", TOKENS).tokens == 48
    stored[2].created -= 120  # past the namespace's TTL
    assert lk.lookup("m", TOKENS).tokens == 32
    assert stored[2].key not in p.index  # dropped on the way


@pytest.fixture
def shared(redis_server):
    tier = remote(redis_server)
    yield tier
    tier.close()


def count_queries(monkeypatch, tier) -> list[list[bytes]]:
    asked: list[list[bytes]] = []
    real = tier.contains_many

    def contains_many(keys):
        asked.append(list(keys))
        return real(keys)

    monkeypatch.setattr(tier, "contains_many", contains_many)
    return asked


def test_the_shared_tier_is_asked_once_for_the_blocks_past_the_local_prefix(shared, monkeypatch):
    ns = namespace()
    p = placement([host(16 * BLOCK), shared])
    lk = lookups_over(p, [ns])
    keys = keys_of(ns)
    for key in keys[:5]:  # another instance stored blocks 0..4 in the shared tier
        shared.put(key, data(), BlockEntry(key, "m", None, 0, BT, BLOCK, 0.0).meta())
    assert shared.flush(30)
    local = store(p, ns, 2)  # this instance holds blocks 0 and 1
    asked = count_queries(monkeypatch, shared)
    lease = lk.lease("m", TOKENS)
    assert asked == [keys[2:]]  # one batched query, past the local prefix only
    assert lease.tokens == 5 * BT and [b.tiers for b in lease.blocks[2:]] == [["remote"]] * 3
    found = [p.index[k] for k in keys[2:5]]
    assert [e.parent for e in found] == [local[1].key, keys[2], keys[3]]
    assert keys[2] in local[1].children and all(e.tiers == (1,) and e.nbytes == 0 for e in found)
    assert all(e.pins == 1 for e in found)  # leased like the local blocks
    p.release(lease._entries)
    asked.clear()
    assert lk.lookup("m", TOKENS[:80]).tiers == {"host": 2, "remote": 3}
    assert asked == []  # every block asked for is indexed now: no network call


def test_engine_pages_are_found_in_the_shared_tier_by_their_own_keys(shared):
    ns = Namespace("pages", "engine", 1, "none", LAYOUT, kind="pages")
    p = placement([host(), shared])
    lk = lookups_over(p)
    keys = [bytes([i]) * 16 for i in range(4)]
    for key in (keys[0], keys[1], keys[3]):
        shared.put(key, data(), BlockEntry(key, "pages", None, 0, 1, BLOCK, 0.0).meta())
    assert shared.flush(30)
    entries: list[BlockEntry | None] = [None] * 4
    lk.find_blocks(ns, keys, entries)
    assert [e is not None for e in entries] == [True, True, False, True]
    assert all(e.parent is None and e.tiers == (1,) and e.pins == 0 for e in entries if e)
    run: list[BlockEntry | None] = [None] * 4
    lk.find_blocks(ns, keys, run, pin=True)  # the leading run only, pinned
    assert [e is not None for e in run] == [True, True, False, False]
    assert [e.pins for e in run if e] == [1, 1]
