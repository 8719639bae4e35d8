"""A circuit breaker so a dead remote engine costs local tiers nothing.

Closed: calls pass; ``failures`` consecutive failures open it. Open: calls are refused without
touching the network until ``cooldown_s`` has passed; then one probe call is let through
(half-open). The probe's success closes the breaker, its failure re-opens it for another
cool-down. Written here rather than taken from pybreaker/purgatory because the hot path needs
a non-blocking ``allow()`` check separate from the call, and a probe that never reports back
(a caller that died) must not wedge the breaker half-open forever.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from kvtier.errors import InvalidRequest

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


class CircuitBreaker:
    """Thread-safe closed / open / half-open breaker; the lock is never held across I/O."""

    def __init__(
        self, failures: int = 5, cooldown_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failures < 1:
            raise InvalidRequest(f"breaker failures must be >= 1, got {failures}")
        if cooldown_s <= 0:
            raise InvalidRequest(f"breaker cooldown_s must be > 0, got {cooldown_s}")
        self.failures = failures
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._lock = threading.Lock()
        self._state = CLOSED
        self._consecutive = 0
        self._opened_at = 0.0
        self._probe_at: float | None = None
        self.opens = 0

    @property
    def state(self) -> str:
        with self._lock:
            return self._state

    def allow(self) -> bool:
        """True if a call may go to the engine now (in half-open: only the single probe)."""
        with self._lock:
            if self._state == CLOSED:
                return True
            now = self._clock()
            if self._state == OPEN:
                if now - self._opened_at < self.cooldown_s:
                    return False
                self._state = HALF_OPEN
                self._probe_at = now
                return True
            # Half-open: one probe at a time, but a probe silent for a cool-down is presumed lost.
            if self._probe_at is None or now - self._probe_at >= self.cooldown_s:
                self._probe_at = now
                return True
            return False

    def record_success(self) -> None:
        with self._lock:
            self._state = CLOSED
            self._consecutive = 0
            self._probe_at = None

    def record_failure(self) -> None:
        with self._lock:
            self._consecutive += 1
            if self._state == HALF_OPEN or (
                self._state == CLOSED and self._consecutive >= self.failures
            ):
                self._state = OPEN
                self._opened_at = self._clock()
                self._probe_at = None
                self.opens += 1

    def to_dict(self) -> dict:
        with self._lock:
            return {"state": self._state, "opens": self.opens,
                    "consecutive_failures": self._consecutive}
