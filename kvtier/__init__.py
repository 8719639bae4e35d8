"""kvtier: a tiered KV-cache offload service (GPU -> pinned host DRAM -> SSD -> remote).

Public names load lazily (PEP 562) so light commands such as ``kvtier calc`` start without
importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "CacheConfig": "kvtier.config", "DeviceTierConfig": "kvtier.config", "HostTierConfig": "kvtier.config",
    "RemoteTierConfig": "kvtier.config", "SSDTierConfig": "kvtier.config",
    "CorruptBlock": "kvtier.errors", "InvalidRequest": "kvtier.errors", "KVTierError": "kvtier.errors",
    "LayoutMismatch": "kvtier.errors", "StorageFull": "kvtier.errors", "UnknownNamespace": "kvtier.errors",
    "FingerprintMismatch": "kvtier.errors", "BlockHits": "kvtier.blocks",
    "KVLayout": "kvtier.layout", "TieredCache": "kvtier.manager", "Namespace": "kvtier.namespaces",
    "PrefetchHandle": "kvtier.prefetch", "BlockLocation": "kvtier.records", "Hit": "kvtier.records",
}
__all__ = [
    "CacheConfig",
    "DeviceTierConfig",
    "HostTierConfig",
    "RemoteTierConfig",
    "SSDTierConfig",
    "CorruptBlock",
    "InvalidRequest",
    "KVTierError",
    "LayoutMismatch",
    "StorageFull",
    "UnknownNamespace",
    "FingerprintMismatch",
    "BlockHits",
    "KVLayout",
    "TieredCache",
    "Namespace",
    "PrefetchHandle",
    "BlockLocation",
    "Hit",
]
assert set(__all__) == set(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvtier' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:
    from kvtier.blocks import BlockHits
    from kvtier.config import (
        CacheConfig,
        DeviceTierConfig,
        HostTierConfig,
        RemoteTierConfig,
        SSDTierConfig,
    )
    from kvtier.errors import (
        CorruptBlock,
        FingerprintMismatch,
        InvalidRequest,
        KVTierError,
        LayoutMismatch,
        StorageFull,
        UnknownNamespace,
    )
    from kvtier.layout import KVLayout
    from kvtier.manager import TieredCache
    from kvtier.namespaces import Namespace
    from kvtier.prefetch import PrefetchHandle
    from kvtier.records import BlockLocation, Hit
