"""RemoteTier over a real redis-server: async bounded writes, misses on failure, the breaker."""

from __future__ import annotations

import os
import time

import pytest
import torch

from kvtier.config import RemoteTierConfig
from kvtier.errors import BackendUnavailable, CorruptBlock, InvalidRequest, StorageFull
from kvtier.tiers.base import BlockMeta, Tier
from kvtier.tiers.remote import RemoteTier, make_remote_tier
from tests.conftest import random_bytes
from tests.integration.remote_servers import wait_for

pytest.importorskip("redis", reason="redis-py missing: pip install 'kvtier[redis]'")

TIMEOUT = 0.5
MARGIN = 0.75  # scheduling slack on a shared 2-core machine; a bound, not a speed goal
META = BlockMeta("ns", None, 16, "none", 0.0)


def _tier(redis_server, **kw) -> RemoteTier:
    cfg = RemoteTierConfig(backend="redis", url=redis_server.url, timeout_s=TIMEOUT,
                           max_inflight_bytes=kw.pop("max_inflight_bytes", 64 * 1024**2))
    tier = make_remote_tier(cfg, breaker_failures=3, breaker_cooldown_s=0.3,
                            chunk_bytes=1024**2, **kw)
    assert tier is not None
    return tier



def _timed(fn, *args):
    t0 = time.perf_counter()
    try:
        result = fn(*args)
    except (KeyError, StorageFull) as e:
        result = type(e)
    return result, time.perf_counter() - t0


def test_async_put_then_batched_lookup_and_bit_exact_reload(redis_server):
    tier = _tier(redis_server)
    try:
        assert isinstance(tier, Tier)
        blocks = {os.urandom(16): random_bytes(n, n) for n in (4096, 2 * 1024**2, 3 * 1024**2 + 1)}
        for key, data in blocks.items():
            tier.put(key, data, META)
        assert tier.flush(10)
        missing = os.urandom(16)
        assert tier.contains_many([*blocks, missing]) == [True, True, True, False]
        for key, data in blocks.items():
            out = torch.empty_like(data)
            assert tier.read_into(key, out) == data.numel()
            assert torch.equal(out, data)
            assert tier.size(key) == data.numel()
        part = torch.empty(100, dtype=torch.uint8)
        key3 = list(blocks)[2]
        tier.read_into(key3, part, offset=1024**2 - 50)
        assert torch.equal(part, blocks[key3][1024**2 - 50:1024**2 + 50])
        with pytest.raises(KeyError):
            tier.read_into(missing, torch.empty(4, dtype=torch.uint8))
        assert list(tier.scan()) == []
        s = tier.stats()
        assert (s["hits"], s["misses"]) == (3, 1)
        assert s["blocks_written"] == 3 and s["bytes_written"] == sum(d.numel() for d in blocks.values())
        assert s["blocks_read"] == 4 and s["read_misses"] == 1
        assert s["read_seconds"]["count"] == 4 and s["errors"] == 0
        assert s["breaker"]["state"] == "closed" and s["backend"] == "redis"
        assert tier.delete(key3) is True and tier.delete(key3) is False
    finally:
        tier.close()


def test_put_copies_the_callers_buffer(redis_server):
    tier = _tier(redis_server)
    try:
        key, data = os.urandom(16), random_bytes(8192, 1)
        expected = data.clone()
        tier.put(key, data, META)
        data.zero_()  # the caller reuses its buffer right away
        assert tier.flush(10)
        out = torch.empty(8192, dtype=torch.uint8)
        tier.read_into(key, out)
        assert torch.equal(out, expected)
    finally:
        tier.close()


def test_inflight_bound_drops_and_counts_never_blocks(redis_server):
    tier = _tier(redis_server, max_inflight_bytes=3 * 1024**2)
    try:
        redis_server.pause()  # writes hang until their timeout, so bytes stay in flight
        results, durations = [], []
        for i in range(6):
            r, dt = _timed(tier.put, os.urandom(16), random_bytes(1024**2, i), META)
            results.append(r)
            durations.append(dt)
        assert results == [None] * 3 + [StorageFull] * 3
        s = tier.stats()
        assert s["puts"] == 3 and s["puts_dropped_inflight"] == 3
        assert s["inflight_bytes"] <= 3 * 1024**2
        assert max(durations) < TIMEOUT  # queued or dropped, never waiting on the engine
        assert tier.can_fit(1024**2) and not tier.fits_ever(3 * 1024**2 + 1)
        redis_server.resume()
        assert tier.flush(TIMEOUT * 3 + 5)
        assert tier.stats()["inflight_bytes"] == 0
    finally:
        redis_server.resume()
        tier.close()


