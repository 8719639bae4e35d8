"""Prefetch: policies, timeout with contiguous readiness, budget, cancellation, SSD-free serving."""

from __future__ import annotations

import threading

import pytest

from kvtier.loader import Loader
from kvtier.prefetch import PrefetchTimeout
from tests.test_loader import BT, fill, split_cache


def ssd_only_prefixes(cache, n: int, blocks: int = 8):
    """``n`` prefixes of ``blocks`` blocks that live only on SSD (pushed out of host by a filler)."""
    prefixes = [fill(cache, blocks * BT, seed=s)[0] for s in range(1, n + 1)]
    fill(cache, 16 * BT, seed=99)  # as big as the host tier: pushes the others down
    for toks in prefixes:
        lease = cache.acquire("m", toks)
        assert [b.tiers for b in lease.blocks] == [["ssd"]] * blocks
        cache.release(lease)
    return prefixes


# A host tier of 8 blocks whose prefetch budget holds one 8-block prefix, not two.
BUDGET = 0.75


def test_prefetched_prefix_is_served_without_touching_ssd(tmp_path):
    with split_cache(tmp_path, host_blocks=16, prefetch_budget=BUDGET) as cache:
        (toks,) = ssd_only_prefixes(cache, 1)
        h = cache.prefetch("m", toks, "host", policy="wait_complete")
        assert h.state == "done" and h.ready_tokens == 8 * BT
        ssd = cache.tier("ssd")
        before = ssd.reads
        loader = Loader(cache)
        lease = cache.acquire("m", toks)
        assert all(b.tiers[0] == "host" for b in lease.blocks)
        stream = loader.load(lease, lease.namespace.layout.empty(lease.tokens))
        assert stream.wait_all(10) == 8 * BT
        cache.release(lease)
        assert ssd.reads == before
        loader.close()


def test_timeout_reports_the_contiguous_tokens_that_arrived(tmp_path):
    with split_cache(tmp_path, host_blocks=16, delay=0.05) as cache:
        (toks,) = ssd_only_prefixes(cache, 1)
        h = cache.prefetch("m", toks, "host", policy="timeout", timeout_s=0.12)
        assert h.state == "timeout" and h.error
        ready = h.ready_tokens
        assert ready % BT == 0 and ready < 8 * BT
        cache.flush(5)
        cache._prefetcher._pool.submit(lambda: None).result(10)  # the worker has stopped
        assert h.ready_tokens == ready  # frozen at the timeout
        lease = cache.acquire("m", toks)
        in_host = [("host" in b.tiers) for b in lease.blocks]
        cache.release(lease)
        assert all(in_host[: ready // BT])
        assert cache.stats().prefetch["timeout"] == 1


def test_default_timeout_grows_with_length_and_is_capped():
    t = PrefetchTimeout(base_s=0.1, tokens_per_s=1000, cap_s=2.0)
    assert t.seconds(0) == pytest.approx(0.1)
    assert t.seconds(100) < t.seconds(1000) <= 2.0
    assert t.seconds(10**9) == 2.0


def test_budget_is_never_exceeded_and_frees_once_used(tmp_path):
    with split_cache(tmp_path, host_blocks=16, prefetch_budget=BUDGET) as cache:
        a, b = ssd_only_prefixes(cache, 2)
        budget = cache.prefetch_budget("host")
        limit = budget.limit(cache.tier("host").capacity_bytes)
        over, stop = [], threading.Event()

        def watch():
            while not stop.is_set():
                if budget.held_bytes > limit:
                    over.append(budget.held_bytes)
                stop.wait(0.0005)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            ha = cache.prefetch("m", a, "host")
            hb = cache.prefetch("m", b, "host")
            assert ha.wait(10) and hb.wait(10)
        finally:
            stop.set()
            watcher.join()
        assert not over
        assert budget.held_bytes <= limit
        assert "budget" in (ha.stopped_by, hb.stopped_by)
        assert ha.ready_tokens + hb.ready_tokens < 16 * BT
        cache.lookup("m", a)  # a reader used the prefetched blocks: they stop counting
        cache.lookup("m", b)
        assert cache.prefetch_budget("host").held_bytes == 0
        h = cache.prefetch("m", b, "host", policy="wait_complete")
        assert h.state == "done" and h.ready_tokens == 8 * BT and h.stopped_by is None


def test_cancel_and_bad_policy(tmp_path):
    with split_cache(tmp_path, host_blocks=16, delay=0.05) as cache:
        (toks,) = ssd_only_prefixes(cache, 1)
        h = cache.prefetch("m", toks, "host")
        assert h.cancel()
        assert h.wait(10) and h.state == "cancelled" and h.ready_tokens < 8 * BT
        assert not h.cancel()
        with pytest.raises(ValueError, match="policy"):
            cache.prefetch("m", toks, "host", policy="eventually")


def test_a_sidecar_prefetch_says_whether_cancel_stopped_it(tmp_path):
    """``RemotePrefetch.cancel()`` answers as ``PrefetchHandle.cancel()``: True only if this call
    stopped a prefetch still running. It used to answer from the handle's own last state, so
    a prefetch that had finished on the server since was reported stopped."""
    from kvtier.client import KVTierClient
    from kvtier.server.testing import serve_in_thread

    with split_cache(tmp_path, host_blocks=16, delay=0.05) as cache, serve_in_thread(cache) as url, \
            KVTierClient(url) as client:
        first, second = ssd_only_prefixes(cache, 2)
        running = client.prefetch("m", first, "host")
        assert running.cancel()
        assert running.wait(10) and running.state == "cancelled"
        assert not running.cancel()
        finished = client.prefetch("m", second, "host")
        assert client.prefetch_status(finished.id).wait(30)  # done on the server; this handle
        assert finished.state != "done"                      # has not looked since
        assert not finished.cancel()
        assert finished.state == "done"
