"""The dual-path loader: both paths at once, per-layer readiness, back-pressure, corrupt blocks."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from kvtier import CacheConfig, HostTierConfig, TieredCache
from kvtier.config import SSDTierConfig
from kvtier.loader import Loader, LoaderConfig, LoadStream
from kvtier.loader_job import layer_groups
from kvtier.staging import StagingRing
from tests.conftest import random_kv

BT = 16
LAYERS = 4


class SlowTier:
    """Wraps a real tier: every read waits ``delay`` s (or on ``gate``) and is counted."""

    def __init__(self, inner, delay: float = 0.0) -> None:
        self._inner = inner
        self.delay = delay
        self.gate: threading.Semaphore | None = None  # if set, each range read takes a permit
        self.broken: bytes | None = None  # if set, reading this key raises what no tier raises
        self.reads = 0
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def _count(self, n: int) -> None:
        with self._lock:
            self.reads += n
        if self.delay:
            time.sleep(self.delay)

    def read_into(self, key, out, offset=0):
        if self.gate is not None:
            assert self.gate.acquire(timeout=10), "test gate never opened"
        self._count(1)
        if key == self.broken:
            raise RuntimeError("injected: a bug in a tier, not an I/O error")
        return self._inner.read_into(key, out, offset)

    def read_many_into(self, requests):
        self._count(len(requests))
        return self._inner.read_many_into(requests)


def split_cache(tmp_path, host_blocks: int, delay: float = 0.0, **kw) -> TieredCache:
    """Host tier of ``host_blocks`` half-slots over a real SSD tier: a block of random_kv(layers=
    LAYERS) (16 tokens x 4 layers x 2 x 2 heads x 8 dims x 4 B + header = 8284 B) takes a 12 KiB
    slot, so ``host_blocks // 2`` of them fit."""
    from kvtier.manager import build_tiers

    half_slot = 6144
    cfg = CacheConfig(block_tokens=BT, host=HostTierConfig(capacity_bytes=host_blocks * half_slot),
                      ssd=SSDTierConfig(path=str(tmp_path / "ssd"), min_free_bytes=0, durability="none",
                                        capacity_bytes="64MiB", segment_bytes="4MiB",
                                        inline_threshold=0), **kw)
    tiers = build_tiers(cfg)
    tiers[-1] = SlowTier(tiers[-1], delay)
    return TieredCache(cfg, tiers=tiers)


def fill(cache: TieredCache, tokens: int, seed: int = 0):
    kv = random_kv(tokens, layers=LAYERS, seed=seed)
    toks = list(range(seed * 10_000, seed * 10_000 + tokens))
    cache.put("m", toks, kv)
    cache.flush(10)
    return toks, kv


def same(kv_a, kv_b, n):
    return all(torch.equal(a[:n], b[:n]) for la, lb in zip(kv_a, kv_b, strict=True) for a, b in zip(la, lb, strict=True))


def load(cache, loader, toks):
    lease = cache.acquire("m", toks)
    try:
        dest = lease.namespace.layout.empty(lease.tokens)
        stream = loader.load(lease, dest)
        stream.wait_all(10)
        return stream, dest
    finally:
        cache.release(lease)


def test_split_prefix_loads_exactly_over_both_paths(tmp_path):
    with split_cache(tmp_path, host_blocks=3) as cache:
        toks, kv = fill(cache, 8 * BT + 5)  # 8 full blocks + a partial one
        lease = cache.acquire("m", toks)
        tiers = [b.tiers[0] for b in lease.blocks]
        cache.release(lease)
        assert "host" in tiers and "ssd" in tiers, tiers
        loader = Loader(cache)
        stream, dest = load(cache, loader, toks)
        assert stream.tokens == 8 * BT and stream.error is None
        assert same(kv, dest, 8 * BT)
        st = cache.stats()
        assert st.tiers["ssd"].blocks_read == tiers.count("ssd")
        assert st.tiers["host"].blocks_read == tiers.count("host")
        loader.close()


