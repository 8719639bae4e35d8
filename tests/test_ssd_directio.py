"""O_DIRECT segment writes and the single-request read path (``read_into``) of the SSD tier."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from kvtier.config import SSDTierConfig
from kvtier.errors import CorruptBlock, InvalidRequest, KVTierError
from kvtier.tiers.ssd import SSDTier, aligned_empty, directio, segments
from tests.ssd_child import meta_for


def config(path: Path, **kw) -> SSDTierConfig:
    base = dict(path=str(path), durability="sync", segment_bytes=8 << 20, inline_threshold=8192,
                min_free_bytes=0, capacity_bytes=1 << 34)
    base.update(kw)
    return SSDTierConfig(**base)


def payloads() -> dict[bytes, bytes]:
    """Sizes around the 4 KiB unit and the staging buffer, aligned and not."""
    sizes = [12_288, 12_289, 100_003, 262_144, segments.STAGING_BYTES // 2 + 5]
    return {b"blk-%d" % n: os.urandom(n) for n in sizes}


def read(tier: SSDTier, key: bytes, aligned: bool) -> bytes:
    n = tier.size(key)
    out = aligned_empty(n) if aligned else torch.empty(n + 1, dtype=torch.uint8)[1:]
    assert tier.read_into(key, out) == n
    return out.numpy().tobytes()


@pytest.mark.parametrize("aligned_source", [True, False])
def test_direct_writes_read_back_from_aligned_and_unaligned_buffers(tmp_path, aligned_source):
    blocks = payloads()
    with SSDTier(config(tmp_path)) as tier:
        for i, (key, data) in enumerate(blocks.items()):
            src = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            if aligned_source:
                src = aligned_empty(len(data)).copy_(src)
            tier.put(key, src, meta_for(i))
        seg = next(iter(tier._segments.by_id.values()))
        if tier.direct_io:
            assert seg.direct_writes
            # records are written whole-page: the file ends on the last record's 4 KiB boundary
            assert os.path.getsize(seg.path) % 4096 == 0
        for key, data in blocks.items():
            assert read(tier, key, aligned=True) == data
            assert read(tier, key, aligned=False) == data
        assert tier.check() == []
    with SSDTier(config(tmp_path)) as tier:  # and after a restart
        assert all(read(tier, k, aligned=True) == d for k, d in blocks.items())
        assert tier.check() == []


def test_direct_write_refused_falls_back_to_buffered(tmp_path, monkeypatch):
    real = segments._pwrite

    def pwrite(fd, data, offset):
        if fd == seg_dfd[0]:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real(fd, data, offset)

    with SSDTier(config(tmp_path)) as tier:
        tier.put(b"first", os.urandom(50_000), meta_for(0))
        seg = next(iter(tier._segments.by_id.values()))
        if not seg.direct_writes:
            pytest.skip("no O_DIRECT on this file system")
        seg_dfd = [seg.dfd]
        monkeypatch.setattr(segments, "_pwrite", pwrite)
        data = os.urandom(70_001)
        tier.put(b"second", data, meta_for(1))
        assert not seg.direct_writes  # said once, then buffered
        assert read(tier, b"second", aligned=True) == data
        assert tier.stats()["put_failures"] == 0


def test_direct_write_error_fails_the_put_only(tmp_path, monkeypatch):
    with SSDTier(config(tmp_path)) as tier:
        good = os.urandom(40_000)
        tier.put(b"good", good, meta_for(0))

        def pwrite(fd, data, offset):
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        monkeypatch.setattr(segments, "_pwrite", pwrite)
        with pytest.raises(KVTierError, match="failed"):
            tier.put(b"bad", os.urandom(90_000), meta_for(1))
        monkeypatch.undo()
        assert not tier.contains(b"bad") and tier.stats()["put_failures"] == 1
        assert read(tier, b"good", aligned=True) == good
        assert tier.check() == []


def test_read_into_counts_verifies_and_rejects_bad_input(tmp_path):
    with SSDTier(config(tmp_path)) as tier:
        data = os.urandom(256 << 10)
        tier.put(b"k", data, meta_for(0))
        before = tier.stats()
        assert read(tier, b"k", aligned=True) == data
        after = tier.stats()
        assert after["blocks_read"] == before["blocks_read"] + 1
        assert after["bytes_read"] == before["bytes_read"] + len(data)
        assert after["direct_reads"] == before["direct_reads"] + (1 if tier.direct_io else 0)
        big = aligned_empty(len(data) + 8192)  # a larger buffer reads the whole block
        assert tier.read_into(b"k", big) == len(data) and big[: len(data)].numpy().tobytes() == data
        with pytest.raises(InvalidRequest, match="uint8"):
            tier.read_into(b"k", torch.empty(16, dtype=torch.float32))
        with pytest.raises(InvalidRequest, match="offset"):
            tier.read_into(b"k", aligned_empty(16), offset=-1)
        with pytest.raises(KeyError):
            tier.read_into(b"absent", aligned_empty(16))
        assert tier.stats()["blocks_read"] == after["blocks_read"] + 1


def test_read_into_drops_a_block_whose_bytes_changed(tmp_path):
    with SSDTier(config(tmp_path)) as tier:
        data = os.urandom(64 << 10)
        tier.put(b"victim", data, meta_for(0))
        tier.put(b"other", os.urandom(64 << 10), meta_for(1))
        loc = tier._loc[b"victim"]
        seg = tier._segments.by_id[loc.segment]
        with open(seg.path, "r+b") as f:
            f.seek(loc.offset + 4096 * 3 + 7)
            b = f.read(1)
            f.seek(loc.offset + 4096 * 3 + 7)
            f.write(bytes([b[0] ^ 0xFF]))
            f.flush()
            os.fsync(f.fileno())
        with pytest.raises(CorruptBlock, match="checksum"):
            read(tier, b"victim", aligned=True)  # O_DIRECT sees the on-disk bytes
        assert not tier.contains(b"victim") and tier.stats()["corrupt_blocks"] == 1
        with pytest.raises(KeyError):
            tier.read_into(b"victim", aligned_empty(64 << 10))
        assert tier.read_into(b"other", aligned_empty(64 << 10)) == 64 << 10


def test_read_into_on_a_closed_tier_fails_cleanly(tmp_path):
    tier = SSDTier(config(tmp_path))
    tier.put(b"k", os.urandom(20_000), meta_for(0))
    tier.close()
    with pytest.raises(KVTierError, match="closed"):
        tier.read_into(b"k", aligned_empty(20_000))


# ---- reads straight into the caller's memory, O_DIRECT (docs/ssd.md "Reads") ------------------

def direct_tier(tmp_path: Path, **kw) -> SSDTier:
    tier = SSDTier(config(tmp_path, **kw))
    if not tier.direct_io:
        tier.close()
        pytest.skip("no O_DIRECT on this file system (tmpfs has none): reads go buffered there")
    return tier


def recording_preadv(monkeypatch) -> list[int]:
    """Record the descriptor of every positional read the tier makes."""
    fds, real = [], directio._preadv

    def preadv(fd, buffers, offset):
        fds.append(fd)
        return real(fd, buffers, offset)

    monkeypatch.setattr(directio, "_preadv", preadv)
    return fds


def test_whole_block_and_range_reads_into_aligned_memory_go_direct(tmp_path, monkeypatch):
    """A block whose length is not a multiple of 4 KiB, read whole into aligned memory, and
    ranges read into memory congruent to their offset (``aligned_empty(n, phase=...)``): every
    byte comes O_DIRECT — the partial last (and first) page through a bounce page — and each
    read counts as direct."""
    data = os.urandom(300_001)  # a tail of 1,089 bytes past the last whole page
    with direct_tier(tmp_path) as tier:
        tier.put(b"k", data, meta_for(0))
        dfds = {seg.dfd for seg in tier._segments.by_id.values()}
        fds = recording_preadv(monkeypatch)
        cases = [(0, len(data), 0), (8192, 50_000, 0), (100, 70_000, 100), (4000, 200, 4000),
                 (len(data) - 777, 777, (len(data) - 777) % 4096)]
        for offset, n, phase in cases:
            before = tier.stats()
            buf = aligned_empty(n + 8192, phase=phase)
            buf.fill_(0xAB)
            out = buf[:n]
            assert tier.read_into(b"k", out, offset=offset) == n
            assert out.numpy().tobytes() == data[offset:offset + n], (offset, n)
            assert (buf[n:] == 0xAB).all(), "a read wrote past its destination"
            after = tier.stats()
            assert after["direct_reads"] == before["direct_reads"] + 1, (offset, n)
            assert after["buffered_reads"] == before["buffered_reads"]
        assert fds and set(fds) <= dfds, "a read went through the page cache"
        # memory not congruent to the offset cannot go direct: counted buffered, bytes right
        before = tier.stats()["buffered_reads"]
        out = aligned_empty(5000, phase=1)
        assert tier.read_into(b"k", out, offset=0) == 5000 and out.numpy().tobytes() == data[:5000]
        assert tier.stats()["buffered_reads"] == before + 1


def test_read_many_whole_blocks_into_aligned_memory_coalesce_direct(tmp_path, monkeypatch):
    blocks = {bytes([i]) * 16: os.urandom(50_000 + 999 * i) for i in range(6)}  # ragged tails
    with direct_tier(tmp_path) as tier:
        for key, data in blocks.items():
            tier.put(key, data, meta_for(0))
        dfds = {seg.dfd for seg in tier._segments.by_id.values()}
        fds = recording_preadv(monkeypatch)
        reqs = [(k, aligned_empty(len(d)), 0) for k, d in blocks.items()]
        assert tier.read_many_into(reqs) == [len(d) for d in blocks.values()]
        assert all(out.numpy().tobytes() == blocks[k] for k, out, _ in reqs)
        stats = tier.stats()
        assert stats["direct_reads"] == len(blocks) and stats["buffered_reads"] == 0
        assert stats["coalesced_reads"] == len(blocks)
        assert set(fds) <= dfds and len(fds) < len(blocks)  # one preadv for the run


def test_direct_read_plan_fills_exactly_its_range():
    """``DirectRead`` against an in-memory 'file': every start/length around page edges, and
    short reads at the end of the file, fill exactly what arrived and nothing else."""
    src = np.frombuffer(os.urandom(5 * 4096), dtype=np.uint8)
    for start in (0, 1, 4095, 4096, 5000):
        for n in (1, 100, 4096 - start % 4096, 4096, 4097, 8192 + 3):
            if start + n > len(src):
                continue
            for got_cap in (None, 4096, 1):
                buf = aligned_empty(n + 4096 + 8192, phase=start % 4096).numpy()
                buf[:] = 0xAB
                arr = buf[:n]
                plan = directio.DirectRead(arr, start, directio.bounce_pages(2))
                assert plan.lo % 4096 == 0 and plan.hi % 4096 == 0
                assert all(directio.is_aligned(a) and len(a) % 4096 == 0 for a in plan.iov)
                avail = len(src) - plan.lo if got_cap is None else min(got_cap, len(src) - plan.lo)
                pos = plan.lo
                for a in plan.iov:  # what preadv would do from plan.lo, stopping at `avail`
                    k = max(0, min(len(a), plan.lo + avail - pos))
                    a[:k] = src[pos:pos + k]
                    pos += len(a)
                filled = plan.finish(avail)
                want = max(0, min(n, plan.lo + avail - start))
                assert filled == want, (start, n, got_cap)
                assert arr[:filled].tobytes() == src[start:start + filled].tobytes()
                assert (buf[n:] == 0xAB).all()


@pytest.mark.parametrize("native", [True, False])
def test_whole_pages_says_whether_every_piece_can_take_a_direct_read(monkeypatch, native):
    from kvtier.bufpool import aligned_array
    from kvtier.tiers.ssd import directio

    if not native:
        monkeypatch.setattr(directio, "_all_aligned", None)
    elif directio._all_aligned is None:
        pytest.skip("kvtier._fastcopy is not built here")
    a = aligned_array(4 * 4096)
    assert directio.whole_pages([a[:4096], a[4096:]]) and directio.whole_pages([])
    assert not directio.whole_pages([a[:4096], a[4097:8193]])  # a piece off its page
    assert not directio.whole_pages([a[:4096], a[4096:6000]])  # a piece not whole pages
