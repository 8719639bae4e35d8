import gc
import random
import threading
import time

import pytest
import torch

from kvtier import CacheConfig, DeviceTierConfig, HostTierConfig, TieredCache
from kvtier.errors import InvalidRequest, InvalidType, LayoutMismatch, UnknownNamespace
from tests.conftest import random_kv

BT = 16


def small_cache(host="256KiB", device=0, policy="lru", **kw) -> TieredCache:
    return TieredCache(CacheConfig(block_tokens=BT, host=HostTierConfig(capacity_bytes=host, page_bytes="64KiB", policy=policy),
                                   device=DeviceTierConfig(capacity_bytes=device, slot_bytes="8KiB"), **kw))


def same(kv_a, kv_b, n):
    return all(torch.equal(a[:n], b[:n]) for la, lb in zip(kv_a, kv_b, strict=True) for a, b in zip(la, lb, strict=True))


def run_workers(worker, n: int) -> list[BaseException]:
    """Run ``worker(w)`` for w in range(n) on threads, wait for all; what they raised."""
    errors: list[BaseException] = []

    def guarded(w):
        try:
            worker(w)
        except BaseException as e:  # noqa: BLE001  returned to the test
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(w,)) for w in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_put_lookup_get_roundtrip():
    with small_cache() as c:
        kv = random_kv(100)
        toks = list(range(100))
        assert c.put("m", toks, kv) == 96  # 6 full blocks; the partial block is not cached
        assert c.put("m", toks, kv) == 0  # already stored
        hit = c.lookup("m", toks + [7, 7, 7])
        assert hit.tokens == 96 and hit.tiers == {"host": 6} and [b.index for b in hit.blocks] == list(range(6))
        out, n = c.get("m", toks)
        assert n == 96 and same(kv, out, 96)
        assert c.lookup("m", [1] + toks[1:]).tokens == 0  # first block differs: no hit
        assert c.lookup("other", toks).tokens == 0


def test_a_put_with_background_write_through_encodes_the_next_blocks_while_it_places_one(tmp_path, monkeypatch):
    """A write-through the put does not wait for (durability none) outlives the put, so it
    needs a copy of its own: the put encodes blocks into buffers, the next ones ahead."""
    from kvtier import SSDTierConfig
    from kvtier.block import PreparedBlock

    where: list[str] = []
    encode = PreparedBlock.pooled

    def spy(block):
        where.append(threading.current_thread().name)
        return encode(block)

    monkeypatch.setattr(PreparedBlock, "pooled", spy)
    with small_cache(ssd=SSDTierConfig(path=str(tmp_path), durability="none", direct_io=False,
                                       min_free_bytes=0)) as c:
        kv = random_kv(100)
        toks = list(range(100))
        assert c.put("m", toks, kv) == 96
        assert len(where) == 6 and any(n.startswith("kvtier-encode") for n in where)
        out, n = c.get("m", toks)
        assert n == 96 and same(kv, out, 96)  # placed in order, each block its own bytes
        assert [b.index for b in c.lookup("m", toks).blocks] == list(range(6))
        c.flush(30)
        assert c.stats().tiers["ssd"].blocks == 6


def test_a_put_into_memory_tiers_encodes_each_block_straight_into_its_slot(monkeypatch):
    """With no write-through outliving the put, each block is encoded once, into its host slot
    (``WritesInPlace``), never into a buffer copied again; and reads back bit-exact."""
    from kvtier.block import PreparedBlock

    monkeypatch.setattr(PreparedBlock, "pooled", lambda b: pytest.fail("encoded into a buffer"))
    written = []  # every block's destination (write_into and write_blocks check each first)
    host_bytes = PreparedBlock._host_bytes
    monkeypatch.setattr(PreparedBlock, "_host_bytes", lambda b, out: (written.append(out), host_bytes(b, out))[1])
    with small_cache() as c:
        host = c.tier("host").buffer
        kv = random_kv(100)
        toks = list(range(100))
        assert c.put("m", toks, kv) == 96
        lo, hi = host.data_ptr(), host.data_ptr() + host.numel()
        assert len(written) == 6 and all(lo <= out.data_ptr() < hi for out in written)
        out, n = c.get("m", toks)
        assert n == 96 and same(kv, out, 96)


