"""The SSD tier: LMDB index + append-only segment files, durable across crashes and restarts."""

from kvtier.tiers.ssd.directio import ALIGN, aligned_empty, padded
from kvtier.tiers.ssd.tier import SSDTier

__all__ = ["ALIGN", "SSDTier", "aligned_empty", "padded"]
