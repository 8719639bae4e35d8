"""The EvictionPolicy extension point and its registry.

A policy orders the keys resident in one tier; the manager asks it for victims. Policies are
not thread-safe: the manager calls them under its lock.
"""

from __future__ import annotations

from collections.abc import Callable, Container
from typing import Protocol, runtime_checkable

from kvtier.errors import InvalidRequest


@runtime_checkable
class EvictionPolicy(Protocol):
    """Tracks the keys of one tier.

    - ``insert`` adds a key (a no-op touch if present); ``touch`` records an access of a
      present key (absent keys are ignored); ``remove`` forgets a key (absent: no-op).
    - ``evict`` chooses one victim not in ``protected``, forgets it and returns it; it returns
      None and changes nothing observable if every key is protected or the policy is empty.
    """

    def insert(self, key: bytes) -> None: ...

    def touch(self, key: bytes) -> None: ...

    def remove(self, key: bytes) -> None: ...

    def evict(self, protected: Container[bytes] = ()) -> bytes | None: ...

    def __len__(self) -> int: ...

    def __contains__(self, key: object) -> bool: ...


_POLICIES: dict[str, Callable[[], EvictionPolicy]] = {}


def register_policy(name: str, factory: Callable[[], EvictionPolicy]) -> None:
    _POLICIES[name] = factory


def make_policy(name: str) -> EvictionPolicy:
    """A new policy by config name (``lru``, ``s3fifo``). Raises InvalidRequest if unknown."""
    try:
        return _POLICIES[name]()
    except KeyError:
        raise InvalidRequest(f"unknown eviction policy {name!r}: expected one of {sorted(_POLICIES)}") from None
