"""Prefetch handles, policies and the budget: asynchronous promotion of a prefix to a faster tier.

Only a contiguous prefix counts as ready: ``ready_tokens`` grows block by block in order, and
freezes when the handle reaches a terminal state (a block landing after a timeout is not counted).

Policies: ``best_effort`` returns at once; ``wait_complete`` returns when the prefetch finished;
``timeout`` returns when it finished or its timeout expired — then the prefetch is stopped and
reports the contiguous tokens that did arrive. The default timeout grows with the prefix length
and is capped. A budget caps the bytes prefetches may hold in the target tier (a share of its
capacity); a prefetched block stops counting once a reader has used it or it left the tier.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field

from kvtier.errors import InvalidRequest

TERMINAL = ("done", "failed", "cancelled", "timeout")
POLICIES = ("best_effort", "wait_complete", "timeout")


@dataclass(frozen=True, slots=True)
class PrefetchTimeout:
    """Timeout of the ``timeout`` policy: ``base_s + tokens / tokens_per_s``, at most ``cap_s``."""

    base_s: float = 0.05
    tokens_per_s: float = 200_000.0
    cap_s: float = 5.0

    def seconds(self, tokens: int) -> float:
        return min(self.cap_s, self.base_s + tokens / self.tokens_per_s)


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise InvalidRequest(f"unknown prefetch policy {policy!r}: expected one of {POLICIES}")
    return policy


@dataclass(slots=True)
class PrefetchHandle:
    namespace: str
    target: str
    requested_tokens: int
    policy: str = "best_effort"
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    state: str = "pending"  # pending | running | done | failed | cancelled | timeout
    ready_tokens: int = 0
    error: str | None = None
    stopped_by: str | None = None  # "budget" when the budget cut the prefetch short
    _done: threading.Event = field(default_factory=threading.Event, repr=False)
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def cancel(self) -> bool:
        """Ask the prefetch to stop; blocks already promoted stay. False if already finished."""
        if self.state in TERMINAL:
            return False
        self._cancel.set()
        return True

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the prefetch finishes; True if it did within ``timeout``."""
        return self._done.wait(timeout)

    def start(self) -> bool:
        """Mark the prefetch running; False if it already finished (e.g. timed out while queued)."""
        with self._lock:
            if self.state in TERMINAL:
                return False
            self.state = "running"
            return True

    def advance(self, tokens: int) -> None:
        """One more block of the contiguous prefix is in the target tier (ignored once finished)."""
        with self._lock:
            if self.state not in TERMINAL:
                self.ready_tokens += tokens

    def finish(self, state: str, error: str | None = None) -> bool:
        """Enter a terminal state; False (and no change) if already in one."""
        with self._lock:
            if self.state in TERMINAL:
                return False
            self.state = state
            self.error = error
        self._cancel.set()  # a finished prefetch (e.g. timed out) stops its worker
        self._done.set()
        return True

    def to_dict(self) -> dict:
        return {"id": self.id, "namespace": self.namespace, "target": self.target,
                "policy": self.policy, "state": self.state, "ready_tokens": self.ready_tokens,
                "requested_tokens": self.requested_tokens, "error": self.error,
                "stopped_by": self.stopped_by}


class PrefetchBudget:
    """Bytes prefetches hold in one tier, capped at ``fraction`` of its capacity. Thread-safe."""

    def __init__(self, fraction: float) -> None:
        if not 0 < fraction <= 1:
            raise InvalidRequest(f"prefetch budget must be a fraction in (0, 1], got {fraction!r}")
        self.fraction = fraction
        self._held: dict[bytes, tuple[int, int]] = {}  # key -> (nbytes, reader hits at promotion)
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def held_bytes(self) -> int:
        return self._bytes

    def limit(self, capacity: int) -> int:
        return int(self.fraction * capacity)

    def reserve(self, key: bytes, nbytes: int, capacity: int, hits: int) -> bool:
        """Count ``nbytes`` against the budget; False (nothing reserved) if it would overflow."""
        with self._lock:
            if key in self._held:
                return True
            if self._bytes + nbytes > self.limit(capacity):
                return False
            self._held[key] = (nbytes, hits)
            self._bytes += nbytes
            return True

    def release(self, key: bytes) -> None:
        with self._lock:
            held = self._held.pop(key, None)
            if held is not None:
                self._bytes -= held[0]

    def held(self) -> dict[bytes, tuple[int, int]]:
        with self._lock:
            return dict(self._held)
