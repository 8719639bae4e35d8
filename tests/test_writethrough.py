"""Write-through (``kvtier.writethrough``) over a host tier and a real SSD tier: a put waits for
durable tiers only, the background backlog stays bounded, one write per block and tier is in
flight, and a block dropped meanwhile leaves no copy behind."""

from __future__ import annotations

import threading

import pytest

from kvtier.errors import StorageFull
from kvtier.writethrough import WriteThrough
from tests.parts import BLOCK, data, entry, host, place, placement, ssd

WAIT = 30.0  # generous: only a broken contract waits this long


class Gate:
    """Holds every ``put`` (or ``method``) of a tier until opened; counts the calls that
    reached it."""

    def __init__(self, tier, monkeypatch, method: str = "put") -> None:
        self.open = threading.Event()
        self.calls = 0
        self.reached = threading.Semaphore(0)
        real = getattr(tier, method)

        def put(*args, **kw):
            self.calls += 1
            self.reached.release()
            assert self.open.wait(WAIT)
            return real(*args, **kw)

        monkeypatch.setattr(tier, method, put)

    def wait_reached(self, n: int = 1) -> None:
        for _ in range(n):
            assert self.reached.acquire(timeout=WAIT)


@pytest.fixture
def gates(monkeypatch):
    """Makes ``Gate``s; every one is opened when the test ends, passed or failed."""
    made: list[Gate] = []

    def make(tier, method: str = "put") -> Gate:
        made.append(Gate(tier, monkeypatch, method))
        return made[-1]

    yield make
    for gate in made:
        gate.open.set()


@pytest.fixture
def tiers(tmp_path, request):
    """A host tier over an SSD tier of the durability the test asks for (default sync)."""
    durability = getattr(request, "param", "sync")
    disk = ssd(tmp_path / "ssd", durability=durability)
    yield host(16 * BLOCK), disk
    disk.close()


def writer(p, backlog: int = 64 * BLOCK, threads: int = 2, admit_on_put: bool = True) -> WriteThrough:
    return WriteThrough(p, admit_on_put=admit_on_put, backlog_bytes=backlog, threads=threads)


def in_thread(fn) -> threading.Event:
    done = threading.Event()
    threading.Thread(target=lambda: (fn(), done.set()), daemon=True).start()
    return done


def test_a_put_waits_for_its_durable_tier(tiers, gates):
    hst, disk = tiers
    p = placement([hst, disk])
    w = writer(p)
    try:
        assert w.durable == [1]
        e = entry("a")
        place(p, e)
        gate = gates(disk, "put_many")  # durable: written in batches
        writes = w.schedule([(e, data(), 0)])
        assert [x.tier for x in writes] == [1] and w.missing(e) == [1]
        gate.wait_reached()
        acked = in_thread(lambda: w.wait(writes))
        assert not acked.wait(0.2)  # the SSD has not taken it: not acknowledged
        gate.open.set()
        assert acked.wait(WAIT)
        assert e.tiers == (0, 1) and disk.contains(e.key) and w.missing(e) == []
    finally:
        w.close()


@pytest.mark.parametrize("tiers", ["none"], indirect=True)
def test_writes_to_a_tier_that_is_not_durable_run_in_the_background(tiers, gates):
    hst, disk = tiers
    p = placement([hst, disk])
    w = writer(p)
    try:
        assert w.durable == []
        e = entry("a")
        place(p, e)
        gate = gates(disk)
        assert w.schedule([(e, data(), 0)]) == []  # nothing for the put to wait for
        gate.wait_reached()
        assert w.backlog_bytes == BLOCK and e.tiers == (0,)
        gate.open.set()
        w.flush(WAIT)
        assert e.tiers == (0, 1) and disk.contains(e.key) and w.backlog_bytes == 0
    finally:
        w.close()


def test_a_put_fails_when_its_durable_tier_refuses_a_block(tiers, monkeypatch):
    hst, disk = tiers
    p = placement([hst, disk])
    w = writer(p)
    try:
        e = entry("a")
        place(p, e)
        monkeypatch.setattr(disk, "_free_disk", lambda: 0)  # the SSD's file system is full
        writes = w.schedule([(e, data(), 0)])
        with pytest.raises(StorageFull, match="put not acknowledged: 1 of 1 blocks"):
            w.wait(writes)
        assert e.tiers == (0,) and not disk.contains(e.key)
        assert p.stats.tiers["ssd"].put_failures == 1
    finally:
        w.close()


