"""The LMDB index: key -> where the block's bytes are, its checksum and its metadata.

One record per block (msgpack): segment id (0 = inline in the ``inline`` table), offset,
length, crc32c of the payload, whether the payload was fsync'd before the record committed,
the ``BlockMeta`` fields, last access time and hit count. LMDB commits are atomic, so the index
is always a consistent snapshot; the tier guarantees a record commits only after its payload.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import lmdb
import msgpack
import numpy as np

from kvtier.errors import KVTierError, StorageFull
from kvtier.tiers.base import BlockMeta


@dataclass(frozen=True, slots=True)
class Location:
    """Where a block's payload lives. ``segment == 0`` means inline in LMDB."""

    segment: int
    offset: int
    length: int
    crc: int
    durable: bool  # payload was fsync'd before the record committed


@dataclass(slots=True)
class Record:
    loc: Location
    meta: BlockMeta
    last_access: float
    hits: int = 0

    def pack(self) -> bytes:
        loc, m = self.loc, self.meta
        return msgpack.packb([loc.segment, loc.offset, loc.length, loc.crc, loc.durable,
                              m.namespace, m.parent, m.tokens, m.codec, m.created,
                              self.last_access, self.hits])

    @staticmethod
    def unpack(raw: bytes | memoryview) -> Record:
        seg, off, length, crc, durable, ns, parent, tokens, codec, created, last, hits = (
            msgpack.unpackb(raw))
        return Record(Location(seg, off, length, crc, durable),
                      BlockMeta(ns, parent, tokens, codec, created), last, hits)


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
        """Add records (with inline payloads) and remove keys in one atomic transaction."""
        with _guard("committing"), self.env.begin(write=True) as txn:
            for key, rec, inline in puts:
                if inline is not None:
                    txn.put(key, inline, db=self.inline)
                txn.put(key, rec.pack(), db=self.blocks)
            for key in deletes:
                txn.delete(key, db=self.blocks)
                txn.delete(key, db=self.inline)

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
