"""The tier factory (``kvtier.tiers.factory``): every tier kind a config names is built, fastest
first, with the configured sizes and policies; a bad setting fails in one line before any tier
is allocated, even one assigned after the config was built."""

from __future__ import annotations

import pytest

import kvtier.tiers.memory as memory
from kvtier.config import (
    CacheConfig,
    DeviceTierConfig,
    HostTierConfig,
    RemoteTierConfig,
    SSDTierConfig,
)
from kvtier.errors import InvalidRequest, KVTierError
from kvtier.tiers.base import MemoryTier, SharedIndex
from kvtier.tiers.factory import build_tiers, policy_name
from kvtier.tiers.remote import RemoteTier
from kvtier.tiers.ssd import SSDTier

MiB = 1024**2


def ssd_config(path, **kw) -> SSDTierConfig:
    return SSDTierConfig(path=str(path), capacity_bytes=64 * MiB, segment_bytes=MiB, min_free_bytes=0,
                         direct_io=False, compaction_interval_s=None, **kw)


def close(tiers) -> None:
    for t in tiers:
        t.close()


def test_every_tier_kind_is_built_fastest_first_as_configured(tmp_path, redis_server):
    cfg = CacheConfig(device=DeviceTierConfig(capacity_bytes=2 * MiB, policy="s3fifo"),
                      host=HostTierConfig(capacity_bytes=4 * MiB, pinned=False),
                      ssd=ssd_config(tmp_path / "ssd", policy="s3fifo"),
                      remote=RemoteTierConfig(backend="redis", url=redis_server.url, key_prefix="factory"))
    tiers = build_tiers(cfg)
    try:
        assert [t.name for t in tiers] == ["device", "host", "ssd", "remote"]
        dev, hst, disk, rem = tiers
        assert isinstance(dev, MemoryTier) and isinstance(hst, MemoryTier)
        assert (dev.capacity_bytes, hst.capacity_bytes, disk.capacity_bytes) == (2 * MiB, 4 * MiB, 64 * MiB)
        assert isinstance(disk, SSDTier) and disk.persistent and (tmp_path / "ssd" / "segments").is_dir()
        assert isinstance(rem, RemoteTier) and isinstance(rem, SharedIndex)
        assert [policy_name(cfg, t) for t in tiers] == ["s3fifo", "lru", "s3fifo", "lru"]
    finally:
        close(tiers)


def test_only_the_configured_tiers_are_built(tmp_path):
    host_only = build_tiers(CacheConfig(host=HostTierConfig(capacity_bytes=MiB, pinned=False)))
    assert [t.name for t in host_only] == ["host"]
    close(host_only)
    ssd_only = build_tiers(CacheConfig(host=HostTierConfig(capacity_bytes=0), ssd=ssd_config(tmp_path)))
    assert [t.name for t in ssd_only] == ["ssd"]
    close(ssd_only)
    with pytest.raises(KVTierError, match="no tier is configured") as e:
        build_tiers(CacheConfig(host=HostTierConfig(capacity_bytes=0)))
    assert "\n" not in str(e.value)


@pytest.fixture
def allocations(monkeypatch) -> list[str]:
    """The memory tiers the factory allocates, in order."""
    made: list[str] = []
    for name in ("make_device_tier", "make_host_tier"):
        real = getattr(memory, name)

        def spy(config, _real=real, _name=name):
            made.append(_name)
            return _real(config)

        monkeypatch.setattr(memory, name, spy)
    return made


@pytest.mark.parametrize("field, value, words", [
    ("durability", "fsync", "unknown ssd durability 'fsync'"),
    ("admission", "sometimes", "unknown ssd admission policy 'sometimes'"),
    ("policy", "mru", "unknown eviction policy 'mru'"),
])
def test_a_bad_setting_fails_in_one_line_before_anything_is_allocated(tmp_path, allocations, field,
                                                                       value, words):
    with pytest.raises(InvalidRequest, match=words) as e:
        CacheConfig(ssd=SSDTierConfig(path=str(tmp_path / "a"), **{field: value}))
    assert "\n" not in str(e.value) and "expected one of" in str(e.value)
    cfg = CacheConfig(host=HostTierConfig(capacity_bytes=MiB, pinned=False), ssd=ssd_config(tmp_path / "b"))
    setattr(cfg.ssd, field, value)  # assigned after the config was checked
    with pytest.raises(InvalidRequest, match=words) as e:
        build_tiers(cfg)
    assert "\n" not in str(e.value)
    assert allocations == [] and not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_bad_remote_or_codec_fails_before_anything_is_allocated(tmp_path, allocations):
    with pytest.raises(InvalidRequest, match="unknown remote backend 'memcached'"):
        RemoteTierConfig(backend="memcached", url="redis://127.0.0.1:1/0")
    with pytest.raises(InvalidRequest, match="needs remote.url"):
        RemoteTierConfig(backend="redis")
    cfg = CacheConfig(host=HostTierConfig(capacity_bytes=MiB, pinned=False), ssd=ssd_config(tmp_path / "c"))
    cfg.codec = "lz4"
    with pytest.raises(InvalidRequest, match="unknown codec 'lz4'"):
        build_tiers(cfg)
    cfg.codec = "none"
    cfg.remote.backend = "memcached"
    with pytest.raises(InvalidRequest, match="unknown remote backend 'memcached'"):
        build_tiers(cfg)
    assert allocations == [] and not (tmp_path / "c").exists()



def test_kind_check_answers_as_isinstance_and_asks_once_per_tier():
    """A load asks a capability of every block's tier; the answer is remembered per tier (a
    runtime Protocol check is slow), so a check is asked once per tier, not per block."""
    from typing import Protocol, runtime_checkable

    from kvtier.tiers.base import ScatterReads, kind_check

    class Scatter:
        def read_scatter_into(self, key, offset, outs):
            return 0

    host = memory.make_host_tier(HostTierConfig(capacity_bytes=1 << 20))
    check = kind_check(ScatterReads)
    assert check(Scatter()) and not check(host)
    assert check(memory.make_host_tier(HostTierConfig(capacity_bytes=1 << 20))) is False

    @runtime_checkable
    class Ready(Protocol):  # a data member: isinstance looks at the object every time
        ready: bool

    class Tier:
        def __init__(self):
            self.ready = True

    tier = Tier()
    check = kind_check(Ready)
    assert check(tier)
    del tier.ready
    assert not isinstance(tier, Ready)
    assert check(tier), "asked again instead of remembered"
    assert not kind_check(Ready)(tier), "a new check asks afresh"