@pytest.mark.parametrize("tiers", ["none"], indirect=True)
def test_the_background_backlog_is_bounded(tiers, gates):
    hst, disk = tiers
    p = placement([hst, disk])
    w = writer(p, backlog=2 * BLOCK, threads=4)
    try:
        gate = gates(disk)
        blocks = [entry(i) for i in range(3)]
        for e in blocks:
            place(p, e)
        w.schedule([(blocks[0], data(), 0)])
        w.schedule([(blocks[1], data(), 0)])
        gate.wait_reached(2)
        third = in_thread(lambda: w.schedule([(blocks[2], data(), 0)]))
        assert not third.wait(0.2)  # waits for room: back-pressure instead of memory growth
        assert w.backlog_bytes == 2 * BLOCK and gate.calls == 2
        gate.open.set()
        assert third.wait(WAIT)
        w.flush(WAIT)
        assert w.backlog_bytes == 0 and all(disk.contains(e.key) for e in blocks)
    finally:
        w.close()


def test_a_second_write_of_a_block_joins_the_first(tiers, gates):
    hst, disk = tiers
    p = placement([hst, disk])
    w = writer(p)
    try:
        e = entry("a")
        place(p, e)
        gate = gates(disk)
        first = w.write(e, data(), [1])
        gate.wait_reached()
        second = w.write(e, data(), [1])
        assert first[0].future is second[0].future
        gate.open.set()
        w.wait(first + second)
        assert gate.calls == 1 and e.tiers == (0, 1)
    finally:
        w.close()


@pytest.mark.parametrize("tiers", ["none"], indirect=True)
def test_a_joined_background_write_reserves_the_backlog_once(tiers, gates):
    hst, disk = tiers
    p = placement([hst, disk])
    w = writer(p)
    try:
        e = entry("a")
        place(p, e)
        gate = gates(disk)
        w.schedule([(e, data(), 0)])
        gate.wait_reached()
        w.schedule([(e, data(), 0)])
        assert w.backlog_bytes == BLOCK and gate.calls == 1
        gate.open.set()
        w.flush(WAIT)
        assert w.backlog_bytes == 0 and gate.calls == 1
    finally:
        w.close()


def test_a_block_dropped_while_its_write_runs_leaves_no_copy(tiers, gates):
    hst, disk = tiers
    p = placement([hst, disk])
    w = writer(p)
    try:
        e = entry("a")
        place(p, e)
        with p.lock:
            p.touch([e], pin=True)  # as a put holds its blocks
        gate = gates(disk, "put_many")  # durable: written in batches
        writes = w.schedule([(e, data(), 0)])
        gate.wait_reached()
        with p.lock:
            p.drop(e.key, "evicted")  # doomed: freed when the put lets go
        gate.open.set()
        w.wait(writes)  # a dropped block owes nothing: the put is not failed for it
        p.release([e])
        assert not disk.contains(e.key) and not hst.contains(e.key) and e.key not in p.index
    finally:
        w.close()


def test_a_put_is_not_acknowledged_for_a_block_dropped_before_it_was_durable(tiers, gates):
    hst, disk = tiers
    p = placement([hst, disk])
    w = writer(p)
    try:
        e = entry("a")
        place(p, e)  # not pinned: nothing holds it
        gate = gates(disk, "put_many")  # durable: written in batches
        w.schedule([(e, data(), 0)])
        gate.wait_reached()  # a write of it in flight
        with p.lock:
            p.drop(e.key, "capacity")
        writes = w.write(e, data(), [1])  # joins the one in flight
        gate.open.set()
        with pytest.raises(StorageFull, match="did not reach the ssd tier"):
            w.wait(writes)
        assert not disk.contains(e.key)
    finally:
        w.close()


def test_without_write_through_admission_nothing_is_written_on_put(tiers):
    hst, disk = tiers
    p = placement([hst, disk], admission="write_back")
    w = writer(p, admit_on_put=False)
    try:
        e = entry("a")
        place(p, e)
        assert w.schedule([(e, data(), 0)]) == [] and w.missing(e) == []
        w.flush(WAIT)
        assert not disk.contains(e.key) and e.tiers == (0,)
    finally:
        w.close()


def test_writes_below_says_where_a_put_has_something_to_write_through(tiers):
    """A put skips the write-through bookkeeping of a block only where ``schedule`` would write
    it nowhere: a block in the SSD tier, or any block without write-through admission or
    without a persistent tier under it."""
    hst, disk = tiers
    for tiers_, admit, expect in [([hst, disk], True, [True, False]), ([hst, disk], False, [False, False]),
                                  ([hst], True, [False])]:
        w = writer(placement(tiers_), admit_on_put=admit)
        try:
            assert [w.writes_below(t) for t in range(len(tiers_))] == expect
        finally:
            w.close()


