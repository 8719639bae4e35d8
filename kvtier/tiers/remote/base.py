"""The RemoteBackend extension point: one shared key-value engine (Redis/Valkey, Mooncake).

A backend only moves bytes to and from the engine; ``RemoteTier`` adds asynchronous writes,
the bound on bytes in flight, the circuit breaker and the statistics. A registry maps the
configured backend name to a constructor so ``make_remote_tier`` never imports an engine's
client library that the deployment does not use.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar, runtime_checkable

import torch

from kvtier.block import checksum, checksum_combine
from kvtier.errors import BackendUnavailable, InvalidRequest

T = TypeVar("T")


@runtime_checkable
class RemoteBackend(Protocol):
    """A shared engine holding opaque values by binary key. All methods are thread-safe.

    Every call is bounded by the backend's timeout: it returns or raises within about
    ``timeout_s`` (a ``TimeoutError`` or ``BackendUnavailable``), it never hangs.

    - ``exists_many`` answers for all keys in one batched round trip, in order.
    - ``put`` is idempotent, first writer wins: a key that exists is left untouched, and a
      reader never sees a partly written value (it sees the whole value or nothing).
    - ``get_into`` copies ``out.numel()`` bytes from byte ``offset`` of the value into ``out``
      (1-D uint8) and returns the count; raises ``KeyError`` if absent and ``CorruptBlock``
      if the stored bytes fail their checksum. When it raises, ``out`` holds unspecified bytes
      (never served: the caller got an exception), but nothing writes into ``out`` once the
      call has returned or raised, even if the engine completes a timed-out read later —
      except memory registered with a backend offering ``RegisteredReads`` (see there).
    - ``size`` is the stored value's length, None if absent.
    - ``delete`` returns False if the key was absent.
    """

    name: str
    timeout_s: float

    def exists_many(self, keys: Sequence[bytes]) -> list[bool]: ...

    def put(self, key: bytes, data: memoryview) -> None: ...

    def get_into(self, key: bytes, out: torch.Tensor, offset: int = 0) -> int: ...

    def size(self, key: bytes) -> int | None: ...

    def delete(self, key: bytes) -> bool: ...

    def close(self) -> None: ...


@runtime_checkable
class RegisteredReads(Protocol):
    """Optional capability: reads land straight in host memory registered once (no staging copy).

    ``register`` puts a host buffer (CPU, contiguous) under the backend's discipline: the engine
    may write directly into a registered ``out``, and if that call times out it may still write
    there until the late call is over: those bytes are *quarantined*. A later ``get_into`` into
    quarantined bytes first waits for the late call (``TimeoutError`` if it outlasts the new
    call's deadline), so nothing older can overwrite a read that returned. An owner reusing
    registered memory for anything else must wait for ``when_settled``. All thread-safe.

    - ``register`` is idempotent; the backend keeps a reference, so the memory outlives any
      late call even if its owner drops it.
    - ``unregister`` returns False (and keeps the registration) while a late call may write.
    - ``when_settled(tensor, fn)`` calls ``fn()`` once no late call can write into ``tensor``
      (at once if none can; else in the thread that finishes the last one).
    - ``get_many_into(keys, outs)``: whole values into ``outs`` in one bounded engine call;
      per key the byte count or the exception ``get_into`` would raise (``KeyError``,
      ``CorruptBlock``, ``InvalidRequest``); a failure of the call itself raises.
    """

    def register(self, tensor: torch.Tensor) -> None: ...

    def unregister(self, tensor: torch.Tensor) -> bool: ...

    def when_settled(self, tensor: torch.Tensor, fn: Callable[[], None]) -> None: ...

    def get_many_into(self, keys: Sequence[bytes],
                      outs: Sequence[torch.Tensor]) -> list[int | Exception]: ...


BackendFactory = Callable[..., RemoteBackend]
_REGISTRY: dict[str, Callable[[], BackendFactory]] = {}


def register_backend(name: str, loader: Callable[[], BackendFactory]) -> None:
    """Register ``name``; ``loader`` imports the implementation lazily (optional extras)."""
    _REGISTRY[name] = loader


def backend_factory(name: str) -> BackendFactory:
    """The constructor registered for ``name``; InvalidRequest names the known backends."""
    try:
        loader = _REGISTRY[name]
    except KeyError:
        raise InvalidRequest(
            f"unknown remote backend {name!r}: expected one of {sorted(_REGISTRY)}"
        ) from None
    return loader()


def check_span(length: int, offset: int, nbytes: int, key: bytes) -> None:
    """Raise InvalidRequest unless ``[offset, offset + nbytes)`` lies inside a value of ``length``."""
    if offset < 0 or offset + nbytes > length:
        raise InvalidRequest(
            f"read of {nbytes} bytes at offset {offset} exceeds remote value {key.hex()} "
            f"of {length} bytes"
        )


_QUEUED, _RUNNING, _DONE, _CANCELLED = range(4)
_STATE = threading.Lock()  # guards every Call's state; held for a few bytecodes only


class Call(Generic[T]):
    """One engine call handed to a worker thread: a lean ``concurrent.futures.Future``.

    Why not ``ThreadPoolExecutor``: its hand-off (work item, Future, Condition) cost ~70 us
    per call on a busy 2-core host, ~5% of a 2 MiB read; a bare lock costs a third of that.
    """

    __slots__ = ("fn", "_state", "_value", "_error", "_done", "_callbacks")

    def __init__(self, fn: Callable[[], T]) -> None:
        self.fn = fn
        self._state = _QUEUED
        self._value: T | None = None
        self._error: BaseException | None = None
        self._done = threading.Lock()
        self._done.acquire()  # released once the call is over (or cancelled)
        self._callbacks: list[Callable[[Call[T]], None]] = []

    def wait(self, timeout: float | None = None) -> bool:
        """True once the call is over (or was cancelled); False at ``timeout``."""
        if self._state >= _DONE:
            return True
        if self._done.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            self._done.release()  # let other waiters through
            return True
        return False

    def result(self) -> T:
        """The call's value, or its exception raised; only after ``wait`` returned True."""
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]

    def cancel(self) -> bool:
        """Make a call that has not started never run; False if it already started."""
        with _STATE:
            if self._state != _QUEUED:
                return self._state == _CANCELLED
            self._state = _CANCELLED
        self._error = BackendUnavailable("remote call cancelled before it started")
        self._finish()
        return True

    def add_done_callback(self, fn: Callable[[Call[T]], None]) -> None:
        """``fn(call)`` once the call is over: at once if it is, else in the worker thread."""
        with _STATE:
            if self._state < _DONE:
                self._callbacks.append(fn)
                return
        fn(self)

    def _start(self) -> bool:
        with _STATE:
            if self._state != _QUEUED:
                return False
            self._state = _RUNNING
            return True

    def _finish(self) -> None:
        with _STATE:
            if self._state == _RUNNING:
                self._state = _DONE
            callbacks, self._callbacks = self._callbacks, []
        self._done.release()
        for fn in callbacks:
            fn(self)


