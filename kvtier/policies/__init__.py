"""Eviction and admission policies."""

from kvtier.policies import lru, s3fifo  # noqa: F401  (register the built-ins)
from kvtier.policies.base import EvictionPolicy, make_policy

__all__ = ["EvictionPolicy", "make_policy"]
