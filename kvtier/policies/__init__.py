"""Eviction and admission policies."""

from kvtier.policies.base import EvictionPolicy, make_policy

__all__ = ["EvictionPolicy", "make_policy"]
