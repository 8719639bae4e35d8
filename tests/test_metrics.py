"""The Prometheus collector: per-namespace counters, and a cache whose remote engine is down."""

import socket

import pytest
from prometheus_client import generate_latest

from kvtier import CacheConfig, HostTierConfig, RemoteTierConfig, TieredCache
from kvtier.metrics import make_registry
from tests.conftest import random_kv


def sample(text: str, line_start: str) -> float:
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(line_start)]
    assert len(values) == 1, f"expected one sample starting {line_start!r}, got {values}"
    return values[0]


def test_namespace_counters_follow_lookups_and_puts_and_go_with_the_namespace():
    with TieredCache(CacheConfig(block_tokens=16, host=HostTierConfig(capacity_bytes="1MiB"))) as cache:
        registry = make_registry(cache.stats)[0]
        cache.register_namespace("a", layout=None)
        cache.register_namespace("b", layout=None)
        cache.put("a", list(range(48)), random_kv(48))
        assert cache.lookup("a", list(range(40))).tokens == 32  # 2 full blocks hit of 40 tokens
        assert cache.lookup("b", list(range(16))).tokens == 0  # b has a layout only after a put
        cache.put("b", list(range(16)), random_kv(16))
        assert cache.lookup("b", list(range(32))).tokens == 16
        text = generate_latest(registry).decode()
        assert sample(text, 'kvtier_namespace_lookups_total{namespace="a"}') == 1
        assert sample(text, 'kvtier_namespace_lookup_tokens_total{namespace="a"}') == 40
        assert sample(text, 'kvtier_namespace_lookup_hit_tokens_total{namespace="a"}') == 32
        assert sample(text, 'kvtier_namespace_put_tokens_total{namespace="a"}') == 48
        assert sample(text, 'kvtier_namespace_lookups_total{namespace="b"}') == 2
        assert sample(text, 'kvtier_namespace_lookup_hit_tokens_total{namespace="b"}') == 16
        s = cache.stats()
        assert sum(n.lookups for n in s.namespaces.values()) == s.lookups
        assert sum(n.tokens_hit for n in s.namespaces.values()) == s.tokens_hit
        assert s.to_dict()["namespaces"]["a"]["hit_rate_tokens"] == 32 / 40
        cache.drop_namespace("a")
        text = generate_latest(registry).decode()
        assert 'namespace="a"' not in text and 'namespace="b"' in text


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on exit: connections are refused


def test_remote_errors_and_breaker_are_exported_with_tier_remote():
    pytest.importorskip("redis", reason="redis-py missing: pip install 'kvtier[redis]'")
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