def test_a_put_of_host_kv_takes_its_blocks_as_numpy_views_not_torch_views(monkeypatch):
    """Slicing and viewing 64 tensors with torch per block cost more Python than a 2 MiB block's
    copy (``kvtier.prefixkv``): a put of host KV, contiguous or not (gathered a chunk at a time),
    makes no torch byte view per tensor, and stores the same bytes."""
    import kvtier.codecs.none as none

    views = []
    real = none.byte_view
    monkeypatch.setattr(none, "byte_view", lambda t: views.append(t) or real(t))
    with small_cache() as c:
        kv = random_kv(64)
        toks = list(range(64))
        assert c.put("m", toks, kv) == 64
        assert views == []
        out, n = c.get("m", toks)
        assert n == 64 and same(kv, out, 64)
        strided = [tuple(t.transpose(0, 1).contiguous().transpose(0, 1) for t in layer) for layer in kv]
        assert c.put("m2", toks, strided) == 64  # not contiguous: gathered by numpy, same bytes
        assert views == []
        out, n = c.get("m2", toks)
        assert n == 64 and same(kv, out, 64)


def test_a_put_that_finds_every_block_stored_makes_no_views(monkeypatch):
    """The views a put encodes from are made on first use: a turn that re-puts a prefix the
    cache holds whole (the common case in multi-turn chat) pays nothing for them."""
    import kvtier.prefixkv as prefixkv

    made = []
    real = prefixkv._bytes
    monkeypatch.setattr(prefixkv, "_bytes", lambda t: made.append(1) or real(t))
    with small_cache() as c:
        kv = random_kv(64)
        toks = list(range(64))
        assert c.put("m", toks, kv) == 64 and made
        made.clear()
        assert c.put("m", toks, kv) == 0
        assert made == []


def test_namespaces_of_one_tenant_and_model_never_share_blocks():
    """Dropping or expiring one namespace must never empty another of the same model."""
    with small_cache() as c:
        kv = random_kv(32)
        toks = list(range(32))
        c.register_namespace("a", model_id="llama")
        c.register_namespace("b", model_id="llama")
        c.put("a", toks, kv)
        c.put("b", toks, kv)
        ka = {b.key for b in c.lookup("a", toks).blocks}
        kb = {b.key for b in c.lookup("b", toks).blocks}
        assert len(ka) == len(kb) == 2 and not ka & kb
        assert c.drop_namespace("a") == 2
        out, n = c.get("b", toks)
        assert n == 32 and same(kv, out, 32)
        assert c.stats().namespaces["b"].tokens_put == 32


def test_shared_prefix_extends():
    with small_cache() as c:
        kv = random_kv(64)
        c.put("m", list(range(32)), [tuple(t[:32] for t in layer) for layer in kv])
        assert c.put("m", list(range(64)), kv) == 32  # only the two new blocks
        out, n = c.get("m", list(range(64)))
        assert n == 64 and same(kv, out, 64)


def test_tenants_and_namespaces_never_share_hits():
    with small_cache() as c:
        kv = random_kv(32)
        toks = list(range(32))
        c.register_namespace("a", model_id="llama", tenant="t1")
        c.register_namespace("b", model_id="llama", tenant="t2")
        c.put("a", toks, kv)
        assert c.lookup("a", toks).tokens == 32
        assert c.lookup("b", toks).tokens == 0
        c.put("b", toks, kv)
        ka = {b.key for b in c.lookup("a", toks).blocks}
        kb = {b.key for b in c.lookup("b", toks).blocks}
        assert ka and kb and not ka & kb


