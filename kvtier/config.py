"""Configuration: one dataclass tree, built once and passed down explicitly.

Precedence when built by the CLI/server: flags > ``KVTIER_*`` environment > YAML file > defaults.
Nothing below this module reads the environment.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Literal, get_args

from kvtier.errors import InvalidRequest

# Closed sets, checked when a config is built so a typo fails in one line before any buffer is
# allocated. They name the built-ins of the registries in kvtier.codecs, kvtier.policies and
# kvtier.tiers.remote (tests/test_config.py keeps them equal).
Policy = Literal["lru", "s3fifo"]
Durability = Literal["sync", "batch", "none"]
Admission = Literal["write_through", "write_back", "selective"]
RemoteBackendName = Literal["redis", "redis-cluster", "mooncake"]
ValueCodec = Literal["none", "fp8", "int8"]
ByteCodec = Literal["zstd"]

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
    if value.strip().startswith("-"):
        raise InvalidRequest(f"size must be >= 0, got {value!r}")
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


def choice(value: Any, allowed: Any, what: str) -> Any:
    """``value`` if it is one of the ``Literal`` ``allowed``; else InvalidRequest naming them."""
    options = get_args(allowed)
    if value not in options:
        raise InvalidRequest(f"unknown {what} {value!r}: expected one of {', '.join(map(str, options))}")
    return value


def check_codec(spec: Any) -> str:
    """A codec spec: a value codec, optionally ``+`` a byte codec (``int8+zstd``), or a byte codec
    alone (``zstd``, meaning ``none+zstd``); case-insensitive. Returns it unchanged."""
    values, compressors = get_args(ValueCodec), get_args(ByteCodec)
    parts = spec.lower().split("+") if isinstance(spec, str) else []
    ok = (len(parts) == 1 and (parts[0] in values or parts[0] in compressors)) or (
        len(parts) == 2 and parts[0] in values and parts[1] in compressors)
    if not ok:
        raise InvalidRequest(f"unknown codec {spec!r}: expected one of {', '.join(values)}, "
                             f"optionally followed by '+' and one of {', '.join(compressors)}")
    return spec


def _number(obj: Any, name: str, *, low: float = 0, strict: bool = False, integer: bool = False,
            high: float | None = None, optional: bool = False) -> None:
    """Check field ``name`` of ``obj``: a number >= ``low`` (> with ``strict``), <= ``high``."""
    value = getattr(obj, name)
    if value is None and optional:
        return
    kinds = (int,) if integer else (int, float)
    bad = isinstance(value, bool) or not isinstance(value, kinds)
    if not bad:
        bad = value <= low if strict else value < low
        bad = bad or (high is not None and value > high)
    if bad:
        bound = f"{'>' if strict else '>='} {low}" + (f" and <= {high}" if high is not None else "")
        kind = "an integer" if integer else "a number"
        null = " or null" if optional else ""
        raise InvalidRequest(f"{type(obj).__name__}.{name} must be {kind} {bound}{null}, got {value!r}")


def _flag(obj: Any, name: str, *, optional: bool = False) -> None:
    value = getattr(obj, name)
    if not isinstance(value, bool) and not (optional and value is None):
        raise InvalidRequest(f"{type(obj).__name__}.{name} must be true or false, got {value!r}")


@dataclass(slots=True)
class DeviceTierConfig:
    """GPU-memory tier: fixed-size slots in one preallocated tensor. 0 capacity disables it."""

    capacity_bytes: int = 0
    slot_bytes: int = 32 * 1024**2
    policy: Policy = "lru"

    def __post_init__(self) -> None:
        normalize_sizes(self)
        choice(self.policy, Policy, "eviction policy")
        _number(self, "slot_bytes", strict=True, integer=True)


@dataclass(slots=True)
class HostTierConfig:
    """Host DRAM tier: one preallocated (pinned when CUDA is present) buffer, slab-allocated."""

    capacity_bytes: int = 1024**3
    policy: Policy = "lru"
    pinned: bool | None = None  # None: pin when CUDA is available
    page_bytes: int = 4 * 1024**2  # slab page; a block larger than a page takes a run of pages
    # fault the buffer's memory in at open, on a background thread, rather than on the first puts
    # (on a VM ~1-3 s of system time per GiB); the process then holds all of it from the start
    prefault: bool = True

    def __post_init__(self) -> None:
        normalize_sizes(self)
        choice(self.policy, Policy, "eviction policy")
        _flag(self, "pinned", optional=True)
        _flag(self, "prefault")
        _number(self, "page_bytes", strict=True, integer=True)


@dataclass(slots=True)
class SSDTierConfig:
    """SSD tier: LMDB index plus append-only segment files under ``path``. None path disables it."""

    path: str | None = None
    capacity_bytes: int = 64 * 1024**3
    policy: Policy = "lru"
    segment_bytes: int = 256 * 1024**2
    inline_threshold: int = 64 * 1024
    durability: Durability = "batch"
    batch_interval_ms: int = 20
    admission: Admission = "write_through"
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
        if isinstance(self.path, os.PathLike):
            self.path = os.fspath(self.path)
        if self.path is not None and not isinstance(self.path, str):
            raise InvalidRequest(f"SSDTierConfig.path must be a directory path or null, got {self.path!r}")
        choice(self.policy, Policy, "eviction policy")
        choice(self.durability, Durability, "ssd durability")
        choice(self.admission, Admission, "ssd admission policy")
        for name in ("segment_bytes", "map_size", "batch_interval_ms", "admission_min_hits", "io_threads"):
            _number(self, name, strict=True, integer=True)
        _number(self, "inline_threshold", integer=True)
        _flag(self, "direct_io")
        _number(self, "compaction_live_fraction", high=1)
        _number(self, "compaction_interval_s", strict=True, optional=True)


@dataclass(slots=True)
class RemoteTierConfig:
    """Shared remote tier (Redis/Valkey or Mooncake). None backend disables it."""

    backend: RemoteBackendName | None = None
    url: str | None = None
    timeout_s: float = 1.0
    max_inflight_bytes: int = 256 * 1024**2
    policy: Policy = "lru"
    key_prefix: str = "kvtier"
    breaker_failures: int = 5
    breaker_cooldown_s: float = 2.0

    def __post_init__(self) -> None:
        normalize_sizes(self)
        choice(self.policy, Policy, "eviction policy")
        if self.backend is None:
            return
        choice(self.backend, RemoteBackendName, "remote backend")
        if not self.url or not isinstance(self.url, str):
            raise InvalidRequest(f"remote backend {self.backend!r} needs remote.url (--remote-url), "
                                 "e.g. redis://127.0.0.1:6379/0")
        _number(self, "timeout_s", strict=True)
        _number(self, "max_inflight_bytes", strict=True, integer=True)
        _number(self, "breaker_failures", low=1, integer=True)
        _number(self, "breaker_cooldown_s", strict=True)


@dataclass(slots=True)
class CacheConfig:
    """Everything a TieredCache needs. Sizes accept ints or strings like ``"4GiB"``."""

    block_tokens: int = 256
    codec: str = "none"  # a spec accepted by check_codec, e.g. int8+zstd
    device: DeviceTierConfig = field(default_factory=DeviceTierConfig)
    host: HostTierConfig = field(default_factory=HostTierConfig)
    ssd: SSDTierConfig = field(default_factory=SSDTierConfig)
    remote: RemoteTierConfig = field(default_factory=RemoteTierConfig)
    promote_on_get: bool = True
    prefetch_budget: float = 0.5  # share of a tier's capacity prefetched blocks may hold
    # Host memory ``get`` keeps from the KV it returned once the caller dropped it, so the next
    # get of a large prefix writes into pages already faulted in (``kvtier.bufpool.MappedPool``:
    # gets of 64 MiB or more; a mapping idle 60 s goes at the next get, all at close). 0: every
    # such get maps fresh memory.
    reload_pool_bytes: int = 4 * 1024**3

    def __post_init__(self) -> None:
        """Check every field, the tiers' too (settings re-run this after assigning fields)."""
        for tier in (self.device, self.host, self.ssd, self.remote):
            tier.__post_init__()
        if isinstance(self.block_tokens, bool) or not isinstance(self.block_tokens, int) or self.block_tokens <= 0:
            raise InvalidRequest(f"block_tokens must be a positive integer, got {self.block_tokens!r}")
        check_codec(self.codec)
        _flag(self, "promote_on_get")
        _number(self, "prefetch_budget", high=1)
        normalize_sizes(self)
        _number(self, "reload_pool_bytes", integer=True)


def normalize_sizes(obj: Any) -> None:
    """Turn every ``*_bytes`` field given as a string into an int, recursively."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            normalize_sizes(value)
        elif f.name.endswith("_bytes") or f.name == "map_size":
            try:
                setattr(obj, f.name, parse_size(value))
            except InvalidRequest as e:
                raise InvalidRequest(f"{type(obj).__name__}.{f.name}: {e}") from None
