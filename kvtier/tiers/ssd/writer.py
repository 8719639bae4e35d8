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
from collections.abc import Callable, Sequence
from concurrent.futures import Executor

import numpy as np
import torch

from kvtier.errors import InvalidRequest, InvalidType, KVTierError
from kvtier.pieces import BlockPieces
from kvtier.tiers.base import BlockMeta
from kvtier.tiers.ssd.directio import padded
from kvtier.tiers.ssd.index import Location, Record, seal
from kvtier.tiers.ssd.segments import Segment, sync_all, sync_each
from kvtier.tiers.ssd.store import Reservation, Store

log = logging.getLogger(__name__)
BlockData = bytes | bytearray | memoryview | torch.Tensor | BlockPieces  # a block's bytes, for put


def check_block(key: bytes, data: BlockData, meta: BlockMeta) -> BlockPieces:
    """A put's arguments checked (InvalidType, InvalidRequest); the block's bytes as pieces
    (one piece, a view, unless it came in pieces)."""
    if not isinstance(key, bytes):
        raise InvalidType(f"key must be bytes, got {type(key).__name__}")
    if not 1 <= len(key) <= 511:
        raise InvalidRequest(f"key must be 1..511 bytes, got {len(key)}")
    if not isinstance(meta, BlockMeta):
        raise InvalidType(f"meta must be a BlockMeta, got {type(meta).__name__}")
    if isinstance(data, BlockPieces):
        if not data.nbytes:
            raise InvalidRequest("cannot store an empty block")
        return data
    if isinstance(data, torch.Tensor):
        t = data.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        mv = t.contiguous().reshape(-1).view(torch.uint8).numpy().data
    elif isinstance(data, (bytes, bytearray, memoryview)):
        mv = memoryview(data).cast("B")
    else:
        raise InvalidType(
            f"block data must be bytes, memoryview or a tensor, got {type(data).__name__}")
    if len(mv) == 0:
        raise InvalidRequest("cannot store an empty block")
    return BlockPieces((np.frombuffer(mv, dtype=np.uint8),), len(mv))