def stored_prefix(cache: TieredCache, blocks: int) -> tuple[list, list[int]]:
    """A prefix of ``blocks`` blocks of random KV put under namespace ``m``: its KV and tokens."""
    kv = random_kv(blocks * BT, layers=LAYERS)
    toks = list(range(blocks * BT))
    assert cache.put("m", toks, kv) == blocks * BT
    return kv, toks


@pytest.mark.parametrize("dest_kind", ["layout_empty", "a_tensor_each"])
def test_host_blocks_land_in_host_kv_by_one_copy_per_layer_group(monkeypatch, dest_kind):
    """Host-tier blocks reloaded into host KV (``KVLayout.empty``'s, or a tensor per layer and
    K/V as a model's own cache): one ``decode_many`` call per group of layers for all blocks
    (no per-layer, per-tensor decode, one header parsed), groups landing in order, exact bytes;
    int8 blocks take the per-layer decode, exact too (their scales)."""
    import kvtier.loader as loader_mod
    import kvtier.prefixkv as prefixkv_mod

    decodes, many, parses = [], [], [0]
    real_parse = loader_mod.parse_table
    monkeypatch.setattr(loader_mod, "parse_table", lambda *a: parses.__setitem__(0, parses[0] + 1) or real_parse(*a))
    real = loader_mod.decode_layer_into
    monkeypatch.setattr(loader_mod, "decode_layer_into", lambda *a, **k: decodes.append(a[1]) or real(*a, **k))
    real_many = prefixkv_mod.PrefixKV.decode_many
    monkeypatch.setattr(prefixkv_mod.PrefixKV, "decode_many",
                        lambda self, arr, blocks, step, layers: many.append((len(blocks), list(layers)))
                        or real_many(self, arr, blocks, step, layers))
    landed: list[int] = []
    real_land = LoadStream._land
    monkeypatch.setattr(LoadStream, "_land", lambda self, layers, blocks: landed.extend(layers) or real_land(self, layers, blocks))
    with TieredCache(CacheConfig(block_tokens=BT, host=HostTierConfig(capacity_bytes="8MiB"))) as cache:
        kv, toks = stored_prefix(cache, 6)
        block = cache.acquire("m", toks)
        layout = block.namespace.layout
        cache.release(block)
        layer_bytes = BT * sum(t[0].numel() * t.element_size() for t in kv[0])  # a layer's payload
        loader = Loader(cache, LoaderConfig(min_read_bytes=2 * layer_bytes))  # groups of 2 layers

        def into(dest):
            lease = cache.acquire("m", toks)
            try:
                stream = loader.load(lease, dest)
                stream.wait_all(10)
            finally:
                cache.release(lease)
            return stream

        def fresh():
            if dest_kind == "layout_empty":
                return layout.empty(6 * BT)
            return [tuple(torch.full_like(t, 7.0) for t in layer) for layer in kv]  # separate allocations

        dest = fresh()
        stream = into(dest)
        assert stream.tokens == 6 * BT and stream.error is None and same(kv, dest, 6 * BT)
        assert decodes == [] and landed == [0, 1, 2, 3]
        assert many == [(6, [0, 1]), (6, [2, 3])]
        assert parses == [1]  # block 0's header; the others are checked against it at once

        q = [list(range(50_000, 50_000 + 6 * BT))]
        cache.register_namespace("q", layout=layout, codec="int8")
        assert cache.put("q", q[0], kv) == 6 * BT
        many.clear()
        lease = cache.acquire("q", q[0])
        try:
            out = fresh()
            s2 = loader.load(lease, out)
            s2.wait_all(10)
        finally:
            cache.release(lease)
        assert s2.tokens == 6 * BT and many == []
        assert sorted(set(decodes)) == list(range(LAYERS))
        assert all((a[:6 * BT].float() - b[:6 * BT].float()).abs().max() < 0.1 * b.abs().max()
                   for la, lb in zip(out, kv, strict=True) for a, b in zip(la, lb, strict=True))
        loader.close()