class Workers:
    """A few daemon threads running engine calls, so a caller can stop waiting at a deadline
    while a stalled call goes on. Threads start on demand, up to ``n``. Thread-safe."""

    def __init__(self, n: int, name: str) -> None:
        self.n, self.name = n, name
        self._queue: queue.SimpleQueue[Call | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._closed = False

    def submit(self, fn: Callable[[], T]) -> Call[T]:
        call = Call(fn)
        with self._lock:
            if self._closed:
                raise BackendUnavailable(f"{self.name}: closed")
            if self._idle == 0 and len(self._threads) < self.n:
                t = threading.Thread(target=self._work, name=f"{self.name}-{len(self._threads)}",
                                     daemon=True)
                self._threads.append(t)
                t.start()
            self._idle -= 1
        self._queue.put(call)
        return call

    def run(self, fn: Callable[[], T], timeout: float) -> T:
        """``fn()`` on a worker; ``TimeoutError`` after ``timeout`` s (a queued call is dropped)."""
        call = self.submit(fn)
        if not call.wait(timeout):
            call.cancel()
            raise TimeoutError(f"{self.name}: call exceeded {timeout:.3g}s")
        return call.result()

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            call = self._queue.get()
            if call is None:
                return
            if self._closed:
                call.cancel()
                continue
            if not call._start():
                continue  # cancelled while queued
            try:
                call._value = call.fn()
            except BaseException as e:  # noqa: BLE001  handed to the caller with the result
                call._error = e
            call._finish()

    def shutdown(self, timeout: float) -> bool:
        """Drop queued calls and stop the threads; False if a call still runs at ``timeout``."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for _ in threads:
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in threads)


def key_bound(crc: int, key: bytes, nbytes: int, part: int = 0) -> int:
    """The checksum stored for ``nbytes`` of a value whose own crc32c is ``crc``, bound to the
    value's ``key`` (and chunk ``part``): crc32c(key ‖ part ‖ bytes).

    Why: a checksum of the bytes alone lets a valid value copied or renamed under another key
    in the shared engine pass as that key's block; bound to the key it fails, and is a miss.
    """
    return checksum_combine(checksum(key + part.to_bytes(4, "little")), crc, nbytes)
