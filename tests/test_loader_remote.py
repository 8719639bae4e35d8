"""The loader over a real remote tier (Redis and Mooncake): a prefix another instance stored
comes back whole and exact, a batch of blocks per engine call, never a round trip per layer."""

from __future__ import annotations

import os
import threading

import pytest

from kvtier import CacheConfig, HostTierConfig, RemoteTierConfig, TieredCache
from kvtier.layout import KVLayout
from kvtier.loader import Loader, LoaderConfig
from tests.conftest import random_kv
from tests.test_loader import load, same

BT = 32
LAYERS = 4
BLOCKS = 6
# 32 tokens x 4 layers x (K, V) x 8 heads x 64 dims x 4 B = 512 KiB a block: Mooncake reads it direct.
KV = dict(layers=LAYERS, heads=8, dim=64)


@pytest.fixture(params=["redis", "mooncake"])
def engine(request):
    """(backend name, url) of a real engine on loopback."""
    if request.param == "redis":
        return "redis", request.getfixturevalue("redis_server").url
    return "mooncake", request.getfixturevalue("mooncake_store").url


def cache(engine, prefix: str, promote: bool = True) -> TieredCache:
    backend, url = engine
    c = TieredCache(CacheConfig(
        block_tokens=BT, promote_on_get=promote,
        host=HostTierConfig(capacity_bytes="16MiB", page_bytes="1MiB"),
        remote=RemoteTierConfig(backend=backend, url=url, timeout_s=5.0, key_prefix=prefix,
                                max_inflight_bytes="64MiB")))
    # An instance that never saw the prompt knows its model's layout, as any engine does.
    c.register_namespace("m", layout=KVLayout(LAYERS, ((KV["heads"], KV["dim"]),) * 2, "float32"))
    return c


class Calls:
    """Counts the remote tier's read calls (the loader must batch, not read per range)."""

    def __init__(self, tier) -> None:
        self.batches, self.blocks, self.ranges = 0, 0, 0
        self._lock = threading.Lock()
        batch, one = tier.read_blocks_into, tier.read_into

        def read_blocks_into(keys, outs):
            with self._lock:
                self.batches += 1
                self.blocks += len(keys)
            return batch(keys, outs)

        def read_into(key, out, offset=0):
            with self._lock:
                self.ranges += 1
            return one(key, out, offset)

        tier.read_blocks_into, tier.read_into = read_blocks_into, read_into


def shared_prefix(engine, seed: int):
    """A prefix put through one instance (host + remote), flushed to the engine."""
    prefix = f"kvtier-test-{os.urandom(4).hex()}"
    toks = [seed * 100_000 + j for j in range(BLOCKS * BT)]
    kv = random_kv(BLOCKS * BT, seed=seed, **KV)
    with cache(engine, prefix) as a:
        a.put("m", toks, kv)
        a.flush(30)
        assert a.tier("remote").flush(30)
    return prefix, toks, kv


def test_a_prefix_from_the_remote_tier_loads_exactly_in_batches(engine):
    prefix, toks, kv = shared_prefix(engine, seed=1)
    with cache(engine, prefix) as b:
        assert b.lookup("m", toks).tiers == {"remote": BLOCKS}
        calls = Calls(b.tier("remote"))
        loader = Loader(b, LoaderConfig(staging_slots=4))  # batches of 2 blocks: 3 calls
        stream, dest = load(b, loader, toks)
        assert stream.error is None and stream.tokens == BLOCKS * BT
        assert same(kv, dest, BLOCKS * BT)
        if engine[0] == "mooncake":  # one engine call per batch of 2, nothing else
            assert (calls.batches, calls.blocks, calls.ranges) == (3, BLOCKS, 0)
        else:  # redis-py has no batched read into memory: one whole read per block, in parallel
            assert (calls.batches, calls.blocks, calls.ranges) == (BLOCKS, BLOCKS, BLOCKS)
        assert b.stats().tiers["remote"].blocks_read == BLOCKS
        loader.flush(30)  # promoted from the bytes read: the next turn is a host hit
        assert b.lookup("m", toks).tiers == {"host": BLOCKS}
        loader.close()


def test_a_block_lost_from_the_remote_tier_truncates_to_a_correct_prefix(engine):
    prefix, toks, kv = shared_prefix(engine, seed=2)
    with cache(engine, prefix, promote=False) as b:
        lease = b.acquire("m", toks)
        try:
            assert [blk.tiers[0] for blk in lease.blocks] == ["remote"] * BLOCKS
            b.tier("remote").delete(lease.blocks[3].key)  # gone from the engine after the lookup
            dest = lease.namespace.layout.empty(lease.tokens)
            loader = Loader(b, LoaderConfig(staging_slots=4))
            stream = loader.load(lease, dest)
            stream.wait_all(30)
        finally:
            b.release(lease)
        assert stream.tokens == 3 * BT  # blocks 0-2, exact; block 3 and after are not served
        assert same(kv, dest, 3 * BT)
        loader.close()


def test_sizes_learned_by_a_load_are_remembered(engine):
    """Blocks found by a remote existence query have no size yet: the first load asks the engine
    (all at once), later leases carry the answer and go straight to the batched read."""
    prefix, toks, kv = shared_prefix(engine, seed=3)
    with cache(engine, prefix, promote=False) as b:
        tier = b.tier("remote")
        asked = []
        real = tier.size
        tier.size = lambda key: asked.append(key) or real(key)
        loader = Loader(b, LoaderConfig(staging_slots=4))
        for turn in range(2):
            stream, dest = load(b, loader, toks)
            assert stream.tokens == BLOCKS * BT and same(kv, dest, BLOCKS * BT)
            assert len(asked) == BLOCKS, f"turn {turn}: {len(asked)} size queries"
        loader.close()
