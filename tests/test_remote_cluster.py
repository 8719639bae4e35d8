"""RedisBackend/RemoteTier on a real 3-node Redis Cluster: spread, whole reloads, a lost node."""

from __future__ import annotations

import contextlib
import os
import time

import pytest
import torch

from kvtier.config import RemoteTierConfig
from kvtier.tiers.base import BlockMeta
from kvtier.tiers.remote import make_remote_tier
from tests.conftest import random_bytes
from tests.integration.remote_servers import (
    REDIS_CLI,
    REDIS_SERVER,
    SKIP_REASON,
    RedisCluster,
    glob_escape,
    wait_for,
)

pytestmark = pytest.mark.skipif(not (REDIS_SERVER and REDIS_CLI), reason=SKIP_REASON)
redis = pytest.importorskip("redis", reason="redis-py missing: pip install 'kvtier[redis]'")

TIMEOUT = 0.5
MARGIN = 0.75
CHUNK = 256 * 1024
META = BlockMeta("ns", None, 16, "none", 0.0)


@pytest.fixture(scope="module")
def cluster():
    c = RedisCluster(3).start()
    yield c
    c.stop()


@pytest.fixture
def tier(cluster):
    cfg = RemoteTierConfig(backend="redis-cluster", url=cluster.url, timeout_s=TIMEOUT)
    t = make_remote_tier(cfg, breaker_failures=3, breaker_cooldown_s=0.3, chunk_bytes=CHUNK,
                         prefix=f"c{os.getpid()}:")
    yield t
    t.close()



def _node_clients(cluster):
    return [redis.Redis(host="127.0.0.1", port=n.port) for n in cluster.nodes]


def test_prefix_and_multichunk_value_spread_over_all_nodes_and_reload_whole(cluster, tier):
    before = cluster.dbsizes()
    prefix = [(os.urandom(16), random_bytes(CHUNK // 2 + i, i)) for i in range(24)]
    big_key, big = os.urandom(16), random_bytes(12 * CHUNK + 5, 99)
    for key, data in [*prefix, (big_key, big)]:
        tier.put(key, data, META)
    assert tier.flush(15)
    assert tier.stats()["put_failures"] == 0
    grown = [a - b for a, b in zip(cluster.dbsizes(), before, strict=True)]
    assert all(g > 0 for g in grown), grown
    assert sum(grown) == 24 + 1 + 13
    chunk_pattern = glob_escape(tier.backend.prefix + big_key) + b"#*"
    holders = [len(c.keys(chunk_pattern)) for c in _node_clients(cluster)]
    assert sum(holders) == 13 and sum(h > 0 for h in holders) >= 2, holders

    assert tier.contains_many([k for k, _ in prefix] + [big_key]) == [True] * 25
    for key, data in [*prefix, (big_key, big)]:
        out = torch.empty_like(data)
        tier.read_into(key, out)
        assert torch.equal(out, data)


def test_losing_a_node_gives_bounded_misses_and_recovery(cluster, tier):
    victim = cluster.nodes[1]
    on_victim = redis.Redis(host="127.0.0.1", port=victim.port)
    keys: list[bytes] = []
    hit: list[bytes] = []  # keys with a part on the victim: reading them fails once it is gone
    while len(keys) < 12 or len(hit) < 3:  # random keys: 3 on the victim, whatever the slots
        assert len(keys) < 200
        k = os.urandom(16)
        tier.put(k, random_bytes(CHUNK + len(keys), len(keys)), META)
        assert tier.flush(15)
        keys.append(k)
        if on_victim.keys(glob_escape(tier.backend.prefix + k) + b"*"):
            hit.append(k)
    on_victim.close()
    assert tier.contains_many(keys) == [True] * len(keys)

    victim.kill()
    durations, found_any_false = [], False
    deadline = time.monotonic() + 4.0
    while time.monotonic() < deadline:  # mid-workload: before and after the cluster notices
        t0 = time.perf_counter()
        found = tier.contains_many(keys)
        durations.append(time.perf_counter() - t0)
        found_any_false |= not all(found)
        for k in hit[:3]:  # 3 failures in a row open the breaker (reads of other keys would not)
            t0 = time.perf_counter()
            with contextlib.suppress(KeyError):
                tier.read_into(k, torch.empty(CHUNK, dtype=torch.uint8))
            durations.append(time.perf_counter() - t0)
    assert max(durations) <= TIMEOUT + MARGIN, max(durations)
    s = tier.stats()
    assert found_any_false and s["errors"] + s["timeouts"] > 0
    assert s["breaker"]["opens"] >= 1

    victim.start()  # rejoins from its nodes.conf, empty
    wait_for(cluster.ok, 20.0, "cluster_state:ok after the node came back")
    wait_for(lambda: tier.contains_many(keys[:1]) is not None and tier.breaker.state == "closed",
             15.0, "breaker to close after the node came back")
    for i, k in enumerate(keys):
        tier.put(k, random_bytes(CHUNK + i, i), META)
    assert tier.flush(15)
    wait_for(lambda: tier.contains_many(keys) == [True] * len(keys), 10.0, "all keys served again")
