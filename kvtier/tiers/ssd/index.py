"""The LMDB index: key -> where the block's bytes are, its checksums and its metadata.

One record per block (msgpack): segment id (0 = inline in the ``inline`` table), offset,
length, crc32c of the payload, whether the payload was fsync'd before the record committed,
the ``BlockMeta`` fields, last access time, hit count and the crc32c of the payload's first
``HEAD_BYTES``. LMDB commits are atomic, so the index is always a consistent snapshot; the tier
guarantees a record commits only after its payload.

Both checksums are seeded with the crc32c of the block's key (format 2), so a record can only
ever vouch for its own block's bytes: a record pointing at another block's bytes — copied,
stale after a crash, or left behind by a bug — fails its check and is a miss. Format-1 records
(crc of the payload alone, no head crc) are rewritten on open (``migrate``).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb
import msgpack
import numpy as np

from kvtier.block import checksum, checksum_combine
from kvtier.errors import KVTierError, StorageFull
from kvtier.pieces import BlockPieces
from kvtier.tiers.base import BlockMeta
from kvtier.tiers.ssd.space import free_bytes

HEAD_BYTES = 32  # a read from byte 0 this long is checked too (a block header's own crc is in it)
# bytes, a memoryview or a 1-D uint8 numpy array: numpy declares no buffer protocol to type
# checkers before Python 3.12, so this cannot be spelled as ``collections.abc.Buffer``
Payload = Any


@dataclass(frozen=True, slots=True)
class Location:
    """Where a block's payload lives (``segment == 0``: inline in LMDB) and its checksums."""

    segment: int
    offset: int
    length: int
    crc: int  # crc32c of the payload, seeded with the key's
    durable: bool  # payload was fsync'd before the record committed
    head: int = -1  # crc32c of the first HEAD_BYTES, seeded with the key's; -1: format 1

    @property
    def bound(self) -> bool:
        """Whether the checksums cover the key (format 2), not the payload alone (format 1)."""
        return self.head >= 0


def seal(key: bytes, payload: Payload | BlockPieces) -> tuple[int, int]:
    """(crc, head) of ``payload`` stored under ``key``: both bound to the key. A block in pieces
    (``kvtier.pieces``) is checksummed piece by piece, a piece whose checksum it carries by
    combining that one (not reading the piece again): so the record's checksum comes from the
    same pass as the block's own layer checksums, and a page the caller changed after encoding
    fails both."""
    seed = checksum(key)
    if not isinstance(payload, BlockPieces):
        return checksum(payload, seed), checksum(payload[:HEAD_BYTES], seed)
    crc = seed
    for piece, known in zip(payload.pieces, payload.crcs or (None,) * len(payload.pieces), strict=True):
        crc = checksum(piece, crc) if known is None else checksum_combine(crc, known, len(piece))
    first = payload.pieces[0]
    if len(first) < HEAD_BYTES:  # the head spans pieces: gather its bytes only
        first = np.concatenate([p[:HEAD_BYTES] for p in payload.pieces])
    return crc, checksum(first[:HEAD_BYTES], seed)


def matches(key: bytes, loc: Location, data: Payload, offset: int = 0) -> bool:
    """Whether bytes ``[offset, offset + len(data))`` read for ``key`` are its block's.

    The whole block is checked against ``crc``; a read from byte 0 of at least ``HEAD_BYTES``
    against ``head`` (for ``kvtier.block`` payloads that covers the header and, through its
    crc, every layer's crc); other partial reads cannot be checked here (the caller checks them
    with the block format's per-layer crc).
    """
    n = len(data)
    if offset:
        return True
    seed = checksum(key) if loc.bound else 0
    if n == loc.length:
        return checksum(data, seed) == loc.crc
    if n >= HEAD_BYTES and loc.bound:
        return checksum(data[:HEAD_BYTES], seed) == loc.head
    return True


