"""The manager over a real SSD tier: warm restart, corruption, admission modes, retention."""

import threading
import time
from pathlib import Path

import pytest
import torch

from kvtier import CacheConfig, HostTierConfig, SSDTierConfig, TieredCache, loader_promote
from kvtier.block import encode_block
from kvtier.codecs import get_codec
from tests.conftest import random_kv

BT = 16


def cache(path, host="64KiB", admission="write_through", durability="sync") -> TieredCache:
    return TieredCache(CacheConfig(
        block_tokens=BT, host=HostTierConfig(capacity_bytes=host, page_bytes="16KiB"),
        ssd=SSDTierConfig(path=str(path), capacity_bytes="64MiB", min_free_bytes=0, durability=durability,
                          admission=admission, segment_bytes="1MiB", direct_io=False,
                          inline_threshold=0)))


def prompt(i, blocks=3):
    return [i * 7919 + j for j in range(BT * blocks)], random_kv(BT * blocks, seed=i)


def same(kv_a, kv_b, n):
    return all(torch.equal(a[:n], b[:n]) for la, lb in zip(kv_a, kv_b, strict=True) for a, b in zip(la, lb, strict=True))


def test_warm_restart_serves_every_block_bit_exact(tmp_path):
    with cache(tmp_path) as c:
        for i in range(20):
            c.put("m", *prompt(i))
        c.flush(30)
    with cache(tmp_path) as c:
        s = c.stats()
        assert s.tiers["ssd"].blocks == 60 and s.tiers["host"].blocks == 0
        for i in range(20):
            toks, kv = prompt(i)
            assert c.lookup("m", toks).tiers == {"ssd": 3}
            out, n = c.get("m", toks)
            assert n == 3 * BT and same(kv, out, n)
        assert c.stats().tiers["host"].promotions > 0  # reads promoted blocks back to host


def test_corrupt_block_on_disk_is_a_counted_miss_never_served(tmp_path):
    toks, kv = prompt(1)
    with cache(tmp_path) as c:
        c.put("m", toks, kv)
        c.flush(30)
    block1 = encode_block(get_codec("none"), [[t[BT:2 * BT] for t in layer] for layer in kv])
    for seg in Path(tmp_path).rglob("*.seg"):
        raw = bytearray(seg.read_bytes())
        at = raw.find(block1)
        if at >= 0:
            raw[at + len(block1) - 3] ^= 0xFF
            seg.write_bytes(raw)
            break
    else:
        pytest.fail("block 1 not found in any segment")
    with cache(tmp_path) as c:
        out, n = c.get("m", toks)
        assert n == BT and same(kv, out, BT)  # block 0 only: block 1 is corrupt, block 2 orphaned
        s = c.stats()
        assert s.tiers["ssd"].corrupt_blocks == 1
        assert c.lookup("m", toks).tokens == BT


def test_write_back_writes_only_on_eviction(tmp_path):
    with cache(tmp_path, host="256KiB", admission="write_back") as c:
        c.put("m", *prompt(0))
        c.flush(30)
        assert c.stats().tiers["ssd"].blocks == 0
        for i in range(1, 60):  # push prompt 0 out of host
            c.put("m", *prompt(i))
        c.flush(30)
        toks, kv = prompt(0)
        assert c.lookup("m", toks).tiers == {"ssd": 3}
        assert c.stats().tiers["host"].demotions > 0


def test_selective_admission_keeps_only_blocks_hit_twice(tmp_path):
    with cache(tmp_path, host="128KiB", admission="selective") as c:
        hot_toks, hot_kv = prompt(0)
        c.put("m", hot_toks, hot_kv)
        for _ in range(2):
            assert c.lookup("m", hot_toks).tokens == 3 * BT
        for i in range(1, 60):
            c.put("m", *prompt(i))
        c.flush(30)
        assert c.lookup("m", hot_toks).tiers.get("ssd") == 3  # hit twice: demoted to SSD
        assert c.lookup("m", prompt(1)[0]).tokens == 0  # never hit: dropped, no SSD write
        assert c.stats().blocks_dropped > 0


