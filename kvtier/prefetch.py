"""Prefetch handles: asynchronous promotion of a prefix toward a faster tier.

Only a contiguous prefix counts as ready: ``ready_tokens`` grows block by block in order.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field

TERMINAL = ("done", "failed", "cancelled", "timeout")


@dataclass(slots=True)
class PrefetchHandle:
    namespace: str
    target: str
    requested_tokens: int
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    state: str = "pending"  # pending | running | done | failed | cancelled | timeout
    ready_tokens: int = 0
    error: str | None = None
    _done: threading.Event = field(default_factory=threading.Event, repr=False)
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)

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

    def finish(self, state: str, error: str | None = None) -> None:
        self.state = state
        self.error = error
        self._done.set()

    def to_dict(self) -> dict:
        return {"id": self.id, "namespace": self.namespace, "target": self.target,
                "state": self.state, "ready_tokens": self.ready_tokens,
                "requested_tokens": self.requested_tokens, "error": self.error}
