"""Reloads straight into page-aligned destination KV: O_DIRECT, verified once, corrupt bytes never
served (``kvtier.loader_ranged``'s direct way and ``SSDTier.read_scatter_into``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvtier import CacheConfig, HostTierConfig, TieredCache
from kvtier.bufpool import aligned_empty
from kvtier.config import SSDTierConfig
from kvtier.loader import Loader, LoaderConfig
from tests.conftest import random_kv

BT, LAYERS, HEADS, DIM = 16, 4, 4, 128  # a block's tensor: 16 x 4 x 128 x 4 B = 32 KiB, whole pages;
# a block 256 KiB of payload: its 4 KiB header page is little enough padding for format 2


def ssd_cache(tmp_path) -> TieredCache:
    cfg = CacheConfig(block_tokens=BT, host=HostTierConfig(capacity_bytes=0), promote_on_get=False,
                      ssd=SSDTierConfig(path=str(tmp_path / "ssd"), min_free_bytes=0, durability="batch",
                                        capacity_bytes="64MiB", segment_bytes="4MiB", inline_threshold=0))
    return TieredCache(cfg)


def fill(cache: TieredCache, blocks: int):
    kv = random_kv(blocks * BT, layers=LAYERS, heads=HEADS, dim=DIM)
    toks = list(range(1, blocks * BT + 1))
    cache.put("m", toks, kv)
    cache.flush(10)
    return toks, kv


def same(a, b, n) -> bool:
    return all(torch.equal(x[:n], y[:n]) for la, lb in zip(a, b, strict=True) for x, y in zip(la, lb, strict=True))


def direct_io(cache: TieredCache) -> bool:
    return bool(cache.tier("ssd").stats()["direct_io"])


def corrupt(cache: TieredCache, key: bytes, from_end: int) -> None:
    ssd = cache.tier("ssd")
    loc = ssd._loc[key]
    seg = ssd._segments.by_id[loc.segment]
    with open(seg.path, "r+b") as f:
        f.seek(loc.offset + loc.length - from_end)
        b = f.read(1)
        f.seek(loc.offset + loc.length - from_end)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.mark.parametrize("how", ["get", "loader"])
def test_reload_reads_go_direct_into_the_destination(tmp_path, how):
    with ssd_cache(tmp_path) as cache:
        toks, kv = fill(cache, 6)
        if not direct_io(cache):
            pytest.skip("the temp directory's file system refuses O_DIRECT")
        before = cache.tier("ssd").stats()
        if how == "get":
            out, n = cache.get("m", toks)
        else:
            loader = Loader(cache, LoaderConfig(min_read_bytes=1))  # a read per layer
            lease = cache.acquire("m", toks)
            out = lease.namespace.layout.empty(lease.tokens)
            n = loader.load(lease, out).wait_all(10)
            cache.release(lease)
            loader.close()
        after = cache.tier("ssd").stats()
        assert n == 6 * BT and same(kv, out, n)
        reads = after["direct_reads"] - before["direct_reads"]
        assert after["buffered_reads"] == before["buffered_reads"]
        assert reads == (6 if how == "get" else 6 * LAYERS)  # get: a whole block a read


def test_get_checksums_each_byte_once(tmp_path, monkeypatch):
    import kvtier.block as block_mod
    import kvtier.loader_ranged as ranged_mod
    import kvtier.tiers.ssd.index as index_mod
    import kvtier.tiers.ssd.reader as reader_mod

    with ssd_cache(tmp_path) as cache:
        toks, kv = fill(cache, 4)
        counted = [0]
        real, real_parts = block_mod.checksum, block_mod.checksum_parts

        def counting(data, value=0):
            counted[0] += memoryview(data).nbytes
            return real(data, value)

        def counting_parts(parts, value=0):
            counted[0] += sum(memoryview(p).nbytes for p in parts)
            return real_parts(parts, value)

        for mod in (block_mod, index_mod, reader_mod):
            monkeypatch.setattr(mod, "checksum", counting)
        for mod in (block_mod, ranged_mod, reader_mod):
            monkeypatch.setattr(mod, "checksum_parts", counting_parts)
        out, n = cache.get("m", toks)
        assert n == 4 * BT and same(kv, out, n)
        payload = sum(t.numel() * t.element_size() for layer in kv for t in layer)
        assert payload <= counted[0] < 1.2 * payload, (counted[0], payload)


@pytest.mark.parametrize("how", ["get", "loader"])
def test_a_corrupt_byte_truncates_the_prefix_and_is_never_served(tmp_path, how):
    with ssd_cache(tmp_path) as cache:
        toks, kv = fill(cache, 6)
        lease = cache.acquire("m", toks)
        victim = lease.blocks[3].key
        cache.release(lease)
        corrupt(cache, victim, from_end=100)  # in the last layer's V
        if how == "get":
            out, n = cache.get("m", toks)
        else:
            loader = Loader(cache, LoaderConfig(min_read_bytes=1))
            lease = cache.acquire("m", toks)
            out = lease.namespace.layout.empty(lease.tokens)
            stream = loader.load(lease, out)
            n = stream.wait_all(10)
            cache.release(lease)
            loader.close()
        assert n == 3 * BT and same(kv, out, n)
        assert cache.tier("ssd").stats()["corrupt_blocks"] == 1  # the tier's check caught it
        assert cache.stats().tiers["ssd"].corrupt_blocks == 1  # and the cache counted it, once
        assert cache.lookup("m", toks).tokens == 3 * BT  # the corrupt copy is gone


def test_scatter_read_into_unaligned_buffers_goes_through_the_page_cache(tmp_path):
    with ssd_cache(tmp_path) as cache:
        toks, _ = fill(cache, 1)
        ssd = cache.tier("ssd")
        key = cache.acquire("m", toks).blocks[0].key
        whole = aligned_empty(ssd._loc[key].length).numpy()
        assert ssd.read_scatter_into(key, 0, [whole]) == len(whole)
        before = ssd.stats()
        odd = np.empty(len(whole) + 1, dtype=np.uint8)[1:]  # not page-aligned
        parts = [odd[:5000], odd[5000:]]
        assert ssd.read_scatter_into(key, 0, parts) == len(whole)
        assert np.array_equal(odd, whole)
        after = ssd.stats()
        assert after["buffered_reads"] == before["buffered_reads"] + 1
        assert after["direct_reads"] == before["direct_reads"]


def test_staged_ranges_land_in_a_tensor_per_layer_verified_in_one_copy_call_each(tmp_path, monkeypatch):
    """Destination KV a tensor per layer and K/V (a model's own cache: not page-aligned, so each
    range is staged): every range's layers are verified in the slot, then land in one copy call
    (``PrefixKV.decode_layers``), not a decode per layer and tensor; a corrupt layer is refused
    before it is copied and the prefix ends before its block."""
    import kvtier.loader_ranged as ranged_mod
    import kvtier.prefixkv as prefixkv_mod

    per_tensor, grouped = [0], [0]
    real_layer, real_layers = ranged_mod.decode_layer_into, prefixkv_mod.PrefixKV.decode_layers
    monkeypatch.setattr(ranged_mod, "decode_layer_into",
                        lambda *a, **k: per_tensor.__setitem__(0, per_tensor[0] + 1) or real_layer(*a, **k))
    monkeypatch.setattr(prefixkv_mod.PrefixKV, "decode_layers",
                        lambda *a, **k: grouped.__setitem__(0, grouped[0] + 1) or real_layers(*a, **k))
    with ssd_cache(tmp_path) as cache:
        toks, kv = fill(cache, 6)
        loader = Loader(cache, LoaderConfig(min_read_bytes=1))  # a range per layer

        def load_into():
            out = [tuple(torch.full((t.shape[0] + 3, *t.shape[1:]), 7.0)[3:] for t in layer) for layer in kv]
            assert any(t.data_ptr() % 4096 for layer in out for t in layer)  # staged, not direct
            lease = cache.acquire("m", toks)
            try:
                n = loader.load(lease, out).wait_all(10)
            finally:
                cache.release(lease)
            return out, n

        out, n = load_into()
        assert n == 6 * BT and same(kv, out, n)
        assert per_tensor[0] == 0 and grouped[0] == 6 * LAYERS
        lease = cache.acquire("m", toks)
        victim = lease.blocks[3].key
        cache.release(lease)
        corrupt(cache, victim, from_end=100)  # in the last layer's V
        out, n = load_into()
        assert n == 3 * BT and same(kv, out, n)
        assert bool((out[-1][1][3 * BT:4 * BT] == 7.0).all())  # the corrupt range never landed
        assert cache.stats().tiers["ssd"].corrupt_blocks == 1
        loader.close()