def test_ttl_reaps_expired_blocks_from_every_tier(tmp_path, monkeypatch):
    with cache(tmp_path, host="1MiB") as c:
        c.register_namespace("short", ttl_s=30)
        c.put("short", *prompt(0))
        c.put("keep", *prompt(1))
        c.flush(30)
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() + 31)
        assert c.reap_expired() == 3
        s = c.stats()
        assert s.tiers["ssd"].blocks == 3 and s.tiers["host"].blocks == 3
        assert s.tiers["host"].evictions["expired"] >= 1
        assert c.lookup("keep", prompt(1)[0]).tokens == 3 * BT


def test_pressure_cascades_to_ssd_and_reads_promote(tmp_path):
    with cache(tmp_path, host="64KiB") as c:
        for i in range(40):
            c.put("m", *prompt(i))
        c.flush(30)
        s = c.stats()
        assert s.tiers["host"].used_bytes <= s.tiers["host"].capacity_bytes
        assert s.tiers["ssd"].blocks == 120 and s.blocks_dropped == 0
        for i in range(40):
            toks, kv = prompt(i)
            out, n = c.get("m", toks)
            assert n == 3 * BT and same(kv, out, n)


def test_reload_from_ssd_checksums_each_byte_once(tmp_path, monkeypatch):
    """The tier verifies a whole-block read; the manager must not pay a second crc pass."""
    import kvtier.block as block_mod
    import kvtier.tiers.ssd.index as index_mod

    toks, kv = prompt(3)
    with cache(tmp_path) as c:
        c.put("m", toks, kv)
        c.flush(30)
    with cache(tmp_path) as c:
        counted = [0]
        real = block_mod.checksum

        def counting(data, value=0):
            counted[0] += memoryview(data).nbytes
            return real(data, value)

        monkeypatch.setattr(block_mod, "checksum", counting)
        monkeypatch.setattr(index_mod, "checksum", counting)  # the tier's key-bound check
        out, n = c.get("m", toks)
        assert n == 3 * BT and same(kv, out, n)
        payload = sum(t.numel() * t.element_size() for layer in kv for t in layer)
        # Once over the payload (plus the small block headers), not twice.
        assert payload <= counted[0] < 1.5 * payload, (counted[0], payload)


def test_background_write_through_backlog_is_bounded(tmp_path, monkeypatch):
    """durability none: write-throughs run in the background, but a put waits once the queued
    bytes reach ssd.write_backlog_bytes (back-pressure), rather than letting memory grow."""
    import threading

    cfg = CacheConfig(block_tokens=16, host=HostTierConfig(capacity_bytes="4MiB", page_bytes="64KiB"),
                      ssd=SSDTierConfig(path=str(tmp_path / "ssd"), durability="none", direct_io=False,
                                        min_free_bytes=0, write_backlog_bytes="8KiB"))
    with TieredCache(cfg) as c:
        ssd = c.tier("ssd")
        real, gate, started = ssd.put, threading.Event(), threading.Event()

        def stuck_put(*a, **kw):
            started.set()
            assert gate.wait(30)
            return real(*a, **kw)

        monkeypatch.setattr(ssd, "put", stuck_put)
        kv = random_kv(16 * 8)  # 8 blocks of 4 KiB (2 layers x K,V x 16 tokens x 2 x 8 fp32)
        done = threading.Event()
        threading.Thread(target=lambda: (c.put("m", list(range(16 * 8)), kv), done.set()),
                         daemon=True).start()
        assert started.wait(30)
        assert not done.wait(0.5)  # blocked: the SSD holds the writer, the backlog is full
        assert c._writes.backlog_bytes <= 8 * 1024
        gate.set()
        assert done.wait(60)
        c.flush(60)
        assert c._writes.backlog_bytes == 0
        assert c.stats().tiers["ssd"].blocks == 8