def test_durable_writes_go_together_and_each_blocks_failure_is_its_own(tiers, monkeypatch):
    """Blocks written through to the SSD tier go in one ``put_many`` (their writes in flight
    together); one that the disk refuses fails the put for itself alone: the others are
    written and published, and the refused one is counted and reported with its reason."""
    hst, disk = tiers
    p = placement([hst, disk])
    w = writer(p)
    real = disk.put_many
    calls: list[int] = []

    def put_many(blocks):
        calls.append(len(blocks))
        out = real([b for b in blocks if b[0] != bad.key])
        return [StorageFull("injected: a bad sector") if b[0] == bad.key else out.pop(0) for b in blocks]

    monkeypatch.setattr(disk, "put_many", put_many)
    monkeypatch.setattr(disk, "put", lambda *a: pytest.fail("one block at a time"))
    try:
        blocks = [entry(i) for i in range(3)]
        bad = blocks[1]
        for e in blocks:
            place(p, e)
        writes = w.schedule([(e, data(seed=i), 0) for i, e in enumerate(blocks)])
        with pytest.raises(StorageFull, match=r"1 of 3 blocks could not be made durable \(injected: a bad sector"):
            w.wait(writes)
        assert calls == [3]
        assert [e.tiers for e in blocks] == [(0, 1), (0,), (0, 1)]
        assert [disk.contains(e.key) for e in blocks] == [True, False, True]
        assert p.stats.tiers["ssd"].put_failures == 1 and w.missing(bad) == [1]
    finally:
        w.close()


def test_a_child_is_not_written_through_where_its_parent_was_refused(tiers, monkeypatch):
    """A prefix a -> b -> c written through together, b refused by the disk: c's copy (written
    beside it) is deleted, as its descendants' would be, so the SSD keeps no block whose parent
    it lacks (an orphan once b leaves the host tier); the put fails for b and c, a is kept."""
    hst, disk = tiers
    p = placement([hst, disk])
    w = writer(p)
    real = disk.put_many

    def put_many(blocks):
        out = real(blocks)
        for i, (key, _, _) in enumerate(blocks):
            if key == b.key:
                disk.delete(key)
                out[i] = StorageFull("injected: a bad sector")
        return out

    monkeypatch.setattr(disk, "put_many", put_many)
    try:
        a = entry("a")
        b = entry("b", parent=a)
        c = entry("c", parent=b)
        for e in (a, b, c):
            place(p, e)
        writes = w.schedule([(e, data(seed=i), 0) for i, e in enumerate((a, b, c))])
        with pytest.raises(StorageFull, match="2 of 3 blocks"):
            w.wait(writes)
        assert [e.tiers for e in (a, b, c)] == [(0, 1), (0,), (0,)]
        assert [disk.contains(e.key) for e in (a, b, c)] == [True, False, False]
        assert w.missing(c) == [1]  # the next put of the prefix writes both again
    finally:
        w.close()


def test_room_made_for_a_batch_in_flight_is_not_given_to_the_next(tmp_path, monkeypatch):
    """A write-through batch makes room under the lock and writes outside it. Room it made but
    had not reserved yet looked free: the next batch took it without evicting, and the first
    then found the SSD full (StorageFull: a put into a full SSD tier failed where evicting
    would have made room for both)."""
    hst, disk = host(16 * BLOCK), ssd(tmp_path / "ssd", capacity_bytes=4 * BLOCK)
    p = placement([hst, disk])
    w = writer(p)
    try:
        old = [entry(i) for i in range(4)]
        for e in old:
            place(p, e)
        w.wait(w.schedule([(e, data(), 0) for e in old]))  # the SSD is full: 4 of 4 blocks
        assert not disk.can_fit(BLOCK)
        real, held, go = disk.put_many, threading.Event(), threading.Event()

        def first_held(*args, **kw):  # the first batch's writes wait until told to go on
            if not held.is_set():
                held.set()
                assert go.wait(WAIT)
            return real(*args, **kw)

        monkeypatch.setattr(disk, "put_many", first_held)
        first, second = entry("first"), entry("second")
        place(p, first)
        place(p, second)
        writes = w.schedule([(first, data(), 0)])
        assert held.wait(WAIT)  # room made for it (one block evicted), not yet written
        w.wait(w.schedule([(second, data(), 0)]))  # must evict for itself
        go.set()
        w.wait(writes)
        assert 1 in first.tiers and 1 in second.tiers
        assert disk.stats()["used_bytes"] == 4 * BLOCK
        assert sum(1 in e.tiers for e in old) == 2
    finally:
        go.set()
        w.close()
        disk.close()