def test_capacity_never_exceeded_and_every_eviction_accounted():
    """Write 10x the host capacity through device -> host; usage never exceeds capacity."""
    with small_cache(host="128KiB", device="32KiB") as c:
        host, device = c.tier("host"), c.tier("device")
        cap = host.capacity_bytes
        block_bytes = c.tier("host").fits_ever(1) and None
        over, stop = [], threading.Event()

        def watch():
            while not stop.is_set():
                if host.used_bytes > cap or device.used_bytes > device.capacity_bytes:
                    over.append((host.used_bytes, device.used_bytes))
                time.sleep(0)

        watcher = threading.Thread(target=watch)
        watcher.start()
        written, blocks, i = 0, 0, 0
        try:
            while written < 10 * cap:
                kv = random_kv(BT * 2, seed=i)
                assert c.put("m", [i, *range(2 * BT - 1)], kv) == 2 * BT
                written += sum(t.numel() * 4 for layer in kv for t in layer)
                blocks += 2
                i += 1
                assert host.used_bytes <= cap
        finally:
            stop.set()
            watcher.join()
        assert not over, f"usage exceeded capacity: {over[:3]}"
        s = c.stats()
        resident = s.tiers["host"].blocks + s.tiers["device"].blocks
        assert resident > 0 and s.blocks_dropped > 0 and block_bytes is None
        assert resident + s.blocks_dropped == blocks  # every block is somewhere or counted dropped
        assert s.tiers["device"].demotions > 0 and s.tiers["host"].evictions["capacity"] > 0
        # Demoted blocks really are in the tier below, and still read back.
        latest = i - 1
        out, n = c.get("m", [latest, *range(2 * BT - 1)])
        assert n == 2 * BT and same(random_kv(2 * BT, seed=latest), out, n)


def test_dropping_a_parent_drops_its_children_first():
    with small_cache(host="64KiB") as c:
        kv = random_kv(BT * 8)
        c.put("m", list(range(BT * 8)), kv)
        assert c.evict("m", list(range(BT))) == 8  # block 0 plus 7 descendants
        assert c.lookup("m", list(range(BT * 8))).tokens == 0
        s = c.stats()
        assert s.tiers["host"].evictions["orphaned"] == 7 and s.tiers["host"].used_bytes == 0


def test_pinned_blocks_survive_pressure():
    with small_cache(host="64KiB") as c:
        kv = random_kv(BT * 2)
        toks = list(range(BT * 2))
        c.put("m", toks, kv)
        lease = c.acquire("m", toks)
        for i in range(50):
            c.put("m", [1000 + i] * BT * 2, random_kv(BT * 2, seed=i))
        assert c.lookup("m", toks).tokens == 2 * BT  # pinned: not evicted
        c.release(lease)
        for i in range(50):
            c.put("m", [5000 + i] * BT * 2, random_kv(BT * 2, seed=i))
        assert c.lookup("m", toks).tokens == 0


def test_frequency_aware_policy_keeps_hot_prefixes_through_a_scan():
    kept = {}
    for policy in ("lru", "s3fifo"):
        with small_cache(host="160KiB", policy=policy) as c:
            hot = [[h] * BT for h in range(8)]
            for _ in range(4):
                for t in hot:
                    if not c.lookup("m", t).tokens:
                        c.put("m", t, random_kv(BT))
            for i in range(200):  # one-off scan
                c.put("m", [10_000 + i] * BT, random_kv(BT, seed=i))
            kept[policy] = sum(c.lookup("m", t).tokens == BT for t in hot)
    assert kept["lru"] == 0 and kept["s3fifo"] == 8


def test_prefetch_promotes_to_host():
    with small_cache(host="256KiB", device="64KiB") as c:
        toks = list(range(BT * 4))
        c.put("m", toks, random_kv(BT * 4))
        for i in range(30):  # push the prefix out of the device tier into host
            c.put("m", [900 + i] * BT, random_kv(BT, seed=i))
        assert c.lookup("m", toks).tiers.get("host")
        h = c.prefetch("m", toks, to="device")
        assert h.wait(10) and h.state == "done" and h.ready_tokens == BT * 4
        assert c.lookup("m", toks).tiers == {"device": 4}
        assert c.prefetch_status(h.id) is h