def test_a_durable_write_through_reads_the_host_slot_and_no_other_put_can_take_it(tmp_path, monkeypatch):
    """Under durability sync a put encodes each block into its host slot, and the SSD's write
    reads it from there (no second copy). Attack: hold the SSD write of prompt A's first block
    while other puts fill the host tier to force evictions. A's blocks stay pinned until its
    writes are done, so no other block lands in their slots: the disk holds A's own bytes (its
    checksum could not tell a wrong block that is whole)."""
    import threading

    from kvtier.block import PreparedBlock

    monkeypatch.setattr(PreparedBlock, "pooled", lambda b: pytest.fail("encoded into a buffer"))
    toks_a, kv_a = prompt(1)
    others = [prompt(i) for i in range(2, 8)]
    with cache(tmp_path, host="64KiB") as c:  # a few blocks: the others' 18 overflow it
        ssd = c.tier("ssd")
        real, gate, entered = ssd.put_many, threading.Event(), threading.Event()
        held: list[bytes] = []

        def held_put_many(blocks):
            if not held:
                held.extend(key for key, _, _ in blocks)
                entered.set()
                assert gate.wait(30)
            return real(blocks)

        monkeypatch.setattr(ssd, "put_many", held_put_many)
        errors: list[BaseException] = []

        def put_a():
            try:
                c.put("m", toks_a, kv_a)
            except BaseException as e:  # noqa: BLE001  reported below
                errors.append(e)

        t = threading.Thread(target=put_a, daemon=True)
        t.start()
        assert entered.wait(30)
        for toks, kv in others:  # these evict every block of the host tier but A's
            c.put("m", toks, kv)
        assert c.lookup("m", toks_a).tiers == {"host": 3}  # still pinned in their slots
        gate.set()
        t.join(60)
        assert not t.is_alive() and not errors
        assert len(held) == 3  # A's blocks were written through together
        assert c.stats().tiers["ssd"].blocks >= 3
    with cache(tmp_path) as c:  # a restart: only what the disk holds
        for toks, kv in [(toks_a, kv_a), *others]:
            assert c.lookup("m", toks).tiers == {"ssd": 3}
            out, n = c.get("m", toks)
            assert n == 3 * BT and same(kv, out, n)


def test_a_dropped_get_from_ssd_is_back_in_the_pool_before_the_next_get(tmp_path, monkeypatch):
    """The loader's worker threads hold their tasks' arguments until they take the next task;
    none of them may keep a finished get's KV from its pool, however fast the caller drops it
    and gets again (else every such get would fault fresh memory in). The attack: every worker
    keeps its finished task a while longer, as a descheduled thread does."""
    from concurrent.futures import thread

    run = thread._WorkItem.run

    def lingering(self):
        run(self)
        time.sleep(0.02)  # the task (and what it holds) outlives its future's result

    monkeypatch.setattr(thread._WorkItem, "run", lingering)
    cfg = CacheConfig(block_tokens=64, host=HostTierConfig(capacity_bytes=0), promote_on_get=False,
                      ssd=SSDTierConfig(path=str(tmp_path / "ssd"), capacity_bytes="1GiB", durability="none"))
    with TieredCache(cfg) as c:
        kv = random_kv(512, heads=8, dim=1024)  # 128 KiB a token: 64 MiB, 8 blocks of 8 MiB
        toks = list(range(512))
        assert c.put("m", toks, kv) == 512
        c.tier("ssd").flush()
        ptrs = set()
        for _ in range(20):
            out, n = c.get("m", toks)
            assert n == 512 and same(kv, out, n)
            ptrs.add(out[0][0].data_ptr())
            del out
            assert c._get_buffers.idle_bytes == 64 * 1024**2
        assert len(ptrs) == 1  # every get wrote into the same memory


def test_a_get_reads_each_small_block_once(tmp_path):
    """A get waits for the whole prefix: a block of at most ``min_read_bytes`` is one read
    (header and layers together), not a header read and then the layers' (two: 128 KiB blocks
    reloaded at 0.22x fio). A damaged one is still never served (the corruption test above)."""
    toks, kv = prompt(5, blocks=6)
    with cache(tmp_path, host="0") as c:
        c.put("m", toks, kv)
        c.flush(30)
        ssd = c.tier("ssd")
        before = ssd.stats()["blocks_read"]
        out, n = c.get("m", toks)
        assert n == 6 * BT and same(kv, out, n)
        assert ssd.stats()["blocks_read"] - before == 6


