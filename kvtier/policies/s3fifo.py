"""S3-FIFO (Yang et al., SOSP'23): scan-resistant and frequency-aware with FIFO queues only.

New keys enter a small FIFO (10% of keys); those touched again before leaving it move to the
main FIFO, the rest are evicted and remembered in a ghost FIFO so a quick return goes straight
to main. Main evicts with a 2-bit frequency second chance. A one-off scan passes through the
small queue without disturbing the hot set in main.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container

from kvtier.policies.base import register_policy

SMALL_FRACTION = 0.1
MAX_FREQ = 3


class S3FIFOPolicy:
    def __init__(self) -> None:
        self._small: OrderedDict[bytes, None] = OrderedDict()
        self._main: OrderedDict[bytes, None] = OrderedDict()
        self._ghost: OrderedDict[bytes, None] = OrderedDict()
        self._freq: dict[bytes, int] = {}

    def insert(self, key: bytes) -> None:
        if key in self._freq:
            self.touch(key)
            return
        self._freq[key] = 0
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = None
        else:
            self._small[key] = None

    def touch(self, key: bytes) -> None:
        if key in self._freq:
            self._freq[key] = min(self._freq[key] + 1, MAX_FREQ)

    def remove(self, key: bytes) -> None:
        if self._freq.pop(key, None) is not None:
            self._small.pop(key, None)
            self._main.pop(key, None)

    def evict(self, protected: Container[bytes] = ()) -> bytes | None:
        # Each key can be passed over at most MAX_FREQ + 2 times before it must be chosen,
        # so this bound only trips when every key is protected.
        for _ in range((MAX_FREQ + 2) * len(self._freq) + 1):
            from_small = self._small and len(self._small) >= SMALL_FRACTION * len(self._freq)
            queue = self._small if from_small or not self._main else self._main
            if not queue:
                return None
            key = next(iter(queue))
            del queue[key]
            if key in protected:
                queue[key] = None
                continue
            if queue is self._small:
                if self._freq[key] > 0:
                    self._freq[key] = 0
                    self._main[key] = None
                    continue
                self._ghost[key] = None
                while len(self._ghost) > max(len(self._freq), 1):
                    self._ghost.popitem(last=False)
            elif self._freq[key] > 0:
                self._freq[key] -= 1
                self._main[key] = None
                continue
            del self._freq[key]
            return key
        return None

    def __len__(self) -> int:
        return len(self._freq)

    def __contains__(self, key: object) -> bool:
        return key in self._freq


register_policy("s3fifo", S3FIFOPolicy)
