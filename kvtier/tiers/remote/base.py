"""The RemoteBackend extension point: one shared key-value engine (Redis/Valkey, Mooncake).

A backend only moves bytes to and from the engine; ``RemoteTier`` adds asynchronous writes,
the bound on bytes in flight, the circuit breaker and the statistics. A registry maps the
configured backend name to a constructor so ``make_remote_tier`` never imports an engine's
client library that the deployment does not use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch

from kvtier.errors import InvalidRequest


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
      call has returned or raised, even if the engine completes a timed-out read later.
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


def as_byte_view(data: bytes | bytearray | memoryview | torch.Tensor) -> memoryview:
    """A flat byte memoryview of ``data``; tensors are copied to host memory if needed."""
    if isinstance(data, torch.Tensor):
        t = data.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous().view(-1).view(torch.uint8)
        return memoryview(t.numpy()).cast("B")
    return memoryview(data).cast("B")
