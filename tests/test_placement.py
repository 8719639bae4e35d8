"""Placement (``kvtier.placement``) over real tiers: where a new block lands, the cascade down
when a tier is full, drops with descendants, pins and doomed blocks, a disk-bound tier short of
disk, and what a drop does to a shared tier's copy."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import pytest
import torch

from kvtier.errors import StorageFull
from kvtier.index import ancestry_depths
from kvtier.placement import Placement
from kvtier.tiers.memory import MemoryTier
from kvtier.tiers.ssd import SSDTier
from tests.parts import (
    BLOCK,
    chain,
    data,
    device,
    entry,
    held,
    host,
    key,
    parents_indexed,
    place,
    placement,
    remote,
    ssd,
)


@contextlib.contextmanager
def reopened(path, **kw) -> Iterator[tuple[Placement, SSDTier]]:
    """The SSD tier at ``path`` opened again and indexed by a fresh placement: a restart."""
    disk = ssd(path, **kw)
    try:
        p = placement([disk])
        p.warm_start()
        yield p, disk
    finally:
        disk.close()


def read(tier, e) -> torch.Tensor:
    out = torch.empty(e.nbytes, dtype=torch.uint8)
    tier.read_into(e.key, out)
    return out


def test_a_new_block_lands_in_the_fastest_tier_that_can_ever_hold_it():
    p = placement([device(4 * BLOCK, slot=BLOCK), host(8 * BLOCK)])
    small, big = entry("small"), entry("big", nbytes=2 * BLOCK)
    assert place(p, small) == 0  # the device tier's slot holds it
    assert place(p, big) == 1  # no device slot ever will: straight to the host tier
    assert p.index[small.key].tiers == (0,) and p.index[big.key].tiers == (1,)
    assert p.stats.tiers["device"].blocks_written == 1 and p.stats.tiers["host"].blocks_written == 1
    assert p.stats.tiers["host"].bytes_written == 2 * BLOCK


def test_a_full_tier_demotes_its_victim_one_tier_down_bit_exact():
    dev, hst = device(2 * BLOCK), host(8 * BLOCK)
    p = placement([dev, hst])
    a, b, c = entry("a"), entry("b"), entry("c")
    payload = data(BLOCK, 7)
    place(p, a, payload)
    place(p, b)
    assert place(p, c) == 0  # room made by demoting the least recent block, a
    assert a.tiers == (1,) and not dev.contains(a.key) and hst.contains(a.key)
    assert torch.equal(read(hst, a), payload)
    assert b.tiers == c.tiers == (0,)
    s = p.stats.tiers["device"]
    assert s.demotions == 1 and s.evictions["capacity"] == 1 and p.stats.blocks_dropped == 0
    assert dev.used_bytes <= dev.capacity_bytes


def test_selective_admission_copies_down_only_blocks_hit_often_enough():
    dev, hst = device(2 * BLOCK), host(8 * BLOCK)
    p = placement([dev, hst], admission="selective", min_hits=2)
    cold, hot = entry("cold"), entry("hot")
    place(p, cold)
    place(p, hot)
    with p.lock:
        p.touch([hot], pin=False)
        p.touch([hot], pin=False)
    place(p, entry("x"))  # evicts cold: never hit, not admitted below, so dropped
    assert cold.key not in p.index and not hst.contains(cold.key) and p.stats.blocks_dropped == 1
    place(p, entry("y"))  # evicts hot: hit twice, admitted
    assert hot.tiers == (1,) and hst.contains(hot.key)


def test_a_child_never_outlives_its_parent_under_pressure():
    tier = host(3 * BLOCK)
    p = placement([tier])
    blocks = chain(p, ["a", "b", "c"])  # a is the least recent: the victim
    d = entry("d")
    assert place(p, d) == 0
    assert list(p.index) == [d.key] and held(tier, blocks) == [False, False, False]
    assert parents_indexed(p)
    ev = p.stats.tiers["host"].evictions
    assert ev["capacity"] == 1 and ev["orphaned"] == 2 and p.stats.blocks_dropped == 3


class DeleteOrder(MemoryTier):
    """A host tier that remembers the order of its deletes."""

    deleted: list[bytes]

    def delete(self, key: bytes) -> bool:
        self.deleted.append(key)
        return super().delete(key)


def test_a_drop_takes_the_descendants_children_first():
    base = host(8 * BLOCK)
    tier = DeleteOrder("host", base.buffer, base._alloc)
    tier.deleted = []
    p = placement([tier])
    a, b, c = chain(p, ["a", "b", "c"])
    other = entry("other")
    place(p, other)
    with p.lock:
        assert p.drop(a.key, "evicted") == 3
    assert tier.deleted == [c.key, b.key, a.key]
    assert list(p.index) == [other.key] and tier.contains(other.key)
    ev = p.stats.tiers["host"].evictions
    assert ev["evicted"] == 1 and ev["orphaned"] == 2


def test_order_after_put_makes_leaves_the_first_victims():
    tier = host(3 * BLOCK)
    p = placement([tier])
    blocks = chain(p, ["a", "b", "c"])
    with p.lock:
        p.order_after_put([e.key for e in blocks], new={e.key for e in blocks})
    place(p, entry("d"))  # the leaf c goes, not the root (which would take the whole prefix)
    assert held(tier, blocks) == [True, True, False] and parents_indexed(p)


def test_pinned_blocks_are_never_evicted():
    tier = host(2 * BLOCK)
    p = placement([tier])
    a, b = entry("a"), entry("b")
    place(p, a)
    place(p, b)
    with p.lock:
        p.touch([a, b], pin=True)  # two readers hold them
        assert not p.make_room(0, BLOCK)
    assert place(p, entry("c")) is None  # no tier can take it: nothing evicted for it
    assert held(tier, [a, b]) == [True, True]
    p.release([b])
    c = entry("c")
    assert place(p, c) == 0  # b, unpinned now, made room; a stays pinned
    assert held(tier, [a, b, c]) == [True, False, True]
    with p.lock:
        assert not p.make_room(0, BLOCK, keep={c.key})  # ``keep`` protects like a pin
    assert tier.contains(c.key)


def test_a_doomed_block_is_freed_with_its_last_reader():
    tier = host(4 * BLOCK)
    p = placement([tier])
    a = entry("a")
    payload = data(BLOCK, 3)
    place(p, a, payload)
    with p.lock:
        p.touch([a], pin=True)
        p.touch([a], pin=True)  # two readers
        assert p.drop(a.key, "evicted") == 1
        assert p.live(a.key, None) is None  # gone for new readers at once
    assert a.doomed and tier.contains(a.key)
    assert torch.equal(read(tier, a), payload)  # still readable by those holding it
    p.release([a])
    assert tier.contains(a.key)
    p.release([a])
    assert not tier.contains(a.key) and tier.used_bytes == 0 and not a.tiers


def test_a_disk_bound_tier_short_of_disk_is_never_emptied_by_eviction(tmp_path, monkeypatch):
    disk = ssd(tmp_path / "ssd")
    try:
        p = placement([disk])
        stored = [entry(i) for i in range(3)]
        for e in stored:
            assert place(p, e) == 0
        monkeypatch.setattr(disk, "_free_disk", lambda: 0)  # the file system is full
        assert disk.short_of_disk(BLOCK)
        with pytest.raises(StorageFull):
            place(p, entry("new"))
        assert held(disk, stored) == [True, True, True]
        assert all(e.key in p.index for e in stored)
        s = p.stats.tiers["ssd"]
        assert s.put_failures == 1 and not s.evictions and p.stats.blocks_dropped == 0
    finally:
        disk.close()


def test_a_persistent_copy_is_written_outside_the_lock_by_one_writer(tmp_path, monkeypatch):
    disk = ssd(tmp_path / "ssd")
    try:
        p = placement([disk])
        real, gate, entered = disk.put, threading.Event(), threading.Event()
        under_lock: list[bool] = []

        def slow_put(*args, **kw):
            under_lock.append(p.lock._is_owned())
            entered.set()
            assert gate.wait(30)
            return real(*args, **kw)

        monkeypatch.setattr(disk, "put", slow_put)
        a = entry("a")
        results: dict[str, int | None] = {}
        first = threading.Thread(target=lambda: results.update(first=p.place_unlocked(a, data())))
        first.start()
        assert entered.wait(30)
        with p.lock:  # the lock is free while the block is written
            pass
        second = threading.Thread(target=lambda: results.update(second=p.place_unlocked(entry("a"), data())))
        second.start()
        second.join(30)
        gate.set()
        first.join(30)
        assert results.get("second") == -1  # the same key was being placed: one writer
        assert results["first"] == 0 and under_lock == [False]
        assert p.index[a.key] is a and disk.contains(a.key)
        assert p.place_unlocked(entry("a"), data()) == -1  # indexed now
    finally:
        gate.set()
        disk.close()


def test_warm_start_indexes_what_persistent_tiers_hold_and_deletes_orphans(tmp_path):
    disk = ssd(tmp_path / "ssd")
    p = placement([disk])
    a, b, c = chain(p, ["a", "b", "c"])
    orphan = entry("orphan", parent=entry("never stored"))
    disk.put(orphan.key, data(), orphan.meta())
    disk.close()
    with reopened(tmp_path / "ssd") as (p, disk):
        assert set(p.index) == {a.key, b.key, c.key}
        assert p.index[a.key].children == {b.key} and p.index[c.key].index == 2
        assert not disk.contains(orphan.key) and parents_indexed(p)


def test_a_damaged_catalog_whose_parents_loop_is_deleted_not_walked_forever(tmp_path):
    disk = ssd(tmp_path / "ssd")
    a = entry("a")
    x, y = entry("x", parent=a), entry("y")  # y's parent is set to x below: x -> y -> x
    y.parent = x.key
    x.parent = y.key
    z = entry("z", parent=x)  # below the loop: unreachable too
    loop = entry("self")
    loop.parent = loop.key
    for e in (a, x, y, z, loop):
        disk.put(e.key, data(), e.meta())
    disk.close()
    with reopened(tmp_path / "ssd") as (p, disk):
        assert set(p.index) == {a.key} and p.index[a.key].children is None
        assert [disk.contains(e.key) for e in (a, x, y, z, loop)] == [True, False, False, False, False]


class CountedParents(dict):
    """Parents by key, counting how often one is looked up."""

    lookups = 0

    def __getitem__(self, k):
        self.lookups += 1
        return super().__getitem__(k)


def test_depths_walk_each_chain_once():
    """A 5,000-block chain listed leaf first: walking every block up to its root looked parents
    up 12.5 million times; remembering depths on the way back, once per block."""
    keys = [key(i) for i in range(5000)]
    parents = CountedParents({k: (keys[i - 1] if i else None) for i, k in enumerate(keys)})
    parents = CountedParents(reversed(list(parents.items())))
    parents[key("branch")] = keys[2500]
    parents[key("orphan")] = key("never stored")
    parents[key("below orphan")] = key("orphan")
    depths = ancestry_depths(parents)
    assert [depths[k] for k in keys] == list(range(5000))
    assert depths[key("branch")] == 2501
    assert depths[key("orphan")] is None and depths[key("below orphan")] is None
    assert parents.lookups <= len(parents)


def test_expired_blocks_are_dropped_and_never_live():
    tier = host(8 * BLOCK)
    p = placement([tier])
    old, fresh = entry("old"), entry("fresh", namespace="other")
    place(p, old)
    place(p, fresh)
    old.created -= 100
    with p.lock:
        assert p.live(old.key, ttl_s=10.0) is None
        assert old.key not in p.index and not tier.contains(old.key)
        assert p.live(fresh.key, ttl_s=10.0) is fresh
        assert p.drop_expired({"other": 10.0}, now=fresh.created + 11) == 1
    assert not p.index and p.stats.tiers["host"].evictions["expired"] == 2


def test_a_drop_forgets_a_shared_copy_and_only_an_explicit_eviction_deletes_it(redis_server):
    hst, rem = host(BLOCK), remote(redis_server)
    try:
        p = placement([hst, rem])
        assert p.shared is rem and p.shared_idx == 1
        a, b, c = entry("a"), entry("b"), entry("c")
        place(p, a)
        place(p, b)  # a demoted to the shared tier
        place(p, c)  # b too
        assert rem.flush(30)
        assert a.tiers == b.tiers == (1,) and rem.contains_many([a.key, b.key]) == [True, True]
        with p.lock:
            p.drop(a.key, "capacity")
            p.drop(b.key, "evicted")
        assert rem.contains_many([a.key, b.key]) == [True, True]  # no network call under the lock
        p.flush_remote_deletes()
        assert rem.contains_many([a.key, b.key]) == [True, False]  # a: the fleet may still use it
        assert not p.index.keys() & {a.key, b.key}
    finally:
        rem.close()


def test_dropping_a_prefix_removes_its_ssd_records_in_one_transaction(tmp_path):
    """Each block's delete had committed (and synced) an index transaction of its own: 1.4 s
    to evict a prefix of 4,000 blocks. One now, and the records are really gone: a reopened
    tier holds none of them."""
    disk = ssd(tmp_path / "ssd")
    p = placement([disk])
    blocks = chain(p, range(40))
    keep = chain(p, ["other"])
    transactions = spy_transactions(disk)
    with p.lock:
        assert p.drop(blocks[5].key, "evicted") == 35
    assert len(transactions) == 1 and len(transactions[0]) == 35
    assert [disk.contains(e.key) for e in blocks] == [True] * 5 + [False] * 35
    disk.close()
    with reopened(tmp_path / "ssd") as (p, disk):
        assert set(p.index) == {e.key for e in blocks[:5]} | {keep[0].key}


def spy_transactions(disk) -> list[list]:
    """Every index delete transaction the SSD tier commits from now on (items removed)."""
    transactions: list[list] = []
    delete_if = disk.store.index.delete_if
    disk.store.index.delete_if = lambda items: transactions.append(list(items)) or delete_if(transactions[-1])
    return transactions


def test_a_disk_bound_tier_over_its_budget_evicts_and_leaves_records_to_the_next_flush(tmp_path):
    """A full SSD tier evicts for every put; each eviction had committed and synced its own
    index transaction (a full tier's puts of 2 MiB blocks 1.5x slower than a tier with room)."""
    disk = ssd(tmp_path / "ssd", capacity_bytes=3 * BLOCK)
    try:
        p = placement([disk])
        old = [entry(i) for i in range(3)]
        for e in old:
            place(p, e)
        transactions = spy_transactions(disk)
        new = [entry(f"new {i}") for i in range(3)]
        for e in new:
            assert place(p, e) == 0  # over the byte budget, deleting does make room
        assert held(disk, old + new) == [False] * 3 + [True] * 3
        assert transactions == []  # evicted from memory at once, the records not yet
        reborn = entry(0)  # evicted, then stored again before the flush: a new record
        assert place(p, reborn, data(seed=7)) == 0
        disk.flush()
        # One transaction; not the reborn block's old record: its new one replaced it
        assert len(transactions) == 1 and {k for k, _ in transactions[0]} == {e.key for e in old[1:]} | {new[0].key}
    finally:
        disk.close()
    with reopened(tmp_path / "ssd", capacity_bytes=3 * BLOCK) as (p, disk):  # only what was stored last is back: the deferred deletes were durable
        assert set(p.index) == {new[1].key, new[2].key, reborn.key}
        assert torch.equal(read(disk, reborn), data(seed=7))  # the new record, not deleted


def test_an_inline_block_evicted_then_stored_again_keeps_its_new_record(tmp_path):
    """An inline block stored again with the same bytes has the same location as the one a
    capacity eviction left for the next flush: that deferred delete must not take the new
    record (it did: the block was then lost, a put acknowledged as durable gone at a restart)."""
    disk = ssd(tmp_path / "ssd", capacity_bytes=2 * BLOCK, inline_threshold=4 * BLOCK)
    try:
        p = placement([disk])
        first, second, third = entry(1), entry(2), entry(3)
        place(p, first)
        place(p, second)
        assert place(p, third) == 0 and not disk.contains(first.key)  # first evicted, lazily
        again = entry(1)
        assert place(p, again) == 0  # the same bytes again, under the same key
        disk.flush()
        payload = data(BLOCK, int.from_bytes(again.key[:4], "little"))  # what place() stores
        assert torch.equal(read(disk, again), payload) and disk.store.index.get(again.key) is not None
    finally:
        disk.close()
    with reopened(tmp_path / "ssd", capacity_bytes=2 * BLOCK, inline_threshold=4 * BLOCK) as (p, disk):
        assert again.key in p.index and torch.equal(read(disk, again), payload)


def test_compaction_never_moves_the_record_of_a_block_evicted_while_it_copied(tmp_path):
    """A capacity eviction during compaction leaves its record for the next flush; moving that
    record to the block's new place kept it past its delete (the block came back at every
    restart, and the copy was never counted as live)."""
    disk = ssd(tmp_path / "ssd", compaction_live_fraction=0.9, inline_threshold=0)
    try:
        blocks = [entry(i) for i in range(300)]  # 1.2 MiB: the first 1 MiB segment fills up
        for e in blocks:
            disk.put(e.key, data(seed=1), e.meta())
        victim, survivor = blocks[0], blocks[1]
        for e in blocks[2:200]:
            disk.delete(e.key)  # the first segment mostly dead: compaction takes it
        real = disk.store.blocks_in

        def then_evict(seg):
            found = real(seg)
            disk.delete_later(victim.key)  # lands while compaction copies what it found
            return found

        disk.store.blocks_in = then_evict
        assert disk.compact() >= 1
        disk.flush()
        assert disk.store.index.get(victim.key) is None and not disk.contains(victim.key)
        assert torch.equal(read(disk, survivor), data(seed=1))
    finally:
        disk.close()
    with reopened(tmp_path / "ssd", inline_threshold=0) as (p, _):
        assert victim.key not in p.index and survivor.key in p.index


def test_deferred_evictions_never_push_out_a_failed_delete_a_caller_asked_for(tmp_path):
    """The retry list is bounded; capacity evictions waiting for the flush are kept apart and,
    past the bound, removed at once instead of displacing an explicit delete kept to retry."""
    from kvtier.errors import KVTierError
    from kvtier.tiers.ssd.deletes import RecordDeleter

    disk = ssd(tmp_path / "ssd", inline_threshold=0)
    try:
        blocks = [entry(i) for i in range(5)]
        for e in blocks:
            disk.put(e.key, data(), e.meta())
        locs = {e.key: disk.store.location(e.key) for e in blocks}
        index = disk.store.index
        deleter = RecordDeleter(index, limit=2)
        real, failing = index.delete_if, [True]

        def delete_if(items):
            if failing[0]:
                raise KVTierError("index full")
            return real(items)

        index.delete_if = delete_if
        explicit = (blocks[0].key, locs[blocks[0].key])
        assert deleter.remove([explicit]) is not None  # kept to retry
        assert deleter.defer([(e.key, locs[e.key]) for e in blocks[1:3]]) is None  # waiting
        assert deleter.defer([(blocks[3].key, locs[blocks[3].key])]) is not None  # over: now, failed
        failing[0] = False
        deleter.retry()
        assert all(index.get(e.key) is None for e in blocks[:4]) and index.get(blocks[4].key) is not None
        assert len(deleter) == 0
    finally:
        disk.close()
