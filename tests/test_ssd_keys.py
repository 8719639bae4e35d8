"""A record can never serve another block's bytes: its checksums are bound to its key.

An index entry made to point at another block's bytes (with that block's own, valid checksum)
is a miss on whole-block reads, on header reads from byte 0, and in recovery; format-1
directories (checksums of the payload alone) are migrated on open.
"""

from __future__ import annotations

import json
from pathlib import Path

import lmdb
import msgpack
import pytest
import torch

from kvtier.block import checksum
from kvtier.config import SSDTierConfig
from kvtier.errors import CorruptBlock
from kvtier.tiers.ssd import SSDTier
from kvtier.tiers.ssd.datadir import VERSION_FILE
from tests.ssd_child import block_key, make_block, meta_for


def config(path: Path, **kw) -> SSDTierConfig:
    base = dict(path=str(path), durability="sync", segment_bytes=4 << 20, inline_threshold=16 << 10,
                min_free_bytes=0, direct_io=False)
    base.update(kw)
    return SSDTierConfig(**base)


def fill(tier: SSDTier, seed: int, count: int, lo: int, hi: int) -> dict[bytes, bytes]:
    blocks = {}
    for i in range(count):
        key, data = block_key(seed, i), make_block(seed, i, lo, hi)
        tier.put(key, data, meta_for(i))
        blocks[key] = data
    return blocks


def read(tier: SSDTier, key: bytes, n: int | None = None) -> bytes:
    out = torch.empty(n or tier.size(key), dtype=torch.uint8)
    assert tier.read_into(key, out) == out.numel()
    return out.numpy().tobytes()


class RawIndex:
    """The tier's LMDB environment opened directly, as a damaged or hand-edited one would be."""

    def __init__(self, path: Path) -> None:
        self.env = lmdb.open(str(path / "index"), max_dbs=4, subdir=True)
        self.blocks = self.env.open_db(b"blocks")
        self.inline = self.env.open_db(b"inline")
        self.meta = self.env.open_db(b"meta")

    def __enter__(self) -> RawIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.env.close()

    def fields(self, key: bytes) -> list:
        with self.env.begin(db=self.blocks) as txn:
            return msgpack.unpackb(txn.get(key))

    def set_fields(self, key: bytes, fields: list) -> None:
        with self.env.begin(write=True, db=self.blocks) as txn:
            txn.put(key, msgpack.packb(fields))

    def copy(self, src: bytes, dst: bytes) -> None:
        """Make ``dst``'s entry a byte-for-byte copy of ``src``'s (record and inline payload)."""
        with self.env.begin(write=True) as txn:
            txn.put(dst, txn.get(src, db=self.blocks), db=self.blocks)
            inline = txn.get(src, db=self.inline)
            if inline is not None:
                txn.put(dst, inline, db=self.inline)

    def keys(self) -> list[bytes]:
        with self.env.begin(db=self.blocks) as txn:
            return [bytes(k) for k in txn.cursor().iternext(values=False)]


@pytest.mark.parametrize("where,lo,hi", [("segment", 40_000, 200_000), ("inline", 2048, 12_000)])
def test_an_entry_pointing_at_another_blocks_bytes_is_a_miss(tmp_path, where, lo, hi):
    with SSDTier(config(tmp_path)) as tier:
        blocks = fill(tier, 51, 6, lo, hi)
        assert all((tier._loc[k].segment == 0) == (where == "inline") for k in blocks)
    a, b, c, d = list(blocks)[:4]
    with RawIndex(tmp_path) as raw:
        raw.copy(b, a)  # a's entry now names b's bytes, with b's valid checksum
        raw.copy(d, c)
    with SSDTier(config(tmp_path)) as tier:
        assert sum("fails its checksum" in p for p in tier.check()) == 2
        with pytest.raises(CorruptBlock):  # a header read from byte 0 is checked too
            read(tier, a, 64)
        assert not tier.contains(a)
        reqs = [(c, torch.empty(tier.size(c), dtype=torch.uint8), 0),
                (b, torch.empty(tier.size(b), dtype=torch.uint8), 0)]
        res = tier.read_many_into(reqs)
        assert isinstance(res[0], CorruptBlock) and res[1] == len(blocks[b])
        assert reqs[1][1].numpy().tobytes() == blocks[b]
        assert tier.stats()["corrupt_blocks"] == 2
        for key in (b, d, *list(blocks)[4:]):
            assert read(tier, key) == blocks[key]
        assert tier.check() == []
    with SSDTier(config(tmp_path)) as tier:  # the drops were persisted
        assert not tier.contains(a) and not tier.contains(c) and tier.check() == []


def test_recovery_drops_an_unsynced_entry_pointing_at_another_blocks_bytes(tmp_path):
    cfg = config(tmp_path, durability="none")
    with SSDTier(cfg) as tier:
        blocks = fill(tier, 52, 4, 40_000, 200_000)
    a, b = list(blocks)[:2]
    with RawIndex(tmp_path) as raw:
        raw.copy(b, a)
        with raw.env.begin(write=True, db=raw.meta) as txn:
            txn.put(b"clean", b"0")  # as after a crash
    with SSDTier(cfg) as tier:
        assert not tier.contains(a) and tier.stats()["recovery_dropped"] == 1
        assert read(tier, b) == blocks[b] and tier.check() == []


def to_format_1(path: Path, blocks: dict[bytes, bytes], keys: list[bytes]) -> None:
    """Rewrite these records as format 1 wrote them (12 fields, crc of the payload alone)."""
    with RawIndex(path) as raw:
        for key in keys:
            fields = raw.fields(key)
            assert len(fields) == 13
            raw.set_fields(key, fields[:3] + [checksum(blocks[key])] + fields[4:12])
    (path / VERSION_FILE).write_text(json.dumps({"format": "kvtier-ssd", "version": 1}))


@pytest.mark.parametrize("part", ["all", "half"])  # half: a migration a crash interrupted
def test_format_1_directories_are_bound_to_keys_on_open(tmp_path, part):
    with SSDTier(config(tmp_path)) as tier:
        blocks = fill(tier, 53, 12, 2048, 200_000)
        locs = dict(tier._loc)
    keys = list(blocks) if part == "all" else list(blocks)[::2]
    to_format_1(tmp_path, blocks, keys)
    bad = next(k for k in keys if locs[k].segment)  # its payload rots before the upgrade
    with open(tmp_path / "segments" / f"{locs[bad].segment:08d}.seg", "r+b") as f:
        f.seek(locs[bad].offset + 100)
        f.write(b"\xff\xfe\xfd")
    with SSDTier(config(tmp_path)) as tier:
        assert json.loads((tmp_path / VERSION_FILE).read_text())["version"] == 2
        assert not tier.contains(bad)
        for key, data in blocks.items():
            if key != bad:
                assert read(tier, key) == data
        assert tier.check() == []
    with RawIndex(tmp_path) as raw:
        assert set(raw.keys()) == set(blocks) - {bad}
        assert all(len(raw.fields(k)) == 13 for k in set(blocks) - {bad})
        a, b = [k for k in keys if k != bad][:2]
        raw.copy(b, a)
    with SSDTier(config(tmp_path)) as tier, pytest.raises(CorruptBlock):
        read(tier, a)  # and the binding holds for migrated records