def test_concurrent_streamed_puts_and_reloads_keep_every_byte():
    """Blocks of 256 KiB: every put and every reload of a block is one C copy with streaming
    stores, the GIL released (``kvtier._fastcopy``, where built). 4 threads put and reload
    prompts sharing prefixes into a host tier that holds 12 blocks, so slots are evicted and
    reused under the copies; every reload must be exactly the KV put."""
    from kvtier.bytecopy import STREAM_BYTES
    from kvtier.layout import KVLayout

    layout = KVLayout(4, ((8, 128), (8, 128)), "float16")  # 32 KiB per tensor per block
    assert layout.bytes_per_token * BT >= min(STREAM_BYTES, 256 << 10)
    shared = random_kv(BT * 2, layers=4, heads=8, dim=128, dtype=torch.float16, seed=99)
    prompts = {}
    for p in range(10):  # two shared blocks, then two of the prompt's own
        own = random_kv(BT * 2, layers=4, heads=8, dim=128, dtype=torch.float16, seed=p)
        kv = [tuple(torch.cat([a, b]) for a, b in zip(la, lb, strict=True)) for la, lb in zip(shared, own, strict=True)]
        prompts[p] = (list(range(BT * 2)) + list(range(1000 * (p + 1), 1000 * (p + 1) + BT * 2)), kv)
    block = layout.bytes_per_token * BT + 4096
    cfg = CacheConfig(block_tokens=BT, host=HostTierConfig(capacity_bytes=12 * block, prefault=False),
                      device=DeviceTierConfig(capacity_bytes=0))
    reloads = [0] * 4
    with TieredCache(cfg) as c:
        def worker(w):
            rnd = random.Random(w)
            dest = layout.empty(BT * 4)
            for _ in range(40):
                p = rnd.randrange(10)
                toks, kv = prompts[p]
                if rnd.random() < 0.5:
                    c.put("m", toks, kv)
                    continue
                for layer in dest:
                    for t in layer:
                        t.fill_(7)
                n = c.get_into("m", toks, dest)
                assert n % BT == 0 and same(kv, dest, n), f"wrong KV for prompt {p}"
                reloads[w] += n > 0

        errors = run_workers(worker, 4)
        assert not errors, errors[:3]
        assert sum(reloads) > 0  # some reloads found blocks (the test checked bytes, not misses)
        s = c.stats().tiers["host"]
        assert s.used_bytes <= s.capacity_bytes
        assert sum(s.evictions.values()) > 0  # slots were freed and reused under the copies


def test_concurrent_put_get_lookup():
    """8 threads, random put/get/lookup for 10 s on a small cache: no error, no wrong KV."""
    with small_cache(host="192KiB", device="32KiB", policy="s3fifo") as c:
        prompts = {p: (list(range(p * 1000, p * 1000 + BT * 3)), random_kv(BT * 3, seed=p)) for p in range(40)}
        counts = [0] * 8
        deadline = time.monotonic() + 10

        def worker(w):
            rnd = random.Random(w)
            while time.monotonic() < deadline:
                p = rnd.randrange(40)
                toks, kv = prompts[p]
                op = rnd.random()
                if op < 0.4:
                    c.put("m", toks, kv)
                elif op < 0.8:
                    out, n = c.get("m", toks)
                    if n:
                        assert same(kv, out, n), f"wrong KV for prompt {p}"
                else:
                    hit = c.lookup("m", toks)
                    assert hit.tokens % BT == 0 and hit.tokens <= BT * 3
                counts[w] += 1

        errors = run_workers(worker, 8)
        assert not errors, errors[:3]
        s = c.stats()
        assert all(counts) and s.lookups >= sum(counts) * 0.5
        for name, ts in s.tiers.items():
            assert ts.used_bytes <= ts.capacity_bytes
            assert ts.blocks == len(c._placement.policies[c._placement.tier_index(name)])
        assert sum(ts.blocks for ts in s.tiers.values()) >= len(c._placement.index)
        assert s.lookup_hits <= s.lookups and s.tokens_hit <= s.tokens_looked_up


def snapshot(c):
    s = c.stats()
    return (s.puts, s.tokens_put, {k: (v.blocks, v.used_bytes) for k, v in s.tiers.items()},
            [ns.to_dict() for ns in c.namespaces()])