def _workload_round(tier, keys, out):
    """One lookup and one reload per key; returns each call's duration."""
    durations = []
    _, dt = _timed(tier.contains_many, keys)
    durations.append(dt)
    for k in keys:
        _, dt = _timed(tier.read_into, k, out)
        durations.append(dt)
    return durations


@pytest.mark.parametrize("outage", ["kill", "hang"])
def test_engine_outage_gives_bounded_misses_then_recovers(redis_server, outage):
    tier = _tier(redis_server)
    try:
        keys = [os.urandom(16) for _ in range(4)]
        for i, k in enumerate(keys):
            tier.put(k, random_bytes(2 * 1024**2, i), META)
        assert tier.flush(10)
        out = torch.empty(2 * 1024**2, dtype=torch.uint8)
        assert all(dt < TIMEOUT + MARGIN for dt in _workload_round(tier, keys, out))

        redis_server.kill() if outage == "kill" else redis_server.pause()
        durations = []
        for _ in range(4):
            durations += _workload_round(tier, keys, out)
            assert tier.contains_many(keys) == [False] * 4  # errors are misses
        assert max(durations) <= TIMEOUT + MARGIN, durations
        s = tier.stats()
        assert s["errors"] + s["timeouts"] >= 3
        assert (s["timeouts"] if outage == "hang" else s["errors"]) >= 1
        assert s["breaker"]["opens"] >= 1 and s["short_circuits"] > 0
        # While open, puts are dropped instead of queued behind a dead engine.
        if tier.breaker.state == "open":
            with pytest.raises(BackendUnavailable, match="breaker is open"):
                tier.put(os.urandom(16), random_bytes(100, 9), META)
            assert tier.stats()["puts_dropped_breaker"] >= 1

        if outage == "kill":
            redis_server.start()
        else:
            redis_server.resume()
        wait_for(lambda: tier.contains_many(keys[:1]) is not None and tier.breaker.state == "closed",
                 10.0, "breaker to close after the engine came back")
        if outage == "kill":  # a restarted, non-persistent engine lost its data
            for i, k in enumerate(keys):
                tier.put(k, random_bytes(2 * 1024**2, i), META)
            assert tier.flush(10)
        assert tier.contains_many(keys) == [True] * 4
        tier.read_into(keys[2], out)
        assert torch.equal(out, random_bytes(2 * 1024**2, 2))
    finally:
        redis_server.resume() if redis_server.proc else None
        tier.close()


def test_corrupt_remote_block_raises_and_is_dropped(redis_server):
    tier = _tier(redis_server)
    try:
        key = os.urandom(16)
        tier.put(key, random_bytes(5000, 3), META)
        assert tier.flush(10)
        raw = tier.backend.raw_client()
        raw.setrange(tier.backend.prefix + key, 100, b"\x00\xff\x00")
        with pytest.raises(CorruptBlock):
            tier.read_into(key, torch.empty(5000, dtype=torch.uint8))
        assert tier.contains(key) is False
        assert tier.stats()["corrupt_blocks"] == 1
        assert tier.breaker.state == "closed"  # corrupt data is not an engine failure
    finally:
        tier.close()


def test_factory_validates_config():
    assert make_remote_tier(RemoteTierConfig()) is None
    with pytest.raises(InvalidRequest, match="unknown remote backend 'memcached'"):
        make_remote_tier(RemoteTierConfig(backend="memcached", url="x"))
    with pytest.raises(InvalidRequest, match="remote.url"):
        make_remote_tier(RemoteTierConfig(backend="redis"))
    with pytest.raises(InvalidRequest, match="timeout_s"):
        make_remote_tier(RemoteTierConfig(backend="redis", url="redis://127.0.0.1:1", timeout_s=0))


def test_unreachable_engine_at_startup_is_a_miss_not_an_error():
    cfg = RemoteTierConfig(backend="redis-cluster", url="redis://127.0.0.1:1", timeout_s=TIMEOUT)
    tier = make_remote_tier(cfg)
    try:
        found, dt = _timed(tier.contains_many, [os.urandom(16)])
        assert found == [False] and dt <= TIMEOUT + MARGIN
        assert tier.stats()["errors"] == 1
    finally:
        tier.close()
