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
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._unremoved)

    def remove(self, items: list[tuple[bytes, Location]]) -> KVTierError | None:
        """Delete the records still pointing at these locations. On an index failure keep
        them to retry and return the error (the caller reports it); else None."""
        try:
            self.index.delete_if(items)
        except KVTierError as e:
            self._keep(items)
            return e
        return None

    def defer(self, items: list[tuple[bytes, Location]]) -> None:
        """Remove these records with the next ``retry`` (the tier's next flush), together with
        whatever else waits, in one transaction: for capacity evictions, where a transaction
        (and its sync) per evicted block made a full tier's puts 1.6x slower."""
        self._keep(items)

    def retry(self) -> None:
        """Try the kept deletes again; what still fails stays kept (not reported again)."""
        with self._lock:
            items = list(self._unremoved.items())
        if not items:
            return
        try:
            self.index.delete_if(items)
        except KVTierError:
            self._keep(items)
            return
        with self._lock:
            for key, loc in items:
                if self._unremoved.get(key) == loc:
                    del self._unremoved[key]

    def _keep(self, items: list[tuple[bytes, Location]]) -> None:
        with self._lock:
            self._unremoved.update(items)
            while len(self._unremoved) > self.limit:
                self._unremoved.pop(next(iter(self._unremoved)))
