"""RemoteTier: a shared engine as the slowest tier, which must never slow the local ones.

Guarantees:
- Writes are asynchronous (a small executor) and bounded: a put that would push the bytes in
  flight over ``max_inflight_bytes`` is dropped, counted and refused with ``StorageFull``; one
  arriving while the breaker is open likewise with ``BackendUnavailable`` (so the manager does
  not record a copy that was never sent). ``put`` never blocks on the network. A queued write
  that later fails is counted; the block then reads as a miss.
- ``can_fit``/``fits_ever`` only say whether a block is within the in-flight bound: the engine
  evicts by itself, so the manager never has to make room in a shared tier.
- Every engine call is bounded by the backend's timeout. Errors and timeouts are misses:
  ``contains``/``contains_many`` answer False, ``read_into`` raises ``KeyError``,
  ``delete`` returns False, ``size`` returns None. They are counted, never raised.
- While the circuit breaker is open no call touches the network (a short-circuited miss);
  it lets one probe through after the cool-down and closes when the engine answers again.
- ``scan`` yields nothing: the index of a shared tier is the engine itself.
- Reachability is probed once at startup in the background (one existence query, outside the
  counters and the breaker): an engine that cannot be reached is a warning in the log and a
  problem in ``health()`` until it first answers. ``health()`` also reports an open breaker.
- A block failing its checksum raises ``CorruptBlock`` and is deleted from the engine.
- Reads into host memory registered with ``register`` may land there straight from the engine
  (backends with ``RegisteredReads``): no staging copy, the bytes still verified before a read
  returns. Memory that a timed-out read may still write is quarantined until that call is
  over: reads into it wait for it, and its owner reuses it for anything else only after
  ``when_settled``/``wait_settled``.
"""

from __future__ import annotations

import enum
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, TypeVar

import torch

from kvtier.bytecopy import as_byte_view
from kvtier.config import RemoteTierConfig
from kvtier.errors import BackendUnavailable, CorruptBlock, InvalidRequest, StorageFull
from kvtier.stats import Histogram
from kvtier.tiers.base import BlockMeta
from kvtier.tiers.remote.base import RegisteredReads, RemoteBackend
from kvtier.tiers.remote.breaker import CircuitBreaker

log = logging.getLogger(__name__)
T = TypeVar("T")


class _Failed(enum.Enum):
    """What ``_call`` returns for an engine call that failed or timed out (a typed sentinel)."""

    FAILED = enum.auto()


_FAILED = _Failed.FAILED
_PROBE_KEY = b"kvtier-startup-probe"