def test_blocks_read_from_ssd_are_promoted_to_host_from_the_bytes_read(tmp_path):
    """The next turn finds the prefix in host memory, and the promotion cost no second SSD read."""
    with split_cache(tmp_path, host_blocks=8) as cache:  # 8284 B blocks take 2 half-slots: 4 fit
        toks, kv = fill(cache, 4 * BT)
        fill(cache, 4 * BT, seed=1)  # pushes the first prefix down to SSD
        lease = cache.acquire("m", toks)
        assert {b.tiers[0] for b in lease.blocks} == {"ssd"}
        cache.release(lease)
        loader = Loader(cache, LoaderConfig(min_read_bytes=1))  # one read per layer: 4 ranges/block
        ssd_reads = cache.tiers[-1].reads
        stream, dest = load(cache, loader, toks)
        assert stream.tokens == 4 * BT and same(kv, dest, 4 * BT)
        loader.flush(10)
        assert cache.tiers[-1].reads - ssd_reads == 4 * (1 + LAYERS)  # headers + ranges, no re-read
        assert [b.tier for b in cache.lookup("m", toks).blocks] == ["host"] * 4
        assert cache.stats().tiers["host"].promotions == 4
        stream, dest = load(cache, loader, toks)  # the next turn: path 1 only
        assert cache.tiers[-1].reads - ssd_reads == 4 * (1 + LAYERS)
        assert same(kv, dest, 4 * BT)
        loader.close()


def test_no_promotion_when_the_cache_does_not_promote(tmp_path):
    with split_cache(tmp_path, host_blocks=8, promote_on_get=False) as cache:
        toks, _ = fill(cache, 4 * BT)
        fill(cache, 8 * BT, seed=1)
        loader = Loader(cache)
        load(cache, loader, toks)
        loader.flush(10)
        assert {b.tier for b in cache.lookup("m", toks).blocks} == {"ssd"}
        assert cache.stats().tiers["host"].promotions == 0
        loader.close()


def test_layer_ready_before_later_layers_land(tmp_path):
    """Layer 0 is usable while the reads of later layers are still held back."""
    with split_cache(tmp_path, host_blocks=0) as cache:
        toks, kv = fill(cache, 4 * BT)
        ssd = cache.tiers[-1]
        loader = Loader(cache, LoaderConfig(min_read_bytes=1, io_threads=2, staging_slots=4))
        lease = cache.acquire("m", toks)
        dest = lease.namespace.layout.empty(lease.tokens)
        ssd.gate = threading.Semaphore(0)
        stream = loader.load(lease, dest)
        ssd.gate.release(4)  # exactly the four reads of layer 0 (one per block)
        stream.wait_layer(0, 10)
        assert all(torch.equal(a[:4 * BT], b) for a, b in zip(kv[0], dest[0], strict=True))
        assert not any(stream._ready[i].is_set() for i in range(1, LAYERS))
        ssd.gate.release(100)
        stream.wait_all(10)
        assert same(kv, dest, 4 * BT)
        cache.release(lease)
        loader.close()


def test_layer_readiness_is_ordered_under_a_slow_tier(tmp_path):
    with split_cache(tmp_path, host_blocks=0, delay=0.02) as cache:
        toks, kv = fill(cache, 4 * BT)
        loader = Loader(cache, LoaderConfig(min_read_bytes=1, io_threads=2, staging_slots=2))
        lease = cache.acquire("m", toks)
        dest = lease.namespace.layout.empty(lease.tokens)
        stream = loader.load(lease, dest)
        times = []
        for i in range(LAYERS):
            stream.wait_layer(i, 10)
            times.append(time.perf_counter())
            assert all(torch.equal(a[:4 * BT], b) for a, b in zip(kv[i], dest[i], strict=True))
        assert times == sorted(times)
        stream.wait_all(10)
        assert loader.ring.high_water <= 2  # back-pressure: never more than the ring holds
        cache.release(lease)
        loader.close()


