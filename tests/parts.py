"""Builders for the tests of the cache's parts: real tiers, a ``Placement`` over them, blocks.

Each part (``kvtier.placement``, ``writethrough``, ``recorder``, ``catalog``, ``lookups``,
``reload``, ``prefetcher``, ``writes``) is built here the way ``TieredCache`` wires it, over real memory tiers, a real SSD
tier in a temporary directory, or a real Redis remote tier, so its tests exercise its own
contract without the facade.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence

import torch

from kvtier.config import DeviceTierConfig, HostTierConfig, RemoteTierConfig, SSDTierConfig
from kvtier.index import BlockEntry
from kvtier.placement import Placement
from kvtier.policies import make_policy
from kvtier.policies.admission import make_admission
from kvtier.stats import CacheStats, TierStats
from kvtier.tiers.base import Tier
from kvtier.tiers.memory import MemoryTier, make_device_tier, make_host_tier
from kvtier.tiers.remote import RemoteTier
from kvtier.tiers.ssd import SSDTier

KiB = 1024
BLOCK = 4 * KiB  # one host slot exactly: a host tier of n * BLOCK holds n blocks


def host(capacity: int = 4 * BLOCK) -> MemoryTier:
    return make_host_tier(HostTierConfig(capacity_bytes=capacity, pinned=False))


def device(capacity: int = 4 * BLOCK, slot: int = BLOCK) -> MemoryTier:
    return make_device_tier(DeviceTierConfig(capacity_bytes=capacity, slot_bytes=slot))


def ssd(path, durability: str = "sync", **kw) -> SSDTier:
    cfg = dict(path=str(path), durability=durability, min_free_bytes=0, direct_io=False,
               capacity_bytes=64 * 1024**2, segment_bytes=1024**2, compaction_interval_s=None)
    cfg.update(kw)
    return SSDTier(SSDTierConfig(**cfg))


def remote(redis_server, prefix: str | None = None) -> RemoteTier:
    """A Redis remote tier (``SharedIndex``); tiers given one ``prefix`` share their keys, as
    two instances of a fleet do."""
    from kvtier.tiers.remote import make_remote_tier

    tier = make_remote_tier(RemoteTierConfig(backend="redis", url=redis_server.url, timeout_s=2.0),
                            breaker_failures=100, prefix=prefix or f"parts-{time.monotonic_ns()}")
    assert tier is not None
    return tier


def placement(tiers: Sequence[Tier], policy: str = "lru", admission: str = "write_through",
              min_hits: int = 2) -> Placement:
    """A ``Placement`` as ``TieredCache`` builds it: one policy per tier, fresh counters."""
    return Placement(tiers, [make_policy(policy) for _ in tiers],
                     CacheStats({t.name: TierStats(t.name) for t in tiers}),
                     make_admission(admission, min_hits))


def key(name: str | int) -> bytes:
    return hashlib.blake2b(str(name).encode(), digest_size=16).digest()


def data(nbytes: int = BLOCK, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)


def entry(name: str | int, parent: BlockEntry | None = None, nbytes: int = BLOCK,
          namespace: str = "ns") -> BlockEntry:
    return BlockEntry(key(name), namespace, parent.key if parent else None,
                      parent.index + 1 if parent else 0, 16, nbytes, time.time())


def place(p: Placement, e: BlockEntry, payload: torch.Tensor | None = None) -> int | None:
    """``place_new`` as a put does it: under the lock, the parent pinned while it runs."""
    parent = p.index.get(e.parent) if e.parent else None
    with p.lock:
        if parent is not None:
            parent.pins += 1
        try:
            return p.place_new(e, data(e.nbytes, int.from_bytes(e.key[:4], "little")) if payload is None else payload)
        finally:
            if parent is not None:
                parent.pins -= 1


def chain(p: Placement, names: Sequence[str | int], nbytes: int = BLOCK) -> list[BlockEntry]:
    """Place a prefix of blocks, each the child of the one before."""
    out: list[BlockEntry] = []
    for name in names:
        e = entry(name, out[-1] if out else None, nbytes)
        assert place(p, e) is not None
        out.append(e)
    return out


def held(tier: Tier, entries: Sequence[BlockEntry]) -> list[bool]:
    return [tier.contains(e.key) for e in entries]


def parents_indexed(p: Placement) -> bool:
    """The placement's invariant: every indexed block's parent is indexed too."""
    return all(e.parent is None or e.parent in p.index for e in p.index.values())
