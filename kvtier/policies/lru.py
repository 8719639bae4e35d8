"""Least-recently-used: the default, and the baseline every other policy is tested against."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container

from kvtier.policies.base import register_policy


class LRUPolicy:
    def __init__(self) -> None:
        self._order: OrderedDict[bytes, None] = OrderedDict()

    def insert(self, key: bytes) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def touch(self, key: bytes) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: bytes) -> None:
        self._order.pop(key, None)

    def evict(self, protected: Container[bytes] = ()) -> bytes | None:
        for key in self._order:
            if key not in protected:
                del self._order[key]
                return key
        return None

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._order


register_policy("lru", LRUPolicy)
