"""SSDTier: the persistent tier — an LMDB index plus append-only segment files.

Guarantees (each has a test in tests/test_ssd_*.py):

- ``sync``: ``put`` returns after the payload is fsync'd and then its index record committed
  (LMDB fsyncs the commit). A crash loses nothing acknowledged.
- ``batch``: payloads are fsync'd and their records committed together every
  ``batch_interval_ms``; a crash loses at most the last interval's puts (never a torn block).
- ``none``: nothing is fsync'd; a crash may lose recent puts. Records whose payload was not
  fsync'd are checksum-verified on the next open after an unclean shutdown.
- A payload always reaches the disk before its record; a block is served only if its stored
  crc32c matches (whole-block reads), else it is dropped, counted as corrupt and raised as
  ``CorruptBlock``.
- A failed put (capacity, free-disk floor, ENOSPC, EIO) changes nothing already stored.

Locks: ``_lock`` guards the in-memory maps and counters and is never held across payload I/O;
``_commit_lock`` orders index mutations (puts, deletes, batch commits, compaction moves).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from kvtier.config import SSDTierConfig, format_size
from kvtier.errors import (
    CorruptBlock,
    DataDirError,
    InvalidRequest,
    InvalidType,
    KVTierError,
    StorageFull,
)
from kvtier.tiers.base import BlockMeta
from kvtier.tiers.ssd import compaction, reader
from kvtier.tiers.ssd.datadir import (
    VERSION,
    format_version,
    fsync_dir,
    open_data_dir,
    write_version,
)
from kvtier.tiers.ssd.directio import padded, probe_direct_io, read_exact
from kvtier.tiers.ssd.index import Location, Record, seal
from kvtier.tiers.ssd.migrate import bind_keys
from kvtier.tiers.ssd.recovery import check, open_index, recover
from kvtier.tiers.ssd.segments import Segment, SegmentSet

log = logging.getLogger(__name__)

DURABILITY = ("sync", "batch", "none")
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
MAX_UNREMOVED = 100_000  # index deletes kept for retry while the index cannot commit them


class SSDTier:
    """The SSD tier (see the module docstring for its guarantees). All methods are thread-safe."""

    name = "ssd"
    persistent = True

    def __init__(self, config: SSDTierConfig, *, compact_interval_s: float | None = None) -> None:
        if not config.path:
            raise InvalidRequest("the ssd tier needs a data directory: set ssd.path")
        if config.durability not in DURABILITY:
            raise InvalidRequest(
                f"unknown ssd durability {config.durability!r}: expected one of {DURABILITY}")
        self.config = config
        self.durability = config.durability
        self.root, self._lock_fd = open_data_dir(config.path)
        try:
            self._index = open_index(self.root, config.map_size, sync=config.durability != "none")
        except DataDirError:
            os.close(self._lock_fd)
            raise
        self._lock = threading.Lock()
        self._commit_lock = threading.Lock()
        self.direct_io = bool(config.direct_io) and probe_direct_io(self.root / "segments")
        self._segments = SegmentSet(self.root / "segments", config.segment_bytes,
                                    self.direct_io, self._segment_created)
        self._marked = False
        try:
            self._upgrade()
            found = recover(self._index, self._segments)
            self._mark_in_use()
        except Exception as e:
            self._close_files()
            raise DataDirError(f"data directory {self.root}: recovery failed ({e})") from None
        self._loc: dict[bytes, Location] = found.locations
        self._used = sum(loc.length for loc in self._loc.values())
        self._reserved = 0
        self._inflight: set[bytes] = set()
        self._pending: list[tuple[bytes, Record, bytes | None, Segment | None]] = []
        self._pending_inline: dict[bytes, bytes] = {}
        self._touches: dict[bytes, tuple[float, int]] = {}
        self._counters: Counter = Counter(recovered_blocks=len(self._loc),
                                          recovery_dropped=found.dropped)
        self._disk_short = 0  # padded size of the last put the disk refused; 0 after a success
        self._free_when_refused = 0  # free disk (statvfs) then: space is back once it grew by that
        self._index_damage: str | None = None  # the last index failure found at run time
        self._unremoved: dict[bytes, Location] = {}  # forgotten, index delete still to commit
        self._dead_space = True  # deleted blocks may hold disk space compaction could return
        self._compact_soon = False  # a put was refused for the disk: compact at the next tick
        self._closed = False
        self._pool = ThreadPoolExecutor(max(1, config.io_threads), thread_name_prefix="kvtier-ssd")
        self._stop = threading.Event()
        self._compact_interval_s = compact_interval_s
        self._flusher = threading.Thread(target=self._flush_loop, name="kvtier-ssd-flush",
                                         daemon=True)
        self._flusher.start()
        log.info("ssd tier at %s: %d blocks (%s), direct_io=%s, durability=%s", self.root,
                 len(self._loc), format_size(self._used), self.direct_io, self.durability)

    @property
    def durable(self) -> bool:
        """``sync``: durable when ``put`` returns; ``batch``: within one commit interval."""
        return self.durability != "none"

    def _upgrade(self) -> None:
        """Bind a format-1 directory's records to their keys (``migrate``); the version file
        says 2 once all are. On a full disk it is left for the next open: format-1 records
        stay readable (checked the old way) meanwhile."""
        if format_version(self.root) >= VERSION:
            return
        try:
            bind_keys(self._index, self._segments.directory)
            write_version(self.root, VERSION)
        except (StorageFull, OSError) as e:
            log.warning("ssd tier under %s stays at format 1 until the next open: %s", self.root, e)

    def _mark_in_use(self) -> bool:
        """Record that the directory is open (a clean close clears it), so a crash is known at
        the next open. False while the index cannot take the write (a full disk): the tier
        still opens and serves reads, and puts are refused until the mark is written."""
        try:
            self._index.set_flag(b"clean", b"0")
            self._index.sync()
        except StorageFull as e:
            log.warning("ssd tier under %s cannot mark itself open yet: %s", self.root, e)
            return False
        self._marked = True
        return True

    # ---- capacity --------------------------------------------------------------------------
    @property
    def capacity_bytes(self) -> int:
        return self.config.capacity_bytes

    @property
    def used_bytes(self) -> int:
        """Live payload bytes (dead space awaiting compaction is not counted)."""
        return self._used

    def fits_ever(self, nbytes: int) -> bool:
        return nbytes <= self.config.capacity_bytes

    def can_fit(self, nbytes: int) -> bool:
        """Whether a put of ``nbytes`` would pass the byte budget and the free-disk floor."""
        free = self._free_disk()
        with self._lock:
            return self._room_problem(nbytes, free) is None

    def short_of_disk(self, nbytes: int) -> bool:
        """Whether a put of ``nbytes`` would be refused for the disk (``DiskBound``).

        Deleting blocks frees no disk space until compaction, so the manager must not evict for
        this: the put fails with ``StorageFull`` and what is stored stays.
        """
        free = self._free_disk()
        return self._disk_problem(nbytes, free) is not None

    def _free_disk(self) -> int:
        try:
            st = os.statvfs(self.root)
        except OSError:
            return 0
        return st.f_bavail * st.f_frsize

    def _room_problem(self, nbytes: int, free: int) -> str | None:
        used = self._used + self._reserved
        if used + nbytes > self.config.capacity_bytes:
            return (f"ssd tier full: a {nbytes}-byte block does not fit "
                    f"({format_size(used)} of {format_size(self.config.capacity_bytes)} used)")
        return self._disk_problem(nbytes, free)

    def _disk_problem(self, nbytes: int, free: int) -> str | None:
        floor = self.config.min_free_bytes
        if free < nbytes:
            return (f"ssd tier: no space left on the device under {self.root} for a "
                    f"{nbytes}-byte block ({format_size(free)} free)")
        if free - nbytes < floor:
            return (f"ssd tier: free disk under {self.root} would fall below the floor "
                    f"({format_size(free)} free, floor {format_size(floor)})")
        return None

    def _refused_for_disk(self, nbytes: int) -> None:
        """Count a put the disk refused, remember its size for ``health``, and get compaction to
        return the space deleted blocks still hold (caller holds ``_lock``)."""
        self._counters["disk_full"] += 1
        self._disk_short = max(self._disk_short, padded(nbytes))
        self._free_when_refused = self._free_disk()
        if self._dead_space:
            self._compact_soon = True
            self._dead_space = False

    def health(self) -> list[str]:
        """What degrades the tier now (``ReportsHealth``): a full disk, a damaged index.

        The disk is full while free space is under the floor, and after a put the disk refused
        until that put would fit again: free space has grown by its size since (a quota's ENOSPC
        does not show in free space: then until a put succeeds).
        """
        problems = []
        free, floor, short = self._free_disk(), self.config.min_free_bytes, self._disk_short
        back = free - short >= floor and free >= self._free_when_refused + short
        if free < floor or (short and not back):
            last = f", a {format_size(short)} block did not fit" if short else ""
            problems.append(
                f"disk full under {self.root} ({format_size(free)} free, floor "
                f"{format_size(floor)}{last}): new blocks are refused, stored ones are served")
        elif short:
            self._disk_short = 0  # the space came back
        if self._index_damage is not None:
            problems.append(
                f"index damaged under {self.root} ({self._counters['index_errors']} errors, last "
                f"{self._index_damage}): blocks it cannot give back are misses; the next open "
                "checks it")
        return problems

    # ---- writes ----------------------------------------------------------------------------
    def put(self, key: bytes, data: bytes | memoryview | torch.Tensor, meta: BlockMeta) -> None:
        """Store a block (whole or nothing). A key already stored is a no-op.

        Raises StorageFull (budget, disk floor, ENOSPC) or KVTierError (EIO, missing segment
        directory) for this put only; nothing already stored is touched.
        """
        _check_key(key)
        if not isinstance(meta, BlockMeta):
            raise InvalidType(f"meta must be a BlockMeta, got {type(meta).__name__}")
        mv = _byte_view(data)
        n = len(mv)
        if n == 0:
            raise InvalidRequest("cannot store an empty block")
        if not self._marked and not self._mark_in_use():
            with self._lock:
                self._counters["put_failures"] += 1
                self._refused_for_disk(n)
            raise StorageFull(f"ssd tier: no space under {self.root} to open the index for writes")
        crc, head = seal(key, mv)
        inline = n < self.config.inline_threshold
        free = self._free_disk()
        seg: Segment | None = None
        offset = 0
        with self._lock:
            if self._closed:
                raise KVTierError("the ssd tier is closed")
            if key in self._loc or key in self._inflight:
                return
            problem = self._room_problem(n, free)
            if problem:
                self._counters["put_failures"] += 1
                if self._disk_problem(n, free):
                    self._refused_for_disk(n)
                raise StorageFull(problem)
            if not inline:
                try:
                    seg, offset = self._segments.reserve(n)
                except OSError as e:  # e.g. the segment directory is gone
                    raise self._put_error(e, n) from None
            self._inflight.add(key)
            self._reserved += n
        ok = False
        try:
            if seg is not None:
                seg.write(mv, offset)
                if self.durability == "sync":
                    seg.sync()
            loc = Location(seg.id if seg else 0, offset, n, crc, self.durability != "none", head)
            rec = Record(loc, meta, time.time())
            blob = bytes(mv) if inline else None
            if self.durability == "batch":
                with self._lock:
                    self._pending.append((key, rec, blob, seg))
                    if blob is not None:
                        self._pending_inline[key] = blob
                    if seg is not None:
                        seg.uncommitted += 1
                    self._insert(key, loc, seg)
            else:
                with self._commit_lock:
                    self._index.commit([(key, rec, blob)])
                    with self._lock:
                        self._insert(key, loc, seg)
            ok = True
        except OSError as e:
            with self._lock:
                err = self._put_error(e, n)
            raise err from None
        except KVTierError as e:
            with self._lock:
                self._counters["put_failures"] += 1
                if isinstance(e, StorageFull):  # the index could not grow on a full disk
                    self._refused_for_disk(n)
            self._index_failed(e, "committing a block")
            raise
        finally:
            with self._lock:
                self._inflight.discard(key)
                self._reserved -= n
                if seg is not None:
                    if ok:
                        seg.writers -= 1
                    else:
                        self._segments.unreserve(seg, offset, n)

    def _insert(self, key: bytes, loc: Location, seg: Segment | None) -> None:
        self._disk_short = 0
        self._loc[key] = loc
        self._used += loc.length
        if seg is not None:
            seg.live += loc.length
        self._counters["blocks_written"] += 1
        self._counters["bytes_written"] += loc.length

    def _put_error(self, e: OSError, nbytes: int) -> KVTierError:
        """Count a put failed by ``e`` and say why (caller holds ``_lock``)."""
        self._counters["put_failures"] += 1
        if e.errno in _FULL_ERRNOS:
            self._refused_for_disk(nbytes)
            return StorageFull(f"ssd tier: no space left on the device under {self.root} for a "
                               f"{nbytes}-byte block ({e.strerror})")
        if e.errno == errno.ENOENT:
            return KVTierError(f"ssd tier: segment missing under {self.root} ({e})")
        return KVTierError(f"ssd tier: write of a {nbytes}-byte block under {self.root} failed "
                           f"({e.strerror or e})")

    def _segment_created(self) -> None:
        if self.durability != "none":
            fsync_dir(self._segments.directory)

    def flush(self) -> None:
        """Commit puts waiting for a batch commit: payloads fsync'd first, then the index.

        Also retries index deletes that could not commit before (a full disk, damage).
        """
        with self._commit_lock:
            with self._lock:
                pending, self._pending = self._pending, []
                unremoved = list(self._unremoved.items())
            if unremoved:
                self._remove_records(unremoved, "retrying deletes", retry=True)
            if not pending:
                return
            try:
                for seg in {p[3] for p in pending if p[3] is not None}:
                    seg.sync()
                self._index.commit(p[:3] for p in pending)
            except (OSError, KVTierError) as e:
                log.error("ssd batch commit of %d blocks failed, dropping them: %s", len(pending), e)
                with self._lock:
                    for key, rec, _, _ in pending:
                        if self._loc.get(key) == rec.loc:
                            self._forget(key)
                    self._counters["put_failures"] += len(pending)
                    if isinstance(e, StorageFull) or getattr(e, "errno", None) in _FULL_ERRNOS:
                        self._refused_for_disk(max(p[1].loc.length for p in pending))
                if isinstance(e, KVTierError):
                    self._index_failed(e, "committing a batch")
            finally:
                with self._lock:
                    for key, _, _, seg in pending:
                        self._pending_inline.pop(key, None)
                        if seg is not None:
                            seg.uncommitted -= 1

    # ---- deletes ---------------------------------------------------------------------------
    def delete(self, key: bytes) -> bool:
        """Remove a block; False if absent. Its space is reclaimed by ``compact``.

        Never raises for the index: the block is gone from this process at once, and an index
        delete that cannot commit now (a full disk, damage) is retried by later flushes.
        """
        with self._commit_lock:
            with self._lock:
                committed = not any(p[0] == key for p in self._pending)
                loc = self._forget(key)
            if loc is None:
                return False
            if committed:
                self._remove_records([(key, loc)], "deleting a block")
        return True

    def _remove_records(self, items: list[tuple[bytes, Location]], what: str,
                        retry: bool = False) -> None:
        """Delete the records still pointing at these locations (caller holds ``_commit_lock``);
        if the index cannot commit it, keep them to retry (bounded: a record left behind is
        only dead space, and a key-bound checksum keeps it from serving other bytes)."""
        try:
            self._index.delete_if(items)
        except KVTierError as e:
            if not retry:
                self._index_failed(e, what)
            with self._lock:
                self._unremoved.update(items)
                while len(self._unremoved) > MAX_UNREMOVED:
                    self._unremoved.pop(next(iter(self._unremoved)))
            return
        if retry:
            with self._lock:
                for key, loc in items:
                    if self._unremoved.get(key) == loc:
                        del self._unremoved[key]

    def _index_failed(self, e: KVTierError, what: str) -> None:
        """Count and log index damage found at run time; ``health`` reports it from now on.

        A full disk is not damage (the caller counts it as the disk refusing). The first failure
        is logged as an error, later ones at debug level: ``index_errors`` counts them all.
        Caller does not hold ``_lock``.
        """
        if isinstance(e, StorageFull):
            return
        with self._lock:
            self._counters["index_errors"] += 1
            first, self._index_damage = self._index_damage is None, f"{what}: {e}"
        log.log(logging.ERROR if first else logging.DEBUG,
                "ssd index under %s failed while %s: %s", self.root, what, e)

    def _forget(self, key: bytes) -> Location | None:
        """Drop ``key`` from memory (caller holds ``_lock``)."""
        loc = self._loc.pop(key, None)
        if loc is None:
            return None
        self._used -= loc.length
        seg = self._segments.by_id.get(loc.segment)
        if seg is not None:
            seg.live -= loc.length
            self._dead_space = True
        if self._pending and any(p[0] == key for p in self._pending):
            # Callers hold _commit_lock, so no batch commit is half-way through this list.
            self._pending = [p for p in self._pending if p[0] != key]
            self._pending_inline.pop(key, None)
            if seg is not None:
                seg.uncommitted -= 1
        self._touches.pop(key, None)
        return loc

    def expire(self, namespace: str, older_than: float) -> int:
        """Delete every block of ``namespace`` created before unix time ``older_than``."""
        self.flush()
        try:
            records = self._index.records(bad=[])
        except KVTierError as e:
            self._index_failed(e, "listing blocks to expire")
            return 0
        doomed = [k for k, rec in records
                  if rec.meta.namespace == namespace and rec.meta.created < older_than]
        with self._commit_lock:
            with self._lock:
                gone = [(k, loc) for k in doomed if (loc := self._forget(k)) is not None]
                self._counters["expired"] += len(gone)
            if gone:
                self._remove_records(gone, "expiring blocks")
        return len(gone)

    def drop_corrupt(self, key: bytes, loc: Location, why: str) -> CorruptBlock:
        """Remove a block whose bytes failed verification; returns the error to raise."""
        with self._commit_lock:
            with self._lock:
                mine = self._loc.get(key) == loc and self._forget(key) is not None
                if mine:
                    self._counters["corrupt_blocks"] += 1
            if mine:
                self._remove_records([(key, loc)], "removing a corrupt block")
        log.warning("ssd block %s %s; dropped", key.hex(), why)
        return CorruptBlock(f"ssd block {key.hex()} {why}; dropped")

    def index_unreadable(self, key: bytes, loc: Location, e: KVTierError) -> CorruptBlock:
        """A block the index cannot give back (damage found on read): counted, dropped, a miss."""
        self._index_failed(e, f"reading block {key.hex()}")
        return self.drop_corrupt(key, loc, "is unreadable from the damaged index")

    # ---- reads -----------------------------------------------------------------------------
    def contains(self, key: bytes) -> bool:
        return key in self._loc

    def size(self, key: bytes) -> int | None:
        loc = self._loc.get(key)
        return loc.length if loc is not None else None

    def read_into(self, key: bytes, out: torch.Tensor, offset: int = 0) -> int:
        """Read ``out.numel()`` bytes of the block from byte ``offset`` into ``out``; returns the count.

        Positional reads go straight into ``out`` (O_DIRECT for the aligned bulk when ``out`` is
        4 KiB-aligned, see ``aligned_empty``). A whole-block read (offset 0, ``out`` at least
        the block's size) verifies the stored crc32c; partial reads are not verified here — the
        caller verifies them with the block format's per-layer crc (``kvtier.block``).
        Raises KeyError if absent, CorruptBlock if the bytes fail verification (then dropped).
        """
        return reader.read_one(self, key, out, offset)

    def read_many_into(self, requests: list[tuple[bytes, torch.Tensor, int]],
                       _inline_pool: bool = True) -> list[int | Exception]:
        """Many ``read_into`` calls with reads in flight on the I/O pool.

        Adjacent records of one segment are coalesced into one ``preadv`` with several buffers.
        Returns, per request, the byte count or the exception ``read_into`` would raise.
        """
        return reader.read_many(self, requests, use_pool=_inline_pool)

    def _pread(self, seg: Segment, arr: np.ndarray, file_offset: int) -> tuple[int, bool]:
        return read_exact(seg.fd, seg.dfd if self.direct_io else -1, arr, file_offset)

    # ---- maintenance and reports -----------------------------------------------------------
    def compact(self) -> int:
        """Rewrite segments whose live fraction is below ``compaction_live_fraction``.

        Reads continue throughout; returns the number of segments whose files were removed.
        """
        return compaction.compact(self)

    def scan(self) -> Iterator[tuple[bytes, BlockMeta, int]]:
        """Every stored block with its metadata and size (a snapshot)."""
        self.flush()
        live = dict(self._loc)
        try:
            records = self._index.records(bad=[])
        except KVTierError as e:
            self._index_failed(e, "listing blocks")
            return
        for key, rec in records:
            if live.get(key) == rec.loc:
                yield key, rec.meta, rec.loc.length

    def ages(self, now: float | None = None) -> list[float]:
        """Age in seconds of every stored block (for the retention report)."""
        now = time.time() if now is None else now
        return [max(0.0, now - meta.created) for _, meta, _ in self.scan()]

    def check(self) -> list[str]:
        """Problems between index, memory and segments (empty when consistent); reads everything."""
        self.flush()
        try:
            return check(self._index, self._segments.directory, dict(self._loc))
        except KVTierError as e:
            return [f"index unreadable: {e}"]

    def stats(self) -> dict:
        with self._lock:
            segs = list(self._segments.by_id.values())
            head = sum(s.head for s in segs)
            live = sum(s.live for s in segs)
            out = {"blocks": len(self._loc), "used_bytes": self._used,
                   "capacity_bytes": self.config.capacity_bytes, "durability": self.durability,
                   "direct_io": self.direct_io, "segments": len(segs), "segment_bytes": head,
                   "live_fraction": live / head if head else 1.0}
            counters = dict(self._counters)
        out["disk_bytes"] = sum(s.disk_bytes() for s in segs)
        for name in ("corrupt_blocks", "index_errors", "put_failures", "disk_full", "bytes_read", "bytes_written", "blocks_read",
                     "blocks_written", "direct_reads", "buffered_reads", "coalesced_reads", "compactions",
                     "compacted_segments", "compacted_bytes", "expired"):
            out[name] = counters.pop(name, 0)
        out.update(counters)
        return out

    def _flush_touches(self) -> None:
        with self._lock:
            touches, self._touches = self._touches, {}
        if touches:
            try:
                self._index.touch(touches)
            except KVTierError as e:  # access times are advisory; never fail a caller for them
                self._index_failed(e, "saving access times")

    def _flush_loop(self) -> None:
        interval = self.config.batch_interval_ms / 1000 if self.durability == "batch" else 1.0
        last_touch = last_compact = time.monotonic()
        while not self._stop.wait(interval):
            try:
                self.flush()
                now = time.monotonic()
                if now - last_touch >= 1.0:
                    self._flush_touches()
                    last_touch = now
                due = self._compact_interval_s and now - last_compact >= self._compact_interval_s
                if due or self._compact_soon:
                    self._compact_soon = False
                    self.compact()
                    last_compact = now
            except Exception:
                log.exception("ssd background flush failed")

    def close(self) -> None:
        """Commit what is pending, mark the directory cleanly closed and release it."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        self._flusher.join()
        self.flush()
        self._flush_touches()
        self._pool.shutdown(wait=True)
        try:
            if self.durability == "none":
                for seg in list(self._segments.by_id.values()):
                    seg.sync()
            self._index.set_flag(b"clean", b"1")
            self._index.sync()
        except (OSError, KVTierError) as e:  # the next open then treats it as a crash
            log.error("ssd tier under %s did not close cleanly: %s", self.root, e)
        finally:
            self._close_files()

    def _close_files(self) -> None:
        for seg in list(self._segments.by_id.values()):
            seg.close()
        self._segments.by_id.clear()
        self._index.close()
        os.close(self._lock_fd)

    def __enter__(self) -> SSDTier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes):
        raise InvalidType(f"key must be bytes, got {type(key).__name__}")
    if not 1 <= len(key) <= 511:
        raise InvalidRequest(f"key must be 1..511 bytes, got {len(key)}")


def _byte_view(data: bytes | bytearray | memoryview | torch.Tensor) -> memoryview:
    if isinstance(data, torch.Tensor):
        t = data.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())
    if isinstance(data, (bytes, bytearray, memoryview)):
        return memoryview(data).cast("B")
    raise InvalidType(f"block data must be bytes, memoryview or a tensor, got {type(data).__name__}")