@dataclass(slots=True)
class Record:
    loc: Location
    meta: BlockMeta
    last_access: float
    hits: int = 0

    def pack(self) -> bytes:
        loc, m = self.loc, self.meta
        fields = [loc.segment, loc.offset, loc.length, loc.crc, loc.durable, m.namespace,
                  m.parent, m.tokens, m.codec, m.created, self.last_access, self.hits]
        if loc.bound:
            fields.append(loc.head)
        return msgpack.packb(fields)

    @staticmethod
    def unpack(raw: bytes | memoryview) -> Record:
        fields = msgpack.unpackb(raw)
        if not isinstance(fields, list) or len(fields) not in (12, 13):
            raise ValueError(f"a record has 12 or 13 fields, this one {fields!r:.80}")
        seg, off, length, crc, durable, ns, parent, tokens, codec, created, last, hits = fields[:12]
        head = fields[12] if len(fields) == 13 else -1
        if not all(type(x) is int and x >= -1 for x in (seg, off, length, crc, head)):
            raise ValueError(f"a record's location is not numbers: {fields[:5]!r:.80}")
        return Record(Location(seg, off, length, crc, durable, head),
                      BlockMeta(ns, parent, tokens, codec, created), last, hits)


COMMIT_SLACK = 1 << 20  # free disk under the bytes a commit writes plus this: an EIO is the disk full
RECORD_BYTES = 256  # a record and its share of LMDB's pages, generously


def lmdb_error(e: lmdb.Error, what: str) -> KVTierError:
    """Map an LMDB failure to our hierarchy: full map or disk -> StorageFull."""
    if isinstance(e, lmdb.MapFullError) or "No space left" in str(e) or (
            getattr(e, "errno", None) == errno.ENOSPC):
        return StorageFull(f"ssd index full while {what}: {e}")
    return KVTierError(f"ssd index error while {what}: {e}")


@contextmanager
def _guard(what: str) -> Iterator[None]:
    """Every LMDB failure leaves the index as a KVTierError (StorageFull for a full disk)."""
    try:
        yield
    except lmdb.Error as e:
        raise lmdb_error(e, what) from None


def _unpack(key: bytes, raw: bytes | memoryview) -> Record:
    try:
        return Record.unpack(raw)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise KVTierError(f"ssd index record {key.hex()} is undecodable ({e})") from None


