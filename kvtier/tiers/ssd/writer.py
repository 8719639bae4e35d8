"""Puts for the SSD tier: claim room, write the payload, make it durable, commit its record.

The order is the durability contract (docs/ssd.md): a payload reaches the disk — and, for
``sync`` and ``batch``, is fdatasync'd — before the index record naming it commits. ``sync``
commits each put before it returns; ``batch`` serves a written block at once and commits the
records of an interval together (``flush``: every written segment fdatasync'd, then one
transaction); ``none`` commits at once without any fsync.
"""

from __future__ import annotations

import logging
import time

from kvtier.errors import KVTierError
from kvtier.tiers.base import BlockMeta
from kvtier.tiers.ssd.index import Location, Record, seal
from kvtier.tiers.ssd.store import Store

log = logging.getLogger(__name__)


class Writer:
    """The put path and the batch commit of one store."""

    def __init__(self, store: Store, inline_threshold: int) -> None:
        self.store = store
        self.inline_threshold = inline_threshold

    def put(self, key: bytes, mv: memoryview, meta: BlockMeta, free: int) -> None:
        """Store ``mv`` under ``key`` whole or not at all (``free``: free disk now). A key
        already stored or being written is a no-op. Raises StorageFull or KVTierError, counted;
        nothing already stored is touched."""
        store = self.store
        n = len(mv)
        crc, head = seal(key, mv)
        res = store.reserve(key, n, inline=n < self.inline_threshold, free=free)
        if res is None:
            return
        seg = res.segment
        ok = False
        try:
            if seg is not None:
                seg.write(mv, res.offset)
                if store.durability == "sync":
                    seg.sync()
            loc = Location(seg.id if seg else 0, res.offset, n, crc, store.durability != "none",
                           head)
            rec = Record(loc, meta, time.time())
            blob = bytes(mv) if seg is None else None
            if store.durability == "batch":
                store.stage(res, rec, blob)
            else:
                store.commit([(res, rec, blob)])
            ok = True
        except (OSError, KVTierError) as e:
            raise store.put_failed(e, n) from None
        finally:
            store.release(res, ok)

    def flush(self) -> None:
        """Commit puts waiting for a batch commit: payloads fdatasync'd first, then the index.

        Also retries index deletes that could not commit before (a full disk, damage).
        """
        store = self.store
        with store.commit_lock:
            batch = store.take_batch()
            store.retry_deletes()
            if not batch:
                return
            try:
                for seg in {p.segment for p in batch if p.segment is not None}:
                    seg.sync()
                store.index.commit((p.key, p.record, p.inline) for p in batch)
            except (OSError, KVTierError) as e:
                log.error("ssd batch commit of %d blocks failed, dropping them: %s", len(batch), e)
                store.batch_failed(batch, e)
            finally:
                store.batch_done(batch)
