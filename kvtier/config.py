"""Configuration: one dataclass tree, built once and passed down explicitly.

Precedence when built by the CLI/server: flags > ``KVTIER_*`` environment > YAML file > defaults.
Nothing below this module reads the environment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from kvtier.errors import InvalidRequest

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | float | str) -> int:
    """Parse a byte size: ``4096``, ``"64MiB"``, ``"1.5GB"``. Raises InvalidRequest if malformed."""
    if isinstance(value, bool):
        raise InvalidRequest(f"size must be a number or a string like '4GiB', got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise InvalidRequest(f"size must be >= 0, got {value!r}")
        return int(value)
    if not isinstance(value, str):
        raise InvalidRequest(f"size must be a number or a string like '4GiB', got {value!r}")
    m = _SIZE_RE.match(value)
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise InvalidRequest(
            f"malformed size {value!r}: expected a number with an optional unit "
            "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
        )
    return int(float(m.group(1)) * _UNITS[unit])


def format_size(n: int) -> str:
    """Human-readable binary size, e.g. ``1.5 GiB``."""
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(x) < 1024 or unit == "TiB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.2f} {unit}"
        x /= 1024
    return f"{n} B"


@dataclass(slots=True)
class DeviceTierConfig:
    """GPU-memory tier: fixed-size slots in one preallocated tensor. 0 capacity disables it."""

    capacity_bytes: int = 0
    slot_bytes: int = 32 * 1024**2
    policy: str = "lru"

    def __post_init__(self) -> None:
        normalize_sizes(self)


@dataclass(slots=True)
class HostTierConfig:
    """Host DRAM tier: one preallocated (pinned when CUDA is present) buffer, slab-allocated."""

    capacity_bytes: int = 1024**3
    policy: str = "lru"
    pinned: bool | None = None  # None: pin when CUDA is available
    page_bytes: int = 4 * 1024**2  # slab page; raised automatically to fit the largest block

    def __post_init__(self) -> None:
        normalize_sizes(self)


@dataclass(slots=True)
class SSDTierConfig:
    """SSD tier: LMDB index plus append-only segment files under ``path``. None path disables it."""

    path: str | None = None
    capacity_bytes: int = 64 * 1024**3
    policy: str = "lru"
    segment_bytes: int = 256 * 1024**2
    inline_threshold: int = 64 * 1024
    durability: str = "batch"  # sync | batch | none
    batch_interval_ms: int = 20
    admission: str = "write_through"  # write_through | write_back | selective
    admission_min_hits: int = 2
    # Background write-throughs (durability none, the remote tier) queued at most this many
    # bytes; a put beyond it waits (back-pressure) instead of growing memory.
    write_backlog_bytes: int = 256 * 1024**2
    direct_io: bool = True
    io_threads: int = 8
    min_free_bytes: int = 1024**3
    compaction_live_fraction: float = 0.5
    compaction_interval_s: float | None = 60.0  # background compaction; None: only on compact()
    map_size: int = 8 * 1024**3  # LMDB map size (address space, not disk)

    def __post_init__(self) -> None:
        normalize_sizes(self)


@dataclass(slots=True)
class RemoteTierConfig:
    """Shared remote tier (Redis/Valkey or Mooncake). None backend disables it."""

    backend: str | None = None  # redis | redis-cluster | mooncake
    url: str | None = None
    timeout_s: float = 1.0
    max_inflight_bytes: int = 256 * 1024**2
    policy: str = "lru"
    key_prefix: str = "kvtier"
    breaker_failures: int = 5
    breaker_cooldown_s: float = 2.0

    def __post_init__(self) -> None:
        normalize_sizes(self)


@dataclass(slots=True)
class CacheConfig:
    """Everything a TieredCache needs. Sizes accept ints or strings like ``"4GiB"``."""

    block_tokens: int = 256
    codec: str = "none"
    device: DeviceTierConfig = field(default_factory=DeviceTierConfig)
    host: HostTierConfig = field(default_factory=HostTierConfig)
    ssd: SSDTierConfig = field(default_factory=SSDTierConfig)
    remote: RemoteTierConfig = field(default_factory=RemoteTierConfig)
    promote_on_get: bool = True
    prefetch_budget: float = 0.5  # share of a tier's capacity prefetched blocks may hold

    def __post_init__(self) -> None:
        normalize_sizes(self)
        if not isinstance(self.block_tokens, int) or self.block_tokens <= 0:
            raise InvalidRequest(f"block_tokens must be a positive integer, got {self.block_tokens!r}")


def normalize_sizes(obj: Any) -> None:
    """Turn every ``*_bytes`` field given as a string into an int, recursively."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            normalize_sizes(value)
        elif f.name.endswith("_bytes") or f.name == "map_size":
            setattr(obj, f.name, parse_size(value))