BAD = [
    ("wrong dtype", lambda kv, t: ("m", t, [tuple(x.half() for x in layer) for layer in kv]), LayoutMismatch, "dtype"),
    ("wrong heads", lambda kv, t: ("m", t, [tuple(x[:, :1] for x in layer) for layer in kv]), LayoutMismatch, "shape"),
    ("wrong layers", lambda kv, t: ("m", t, kv[:1]), LayoutMismatch, "layers"),
    ("token mismatch", lambda kv, t: ("m", t[:-1], kv), LayoutMismatch, "tokens"),
    ("float tokens", lambda kv, t: ("m", [float(x) for x in t], kv), InvalidType, "integers"),
    ("string tokens", lambda kv, t: ("m", "hello", kv), InvalidType, "integers"),
    ("empty tokens", lambda kv, t: ("m", [], kv), InvalidRequest, "empty"),
    ("negative tokens", lambda kv, t: ("m", [-1] * len(t), kv), InvalidRequest, ">= 0"),
    ("kv not a list", lambda kv, t: ("m", t, torch.zeros(3)), InvalidType, "kv"),
    ("kv item not tensor", lambda kv, t: ("m", t, [("a", "b")] * 2), InvalidType, "torch.Tensor"),
    ("bad namespace", lambda kv, t: ("", t, kv), InvalidRequest, "namespace"),
]


@pytest.mark.parametrize("name, make, exc, words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_clear_error_and_changes_nothing(name, make, exc, words):
    with small_cache() as c:
        kv, toks = random_kv(32), list(range(32))
        c.put("m", toks, kv)
        before = snapshot(c)
        with pytest.raises(exc, match=words):
            c.put(*make(kv, toks))
        assert snapshot(c) == before
        out, n = c.get("m", toks)
        assert n == 32 and same(kv, out, 32)


def test_unknown_codec_and_namespace_errors():
    with pytest.raises(InvalidRequest, match="codec"):
        TieredCache(CacheConfig(codec="gzip")).register_namespace("x")
    with small_cache() as c:
        with pytest.raises(InvalidRequest, match="codec"):
            c.register_namespace("x", codec="lz9")
        assert c.namespaces() == []
        with pytest.raises(UnknownNamespace):
            c.drop_namespace("nope")
        c.register_namespace("x", block_tokens=BT)
        with pytest.raises(InvalidRequest, match="different settings"):
            c.register_namespace("x", block_tokens=32)
    with pytest.raises(InvalidRequest, match="size"):
        CacheConfig(host=HostTierConfig(capacity_bytes="12 parsecs"))


def test_drop_namespace():
    with small_cache() as c:
        c.put("a", list(range(32)), random_kv(32))
        c.put("b", list(range(32)), random_kv(32))
        assert c.drop_namespace("a") == 2
        assert c.lookup("a", list(range(32))).tokens == 0 and c.lookup("b", list(range(32))).tokens == 32


def test_ttl_expires_blocks(monkeypatch):
    with small_cache() as c:
        c.register_namespace("m", ttl_s=60)
        c.put("m", list(range(32)), random_kv(32))
        assert c.lookup("m", list(range(32))).tokens == 32
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() + 61)
        assert c.lookup("m", list(range(32))).tokens == 0
        assert c.stats().tiers["host"].evictions["expired"] == 1


def _put_blocked_at_second_block(monkeypatch, c, name, kv):
    """Start a put of ``kv`` into ``name`` that stops once its first block is published, before
    it places the second (a host-only put prepares each block just before placing it: the hook
    is where the second block is prepared; the put copies one block per window into its slot,
    not all of them in one call); returns (thread, result dict, release function)."""
    import kvtier.writes as writes_mod
    from kvtier.prefixkv import PrefixKV

    monkeypatch.setattr(writes_mod, "SLOTS_WINDOW_BYTES", 1)
    real = PrefixKV.prepare
    entered, gate = threading.Event(), threading.Event()

    def slow(self, i, codec):
        if i == 1 and not entered.is_set():
            entered.set()
            assert gate.wait(30)
        return real(self, i, codec)

    monkeypatch.setattr(PrefixKV, "prepare", slow)
    result = {}

    def run():
        try:
            result["tokens"] = c.put(name, list(range(kv[0][0].shape[0])), kv)
        except Exception as e:  # noqa: BLE001  inspected by the test
            result["error"] = e

    t = threading.Thread(target=run)
    t.start()
    assert entered.wait(30)
    return t, result, gate.set


