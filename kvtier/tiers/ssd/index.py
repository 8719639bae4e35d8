"""The LMDB index: key -> where the block's bytes are, its checksum and its metadata.

One record per block (msgpack): segment id (0 = inline in the ``inline`` table), offset,
length, crc32c of the payload, whether the payload was fsync'd before the record committed,
the ``BlockMeta`` fields, last access time and hit count. LMDB commits are atomic, so the index
is always a consistent snapshot; the tier guarantees a record commits only after its payload.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable, Iterator
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


class Index:
    """The LMDB environment. Thread-safe (LMDB serialises writers; readers never block)."""

    def __init__(self, directory: Path, map_size: int, sync: bool) -> None:
        self.env = lmdb.open(str(directory), map_size=map_size, max_dbs=4, subdir=True,
                             sync=sync, metasync=sync, writemap=False, readahead=False,
                             lock=True)
        self.blocks = self.env.open_db(b"blocks")
        self.inline = self.env.open_db(b"inline")
        self.meta = self.env.open_db(b"meta")

    def records(self) -> Iterator[tuple[bytes, Record]]:
        """Every record (a snapshot: materialised inside one read transaction)."""
        with self.env.begin(db=self.blocks) as txn:
            items = [(bytes(k), Record.unpack(v)) for k, v in txn.cursor()]
        return iter(items)

    def get(self, key: bytes) -> Record | None:
        with self.env.begin(db=self.blocks) as txn:
            raw = txn.get(key)
        return Record.unpack(raw) if raw is not None else None

    def commit(self, puts: Iterable[tuple[bytes, Record, bytes | None]] = (),
               deletes: Iterable[bytes] = ()) -> None:
        """Add records (with inline payloads) and remove keys in one atomic transaction."""
        try:
            with self.env.begin(write=True) as txn:
                for key, rec, inline in puts:
                    if inline is not None:
                        txn.put(key, inline, db=self.inline)
                    txn.put(key, rec.pack(), db=self.blocks)
                for key in deletes:
                    txn.delete(key, db=self.blocks)
                    txn.delete(key, db=self.inline)
        except lmdb.Error as e:
            raise lmdb_error(e, "committing") from None

    def delete_if(self, key: bytes, loc: Location) -> bool:
        """Delete ``key`` only if its record still points at ``loc``."""
        try:
            with self.env.begin(write=True, db=self.blocks) as txn:
                raw = txn.get(key)
                if raw is None or Record.unpack(raw).loc != loc:
                    return False
                txn.delete(key)
                txn.delete(key, db=self.inline)
                return True
        except lmdb.Error as e:
            raise lmdb_error(e, "deleting") from None

    def relocate(self, moves: list[tuple[bytes, Location, Location]]) -> set[bytes]:
        """Point records at their new locations, only where they still point at the old one."""
        moved = set()
        try:
            with self.env.begin(write=True, db=self.blocks) as txn:
                for key, old, new in moves:
                    raw = txn.get(key)
                    if raw is None:
                        continue
                    rec = Record.unpack(raw)
                    if rec.loc != old:
                        continue
                    rec.loc = new
                    txn.put(key, rec.pack())
                    moved.add(key)
        except lmdb.Error as e:
            raise lmdb_error(e, "relocating") from None
        return moved

    def touch(self, updates: dict[bytes, tuple[float, int]]) -> None:
        """Persist last-access times and add hit counts (lazily, not per read)."""
        with self.env.begin(write=True, db=self.blocks) as txn:
            for key, (last, hits) in updates.items():
                raw = txn.get(key)
                if raw is not None:
                    rec = Record.unpack(raw)
                    rec.last_access, rec.hits = max(rec.last_access, last), rec.hits + hits
                    txn.put(key, rec.pack())

    def read_inline(self, key: bytes, out: np.ndarray, offset: int) -> int:
        """Copy inline bytes ``[offset, offset+len(out))`` of ``key`` into ``out``; -1 if absent."""
        with self.env.begin(db=self.inline, buffers=True) as txn:
            buf = txn.get(key)
            if buf is None:
                return -1
            n = max(0, min(len(out), len(buf) - offset))
            if n:
                out[:n] = np.frombuffer(buf, dtype=np.uint8, count=n, offset=offset)
            return n

    def get_flag(self, name: bytes) -> bytes | None:
        with self.env.begin(db=self.meta) as txn:
            return txn.get(name)

    def set_flag(self, name: bytes, value: bytes) -> None:
        with self.env.begin(write=True, db=self.meta) as txn:
            txn.put(name, value)

    def sync(self) -> None:
        self.env.sync(True)

    def close(self) -> None:
        self.env.close()