def test_corrupt_ssd_block_truncates_to_a_correct_prefix(tmp_path):
    with split_cache(tmp_path, host_blocks=0) as cache:
        toks, kv = fill(cache, 6 * BT)
        ssd = cache.tiers[-1]._inner
        lease = cache.acquire("m", toks)
        victim = lease.blocks[3].key
        cache.release(lease)
        loc = ssd._loc[victim]
        seg = ssd._segments.by_id[loc.segment]
        with open(seg.path, "r+b") as f:  # flip a byte in the middle of the block's payload
            f.seek(loc.offset + loc.length - 100)
            b = f.read(1)
            f.seek(loc.offset + loc.length - 100)
            f.write(bytes([b[0] ^ 0xFF]))
        loader = Loader(cache)
        stream, dest = load(cache, loader, toks)
        assert stream.tokens == 3 * BT and "block 3" in stream.error
        assert same(kv, dest, 3 * BT)
        assert cache.stats().tiers["ssd"].corrupt_blocks >= 1
        assert cache.lookup("m", toks).tokens == 3 * BT  # the corrupt block is gone
        loader.close()


@pytest.mark.parametrize("how", ["get", "layerwise"])
def test_an_unexpected_read_error_ends_the_prefix_and_never_hangs(tmp_path, how):
    """The ring's readers (a get's whole blocks; a layerwise load's layer ranges): an error no
    tier should raise ends the prefix before its block; the load neither hangs nor raises,
    serves no unread block, and drops nothing."""
    with split_cache(tmp_path, host_blocks=0) as cache:
        toks, kv = fill(cache, 6 * BT)
        slow = cache.tiers[-1]
        lease = cache.acquire("m", toks)
        slow.broken = lease.blocks[3].key
        cache.release(lease)
        loader = Loader(cache)
        if how == "get":
            out, n = cache.get("m", toks)
        else:
            stream, out = load(cache, loader, toks)
            n = stream.tokens
            assert "block 3" in stream.error
        assert n == 3 * BT and same(kv, out, n)
        assert slow.reads >= 4  # the readers got as far as the broken block
        slow.broken = None
        out, n = cache.get("m", toks)  # nothing was dropped for it: a bug is not corruption
        assert n == 6 * BT and same(kv, out, n)
        loader.close()


def test_cancel_ends_with_contiguous_prefix(tmp_path):
    with split_cache(tmp_path, host_blocks=0, delay=0.01) as cache:
        toks, _ = fill(cache, 8 * BT)
        loader = Loader(cache, LoaderConfig(io_threads=1, staging_slots=1))
        lease = cache.acquire("m", toks)
        stream = loader.load(lease, lease.namespace.layout.empty(lease.tokens))
        stream.cancel()
        n = stream.wait_all(10)
        assert n % BT == 0 and n <= 8 * BT
        cache.release(lease)
        loader.close()


def test_load_validates_dest_and_blocks(tmp_path):
    with split_cache(tmp_path, host_blocks=8) as cache:
        toks, _ = fill(cache, 2 * BT)
        loader = Loader(cache)
        lease = cache.acquire("m", toks)
        with pytest.raises(ValueError, match="dest"):
            loader.load(lease, lease.namespace.layout.empty(BT))
        with pytest.raises(ValueError, match="blocks"):
            loader.load(lease, lease.namespace.layout.empty(2 * BT), blocks=3)
        cache.release(lease)
        loader.close()


def test_layer_groups_reach_min_read():
    assert layer_groups([10] * 8, 25) == [range(0, 3), range(3, 6), range(6, 8)]
    assert layer_groups([10] * 4, 1) == [range(i, i + 1) for i in range(4)]
    assert layer_groups([10] * 4, 10**9) == [range(0, 4)]