def test_dropping_a_namespace_during_a_put_never_recreates_it(monkeypatch):
    with small_cache() as c:
        c.register_namespace("ns", model_id="m", tenant="t1", block_tokens=BT)
        kv = random_kv(64)
        t, result, release = _put_blocked_at_second_block(monkeypatch, c, "ns", kv)
        assert c.drop_namespace("ns") == 1  # the first block was already published
        release()
        t.join(30)
        assert isinstance(result.get("error"), UnknownNamespace), result
        assert c.namespaces() == []
        assert c.stats().tiers["host"].blocks == 0  # nothing stray left behind
        ns = c.register_namespace("ns", model_id="m", tenant="t1", block_tokens=BT)
        assert ns.tenant == "t1" and ns.layout is None
        assert c.put("ns", list(range(64)), kv) == 64


def test_a_put_without_create_never_registers(monkeypatch):
    with small_cache() as c:
        with pytest.raises(UnknownNamespace):
            c.put("absent", list(range(32)), random_kv(32), create=False)
        assert c.namespaces() == []


def test_a_prefix_put_again_while_a_reader_holds_its_evicted_copy_is_not_lost_when_the_reader_lets_go():
    """Attack on the index: evict a prefix a reader still holds (its copies stay until the
    reader lets go), put it again at once, then let the reader go. The second put must not
    count the held copies as its own (they are freed with the reader: the index would point
    at freed, then reused, slots): it stores nothing while they are held, and a put after
    that stores and reads back every block."""
    with small_cache() as c:
        kv = random_kv(64)
        toks = list(range(64))
        assert c.put("m", toks, kv) == 64
        lease = c.acquire("m", toks)
        assert c.evict("m", toks) == 4
        assert c.put("m", toks, kv) == 0  # the evicted copies are still held
        c.release(lease)
        assert c.lookup("m", toks).tokens == 0 and c.stats().tiers["host"].blocks == 0
        assert c.put("m", toks, kv) == 64
        out, n = c.get("m", toks)
        assert n == 64 and same(kv, out, 64)


class _HeldWrite:
    """A put stopped while it writes into memory-tier slots, until released: at the ``nth``
    block (``PreparedBlock.write_into``, blocks placed one by one) or, with ``window``, at the
    ``nth`` window of that many blocks (``kvtier.block.write_blocks``, one call per window)."""

    def __init__(self, monkeypatch, nth: int = 1, window: int | None = None):
        import kvtier.placement as placement_mod
        from kvtier.block import PreparedBlock

        self.monkeypatch, self.window = monkeypatch, window
        self.entered, self.gate, self.calls = threading.Event(), threading.Event(), 0

        def hold(real):
            def held(*args):
                self.calls += 1
                if self.calls == nth:
                    self.entered.set()
                    assert self.gate.wait(30)
                return real(*args)
            return held

        if window is None:
            monkeypatch.setattr(PreparedBlock, "write_into", hold(PreparedBlock.write_into))
        else:
            monkeypatch.setattr(placement_mod, "write_blocks", hold(placement_mod.write_blocks))

    def put(self, c, toks, kv):
        """Start ``c.put`` on a thread; returns (thread, results: stored count or exception)."""
        import kvtier.writes as writes_mod
        from kvtier.codecs import get_codec
        from kvtier.prefixkv import PrefixKV

        nbytes = PrefixKV(kv, BT).prepare(0, get_codec("none")).nbytes
        self.monkeypatch.setattr(writes_mod, "SLOTS_WINDOW_BYTES", (self.window or 1) * nbytes)
        out: list = []

        def run():
            try:
                out.append(c.put("m", toks, kv))
            except BaseException as e:  # noqa: BLE001  the test inspects it
                out.append(e)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        assert self.entered.wait(30)
        return t, out


@pytest.mark.parametrize("window", [None, 2], ids=["one by one", "windows"])
def test_a_block_is_written_into_its_slot_outside_the_cache_lock(monkeypatch, window):
    """The copy and checksums of a block into its host slot take ~0.5 ms per 2 MiB; done under
    the cache's lock, every lookup, get and write-through waited for them. A put held in the
    middle of that write (of block 1, or of the window of blocks 2-3) must not stop a lookup,
    which sees only what was published before, or a concurrent put of the same prefix from
    taking the first's blocks once they are there (each block stored once)."""
    held = _HeldWrite(monkeypatch, nth=2, window=window)
    with small_cache() as c:
        kv = random_kv(64)
        toks = list(range(64))
        t, out = held.put(c, toks, kv)
        done = threading.Event()
        threading.Thread(target=lambda: (c.lookup("m", toks), done.set()), daemon=True).start()
        assert done.wait(30)  # the lookup ran while the write was held
        assert c.lookup("m", toks).tokens == (window or 1) * BT  # what is being written is not visible
        second: list = []
        t2 = threading.Thread(target=lambda: second.append(c.put("m", toks, kv)), daemon=True)
        t2.start()
        held.gate.set()
        t.join(30)
        t2.join(30)
        assert out[0] + second[0] == 64  # each block stored once, by one of them
        assert c.stats().tiers["host"].blocks == 4
        got, n = c.get("m", toks)
        assert n == 64 and same(kv, got, 64)