class Index:
    """The LMDB environment. Thread-safe (LMDB serialises writers; readers never block).

    Every method raises ``KVTierError`` (``StorageFull`` when the disk or map is full) for any
    LMDB failure, never an ``lmdb.Error``: damage found at run time is the tier's to handle.
    """

    def __init__(self, directory: Path, map_size: int, sync: bool) -> None:
        self.env = lmdb.open(str(directory), map_size=map_size, max_dbs=4, subdir=True,
                             sync=sync, metasync=sync, writemap=False, readahead=False,
                             lock=True)
        self.blocks = self.env.open_db(b"blocks")
        self.inline = self.env.open_db(b"inline")
        self.meta = self.env.open_db(b"meta")

    def reusable_bytes(self) -> int:
        """Bytes of pages LMDB freed (deleted records and inline payloads) and writes again
        before it grows its file: room for inline blocks that free disk does not show, since
        the file never shrinks. The pages of the file less those every database uses (the free
        list's own few pages count as reusable)."""
        with _guard("measuring free pages"), self.env.begin() as txn:
            psize = self.env.stat()["psize"]
            used = 2 + sum(st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
                           for st in [txn.stat(self.env.open_db(None, txn=txn))]
                           + [txn.stat(db) for db in (self.blocks, self.inline, self.meta)])
        return max(0, self.env.info()["last_pgno"] + 1 - used) * psize

    def records(self, bad: list[bytes] | None = None) -> Iterator[tuple[bytes, Record]]:
        """Every record (a snapshot: materialised inside one read transaction).

        Undecodable records raise, or, when ``bad`` is given, are skipped and their keys added.
        """
        items = []
        with _guard("reading every record"), self.env.begin(db=self.blocks) as txn:
            for k, v in txn.cursor():
                key = bytes(k)
                try:
                    items.append((key, _unpack(key, v)))
                except KVTierError:
                    if bad is None:
                        raise
                    bad.append(key)
        return iter(items)

    def get(self, key: bytes) -> Record | None:
        with _guard("reading a record"), self.env.begin(db=self.blocks) as txn:
            raw = txn.get(key)
            return _unpack(key, raw) if raw is not None else None

    def commit(self, puts: Iterable[tuple[bytes, Record, bytes | None]] = (),
               deletes: Iterable[bytes] = ()) -> None:
        """Add records (with inline payloads) and remove keys in one atomic transaction.

        LMDB reports a page write the full disk cut short as EIO, not ENOSPC: with less free
        disk than the commit writes (and a margin), that is ``StorageFull``, so the caller
        keeps the records for a later commit and says 507, not index damage."""
        puts = list(puts)
        try:
            with _guard("committing"), self.env.begin(write=True) as txn:
                for key, rec, inline in puts:
                    if inline is not None:
                        txn.put(key, inline, db=self.inline)
                    txn.put(key, rec.pack(), db=self.blocks)
                for key in deletes:
                    txn.delete(key, db=self.blocks)
                    txn.delete(key, db=self.inline)
        except StorageFull:
            raise
        except KVTierError as e:
            if os.strerror(errno.EIO) not in str(e):
                raise
            need = COMMIT_SLACK + sum(len(i) + RECORD_BYTES if i is not None else RECORD_BYTES
                                      for _, _, i in puts)
            free = free_bytes(Path(self.env.path()))
            if free >= need:
                raise
            raise StorageFull(f"ssd index: the disk under {self.env.path()} is full ({free} bytes "
                              f"free) while committing: {e}") from None

    def delete_if(self, items: Iterable[tuple[bytes, Location]]) -> int:
        """Delete each key only if its record still points at its location; returns how many."""
        n = 0
        with _guard("deleting"), self.env.begin(write=True, db=self.blocks) as txn:
            for key, loc in items:
                raw = txn.get(key)
                if raw is None or _unpack(key, raw).loc != loc:
                    continue
                txn.delete(key)
                txn.delete(key, db=self.inline)
                n += 1
        return n

    def relocate(self, moves: list[tuple[bytes, Location, Location]]) -> set[bytes]:
        """Point records at their new locations, only where they still point at the old one."""
        moved = set()
        with _guard("relocating"), self.env.begin(write=True, db=self.blocks) as txn:
            for key, old, new in moves:
                raw = txn.get(key)
                if raw is None:
                    continue
                rec = _unpack(key, raw)
                if rec.loc != old:
                    continue
                rec.loc = new
                txn.put(key, rec.pack())
                moved.add(key)
        return moved

    def touch(self, updates: dict[bytes, tuple[float, int]]) -> None:
        """Persist last-access times and add hit counts (lazily, not per read)."""
        with _guard("saving access times"), self.env.begin(write=True, db=self.blocks) as txn:
            for key, (last, hits) in updates.items():
                raw = txn.get(key)
                if raw is not None:
                    rec = _unpack(key, raw)
                    rec.last_access, rec.hits = max(rec.last_access, last), rec.hits + hits
                    txn.put(key, rec.pack())

    def read_inline(self, key: bytes, out: np.ndarray, offset: int) -> int:
        """Copy inline bytes ``[offset, offset+len(out))`` of ``key`` into ``out``; -1 if absent."""
        with _guard("reading an inline block"), \
                self.env.begin(db=self.inline, buffers=True) as txn:
            buf = txn.get(key)
            if buf is None:
                return -1
            n = max(0, min(len(out), len(buf) - offset))
            if n:
                out[:n] = np.frombuffer(buf, dtype=np.uint8, count=n, offset=offset)
            return n

    def get_flag(self, name: bytes) -> bytes | None:
        with _guard("reading a flag"), self.env.begin(db=self.meta) as txn:
            return txn.get(name)

    def set_flag(self, name: bytes, value: bytes) -> None:
        with _guard("writing a flag"), self.env.begin(write=True, db=self.meta) as txn:
            txn.put(name, value)

    def sync(self) -> None:
        with _guard("syncing"):
            self.env.sync(True)

    def close(self) -> None:
        self.env.close()
