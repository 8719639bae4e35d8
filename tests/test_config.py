"""kvtier.config: every closed set and number is checked when a config is built, in one line."""

from __future__ import annotations

from typing import get_args

import pytest

from kvtier.config import (
    ByteCodec,
    CacheConfig,
    DeviceTierConfig,
    HostTierConfig,
    Policy,
    RemoteBackendName,
    RemoteTierConfig,
    SSDTierConfig,
    ValueCodec,
    parse_size,
)
from kvtier.errors import InvalidRequest


@pytest.mark.parametrize(("build", "needles"), [
    (lambda: CacheConfig(codec="lz4"), ["unknown codec 'lz4'", "none, fp8, int8", "zstd"]),
    (lambda: CacheConfig(codec="int8+gzip"), ["'int8+gzip'"]),
    (lambda: CacheConfig(codec="zstd+int8"), ["'zstd+int8'"]),
    (lambda: CacheConfig(block_tokens=0), ["block_tokens"]),
    (lambda: CacheConfig(prefetch_budget=1.5), ["prefetch_budget", "1.5"]),
    (lambda: CacheConfig(reload_pool_bytes="-1GiB"), ["reload_pool_bytes", "'-1GiB'"]),
    (lambda: HostTierConfig(policy="mru"), ["eviction policy 'mru'", "lru, s3fifo"]),
    (lambda: HostTierConfig(page_bytes=0), ["page_bytes"]),
    (lambda: HostTierConfig(capacity_bytes="-1GiB"), [">= 0", "'-1GiB'"]),
    (lambda: DeviceTierConfig(slot_bytes=-4), ["slot_bytes"]),
    (lambda: SSDTierConfig(durability="fast"), ["ssd durability 'fast'", "sync, batch, none"]),
    (lambda: SSDTierConfig(admission="always"), ["admission policy 'always'", "write_through"]),
    (lambda: SSDTierConfig(io_threads=0), ["io_threads"]),
    (lambda: SSDTierConfig(io_threads="8"), ["io_threads", "'8'"]),
    (lambda: SSDTierConfig(direct_io="yes"), ["direct_io", "true or false"]),
    (lambda: SSDTierConfig(compaction_live_fraction=2), ["compaction_live_fraction"]),
    (lambda: SSDTierConfig(compaction_interval_s=0), ["compaction_interval_s"]),
    (lambda: RemoteTierConfig(backend="memcached", url="x"), ["unknown remote backend 'memcached'"]),
    (lambda: RemoteTierConfig(backend="redis"), ["remote.url"]),
    (lambda: RemoteTierConfig(backend="redis", url="redis://h", timeout_s=0), ["timeout_s"]),
    (lambda: RemoteTierConfig(backend="redis", url="redis://h", breaker_failures=0), ["breaker_failures"]),
])
def test_bad_values_fail_in_one_line_naming_the_value(build, needles):
    with pytest.raises(InvalidRequest) as info:
        build()
    msg = str(info.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg


def test_a_nested_value_set_after_construction_is_checked_again():
    cfg = CacheConfig()
    cfg.ssd.durability = "fast"  # what settings do when they apply YAML/env values
    with pytest.raises(InvalidRequest, match="fast"):
        cfg.__post_init__()


def test_good_values_pass():
    for codec in ("none", "fp8", "int8", "zstd", "INT8+zstd", "fp8+zstd", "none+zstd"):
        assert CacheConfig(codec=codec).codec == codec
    cfg = SSDTierConfig(path="x", durability="sync", admission="selective", compaction_interval_s=None)
    assert cfg.durability == "sync"
    assert RemoteTierConfig(backend="mooncake", url="x").backend == "mooncake"
    from pathlib import Path

    assert SSDTierConfig(path=Path("data") / "ssd").path == str(Path("data") / "ssd")
    assert CacheConfig(reload_pool_bytes="1GiB").reload_pool_bytes == 1024**3


def test_the_closed_sets_name_exactly_the_registered_builtins():
    import kvtier.codecs
    import kvtier.policies
    import kvtier.tiers.remote  # noqa: F401  (each registers its built-ins on import)
    from kvtier.codecs.base import _BYTE_CODECS, _VALUE_CODECS
    from kvtier.policies.base import _POLICIES
    from kvtier.tiers.remote.base import _REGISTRY

    assert set(get_args(ValueCodec)) == set(_VALUE_CODECS)
    assert set(get_args(ByteCodec)) == set(_BYTE_CODECS)
    assert set(get_args(Policy)) == set(_POLICIES)
    assert set(get_args(RemoteBackendName)) == set(_REGISTRY)


def test_parse_size():
    assert parse_size("64MiB") == 64 * 1024**2 and parse_size("1.5GB") == 1_500_000_000
    for bad in ("-1GiB", " -5", "12 parsecs", True):
        with pytest.raises(InvalidRequest):
            parse_size(bad)
