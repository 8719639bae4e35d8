"""Write failures (full disk, EIO) fail that put only: counted, nothing stored harmed, reads go on."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import time
import uuid

import httpx
import msgpack
import pytest
import torch

from kvtier import CacheConfig, KVLayout, TieredCache
from kvtier.client import MSGPACK, KVTierClient, kv_to_wire
from kvtier.config import HostTierConfig, SSDTierConfig
from kvtier.errors import KVTierError, StorageFull
from kvtier.server.testing import serve_in_thread
from kvtier.tiers.ssd import SSDTier, segments
from tests.conftest import random_kv
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


@contextlib.contextmanager
def mounted_tmpfs(parent, size: str):
    """A tmpfs of ``size`` under ``parent``, when this process may mount one; else a skip."""
    mnt = parent / f"tmpfs-{uuid.uuid4().hex[:8]}"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()}); see the injected test")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


@pytest.fixture
def tiny_fs(tmp_path):
    """A 4 MiB tmpfs."""
    with mounted_tmpfs(tmp_path, "4m") as mnt:
        yield mnt


def test_real_full_filesystem(tiny_fs, monkeypatch):
    data_dir = tiny_fs / "kv"
    with SSDTier(config(data_dir)) as tier:
        stored, err = fill_until_full(tier, 21)  # the free-disk check refuses first
        assert stored, "some blocks should fit in 4 MiB"
        assert "no space left on the device" in str(err) and str(data_dir) in str(err)
        assert str(err).endswith(" free)"), err  # said by the free-space check, not the kernel
        # Blind the free-space check (as a racing writer would) so the kernel's ENOSPC is hit.
        monkeypatch.setattr(tier, "_free_disk", lambda: 1 << 40)
        more, err = fill_until_full(tier, 24)
        assert "(No space left on device)" in str(err) and str(data_dir) in str(err), str(err)
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


# ---- a full disk under the manager: keep what is stored, refuse new blocks, recover ------------

BT = 16


def disk_cache(path, host: str = "0", **ssd) -> TieredCache:
    cfg = dict(path=str(path), capacity_bytes="1GiB", min_free_bytes="1MiB", durability="sync",
               segment_bytes="1MiB", direct_io=False, inline_threshold=0,
               compaction_interval_s=None)
    cfg.update(ssd)
    return TieredCache(CacheConfig(block_tokens=BT, host=HostTierConfig(capacity_bytes=host),
                                   ssd=SSDTierConfig(**cfg)))


def prompt(i: int):
    """64 tokens: four 128 KiB blocks."""
    return [i * 7919 + j for j in range(4 * BT)], random_kv(4 * BT, layers=4, heads=4, dim=64, seed=i)


def served(c: TieredCache, i: int) -> bool:
    toks, kv = prompt(i)
    out, n = c.get("m", toks)
    return n == len(toks) and all(torch.equal(a, b) for la, lb in zip(out, kv, strict=True)
                                  for a, b in zip(la, lb, strict=True))


def ballast(where, nbytes: int, name: str = "ballast"):
    path = where / name
    with open(path, "wb") as f:
        f.write(b"\0" * nbytes)
    return path


@pytest.mark.parametrize("kind", ["floor", "enospc"])
def test_full_disk_keeps_every_block_and_refuses_new_puts_until_space_returns(
        tmp_path, monkeypatch, kind):
    """``floor``: the free-space floor refuses the put. ``enospc``: the free-space check is
    blinded (as under a quota, or a racing writer), the kernel's ENOSPC refuses it."""
    floor, words = ("1MiB", "below the floor") if kind == "floor" else ("0", "no space left")
    with mounted_tmpfs(tmp_path, "8m") as fs:
        room = ballast(fs, 2 << 20)  # freed later: the space that "returns"
        with disk_cache(fs / "kv", min_free_bytes=floor) as c:
            if kind == "enospc":
                monkeypatch.setattr(c.tier("ssd"), "_free_disk", lambda: 1 << 40)
            stored, err = [], None
            for i in range(100):
                try:
                    assert c.put("m", *prompt(i)) == 4 * BT
                except StorageFull as e:
                    err = e
                    break
                stored.append(i)
            assert err is not None, "the disk never filled"
            assert words in str(err).lower(), err
            assert len(stored) >= 3
            ssd = c.stats().tiers["ssd"]
            # nothing was evicted to make room (the failed put may have stored its first blocks)
            assert 4 * len(stored) <= ssd.blocks < 4 * len(stored) + 4
            assert ssd.put_failures == 1
            for _ in range(3):  # every further put fails the same way, and is counted
                refused = c.tier("ssd").stats()["disk_full"]
                with pytest.raises(StorageFull):
                    c.put("m", *prompt(1000))
                # each block the disk refused: the first, or (ENOSPC, written together) all four,
                # then the first again, one by one, where a tier below might take it
                print("DELTA", c.tier("ssd").stats()["disk_full"] - refused)
                assert c.tier("ssd").stats()["disk_full"] - refused in ((1, 2) if kind == "floor" else (1, 5))
            assert c.stats().tiers["ssd"].put_failures == 4
            problems = c.health()
            assert len(problems) == 1 and problems[0].startswith("ssd: disk full under"), problems
            assert all(served(c, i) for i in stored)  # reads go on
            room.unlink()  # space returns: the cache recovers by itself
            if kind == "floor":  # seen in free space: healthy again before any put
                assert c.health() == []
            assert c.put("m", *prompt(1000)) == 4 * BT
            assert c.health() == []
            stored.append(1000)
            assert all(served(c, i) for i in stored)
        with disk_cache(fs / "kv", min_free_bytes=floor) as c:  # and it all survives a restart
            assert all(served(c, i) for i in stored)