def test_staging_ring_back_pressure_and_alignment():
    ring = StagingRing(2, 5000, pinned=False)
    a, b = ring.acquire(), ring.acquire()
    assert ring.slot_bytes % 4096 == 0 and a.tensor.data_ptr() % 4096 == 0
    with pytest.raises(TimeoutError):
        ring.acquire(timeout=0.01)
    got = []
    t = threading.Thread(target=lambda: got.append(ring.acquire(timeout=5)))
    t.start()
    ring.release(a)
    t.join(5)
    assert got and got[0].index == a.index
    ring.release(b)
    with pytest.raises(ValueError, match="twice"):
        ring.release(b)


def test_empty_stream_is_done():
    s = LoadStream(2, 0, BT)
    s._path_done()
    s._path_done()
    assert s.wait_all(1) == 0 and s.wait_layer(1, 1) == 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_events_and_pinned_staging_bandwidth(tmp_path):
    ring = StagingRing(4, 64 * 1024**2)
    assert ring.pinned and ring.buffer.is_pinned()
    plain = torch.empty(64 * 1024**2, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(64 * 1024**2, dtype=torch.uint8, device="cuda")

    def bandwidth(src):
        dev.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            dev.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        return 10 * src.numel() / (time.perf_counter() - start)

    slot = ring.acquire()
    ratio = min(bandwidth(slot.tensor) / bandwidth(plain) for _ in range(3))
    print(f"pinned staging -> device: {ratio:.2%} of a plain pinned copy")
    assert ratio >= 0.8
    with split_cache(tmp_path, host_blocks=3) as cache:
        toks, kv = fill(cache, 8 * BT)
        loader = Loader(cache)
        lease = cache.acquire("m", toks)
        dest = lease.namespace.layout.empty(lease.tokens, "cuda")
        stream = loader.load(lease, dest)
        for i in range(LAYERS):
            stream.wait_layer(i, 10)
            assert isinstance(stream.layer_event(i), torch.cuda.Event)
        stream.wait_all(10)
        torch.cuda.synchronize()
        assert same([tuple(t.cuda() for t in layer) for layer in kv], dest, 8 * BT)
        cache.release(lease)
        loader.close()


@pytest.mark.parametrize("victim", [0, 2])
def test_a_host_block_whose_layers_run_past_its_slot_is_not_copied_from_its_neighbour(victim):
    """A host-tier block whose (checksummed) header places its layers past the end of its slot:
    the batched copy would read the next block's bytes unverified. It is refused, read whole
    (which refuses it too), and the prefix ends before it; its place in ``dest`` stays as it was.
    Block 0 is the one the others' headers are compared with (``headers_like``)."""
    from kvtier.block import _header, parse_table

    with TieredCache(CacheConfig(block_tokens=BT, host=HostTierConfig(capacity_bytes="8MiB"))) as cache:
        kv, toks = stored_prefix(cache, 4)
        lease = cache.acquire("m", toks)
        key, layout = lease.blocks[victim].key, lease.namespace.layout
        cache.release(lease)
        host = cache.tier("host")
        view = host.view(key).numpy()
        codec, version, tokens, hsize, table = parse_table(view.data)
        shift = 8 if version == 1 else 4096
        forged = _header(codec, version, tokens, [(o + shift, n, c) for o, n, c in table])
        assert len(forged) <= hsize
        view[:len(forged)] = list(forged)
        assert table[-1][0] + table[-1][1] + shift > host.slot(key)[1]
        dest = layout.empty(4 * BT)
        for layer in dest:
            for t in layer:
                t.view(torch.uint8).fill_(0x77)
        loader = Loader(cache)
        lease = cache.acquire("m", toks)
        try:
            n = loader.load(lease, dest, layerwise=False).wait_all(10)
        finally:
            cache.release(lease)
            loader.close()
        assert n == victim * BT and same(kv, dest, victim * BT)
        assert all(bool((t[victim * BT:(victim + 1) * BT].view(torch.uint8) == 0x77).all()) for layer in dest for t in layer)
