"""Index deletes that could not commit (a full disk, a damaged index), kept to retry; and
capacity evictions' deletes, deferred to the next flush on purpose.

A deleted, expired or corrupt block leaves the tier's memory at once; its index record goes now
or, when the index refuses the transaction, at a later flush. Why that is safe to defer: a record
left behind is only dead space (its key-bound checksum keeps it from vouching for other bytes),
and the next open drops records its segments cannot back (a record whose bytes are still there
brings its block back, intact: why only evictions for capacity are deferred, never an evict or a
namespace drop a caller asked for). The retry list is bounded (``MAX_UNREMOVED``) for the same
reason. Thread-safe.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from kvtier.errors import KVTierError
from kvtier.tiers.ssd.index import Index, Location

MAX_UNREMOVED = 100_000  # index deletes kept for retry while the index cannot commit them


class RecordDeleter:
    """Removes index records of blocks already forgotten in memory; keeps failures to retry.

    Callers hold the store's commit lock (index mutations are ordered by it).
    """

    def __init__(self, index: Index, limit: int = MAX_UNREMOVED) -> None:
        self.index = index
        self.limit = limit
        self._unremoved: dict[bytes, Location] = {}  # forgotten, index delete still to commit
        self._deferred: dict[bytes, Location] = {}  # capacity evictions, for the next flush
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._unremoved) + len(self._deferred)

    def remove(self, items: list[tuple[bytes, Location]]) -> KVTierError | None:
        """Delete the records still pointing at these locations. On an index failure keep
        them to retry and return the error (the caller reports it); else None."""
        try:
            self.index.delete_if(items)
        except KVTierError as e:
            self._keep(items)
            return e
        return None

    def defer(self, items: list[tuple[bytes, Location]]) -> KVTierError | None:
        """Remove these records with the next ``retry`` (the tier's next flush), together with
        whatever else waits, in one transaction: for capacity evictions, where a transaction
        (and its sync) per evicted block made a full tier's puts 1.5x slower. Kept apart from
        the failed deletes, so that they never push one of those out; when ``limit`` of them
        wait already (the index keeps failing), removed now as ``remove`` does."""
        with self._lock:
            if len(self._deferred) + len(items) <= self.limit:
                self._deferred.update(items)
                return None
        return self.remove(items)

    def discard(self, keys: Iterable[bytes]) -> None:
        """Keys stored again: their new records replace the old ones, which must not be
        deleted after them (an inline block stored again with the same bytes has the same
        location, so ``delete_if`` could not tell the two records apart)."""
        with self._lock:
            for key in keys:
                self._unremoved.pop(key, None)
                self._deferred.pop(key, None)

    def retry(self) -> None:
        """Try the kept and deferred deletes, in one transaction; what fails stays (not
        reported again)."""
        with self._lock:
            items = list(self._unremoved.items()) + list(self._deferred.items())
        if not items:
            return
        try:
            self.index.delete_if(items)
        except KVTierError:
            return
        with self._lock:
            for key, loc in items:
                for waiting in (self._unremoved, self._deferred):
                    if waiting.get(key) == loc:
                        del waiting[key]

    def _keep(self, items: list[tuple[bytes, Location]]) -> None:
        with self._lock:
            self._unremoved.update(items)
            while len(self._unremoved) > self.limit:
                self._unremoved.pop(next(iter(self._unremoved)))
