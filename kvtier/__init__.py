"""kvtier: a tiered KV-cache offload service (GPU -> pinned host DRAM -> SSD -> remote)."""

from kvtier.config import (
    CacheConfig,
    DeviceTierConfig,
    HostTierConfig,
    RemoteTierConfig,
    SSDTierConfig,
)
from kvtier.errors import (
    CorruptBlock,
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

__version__ = "0.1.0"
__all__ = [
    "BlockLocation", "CacheConfig", "CorruptBlock", "DeviceTierConfig", "Hit", "HostTierConfig",
    "InvalidRequest", "KVLayout", "KVTierError", "LayoutMismatch", "Namespace", "PrefetchHandle",
    "RemoteTierConfig", "SSDTierConfig", "StorageFull", "TieredCache", "UnknownNamespace",
]
