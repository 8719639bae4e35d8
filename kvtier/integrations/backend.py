"""The calls an engine connector makes to its kvtier backend, with what an engine needs around them.

The backend is an embedded ``TieredCache`` or a ``KVTierClient`` of a sidecar; both offer the
engine-page methods. Why a wrapper:

- **The namespace comes back.** A connector registers its namespace once, at start. A sidecar
  restarted without its data dir, or another client that dropped the namespace, made every later
  call fail with ``UnknownNamespace`` until the engine restarted: caching silently off. A call
  that meets ``UnknownNamespace`` now registers the namespace again and runs once more.
- **A stuck sidecar costs one timeout, not one per request.** vLLM looks pages up one request
  after another on a single thread; a sidecar that accepts connections but never answers (paused,
  swapping) held each lookup for the client's whole timeout. After a call times out or cannot
  connect, calls fail at once (``BackendUnavailable``: a miss, or a failed job) for a back-off
  that doubles from ``BACKOFF_S`` up to ``MAX_BACKOFF_S`` while the sidecar stays away; the first
  call after it tries the sidecar again, and a success ends the back-off.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx

from kvtier.errors import KVTierError, UnknownNamespace

BACKOFF_S = 1.0
MAX_BACKOFF_S = 60.0
_UNREACHABLE = (httpx.TimeoutException, httpx.TransportError, ConnectionError, TimeoutError)


class BackendUnavailable(KVTierError):
    """The sidecar did not answer lately: calls fail at once until its back-off ends."""


class EngineBackend:
    """``block_exists``, ``put_blocks``, ``get_blocks_into`` and ``drop_namespace`` of ``backend``
    on the block namespace ``register`` registered; thread-safe (connectors call from several
    threads)."""

    def __init__(self, backend: Any, clock: Callable[[], float] = time.monotonic) -> None:
        self.backend = backend
        self._clock = clock
        self._registration: tuple[str, dict[str, Any]] | None = None
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._backoff = 0.0

    def register(self, name: str, **kw: Any) -> Any:
        """Register block namespace ``name`` (``register_block_namespace``'s arguments); the
        calls below use it, and register it again whenever one finds it gone."""
        ns = self.backend.register_block_namespace(name, **kw)
        self._registration = (name, kw)
        return ns

    def block_exists(self, keys: Sequence[bytes]) -> Any:
        return self._call(self.backend.block_exists, keys)

    def put_blocks(self, keys: Sequence[bytes], pages: Any) -> int:
        return self._call(self.backend.put_blocks, keys, pages)

    def get_blocks_into(self, keys: Sequence[bytes], out: Any) -> int:
        return self._call(self.backend.get_blocks_into, keys, out)

    def drop_namespace(self) -> int:
        return self._call(self.backend.drop_namespace, again=False)

    def _call(self, fn: Callable[..., Any], *args: Any, again: bool = True) -> Any:
        reg = self._registration
        if reg is None:
            raise KVTierError("no kvtier namespace registered yet")
        with self._lock:
            if self._clock() < self._down_until:
                raise BackendUnavailable(f"the kvtier sidecar did not answer lately; calls fail at "
                                         f"once for {self._down_until - self._clock():.1f} s more")
        try:
            try:
                result = fn(reg[0], *args)
            except UnknownNamespace:
                if not again:
                    raise
                self.backend.register_block_namespace(reg[0], **reg[1])  # lost: register again
                result = fn(reg[0], *args)
        except _UNREACHABLE:
            with self._lock:
                self._backoff = min(MAX_BACKOFF_S, self._backoff * 2 or BACKOFF_S)
                self._down_until = self._clock() + self._backoff
            raise
        with self._lock:
            self._backoff = 0.0
        return result