def test_full_disk_under_a_host_tier_never_wipes_the_ssd_copies(tmp_path):
    """The only SSD copies a full disk may cost are orphans of a refused put: a later block of
    it written while an earlier one's write was refused (the writes run in parallel), dropped
    when that parent leaves the host tier with nowhere to go (a block is useless without its
    parent). Every acknowledged prompt keeps its copies, across a restart too."""
    with mounted_tmpfs(tmp_path, "8m") as fs:
        acknowledged = []
        with disk_cache(fs / "kv", host="1MiB") as c:
            on_ssd, refused = 0, 0
            for i in range(40):
                try:
                    c.put("m", *prompt(i))
                    acknowledged.append(i)
                except StorageFull:  # sync: a put the SSD cannot take is not acknowledged
                    refused += 1
                c.flush(30)
                s = c.stats().tiers["ssd"]
                assert set(s.evictions) <= {"orphaned"}, s.evictions
                assert s.blocks + s.evictions["orphaned"] >= on_ssd, f"ssd copies went from {on_ssd} to {s.blocks}"
                on_ssd = s.blocks + s.evictions["orphaned"]
            s = c.stats().tiers["ssd"]
            assert s.put_failures > 0 and refused > 0, "the disk never filled"
            assert len(acknowledged) >= 3
            assert any(p.startswith("ssd: disk full") for p in c.health())
            on_disk = {k for k, _, _ in c.tier("ssd").scan()}
        with disk_cache(fs / "kv", host="1MiB") as c:
            assert {k for k, _, _ in c.tier("ssd").scan()} == on_disk
            assert c.stats().tiers["ssd"].blocks == len(on_disk)
            for i in acknowledged:
                toks, kv = prompt(i)
                out, n = c.get("m", toks)
                assert n == len(toks) and all(torch.equal(a, b) for la, lb in zip(kv, out, strict=True)
                                              for a, b in zip(la, lb, strict=True)), i


