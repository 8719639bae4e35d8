"""The manager over a real Redis remote tier: what a drop does to the shared copy, and no
network call under the manager's lock."""

from __future__ import annotations

import threading

from kvtier import CacheConfig, HostTierConfig, RemoteTierConfig, TieredCache
from tests.conftest import random_kv
from tests.integration.remote_servers import wait_for

BT = 16
TIMEOUT = 1.0  # a frozen engine holds each call this long


def cache(redis_server, host="64KiB", inflight="64MiB") -> TieredCache:
    return TieredCache(CacheConfig(block_tokens=BT, host=HostTierConfig(capacity_bytes=host, page_bytes="16KiB"),
                                   remote=RemoteTierConfig(backend="redis", url=redis_server.url, timeout_s=TIMEOUT,
                                                           breaker_failures=100, max_inflight_bytes=inflight)))


def prompt(i):
    return [i * 1000 + j for j in range(2 * BT)], random_kv(2 * BT, seed=i)


def remote_keys(redis_server) -> int:
    return int(redis_server.cli("DBSIZE"))


def test_capacity_drops_keep_the_shared_copy_and_evict_deletes_it(redis_server):
    with cache(redis_server) as c:
        for i in range(30):  # far more than the host tier holds
            c.put("m", *prompt(i))
        c.flush(30)
        c.tier("remote").flush(30)
        assert c.stats().tiers["host"].evictions["capacity"] > 0
        wait_for(lambda: remote_keys(redis_server) >= 60, 10, "all 60 blocks in redis")
        toks, kv = prompt(0)  # long gone from host: still a hit through the remote tier
        assert c.lookup("m", toks).tiers == {"remote": 2}
        out, n = c.get("m", toks)
        assert n == 2 * BT
        before = remote_keys(redis_server)
        assert c.evict("m", toks) == 2  # explicit eviction deletes the shared copy too
        assert remote_keys(redis_server) == before - 2
        assert c.lookup("m", toks).tokens == 0


class LockWatch:
    """Wraps the remote backend's engine calls: counts them, and those made by a thread that
    holds the manager's lock (each would stall every other cache call for up to a timeout)."""

    CALLS = ("exists_many", "put", "get_into", "size", "delete")

    def __init__(self, cache: TieredCache) -> None:
        self.lock = cache._placement.lock
        self.backend = cache.tier("remote").backend
        self.calls = 0
        self.under_lock: list[str] = []
        for name in self.CALLS:
            setattr(self.backend, name, self._watch(name, getattr(self.backend, name)))

    def _watch(self, name, fn):
        def call(*args, **kw):
            self.calls += 1
            if self.lock._is_owned():  # RLock: held by this very thread
                self.under_lock.append(name)
            return fn(*args, **kw)
        return call


def test_a_frozen_engine_never_stalls_the_lock(redis_server):
    """Writes pile up past the in-flight bound while the engine is frozen: the manager must not
    make room by evicting (deleting) remote blocks under its lock, nor call the engine there."""
    with cache(redis_server, inflight="96KiB") as c:
        watch = LockWatch(c)
        for i in range(10):
            c.put("m", *prompt(i))
        c.flush(30)
        c.tier("remote").flush(30)
        redis_server.pause()  # SIGSTOP: every remote call now waits for its timeout
        try:
            stop = threading.Event()
            puts = 0

            def churn():  # local puts keep dropping blocks whose copies are remote
                nonlocal puts
                i = 100
                while not stop.is_set():
                    c.put("m", *prompt(i))
                    c.lookup("m", prompt(i - 50)[0])  # asks the frozen engine: a timed-out call
                    i += 1
                    puts += 1

            t = threading.Thread(target=churn)
            t.start()
            wait_for(lambda: puts >= 5 and watch.calls >= 5, 120, "churn against the frozen engine")
            stop.set()
            t.join(60)
        finally:
            redis_server.resume()
        assert watch.under_lock == [], f"engine calls made under the manager's lock: {watch.under_lock}"
        assert c.stats().tiers["remote"].evictions["capacity"] == 0  # nothing shared was deleted
