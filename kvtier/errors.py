"""The kvtier exception hierarchy.

Every error a caller can act on is one of these; messages name the bad value and what was
expected. ``InvalidRequest`` is also a ``ValueError`` (and ``InvalidType`` a ``TypeError``) so
plain Python callers can catch the usual built-ins. The server maps these to HTTP statuses in
exactly one place (``server/errors.py``).
"""

from __future__ import annotations


class KVTierError(Exception):
    """Base class of every kvtier error."""


class InvalidRequest(KVTierError, ValueError):
    """The caller passed something malformed; nothing was changed."""


class InvalidType(InvalidRequest, TypeError):
    """The caller passed a value of the wrong type; nothing was changed."""


class LayoutMismatch(InvalidRequest):
    """KV whose shape or dtype differs from the namespace's fixed layout."""


class UnknownNamespace(InvalidRequest):
    """A namespace that was never registered (or was dropped)."""


class FingerprintMismatch(InvalidRequest):
    """A block namespace re-registered with another engine fingerprint or page size: the
    engine's configuration changed, so its pages must not be served from the old namespace."""


class CorruptBlock(KVTierError):
    """Stored bytes failed their checksum; the block is dropped, never served.

    ``dropped``: the tier that found the damage already removed its copy (a caller that reads
    the block again gets a miss there, so it is the caller's one chance to count the damage)."""

    def __init__(self, *args: object, dropped: bool = False) -> None:
        super().__init__(*args)
        self.dropped = dropped


class StorageFull(KVTierError):
    """A tier could not take a block (capacity, free-disk floor, or ENOSPC)."""


class BackendUnavailable(KVTierError):
    """A remote engine is down, timed out, or its circuit breaker is open."""


class DataDirError(KVTierError):
    """A data directory that is not kvtier's, has an unknown format version, or is unreadable."""
