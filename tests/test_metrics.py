"""The Prometheus collector over a cache whose remote engine is unreachable."""

import socket

import pytest
from prometheus_client import generate_latest

from kvtier import CacheConfig, HostTierConfig, RemoteTierConfig, TieredCache
from kvtier.metrics import make_registry
from tests.conftest import random_kv

pytest.importorskip("redis", reason="redis-py missing: pip install 'kvtier[redis]'")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on exit: connections are refused


def test_remote_errors_and_breaker_are_exported_with_tier_remote():
    cfg = CacheConfig(block_tokens=16, host=HostTierConfig(capacity_bytes="1MiB"),
                      remote=RemoteTierConfig(backend="redis", url=f"redis://127.0.0.1:{closed_port()}/0",
                                              timeout_s=0.2, breaker_failures=2, breaker_cooldown_s=60))
    with TieredCache(cfg) as cache:
        cache.register_namespace("m", layout=None)
        cache.put("m", list(range(32)), random_kv(32))
        for i in range(5):  # local misses fall through to the dead remote tier
            assert cache.lookup("m", [100 + i] * 32).tokens == 0
        assert cache.lookup("m", list(range(32))).tokens == 32  # local tiers keep serving
        text = generate_latest(make_registry(cache.stats)[0]).decode()
    errors = sum(float(line.split()[-1]) for line in text.splitlines()
                 if line.startswith("kvtier_tier_errors_total{") and 'tier="remote"' in line)
    assert errors >= 2
    assert 'kvtier_tier_breaker_open{tier="remote"} 1.0' in text
    assert 'kvtier_block_misses_total{tier="remote"}' in text