class RemoteTier:
    """The Tier Protocol over a RemoteBackend. All methods are thread-safe."""

    name = "remote"
    persistent = True
    durable = False  # a shared cache that evicts by its own policy: writes go in the background

    def __init__(
        self, backend: RemoteBackend, config: RemoteTierConfig, *,
        breaker: CircuitBreaker | None = None, write_threads: int = 2,
    ) -> None:
        self.backend = backend
        self.config = config
        self.breaker = breaker or CircuitBreaker()
        self._pool = ThreadPoolExecutor(write_threads, thread_name_prefix="kvtier-remote-put")
        self._lock = threading.Lock()  # counters and in-flight accounting only
        self._idle = threading.Condition(self._lock)
        self._inflight_bytes = 0
        self._inflight_puts = 0
        self._closed = False
        self._c = dict.fromkeys((
            "hits", "misses", "blocks_read", "read_misses", "bytes_read", "errors", "timeouts",
            "short_circuits", "corrupt_blocks", "puts", "blocks_written", "bytes_written",
            "puts_dropped_inflight", "puts_dropped_breaker", "put_failures",
        ), 0)
        self._read_seconds = Histogram()
        self._lookup_seconds = Histogram()
        self._reachable: bool | None = None  # None until the startup probe or a call answers
        self._unreachable_why = ""
        threading.Thread(target=self._probe, name="kvtier-remote-probe", daemon=True).start()

    # -- health ----------------------------------------------------------------------------------

    def _probe(self) -> None:
        """One existence query at startup, so an unreachable engine is said now, not found at
        the first lookup. Outside ``_call``: it moves no counter and no breaker state."""
        try:
            self.backend.exists_many([_PROBE_KEY])
        except Exception as e:  # any failure (refused, timeout, auth...) means unreachable
            with self._lock:
                if self._reachable is not None or self._closed:  # answered meanwhile, or closing
                    return
            why = str(e) or type(e).__name__
            log.warning("remote tier (%s) is unreachable at startup: %s; the local tiers serve "
                        "and it is tried again on use", self.backend.name, why)
            with self._lock:
                if self._reachable is None:
                    self._reachable, self._unreachable_why = False, why
            return
        with self._lock:
            self._reachable = True

    def health(self) -> list[str]:
        """What degrades the remote tier now (``ReportsHealth``): unreachable since startup, or
        the breaker open. Cheap: no network call."""
        problems = []
        breaker = self.breaker.to_dict()
        if breaker["state"] != "closed":
            problems.append(
                f"{self.backend.name} circuit breaker {breaker['state'].replace('_', '-')} after "
                f"{breaker['consecutive_failures']} consecutive failed calls; local tiers serve")
        with self._lock:
            if self._reachable is False:
                problems.append(f"{self.backend.name} unreachable since startup "
                                f"({self._unreachable_why}); local tiers serve")
        return problems

    # -- sizes: a shared engine's capacity is not ours to account ------------------------------

    @property
    def capacity_bytes(self) -> int:
        return 0

    @property
    def used_bytes(self) -> int:
        return 0

    def can_fit(self, nbytes: int) -> bool:
        return self.fits_ever(nbytes)

    def fits_ever(self, nbytes: int) -> bool:
        return nbytes <= self.config.max_inflight_bytes

    # -- calls ---------------------------------------------------------------------------------

    def _call(self, fn: Callable[[], T]) -> T | Literal[_Failed.FAILED]:
        """Run one engine call through the breaker; return ``_FAILED`` on error or timeout."""
        if not self.breaker.allow():
            self._bump("short_circuits")
            return _FAILED
        try:
            result = fn()
        except (KeyError, CorruptBlock):
            self.breaker.record_success()  # the engine answered
            self._reachable = True
            raise
        except TimeoutError as e:
            self._fail("timeouts", e)
            return _FAILED
        except (BackendUnavailable, OSError) as e:
            self._fail("errors", e)
            return _FAILED
        self.breaker.record_success()
        if self._reachable is not True:
            with self._lock:
                self._reachable = True
        return result

    def _fail(self, counter: str, e: Exception) -> None:
        self._bump(counter)
        self.breaker.record_failure()
        log.debug("remote %s call failed: %s", self.backend.name, e)

    def _bump(self, counter: str, n: int = 1) -> None:
        with self._lock:
            self._c[counter] += n

    def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        """One batched existence query for a prefix's remaining blocks; failures are misses."""
        if not keys:
            return []
        t0 = time.perf_counter()
        found = self._call(lambda: self.backend.exists_many(list(keys)))
        if found is _FAILED:
            found = [False] * len(keys)
        else:
            with self._lock:
                self._lookup_seconds.observe(time.perf_counter() - t0)
        hits = sum(found)
        with self._lock:
            self._c["hits"] += hits
            self._c["misses"] += len(keys) - hits
        return found

    def contains(self, key: bytes) -> bool:
        return self.contains_many([key])[0]

    def size(self, key: bytes) -> int | None:
        n = self._call(lambda: self.backend.size(key))
        return None if n is _FAILED else n

    def read_into(self, key: bytes, out: torch.Tensor, offset: int = 0) -> int:
        t0 = time.perf_counter()
        try:
            n = self._call(lambda: self.backend.get_into(key, out, offset))
        except KeyError:
            self._bump("read_misses")
            raise
        except CorruptBlock:
            self._bump("corrupt_blocks")
            self._call(lambda: self.backend.delete(key))
            raise
        if n is _FAILED:
            self._bump("read_misses")
            raise KeyError(key)
        dt = time.perf_counter() - t0
        with self._lock:
            self._c["blocks_read"] += 1
            self._c["bytes_read"] += n
            self._read_seconds.observe(dt)
        return n

    def read_blocks_into(self, keys: Sequence[bytes],
                         outs: Sequence[torch.Tensor]) -> list[int | Exception]:
        """Whole blocks ``keys[i]`` into ``outs[i]`` (each exactly the block's size): a prefix in
        one bounded engine call where the backend batches (``RegisteredReads`` and registered
        ``outs``), else one ``read_into`` each. Per block the byte count or the exception
        ``read_into`` would raise (``KeyError`` for misses, errors and timeouts alike,
        ``CorruptBlock`` after deleting the copy); never raises for a single block.
        """
        backend = self.backend
        if not isinstance(backend, RegisteredReads):
            return [self._read_or_error(k, o) for k, o in zip(keys, outs, strict=True)]
        t0 = time.perf_counter()
        try:
            got = self._call(lambda: backend.get_many_into(list(keys), list(outs)))
        except InvalidRequest as e:
            return [e] * len(keys)
        if got is _FAILED:
            self._bump("read_misses", len(keys))
            return [KeyError(k) for k in keys]
        dt = time.perf_counter() - t0
        for key, res in zip(keys, got, strict=True):
            if isinstance(res, CorruptBlock):
                self._bump("corrupt_blocks")
                self._call(functools.partial(backend.delete, key))
            elif isinstance(res, KeyError):
                self._bump("read_misses")
        done = [n for n in got if not isinstance(n, Exception)]
        with self._lock:
            self._c["blocks_read"] += len(done)
            self._c["bytes_read"] += sum(done)
            if done:
                self._read_seconds.observe(dt)
        return got

    def _read_or_error(self, key: bytes, out: torch.Tensor) -> int | Exception:
        try:
            return self.read_into(key, out)
        except (KeyError, CorruptBlock, InvalidRequest) as e:
            return e

    @property
    def batched_reads(self) -> bool:
        """True where ``read_blocks_into`` reads a whole prefix in one engine call (the backend
        has ``RegisteredReads``); else it reads block by block and callers should spread the
        blocks over their own threads instead."""
        return isinstance(self.backend, RegisteredReads)

    def register(self, tensor: torch.Tensor) -> bool:
        """Let the backend read straight into ``tensor`` (host memory, registered once); False
        where it cannot (reads into it are then staged and copied, as before). Call it once per
        long-lived buffer, e.g. a staging ring, never per read: registration is slow.
        """
        if not isinstance(self.backend, RegisteredReads):
            return False
        try:
            self.backend.register(tensor)
        except (TimeoutError, BackendUnavailable, OSError) as e:
            log.warning("remote %s: registering %d bytes failed: %s",
                        self.backend.name, tensor.numel() * tensor.element_size(), e)
            return False
        return True

    def unregister(self, tensor: torch.Tensor) -> bool:
        """Undo ``register``; False (still registered) while a timed-out read may write into it."""
        if not isinstance(self.backend, RegisteredReads):
            return False
        try:
            return self.backend.unregister(tensor)
        except (TimeoutError, BackendUnavailable, OSError):
            return False

    def when_settled(self, tensor: torch.Tensor, fn: Callable[[], None]) -> None:
        """Call ``fn()`` once no timed-out read can still write into ``tensor``: at once in the
        common case, else in the thread that finishes the late read. E.g. a staging slot whose
        read failed goes back to its ring through this, so it is never reused too early."""
        if isinstance(self.backend, RegisteredReads):
            self.backend.when_settled(tensor, fn)
        else:
            fn()

    def wait_settled(self, tensor: torch.Tensor, timeout: float | None = None) -> bool:
        """Block until ``when_settled`` would fire; False if ``timeout`` passed first."""
        done = threading.Event()
        self.when_settled(tensor, done.set)
        return done.wait(timeout)

    def put(self, key: bytes, data: bytes | memoryview | torch.Tensor, meta: BlockMeta) -> None:
        """Queue an asynchronous write; refuses (and counts) it if over the bound or breaker open."""
        view = as_byte_view(data)
        nbytes = view.nbytes
        if self.breaker.state == "open":
            self._bump("puts_dropped_breaker")
            raise BackendUnavailable(f"remote {self.backend.name} breaker is open; put dropped")
        with self._lock:
            if self._closed or self._inflight_bytes + nbytes > self.config.max_inflight_bytes:
                self._c["puts_dropped_inflight"] += 1
                raise StorageFull(
                    f"remote writes in flight ({self._inflight_bytes} bytes) + {nbytes} exceed "
                    f"max_inflight_bytes={self.config.max_inflight_bytes}; put dropped")
            self._inflight_bytes += nbytes
            self._inflight_puts += 1
            self._c["puts"] += 1
        # The caller may reuse its buffer as soon as we return: own a copy.
        payload = memoryview(bytes(view))
        self._pool.submit(self._write, key, payload)

    def _write(self, key: bytes, payload: memoryview) -> None:
        nbytes = payload.nbytes
        try:
            ok = self._call(lambda: self.backend.put(key, payload))
        except Exception:  # a bug in a backend must not kill the writer thread silently
            log.exception("remote put of %s failed", key.hex())
            ok = _FAILED
        with self._lock:
            if ok is _FAILED:
                self._c["put_failures"] += 1
            else:
                self._c["blocks_written"] += 1
                self._c["bytes_written"] += nbytes
            self._inflight_bytes -= nbytes
            self._inflight_puts -= 1
            self._idle.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until queued writes have finished; False if ``timeout`` passed first."""
        with self._idle:
            return self._idle.wait_for(lambda: self._inflight_puts == 0, timeout)

    def delete(self, key: bytes) -> bool:
        ok = self._call(lambda: self.backend.delete(key))
        return False if ok is _FAILED else bool(ok)

    def scan(self) -> Iterator[tuple[bytes, BlockMeta, int]]:
        return iter(())

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.flush(timeout=self.backend.timeout_s * 2)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.backend.close()

    def stats(self) -> dict:
        """A JSON-able snapshot: counters, bytes in flight, breaker, latency histograms."""
        with self._lock:
            snap: dict[str, Any] = dict(self._c)
            snap["inflight_bytes"] = self._inflight_bytes
            snap["inflight_puts"] = self._inflight_puts
            snap["read_seconds"] = self._read_seconds.to_dict()
            snap["lookup_seconds"] = self._lookup_seconds.to_dict()
            snap["reachable"] = self._reachable  # None: not known yet
        snap["backend"] = self.backend.name
        snap["breaker"] = self.breaker.to_dict()
        return snap