def test_a_full_ssd_tier_under_a_host_tier_keeps_taking_puts(tmp_path, monkeypatch):
    """The sidecar's default shape (a host tier over an SSD tier, write-through, ``batch``) once
    its SSD tier is full: every put must evict its way in. Before, puts failed with StorageFull
    for room that was there (a batch's served blocks also counted as reserved; room made for a
    write-through batch went to the next placement): 8-16 of these 40 puts did. Write-through
    windows of a few blocks make batches overlap the puts' own placements, as 16 MiB windows of
    8 MiB blocks do at full size."""
    import kvtier.writes

    monkeypatch.setattr(kvtier.writes, "WINDOW_BYTES", 256 << 10)
    bt, n = 32, 32 * 32  # 64 KiB blocks, 2 MiB prefixes
    cfg = CacheConfig(block_tokens=bt, host=HostTierConfig(capacity_bytes="512KiB"),
                      ssd=SSDTierConfig(path=str(tmp_path / "ssd"), capacity_bytes="8MiB", segment_bytes="1MiB",
                                        compaction_interval_s=None, min_free_bytes=0, durability="batch"))
    kv = random_kv(n, layers=4, heads=2, dim=64, dtype=torch.float16)
    with TieredCache(cfg) as c:
        for i in range(40):
            assert c.put("kv", list(range(i * 10**6, i * 10**6 + n)), kv) == n, i
        ssd = c.stats().tiers["ssd"]
        assert ssd.put_failures == 0 and ssd.used_bytes <= 8 << 20
        last = list(range(39 * 10**6, 39 * 10**6 + n))
        got, hit = c.get("kv", last)
        assert hit == n and same(got, kv, n)


def wait_until(cond, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.01)


def test_a_namespace_registered_again_never_gets_a_dropped_write_in_flight(tmp_path, monkeypatch):
    """Dropped and registered again with the same name and layout, a namespace's blocks have the
    same keys and other bytes. The dropped block's background write to the SSD tier, still
    queued, used to be joined by the new block's (writes were tracked by key), then wrote the
    old bytes and filed them as the new block's SSD copy: after a restart, a get returned the
    dropped KV, checksums valid. Here the old write is held until the new put had its chance."""
    toks, old = prompt(1)
    _, new = prompt(2)  # other bytes under the same token ids
    entered, go = threading.Event(), threading.Event()
    with cache(tmp_path / "ssd", host="1MiB", durability="none") as c:
        ssd = c.tier("ssd")
        real_put = ssd.put

        def held_put(key, data, meta):
            if not entered.is_set():
                entered.set()
                assert go.wait(120)
            return real_put(key, data, meta)

        monkeypatch.setattr(ssd, "put", held_put)
        assert c.put("kv", toks, old) == len(toks)  # acknowledged; its SSD write is held
        assert entered.wait(60)
        dropper = threading.Thread(target=c.drop_namespace, args=("kv",), daemon=True)
        dropper.start()
        wait_until(lambda: "kv" not in {ns.name for ns in c.namespaces()})
        putter = threading.Thread(target=c.put, args=("kv", toks, new), daemon=True)
        putter.start()
        putter.join(5)  # room for it to join the held write (none is expected)
        go.set()
        dropper.join(60)
        putter.join(60)
        assert not dropper.is_alive() and not putter.is_alive()
        c.flush()
    with cache(tmp_path / "ssd", host="1MiB", durability="none") as c:  # the SSD copies only
        got, n = c.get("kv", toks)
        assert n == len(toks)
        assert same(got, new, n), "the dropped namespace's KV came back"


def test_a_late_promotion_of_a_dropped_block_never_lands_under_its_successor(tmp_path, monkeypatch):
    """A get read the dropped namespace's blocks from the SSD tier; their promotion into the
    host tier runs after the load, on the promoter thread. Meanwhile the namespace was dropped,
    registered again, and its new blocks (same keys) pushed out of the host tier. The late
    promotion used to copy the old bytes into the host tier as the new block's copy."""
    toks, old = prompt(3)
    _, new = prompt(4)
    entered, go = threading.Event(), threading.Event()
    real = loader_promote.Promoter._promote

    def held(self, job, a):
        if not entered.is_set():
            entered.set()
            assert go.wait(120)
        return real(self, job, a)

    monkeypatch.setattr(loader_promote.Promoter, "_promote", held)
    with cache(tmp_path / "ssd", host="64KiB") as c:
        def push_out_of_host(seed):
            for i in range(3):
                c.put("filler", *prompt(1000 * seed + i, blocks=8))
            assert all(b.tier == "ssd" for b in c.lookup("kv", toks).blocks)

        c.put("kv", toks, old)
        push_out_of_host(1)
        got, n = c.get("kv", toks)  # read from the SSD tier: its promotions queued, held
        assert n == len(toks) and same(got, old, n)
        assert entered.wait(60)
        c.drop_namespace("kv")
        c.put("kv", toks, new)
        push_out_of_host(2)
        go.set()
        c._loader._promoter.flush(60)
        got, n = c.get("kv", toks)
        assert n == len(toks)
        assert same(got, new, n), "the dropped namespace's KV came back"
