"""Write failures (full disk, EIO) fail that put only: counted, nothing stored harmed, reads go on."""

from __future__ import annotations

import errno
import os
import subprocess
import uuid

import pytest
import torch

from kvtier.config import SSDTierConfig
from kvtier.errors import KVTierError, StorageFull
from kvtier.tiers.ssd import SSDTier, segments
from tests.ssd_child import block_key, make_block, meta_for


def config(path, **kw) -> SSDTierConfig:
    base = dict(path=str(path), durability="sync", segment_bytes=1 << 20, inline_threshold=4096,
                min_free_bytes=0)
    base.update(kw)
    return SSDTierConfig(**base)


def read(tier: SSDTier, key: bytes) -> bytes:
    out = torch.empty(tier.size(key), dtype=torch.uint8)
    assert tier.read_into(key, out) == out.numel()
    return out.numpy().tobytes()


def fill_until_full(tier: SSDTier, seed: int) -> tuple[dict, StorageFull]:
    stored = {}
    for i in range(1000):
        key, data = block_key(seed, i), make_block(seed, i, 100_000, 300_000)
        try:
            tier.put(key, data, meta_for(i))
        except StorageFull as e:
            return stored, e
        stored[key] = data
    raise AssertionError("the file system never filled up")


@pytest.fixture
def tiny_fs(tmp_path):
    """A 4 MiB tmpfs, when this process may mount one; else the test is skipped."""
    mnt = tmp_path / f"tmpfs-{uuid.uuid4().hex[:8]}"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()}); see the injected test")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_real_full_filesystem(tiny_fs, monkeypatch):
    data_dir = tiny_fs / "kv"
    with SSDTier(config(data_dir)) as tier:
        stored, err = fill_until_full(tier, 21)  # the free-disk check refuses first
        assert stored, "some blocks should fit in 4 MiB"
        assert "would fall below the floor" in str(err) and str(data_dir) in str(err)
        # Blind the free-space check (as a racing writer would) so the kernel's ENOSPC is hit.
        monkeypatch.setattr(tier, "_free_disk", lambda: 1 << 40)
        more, err = fill_until_full(tier, 24)
        assert "no space left" in str(err) and str(data_dir) in str(err), str(err)
        stored.update(more)
        monkeypatch.undo()
        assert tier.stats()["put_failures"] >= 2
        for key, data in stored.items():  # nothing stored harmed, reads continue
            assert read(tier, key) == data
        # freeing space (compaction returns it to the fs) lets puts succeed again
        for key in list(stored)[: len(stored) // 2 + 1]:
            tier.delete(key)
            del stored[key]
        tier.compact()
        key, data = block_key(21, 5000), make_block(21, 5000, 50_000, 60_000)
        tier.put(key, data, meta_for(0))
        stored[key] = data
        assert tier.check() == []
    with SSDTier(config(data_dir)) as tier:
        assert all(read(tier, k) == d for k, d in stored.items())


def _failing_write(code: int):
    real = segments._pwrite

    def pwrite(fd, data, offset):
        if len(data) > 150_000:  # only large blocks fail, after writing part of them
            real(fd, data[:4096], offset)
            raise OSError(code, os.strerror(code))
        return real(fd, data, offset)

    return pwrite


@pytest.mark.parametrize("code,exc,words", [
    (errno.ENOSPC, StorageFull, "no space left"),
    (errno.EIO, KVTierError, "failed"),
])
def test_injected_write_errors(tmp_path, monkeypatch, code, exc, words):
    with SSDTier(config(tmp_path)) as tier:
        good = {}
        for i in range(4):
            key, data = block_key(22, i), make_block(22, i, 20_000, 100_000)
            tier.put(key, data, meta_for(i))
            good[key] = data
        monkeypatch.setattr(segments, "_pwrite", _failing_write(code))
        big_key, big = block_key(22, 99), make_block(22, 99, 400_000, 500_000)
        with pytest.raises(exc, match=words):
            tier.put(big_key, big, meta_for(99))
        assert not tier.contains(big_key)
        assert tier.stats()["put_failures"] == 1
        small_key, small = block_key(22, 98), make_block(22, 98, 20_000, 30_000)
        tier.put(small_key, small, meta_for(98))  # the tier keeps working
        good[small_key] = small
        for key, data in good.items():
            assert read(tier, key) == data
        monkeypatch.undo()
        assert tier.check() == []
    with SSDTier(config(tmp_path)) as tier:
        assert {k for k, _, _ in tier.scan()} == set(good)


def test_missing_segment_directory_fails_put_cleanly(tmp_path):
    with SSDTier(config(tmp_path, segment_bytes=64 << 10)) as tier:
        key, data = block_key(23, 0), make_block(23, 0, 50_000, 60_000)
        tier.put(key, data, meta_for(0))
        seg_dir = tmp_path / "segments"
        moved = tmp_path / "segments.away"
        seg_dir.rename(moved)  # the next put must create a segment and cannot
        with pytest.raises(KVTierError, match="segment missing"):
            tier.put(block_key(23, 1), make_block(23, 1, 70_000, 80_000), meta_for(1))
        assert read(tier, key) == data  # open segments still serve reads
        moved.rename(seg_dir)