def test_full_disk_through_the_sidecar_is_507_and_readyz_degraded(tmp_path):
    with mounted_tmpfs(tmp_path, "8m") as fs:
        room = ballast(fs, 2 << 20)
        with disk_cache(fs / "kv") as c, serve_in_thread(c) as url, KVTierClient(url) as client:
            client.register_namespace("m", layout=KVLayout.from_kv(prompt(0)[1]), block_tokens=BT)
            stored = []
            for i in range(100):
                try:
                    client.put("m", *prompt(i))
                except StorageFull as e:
                    assert "below the floor" in str(e)
                    break
                stored.append(i)
            else:
                raise AssertionError("the disk never filled")
            toks, kv = prompt(1001)
            body = msgpack.packb({"namespace": "m", "token_ids": toks, "kv": kv_to_wire(kv)})
            resp = httpx.put(url + "/v1/kv", content=body, headers={"content-type": MSGPACK})
            assert resp.status_code == 507 and resp.json()["error"] == "StorageFull", resp.text
            ready = httpx.get(url + "/readyz")
            assert ready.status_code == 200 and ready.json()["status"] == "degraded", ready.text
            assert "ssd: disk full" in ready.json()["problems"][0]
            for i in stored:
                toks, kv = prompt(i)
                got, n = client.get("m", toks)
                assert n == len(toks) and all(torch.equal(a, b) for la, lb in zip(got, kv, strict=True)
                                              for a, b in zip(la, lb, strict=True))
            room.unlink()
            assert httpx.get(url + "/readyz").json() == {"status": "ok"}
            assert client.put("m", *prompt(1000)) == 4 * BT


