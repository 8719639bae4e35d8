"""SSDTier against real files and a real LMDB: reads, restart, corruption, compaction, retention."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from kvtier.config import SSDTierConfig
from kvtier.errors import CorruptBlock, InvalidRequest, KVTierError
from kvtier.tiers.base import Tier
from kvtier.tiers.ssd import SSDTier, aligned_empty
from tests.ssd_child import block_key, make_block, meta_for

CHILD = Path(__file__).with_name("ssd_child.py")


def config(path: Path, **kw) -> SSDTierConfig:
    base = dict(path=str(path), durability="sync", segment_bytes=4 << 20, inline_threshold=8192,
                min_free_bytes=0, capacity_bytes=1 << 34)
    base.update(kw)
    return SSDTierConfig(**base)


def fill(tier: SSDTier, seed: int, count: int, lo: int = 4096, hi: int = 1 << 20) -> dict:
    blocks = {}
    for i in range(count):
        key, data = block_key(seed, i), make_block(seed, i, lo, hi)
        tier.put(key, data, meta_for(i))
        blocks[key] = data
    return blocks


def read(tier: SSDTier, key: bytes) -> bytes:
    out = torch.empty(tier.size(key), dtype=torch.uint8)
    assert tier.read_into(key, out) == out.numel()
    return out.numpy().tobytes()


def segment_files(path: Path) -> list[Path]:
    return sorted((path / "segments").glob("*.seg"))


@pytest.mark.parametrize("durability", ["sync", "batch", "none"])
def test_put_read_roundtrip_and_reopen(tmp_path, durability):
    with SSDTier(config(tmp_path, durability=durability)) as tier:
        assert isinstance(tier, Tier) and tier.persistent and tier.name == "ssd"
        blocks = fill(tier, 1, 12)
        assert tier.used_bytes == sum(map(len, blocks.values()))
        for key, data in blocks.items():
            assert tier.contains(key) and tier.size(key) == len(data)
            assert read(tier, key) == data
        assert not tier.contains(b"x" * 16) and tier.size(b"x" * 16) is None
        with pytest.raises(KeyError):
            tier.read_into(b"x" * 16, torch.empty(8, dtype=torch.uint8))
    with SSDTier(config(tmp_path, durability=durability)) as tier:
        assert {k for k, _, _ in tier.scan()} == set(blocks)
        assert all(read(tier, k) == d for k, d in blocks.items())
        assert tier.check() == []


def test_partial_reads_aligned_buffers_and_direct_io(tmp_path):
    with SSDTier(config(tmp_path)) as tier:
        key, data = block_key(2, 0), make_block(2, 0, 300_000, 400_000)
        tier.put(key, data, meta_for(0))
        out = aligned_empty(len(data))
        assert out.data_ptr() % 4096 == 0
        assert tier.read_into(key, out) == len(data) and out.numpy().tobytes() == data
        part = torch.empty(1000, dtype=torch.uint8)
        assert tier.read_into(key, part, offset=12_345) == 1000
        assert part.numpy().tobytes() == data[12_345:13_345]
        tail = torch.empty(5000, dtype=torch.uint8)
        assert tier.read_into(key, tail, offset=len(data) - 100) == 100
        with pytest.raises(InvalidRequest):
            tier.read_into(key, part, offset=len(data) + 1)
        stats = tier.stats()
        if stats["direct_io"]:
            assert stats["direct_reads"] >= 1


def test_read_many_coalesces_and_reports_per_request(tmp_path):
    with SSDTier(config(tmp_path, io_threads=4)) as tier:
        blocks = fill(tier, 3, 10, 8192, 200_000)
        keys = list(blocks)
        reqs = [(k, torch.empty(len(blocks[k]), dtype=torch.uint8), 0) for k in keys]
        reqs.append((b"missing-key-0000", torch.empty(4, dtype=torch.uint8), 0))
        reqs.append((keys[0], torch.empty(64, dtype=torch.uint8), 100))
        res = tier.read_many_into(reqs)
        for (key, out, _), got in zip(reqs[:10], res[:10], strict=True):
            assert got == len(blocks[key]) and out.numpy().tobytes() == blocks[key]
        assert isinstance(res[10], KeyError)
        assert res[11] == 64 and reqs[11][1].numpy().tobytes() == blocks[keys[0]][100:164]
        assert tier.stats()["coalesced_reads"] >= 2


def test_read_many_direct_coalesced_into_aligned_buffers(tmp_path):
    with SSDTier(config(tmp_path)) as tier:
        blocks = {bytes([i]) * 16: os.urandom(64 << 10) for i in range(8)}  # 4 KiB multiples
        for key, data in blocks.items():
            tier.put(key, data, meta_for(0))
        reqs = [(k, aligned_empty(len(d)), 0) for k, d in blocks.items()]
        assert tier.read_many_into(reqs) == [64 << 10] * 8
        assert all(out.numpy().tobytes() == blocks[k] for k, out, _ in reqs)
        stats = tier.stats()
        assert stats["coalesced_reads"] == 8
        assert stats["direct_reads"] == (8 if stats["direct_io"] else 0)


def test_duplicate_put_is_noop_and_delete(tmp_path):
    with SSDTier(config(tmp_path)) as tier:
        key, data = block_key(4, 0), make_block(4, 0, 20_000, 30_000)
        tier.put(key, data, meta_for(0))
        tier.put(key, b"other bytes", meta_for(0))
        assert read(tier, key) == data
        assert tier.delete(key) and not tier.delete(key) and not tier.contains(key)
        assert tier.used_bytes == 0


def test_restart_1000_blocks_in_a_new_process(tmp_path):
    with SSDTier(config(tmp_path, durability="batch", segment_bytes=64 << 20)) as tier:
        fill(tier, 5, 1000, 2048, 2 << 20)
    res = subprocess.run([sys.executable, str(CHILD), "verify", str(tmp_path), "5", "1000"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip() == "ok 1000"


def test_flipped_byte_is_a_corrupt_miss_and_others_survive(tmp_path):
    with SSDTier(config(tmp_path)) as tier:
        blocks = fill(tier, 6, 8, 20_000, 300_000)
        victim = list(blocks)[3]
        loc = tier._loc[victim]
        seg_path = tmp_path / "segments" / f"{loc.segment:08d}.seg"
    with open(seg_path, "r+b") as f:  # flip bytes in the middle of the victim's payload
        f.seek(loc.offset + loc.length // 2)
        b = f.read(4)
        f.seek(loc.offset + loc.length // 2)
        f.write(bytes(x ^ 0xFF for x in b))
    with SSDTier(config(tmp_path)) as tier:
        before = tier.stats()["corrupt_blocks"]
        with pytest.raises(CorruptBlock):
            read(tier, victim)
        assert tier.stats()["corrupt_blocks"] == before + 1
        assert not tier.contains(victim)
        with pytest.raises(KeyError):
            tier.read_into(victim, torch.empty(16, dtype=torch.uint8))
        for key, data in blocks.items():
            if key != victim:
                assert read(tier, key) == data
    with SSDTier(config(tmp_path)) as tier:  # the drop was persisted
        assert not tier.contains(victim) and tier.check() == []


def test_truncated_segment_loses_only_blocks_past_the_cut(tmp_path):
    with SSDTier(config(tmp_path, segment_bytes=64 << 20)) as tier:
        blocks = fill(tier, 7, 10, 20_000, 200_000)
        locs = dict(tier._loc)
    keys = list(blocks)
    cut = locs[keys[6]].offset + 100  # inside block 6
    seg = segment_files(tmp_path)[0]
    os.truncate(seg, cut)
    with SSDTier(config(tmp_path, segment_bytes=64 << 20)) as tier:
        for key in keys[:6]:
            assert read(tier, key) == blocks[key]
        for key in keys[6:]:
            assert not tier.contains(key)
        assert tier.check() == []
        # the space after the last valid record is reused by the next put
        k, d = block_key(7, 99), make_block(7, 99, 20_000, 30_000)
        tier.put(k, d, meta_for(99))
        assert tier._loc[k].offset < cut
        assert read(tier, k) == d


def test_compaction_reclaims_space_while_reads_continue(tmp_path):
    cfg = config(tmp_path, segment_bytes=2 << 20, compaction_live_fraction=0.5)
    with SSDTier(cfg) as tier:
        blocks = fill(tier, 8, 60, 16_000, 400_000)
        keys = list(blocks)
        for i, key in enumerate(keys):
            if i % 10 < 7:
                assert tier.delete(key)
        live = {k: blocks[k] for i, k in enumerate(keys) if i % 10 >= 7}
        disk_before = sum(p.stat().st_blocks for p in segment_files(tmp_path))
        files_before = len(segment_files(tmp_path))
        errors, reads, stop = [], [0], threading.Event()

        def reader():
            while not stop.is_set():
                for key, data in live.items():
                    try:
                        if read(tier, key) != data:
                            errors.append(f"{key.hex()} differs")
                        reads[0] += 1
                    except Exception as e:  # any failure during compaction is a bug
                        errors.append(repr(e))

        t = threading.Thread(target=reader)
        t.start()
        try:
            deadline = time.monotonic() + 10
            while reads[0] < len(live) and time.monotonic() < deadline:
                stop.wait(0.01)
            removed = tier.compact()
        finally:
            stop.set()
            t.join(timeout=30)
        assert errors == []
        assert removed >= 1 and tier.stats()["compactions"] == 1
        assert reads[0] >= len(live)
        disk_after = sum(p.stat().st_blocks for p in segment_files(tmp_path))
        assert disk_after < disk_before * 0.6, (disk_before, disk_after)
        assert len(segment_files(tmp_path)) <= files_before
        for key, data in live.items():
            assert read(tier, key) == data
        assert tier.check() == []
    with SSDTier(cfg) as tier:
        assert {k for k, _, _ in tier.scan()} == set(live)
        assert all(read(tier, k) == d for k, d in live.items())


def test_expire_by_namespace_and_ages(tmp_path):
    with SSDTier(config(tmp_path)) as tier:
        old = time.time() - 3600
        for i in range(6):
            ns = "a" if i % 2 else "b"
            meta = meta_for(i, namespace=ns)
            meta = type(meta)(ns, None, 16, "none", old if i < 4 else time.time())
            tier.put(block_key(9, i), make_block(9, i, 4096, 20_000), meta)
        ages = tier.ages()
        assert len(ages) == 6 and max(ages) >= 3599 and min(ages) < 60
        assert tier.expire("a", time.time() - 60) == 2  # blocks 1 and 3
        assert not tier.contains(block_key(9, 1)) and tier.contains(block_key(9, 5))
        assert tier.stats()["expired"] == 2


def test_capacity_budget_and_bad_input(tmp_path):
    with SSDTier(config(tmp_path, capacity_bytes=100_000)) as tier:
        assert tier.can_fit(50_000) and not tier.can_fit(100_001)
        tier.put(b"k" * 16, os.urandom(60_000), meta_for(0))
        with pytest.raises(KVTierError, match="does not fit"):
            tier.put(b"j" * 16, os.urandom(60_000), meta_for(0))
        assert tier.stats()["put_failures"] == 1
        with pytest.raises(InvalidRequest):
            tier.put(b"", b"abc", meta_for(0))
        with pytest.raises(InvalidRequest):
            tier.read_into(b"k" * 16, torch.empty(4, dtype=torch.float32))
    with pytest.raises(InvalidRequest, match="durability"):
        SSDTier(config(tmp_path, durability="sometimes"))
    with SSDTier(config(tmp_path, min_free_bytes=1 << 60)) as tier:
        assert not tier.can_fit(10)
        with pytest.raises(KVTierError, match="floor"):
            tier.put(b"m" * 16, os.urandom(10_000), meta_for(0))
        assert tier.contains(b"k" * 16)  # reads go on below the floor
