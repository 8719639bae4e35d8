"""The SSD tier's write path: concurrent puts append to different segment files, and
``put_many`` (the ``BatchedPuts`` capability) stores a batch with per-block results."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest
import torch

from kvtier.config import SSDTierConfig
from kvtier.errors import InvalidRequest, InvalidType, KVTierError, StorageFull
from kvtier.tiers.base import BatchedPuts
from kvtier.tiers.ssd import SSDTier, aligned_empty, segments
from tests.ssd_child import block_key, make_block, meta_for


def config(path: Path, **kw) -> SSDTierConfig:
    base = dict(path=str(path), durability="sync", segment_bytes=8 << 20, inline_threshold=8192,
                min_free_bytes=0, capacity_bytes=1 << 34)
    base.update(kw)
    return SSDTierConfig(**base)


def read(tier: SSDTier, key: bytes) -> bytes:
    out = torch.empty(tier.size(key), dtype=torch.uint8)
    assert tier.read_into(key, out) == out.numel()
    return out.numpy().tobytes()


def test_concurrent_puts_append_to_different_segment_files(tmp_path, monkeypatch):
    """Writers appending to one file queue on its inode lock; each gets a file of its own."""
    writers = 4
    arrived = threading.Barrier(writers, timeout=60)
    files, first = [], threading.local()
    real = segments._pwrite

    def pwrite(fd, data, offset):
        if not getattr(first, "done", False):  # every put's first write waits for the others
            first.done = True
            files.append(os.readlink(f"/proc/self/fd/{fd}"))
            arrived.wait()
        return real(fd, data, offset)

    blocks = {block_key(70, i): make_block(70, i, 200_000, 300_000) for i in range(writers)}
    with SSDTier(config(tmp_path / "kv")) as tier:
        monkeypatch.setattr(segments, "_pwrite", pwrite)
        errors = []

        def put(key: bytes) -> None:
            try:
                tier.put(key, blocks[key], meta_for(0))
            except Exception as e:  # noqa: BLE001  reported below
                errors.append(e)

        threads = [threading.Thread(target=put, args=(k,)) for k in blocks]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        monkeypatch.undo()
        assert errors == []
        assert len(set(files)) == writers, files  # all in flight at once, each in its own file
        assert all(read(tier, k) == d for k, d in blocks.items())
        assert tier.check() == []
    with SSDTier(config(tmp_path / "kv")) as tier:  # several partly filled segments reopen
        assert all(read(tier, k) == d for k, d in blocks.items())
        more = {block_key(70, 9): make_block(70, 9, 50_000, 60_000)}
        tier.put(*next(iter(more.items())), meta_for(9))
        assert tier.check() == []


@pytest.mark.parametrize("durability", ["sync", "batch", "none"])
def test_put_many_stores_a_batch_and_answers_per_block(tmp_path, durability):
    sizes = [100, 5000, 70_000, 2 << 20, (2 << 20) + 17, 3 * 4096]
    blocks = {b"blk-%d" % n: os.urandom(n) for n in sizes}
    items = []
    for i, (key, data) in enumerate(blocks.items()):
        src = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if i % 2:  # 4 KiB-aligned memory goes out without a staging copy
            src = aligned_empty(len(data)).copy_(src)
        items.append((key, src, meta_for(i)))
    with SSDTier(config(tmp_path, durability=durability)) as tier:
        assert isinstance(tier, BatchedPuts)
        res = tier.put_many(items + [
            (b"", b"abc", meta_for(0)),  # bad key
            (b"blk-bad-meta", b"abc", "meta"),  # not a BlockMeta
            (b"blk-100", b"other bytes", meta_for(0)),  # stored already: first writer wins
            "not a triple",
        ])
        assert res[:len(blocks)] == [None] * len(blocks)
        assert isinstance(res[-4], InvalidRequest) and isinstance(res[-3], InvalidType)
        assert res[-2] is None and isinstance(res[-1], InvalidType)
        assert all(read(tier, k) == d for k, d in blocks.items())
        assert tier.stats()["blocks"] == len(blocks) and tier.check() == []
    with SSDTier(config(tmp_path, durability=durability)) as tier:
        assert all(read(tier, k) == d for k, d in blocks.items())
        assert tier.check() == []


def test_put_many_over_the_budget_refuses_only_what_does_not_fit(tmp_path):
    with SSDTier(config(tmp_path, capacity_bytes=1 << 20)) as tier:
        items = [(b"k%d" % i, os.urandom(300_000), meta_for(i)) for i in range(5)]
        res = tier.put_many(items)
        assert res[:3] == [None] * 3
        assert all(isinstance(r, StorageFull) and "does not fit" in str(r) for r in res[3:])
        assert tier.stats()["put_failures"] == 2
        assert all(read(tier, k) == bytes(d) for k, d, _ in items[:3])
        assert tier.check() == []


@pytest.mark.parametrize("durability", ["sync", "batch"])
def test_a_block_being_served_is_counted_once_against_the_budget(tmp_path, monkeypatch, durability):
    """Between serving a batch's blocks and ending their reservations, they counted as used
    *and* reserved: another put into a tier with room for exactly one more block was refused
    (a sidecar with its default tiers failed puts into its full SSD tier this way)."""
    items = [(b"k%d" % i, os.urandom(300_000), meta_for(i)) for i in range(3)]
    extra = (b"extra", os.urandom(300_000), meta_for(9))
    with SSDTier(config(tmp_path, durability=durability, capacity_bytes=4 * 300_000)) as tier:
        store = tier.store
        real, during = store.release, []

        def release(res, ok):  # the batch's first reservation to end: its blocks are served
            if not during:
                during.append(tier.can_fit(300_000))
                tier.put(*extra)  # room for exactly this one: it must be taken, not refused
            real(res, ok)

        monkeypatch.setattr(store, "release", release)
        assert tier.put_many(items) == [None] * 3
        assert during == [True]
        assert read(tier, extra[0]) == extra[1]
        assert tier.stats()["used_bytes"] == 4 * 300_000 and store.blocks.reserved == 0
        assert not tier.can_fit(1)
        assert tier.check() == []


def test_put_many_write_error_fails_its_segment_blocks_only(tmp_path, monkeypatch):
    with SSDTier(config(tmp_path)) as tier:
        good = {b"good": os.urandom(100_000)}
        tier.put(b"good", good[b"good"], meta_for(0))

        def fail(*args):
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        monkeypatch.setattr(segments, "_pwrite", fail)
        monkeypatch.setattr(segments, "_pwritev", fail)
        small, big = os.urandom(1000), [os.urandom(200_000) for _ in range(3)]
        res = tier.put_many([(b"small", small, meta_for(1))] +
                            [(b"big%d" % i, d, meta_for(2)) for i, d in enumerate(big)])
        monkeypatch.undo()
        assert res[0] is None  # inline: no segment write
        assert all(isinstance(r, KVTierError) and "failed" in str(r) for r in res[1:])
        assert not any(tier.contains(b"big%d" % i) for i in range(3))
        assert tier.stats()["put_failures"] == 3
        assert read(tier, b"good") == good[b"good"] and read(tier, b"small") == small
        assert tier.put_many([(b"big0", big[0], meta_for(2))]) == [None]  # works again
        assert read(tier, b"big0") == big[0]
        assert tier.check() == []
    with SSDTier(config(tmp_path)) as tier:
        assert {k for k, _, _ in tier.scan()} == {b"good", b"small", b"big0"}