def test_full_disk_gets_back_the_space_of_deleted_blocks(tmp_path):
    """Deleted blocks hold disk space until compaction: a put the disk refuses starts one."""
    with mounted_tmpfs(tmp_path, "8m") as fs, SSDTier(config(
            fs / "kv", min_free_bytes=1 << 20, segment_bytes=1 << 20, direct_io=False)) as tier:
        stored, err = fill_until_full(tier, 31)
        assert "below the floor" in str(err) and tier.health()
        for key in list(stored)[: len(stored) * 3 // 4]:  # whole segments become dead space
            tier.delete(key)
            del stored[key]
        key, data = block_key(31, 5000), make_block(31, 5000, 250_000, 300_000)
        deadline = time.monotonic() + 60
        while True:  # refused until the background compaction has returned the space
            try:
                tier.put(key, data, meta_for(0))
                break
            except StorageFull:
                assert time.monotonic() < deadline, "compaction never returned the space"
                time.sleep(0.05)
        # A pass is counted when it ends; the put may already fit once its first segment is gone.
        while tier.stats()["compactions"] < 1:
            assert time.monotonic() < deadline, "the space came back, but no compaction was counted"
            time.sleep(0.05)
        assert tier.health() == []
        stored[key] = data
        assert all(read(tier, k) == d for k, d in stored.items())
        assert tier.check() == []


def test_dead_space_starts_compaction_before_its_interval(tmp_path):
    """A tier that evicts for every put turns disk into dead space at the put rate: once deleted
    blocks hold capacity/8 (at least two segments), background compaction runs without waiting
    for its interval (an hour here), so the disk is not filled before the first pass."""
    cap = 16 << 20  # dead-space budget: max(2 segments, 16 MiB / 8) = 2 MiB
    with SSDTier(config(tmp_path / "kv", segment_bytes=1 << 20, capacity_bytes=cap, direct_io=False),
                 compact_interval_s=3600) as tier:
        stored = {}
        for i in range(40):  # ~8 MB over ~8 segments
            key, data = block_key(41, i), make_block(41, i, 150_000, 250_000)
            tier.put(key, data, meta_for(i))
            stored[key] = data
        before = tier.stats()["disk_bytes"]
        dead = list(stored)[:30]  # the oldest segments become wholly dead: ~6 MB
        for key in dead:
            tier.delete(key)
            del stored[key]
        assert tier.store.dead_bytes() >= tier._dead_budget
        deadline = time.monotonic() + 60
        while tier.stats()["compactions"] < 1:
            assert time.monotonic() < deadline, "dead space never started a compaction"
            time.sleep(0.05)
        assert tier.stats()["disk_bytes"] < before
        assert tier.store.dead_bytes() < tier._dead_budget
        assert all(read(tier, k) == d for k, d in stored.items())
        assert all(not tier.contains(k) for k in dead)
        assert tier.check() == []


def test_dead_space_under_its_budget_waits_for_the_interval(tmp_path):
    """Below the budget nothing is compacted early (a few deletes do not cost a pass each), over
    it at most once a second; without background compaction (no interval) never."""
    cfg = config(tmp_path / "kv", segment_bytes=1 << 20, capacity_bytes=64 << 20, direct_io=False)
    with SSDTier(cfg, compact_interval_s=3600) as tier:  # budget: 64 MiB / 8 = 8 MiB
        keys = []
        for i in range(60):  # ~12 MB
            key = block_key(42, i)
            tier.put(key, make_block(42, i, 150_000, 250_000), meta_for(i))
            keys.append(key)
        for key in keys[:4]:
            tier.delete(key)
        assert 0 < tier.store.dead_bytes() < tier._dead_budget
        assert not tier._compaction_due(5.0)
        assert tier._compaction_due(3600.0)  # the interval itself
        for key in keys[4:50]:
            tier.delete(key)
        assert tier.store.dead_bytes() >= tier._dead_budget
        assert tier._compaction_due(1.0) and not tier._compaction_due(0.5)
        tier._compact_interval_s = None
        assert not tier._compaction_due(1.0) and not tier._compaction_due(1e9)


PAGE = 256 << 10


def pages_of(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, PAGE), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("durability", ["sync", "batch"])
def test_engine_pages_refused_by_a_full_disk_are_written_when_put_again(tmp_path, durability):
    """``put_blocks`` on a full disk raises, and the pages stay in the host tier only. The engine
    puts them again once space is back: that put must write them to the SSD tier before it is
    acknowledged. It used to find them stored (in the host tier), return 0 and write nothing,
    so they were gone after a restart."""
    keys = [bytes([i]) * 16 for i in range(4)]
    pages = pages_of(4, 5)
    with mounted_tmpfs(tmp_path, "8m") as fs:
        room = ballast(fs, 1 << 20)
        with disk_cache(fs / "kv", host="64MiB", durability=durability, min_free_bytes=0) as c:
            c.register_block_namespace("eng", page_bytes=PAGE, fingerprint={"model": "m"})
            c.put_blocks("eng", keys[:2], pages[:2])
            filler = ballast(fs, 0, "filler")
            with open(filler, "ab") as f, contextlib.suppress(OSError):
                while True:  # another program takes every byte left
                    f.write(b"\0" * (64 << 10))
                    f.flush()
            with pytest.raises(StorageFull):
                c.put_blocks("eng", keys[2:], pages[2:])
            room.unlink()
            filler.unlink()  # space is back
            c.put_blocks("eng", keys[2:], pages[2:])  # acknowledged: so it must be durable
        with disk_cache(fs / "kv", host="64MiB", durability=durability, min_free_bytes=0) as c:
            c.register_block_namespace("eng", page_bytes=PAGE, fingerprint={"model": "m"})
            out = torch.zeros(4, PAGE, dtype=torch.uint8)
            assert c.get_blocks_into("eng", keys, out) == 4
            assert torch.equal(out, pages)


def small_kv(i: int):
    """One 2 KiB block: stored inside the index (inline), so only the index commit needs disk."""
    g = torch.Generator().manual_seed(i)
    return [i * 7919 + j for j in range(BT)], [tuple(torch.randn(BT, 1, 32, generator=g).half() for _ in range(2))]


def fill_leaving(fs, leave: int):
    """Another program fills the file system ``fs``, leaving ``leave`` bytes free."""
    filler = fs / "filler"
    with open(filler, "ab") as f:
        while (free := os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize) > leave:
            try:
                f.write(b"\0" * min(free - leave, 1 << 20))
                f.flush()
            except OSError:
                break
    return filler


def test_an_index_commit_cut_short_by_a_full_disk_is_storage_full_not_damage(tmp_path):
    """LMDB reports a page write the full disk cut short as EIO. A ``sync`` put of an inline
    block then failed as index damage (HTTP 500, ``health`` saying the index is damaged); it is
    the disk refusing: ``StorageFull`` (507), and the tier works again once space is back."""
    with mounted_tmpfs(tmp_path, "16m") as fs, disk_cache(fs / "kv", durability="sync", min_free_bytes=0,
                                                          inline_threshold=4096) as c:
        assert c.put("m", *small_kv(0)) == BT
        filler = fill_leaving(fs, 4096)
        refused = 0
        for i in range(1, 40):
            try:
                c.put("m", *small_kv(i))
            except StorageFull:
                refused += 1
        assert refused >= 1
        assert not any("index damaged" in p for p in c.health()), c.health()
        assert c.tier("ssd").stats()["index_errors"] == 0
        filler.unlink()
        assert c.put("m", *small_kv(1000)) == BT
        assert c.health() == []


def test_a_batch_commit_refused_by_a_full_disk_keeps_its_acknowledged_puts(tmp_path):
    """Under ``batch`` a put is acknowledged once written; its record commits with the next
    batch. When the disk is full at that commit (LMDB cannot write its pages: EIO), the puts
    must stay stored and commit later. They used to be dropped: a clean close and reopen, no
    crash anywhere, lost every put acknowledged while the disk was full."""
    with mounted_tmpfs(tmp_path, "16m") as fs:
        acked = []
        with disk_cache(fs / "kv", host="16MiB", durability="batch", min_free_bytes=0,
                        inline_threshold=4096) as c:
            assert c.put("m", *small_kv(0)) == BT
            acked.append(0)
            c.tier("ssd").flush()
            filler = fill_leaving(fs, 4096)  # one page left: an inline put passes the free-space check
            for i in range(1, 40):
                try:
                    c.put("m", *small_kv(i))
                    acked.append(i)
                except StorageFull:
                    pass
            c.tier("ssd").flush()  # the commit the full disk refuses
            assert len(acked) >= 2, "no put was acknowledged while the disk was full"
            filler.unlink()  # space is back
            assert c.put("m", *small_kv(1000)) == BT
            acked.append(1000)
        with disk_cache(fs / "kv", host="16MiB", durability="batch", min_free_bytes=0,
                        inline_threshold=4096) as c:  # a clean restart
            for i in acked:
                toks, kv = small_kv(i)
                got, n = c.get("m", toks)
                assert n == BT, f"acknowledged put {i} lost ({len(acked)} acknowledged)"
                assert all(torch.equal(a, b) for a, b in zip(got[0], kv[0], strict=True))


def test_a_disk_inline_blocks_filled_takes_puts_again_once_they_are_deleted(tmp_path):
    """Blocks under ``inline_threshold`` live inside the index file, which never shrinks:
    deleting them frees pages only inside it, and compaction (which rewrites segments) returns
    nothing. The tier used to refuse every put for good, even emptied and restarted; an inline
    block now counts the index's reusable pages as room."""
    def prompt8(i: int):
        g = torch.Generator().manual_seed(i)
        return [i, i >> 16, *range(2, 8 * BT)], [tuple(torch.randn(8 * BT, 1, 32, generator=g).half()
                                                        for _ in range(2))]

    with mounted_tmpfs(tmp_path, "8m") as fs:  # the floor keeps room for the index's deletes
        cache = lambda: disk_cache(fs / "kv", durability="sync", min_free_bytes="2MiB",  # noqa: E731
                                   inline_threshold=4096)
        with cache() as c:
            stored = []
            for i in range(10_000):
                try:
                    c.put("m", *prompt8(i))
                except StorageFull:
                    break
                stored.append(i)
            assert 100 < len(stored) < 10_000, len(stored)
            for i in stored:
                c.evict("m", prompt8(i)[0])
            c.tier("ssd").compact()
            assert c.put("m", *prompt8(20_000)) == 8 * BT
        with cache() as c:
            assert c.put("m", *prompt8(20_001)) == 8 * BT
            for i in (20_000, 20_001):
                toks, kv = prompt8(i)
                got, n = c.get("m", toks)
                assert n == 8 * BT and torch.equal(got[0][0], kv[0][0])