class Writer:
    """The put path and the batch commit of one store."""

    def __init__(self, store: Store, inline_threshold: int, pool: Executor | None = None) -> None:
        self.store = store
        self.inline_threshold = inline_threshold
        self._refusals = 0  # batch commits the full disk refused in a row (logged once)
        self.pool = pool  # where several segments are fdatasync'd at once

    def put(self, key: bytes, block: BlockPieces, meta: BlockMeta, free: int) -> None:
        """Store ``block`` under ``key`` whole or not at all (``free``: free disk now). A key
        already stored or being written is a no-op. Raises StorageFull or KVTierError, counted;
        nothing already stored is touched."""
        store = self.store
        n = block.nbytes
        crc, head = seal(key, block)
        res = store.reserve(key, n, inline=n < self.inline_threshold, free=free)
        if res is None:
            return
        seg = res.segment
        ok = False
        try:
            if seg is not None:
                if len(block.pieces) == 1:
                    seg.write(block.pieces[0].data, res.offset)
                else:
                    seg.write_many([(block.pieces, res.offset)])
                if store.durability == "sync":
                    seg.sync()
            loc = Location(seg.id if seg else 0, res.offset, n, crc, store.durability != "none",
                           head)
            rec = Record(loc, meta, time.time())
            blob = block.tobytes() if seg is None else None
            if store.durability == "batch":
                store.stage(res, rec, blob)
            else:
                store.commit([(res, rec, blob)])
            ok = True
        except (OSError, KVTierError) as e:
            raise store.put_failed(e, n) from None
        finally:
            store.release(res, ok)

    def put_many(self, blocks: Sequence[tuple[bytes, BlockPieces, BlockMeta]], free: int
                 ) -> list[Exception | None]:
        """Many puts made durable together (``BatchedPuts``); ``free``: free disk now.

        Room for every block is claimed first, a batch's records end to end in one segment
        where they fit; each segment's records go out in gathered O_DIRECT writes on the pool
        while this thread checksums; then (``sync``) one fdatasync per segment written, and
        one index transaction (``sync``, ``none``) or one batch staging (``batch``). Per block
        None (stored, or stored already) or the error ``put`` would raise; a failed block
        changes nothing stored.
        """
        store = self.store
        results: list[Exception | None] = [None] * len(blocks)
        claimed: list[tuple[int, Reservation]] = []
        prefer: Segment | None = None
        taken = 0
        for i, (key, block, _) in enumerate(blocks):
            n = block.nbytes
            try:
                res = store.reserve(key, n, inline=n < self.inline_threshold, free=free - taken,
                                    prefer=prefer)
            except KVTierError as e:
                results[i] = e
                continue
            if res is not None:
                claimed.append((i, res))
                taken += n
                prefer = res.segment or prefer
        ok: dict[int, bool] = {}
        try:
            wait = self._start_writes(blocks, claimed)
            try:
                records = {i: self._record(blocks[i], res) for i, res in claimed}  # while they run
            finally:
                failed = wait()
            if store.durability == "sync":
                written = {res.segment for _, res in claimed if res.segment is not None}
                failed.update(sync_each([s for s in written if s not in failed], self.pool))
            done = []
            for i, res in claimed:
                if res.segment in failed:
                    results[i] = store.put_failed(failed[res.segment], res.nbytes)
                else:
                    done.append((i, res))
            puts = [(res, records[i], blocks[i][1].tobytes() if res.segment is None else None)
                    for i, res in done]
            if store.durability == "batch":
                for res, rec, blob in puts:
                    store.stage(res, rec, blob)
            elif puts:
                try:
                    store.commit(puts)
                except KVTierError as e:
                    for i, res in done:
                        results[i] = store.put_failed(e, res.nbytes)
                    return results
            ok.update((i, True) for i, _ in done)
            return results
        finally:
            for i, res in reversed(claimed):  # last first: a failed run gives its space back
                store.release(res, ok.get(i, False))

    def _start_writes(self, blocks: Sequence[tuple[bytes, BlockPieces, BlockMeta]],
                      claimed: list[tuple[int, Reservation]]
                      ) -> Callable[[], dict[Segment, OSError]]:
        """Start writing the claimed segment records, each segment's on the pool (at once);
        returns a wait for them that gives the failures by segment."""
        runs: dict[Segment, list[tuple[Sequence[np.ndarray], int]]] = {}
        for i, res in claimed:
            if res.segment is not None:
                runs.setdefault(res.segment, []).append((blocks[i][1].pieces, res.offset))
        pool = self.pool
        if pool is None:
            failed = {}
            for seg, recs in runs.items():
                try:
                    _write_runs(seg, recs)
                except OSError as e:
                    failed[seg] = e
            return lambda: failed
        futures = {seg: pool.submit(_write_runs, seg, recs) for seg, recs in runs.items()}

        def wait() -> dict[Segment, OSError]:
            """Every write finished (then the first unexpected error raised): a write still
            running must never outlive the put, its room or the caller's memory."""
            out: dict[Segment, OSError] = {}
            unexpected: BaseException | None = None
            for seg, f in futures.items():
                try:
                    f.result()
                except OSError as e:
                    out[seg] = e
                except BaseException as e:
                    unexpected = unexpected or e
            if unexpected is not None:
                raise unexpected
            return out

        return wait

    def _record(self, block: tuple[bytes, BlockPieces, BlockMeta], res: Reservation) -> Record:
        key, data, meta = block
        crc, head = seal(key, data)
        seg = res.segment
        loc = Location(seg.id if seg else 0, res.offset, data.nbytes, crc,
                       self.store.durability != "none", head)
        return Record(loc, meta, time.time())

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
            ended = batch
            synced = False
            try:
                sync_all({p.segment for p in batch if p.segment is not None}, self.pool)
                synced = True
                store.index.commit((p.key, p.record, p.inline) for p in batch)
                self._refusals = 0
            except (OSError, KVTierError) as e:
                if synced and isinstance(e, KVTierError):
                    # The payloads are synced; only the records did not commit (a full disk:
                    # LMDB says EIO for a page write it cut short, which may show as free space
                    # again by now). Those puts were acknowledged: keep them served and commit
                    # them with the next batch (dropping them lost acknowledged puts, no crash).
                    ended = store.keep_batch(batch, e)
                    self._refusals += 1
                    log.log(logging.ERROR if self._refusals == 1 else logging.DEBUG,
                            "ssd batch commit of %d blocks failed; kept for the next commit: %s",
                            len(batch), e)
                else:
                    # A failed fdatasync may leave the pages marked clean: the payloads may not
                    # be on the disk, and a retry could not tell. Not served again.
                    log.error("ssd batch commit of %d blocks failed, dropping them: %s", len(batch), e)
                    store.batch_failed(batch, e)
            finally:
                store.batch_done(ended)


def _write_runs(seg: Segment, records: list[tuple[Sequence[np.ndarray], int]]) -> None:
    """Write records of ``seg``: each run lying end to end in one gathered write."""
    records.sort(key=lambda r: r[1])
    run: list[tuple[Sequence[np.ndarray], int]] = []
    end = -1
    for pieces, offset in records:
        if run and end != offset:
            seg.write_many(run)
            run = []
        run.append((pieces, offset))
        end = offset + padded(sum(p.nbytes for p in pieces))
    seg.write_many(run)