@pytest.mark.parametrize("window", [None, 2], ids=["one by one", "windows"])
def test_a_namespace_dropped_while_a_block_is_written_leaves_no_slot_behind(monkeypatch, window):
    held = _HeldWrite(monkeypatch, nth=2, window=window)
    with small_cache() as c:
        kv = random_kv(64)
        toks = list(range(64))
        t, out = held.put(c, toks, kv)
        c.drop_namespace("m")
        held.gate.set()
        t.join(30)
        assert isinstance(out[0], UnknownNamespace)
        assert c.tier("host").used_bytes == 0 and c.stats().tiers["host"].blocks == 0


@pytest.mark.parametrize("window", [None, 2], ids=["one by one", "windows"])
def test_a_prefix_evicted_while_its_next_block_is_written_stops_the_put_and_frees_the_slot(monkeypatch, window):
    held = _HeldWrite(monkeypatch, nth=2, window=window)
    first = window or 1  # blocks placed before the held write
    with small_cache() as c:
        kv = random_kv(64)
        toks = list(range(64))
        t, out = held.put(c, toks, kv)
        assert c.evict("m", toks) == first  # pinned by the put, so doomed
        held.gate.set()
        t.join(30)
        assert out == [first * BT]  # those were stored (and then evicted); the put stopped after
        assert c.lookup("m", toks).tokens == 0
        assert c.tier("host").used_bytes == 0  # the held write's slots freed, the rest with the put


def test_a_large_get_reuses_memory_a_dropped_get_returned_and_never_one_still_held():
    """``get`` of 64 MiB or more writes into memory an earlier get returned once its caller
    dropped it (no page faults), and never into a result the caller still holds."""
    tokens = 512  # 2 layers x K,V of [tokens, 8, 1024] float32: 128 KiB a token, 64 MiB in all
    cfg = CacheConfig(block_tokens=64, host=HostTierConfig(capacity_bytes="384MiB"))
    with TieredCache(cfg) as c:
        kv_a, kv_b = (random_kv(tokens, heads=8, dim=1024, seed=s) for s in (1, 2))
        toks_a, toks_b = list(range(tokens)), list(range(10**6, 10**6 + tokens))
        assert c.put("m", toks_a, kv_a) == tokens and c.put("m", toks_b, kv_b) == tokens
        held, n = c.get("m", toks_a)
        assert n == tokens and same(kv_a, held, n)
        out_b, n = c.get("m", toks_b)  # ``held`` is still viewed: fresh memory
        assert n == tokens and same(kv_b, out_b, n) and same(kv_a, held, tokens)
        ptr_b = out_b[0][0].data_ptr()
        del out_b  # no collection needed: nothing of a finished get holds it in a cycle
        again, n = c.get("m", toks_a)  # B's memory, now dropped, holds A's prefix
        assert again[0][0].data_ptr() == ptr_b and n == tokens and same(kv_a, again, n)
        assert same(kv_a, held, tokens)
        del again, held
        assert c._get_buffers.idle_bytes == 2 * 64 * 1024**2
    assert c._get_buffers.idle_bytes == 0  # a closed cache lets it go


def test_a_get_pool_of_zero_bytes_keeps_nothing():
    cfg = CacheConfig(block_tokens=64, host=HostTierConfig(capacity_bytes="128MiB"), reload_pool_bytes=0)
    with TieredCache(cfg) as c:
        kv = random_kv(512, heads=8, dim=1024)
        c.put("m", list(range(512)), kv)
        out, n = c.get("m", list(range(512)))
        assert n == 512 and same(kv, out, n)
        del out
        gc.collect()
        assert c._get_buffers.idle_bytes == 0
