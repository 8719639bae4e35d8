"""Each durability level of docs/ssd.md, checked against a model of what a power cut keeps.

A SIGKILL keeps the page cache, so a crash test cannot see a missing fsync. Here every segment
write, fdatasync, directory fsync and index commit is recorded, in order, through the tier's
seams (``segments._pwrite``/``_fdatasync``, the tier module's ``fsync_dir``, the ``Index``
methods), and a power cut is simulated on a copy of the data directory: segment bytes written
but not fdatasync'd since are zeroed, segment files whose directory entry was never fsync'd are
removed. The index copy keeps every commit (LMDB's own fsync is checked through its flags), the
worst case for a record whose payload was not made durable first.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import kvtier.tiers.ssd.tier as tier_mod
from kvtier.config import SSDTierConfig
from kvtier.tiers.ssd import SSDTier, datadir, segments
from kvtier.tiers.ssd.index import Location
from tests.ssd_child import block_key, make_block, meta_for


def _path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


class Disk:
    """What the tier made durable, and when; ``violations`` lists every broken promise."""

    def __init__(self, monkeypatch, tier: SSDTier) -> None:
        self.lock = threading.Lock()
        self.events: list[tuple] = []
        self.pending: dict[str, list[tuple[int, int]]] = {}  # written, not yet fdatasync'd
        self.synced: dict[str, list[tuple[int, int]]] = {}
        self.undirsynced: set[str] = set()  # created, directory entry not yet fsync'd
        self.committed: set[bytes] = set()
        self.violations: list[str] = []
        self.tier = tier
        # the seams themselves are the real calls (a no-op there would fool everything below)
        assert segments._pwrite is os.pwrite and segments._fdatasync is os.fdatasync
        assert segments._pwritev is os.pwritev
        assert tier_mod.fsync_dir is datadir.fsync_dir
        real_pwrite, real_sync, real_dirsync = segments._pwrite, segments._fdatasync, tier_mod.fsync_dir
        real_pwritev = segments._pwritev
        real_open = segments.Segment.open.__func__
        index = tier._index

        def pwrite(fd, data, offset):
            n = real_pwrite(fd, data, offset)
            self._note("write", _path(fd), offset, offset + n)
            return n

        def pwritev(fd, buffers, offset):  # put_many's gathered writes
            n = real_pwritev(fd, buffers, offset)
            self._note("write", _path(fd), offset, offset + n)
            return n

        def fdatasync(fd):
            real_sync(fd)
            self._note("sync", _path(fd))

        def fsync_dir(path):
            real_dirsync(path)
            self._note("dirsync", str(path))

        def seg_open(cls, directory, seg_id, *, create, direct):
            seg = real_open(cls, directory, seg_id, create=create, direct=direct)
            if create:
                self._note("create", str(seg.path))
            return seg

        def wrap(name, check):
            real = getattr(index, name)

            def call(*args, **kw):
                args = [list(a) if isinstance(a, Iterator) else a for a in args]  # read once
                check(*args, **kw)
                return real(*args, **kw)

            monkeypatch.setattr(index, name, call)

        monkeypatch.setattr(segments, "_pwrite", pwrite)
        monkeypatch.setattr(segments, "_pwritev", pwritev)
        monkeypatch.setattr(segments, "_fdatasync", fdatasync)
        monkeypatch.setattr(tier_mod, "fsync_dir", fsync_dir)
        monkeypatch.setattr(segments.Segment, "open", classmethod(seg_open))
        wrap("commit", self._on_commit)
        wrap("relocate", lambda moves: self._check(
            "relocate", [(k, new) for k, _, new in moves], claims=True))
        wrap("set_flag", self._on_flag)

    def _note(self, kind: str, path: str, lo: int = 0, hi: int = 0) -> None:
        with self.lock:
            self.events.append((kind, path, lo, hi))
            if kind == "write":
                self.pending.setdefault(path, []).append((lo, hi))
            elif kind == "sync":
                self.synced.setdefault(path, []).extend(self.pending.pop(path, []))
            elif kind == "create":
                self.undirsynced.add(path)
            elif kind == "dirsync":
                self.undirsynced = {p for p in self.undirsynced if os.path.dirname(p) != path}

    def durable(self, path: str, lo: int, hi: int) -> bool:
        """Every byte of [lo, hi) was written and fdatasync'd, and not rewritten since."""
        if any(a < hi and lo < b for a, b in self.pending.get(path, [])):
            return False
        at = lo
        for a, b in sorted(self.synced.get(path, [])):
            if a <= at < b:
                at = b
        return at >= hi and path not in self.undirsynced

    def _on_commit(self, puts=(), deletes=()) -> None:
        self._check("commit", [(k, rec.loc) for k, rec, _ in puts], claims=False)
        with self.lock:
            self.committed.update(k for k, _, _ in puts)

    def _check(self, what: str, items: list[tuple[bytes, Location]], claims: bool) -> None:
        """A record that says its payload is durable must not commit before the payload is."""
        with self.lock:
            for key, loc in items:
                if loc.segment == 0:
                    continue  # inline: the payload commits with the record
                if (claims or loc.durable) and not self.durable(
                        str(self.tier._segments.directory / f"{loc.segment:08d}.seg"),
                        loc.offset, loc.offset + loc.length):
                    self.violations.append(f"{what} of {key.hex()[:8]} before its payload was durable")

    def _on_flag(self, name: bytes, value: bytes) -> None:
        with self.lock:
            if name == b"clean" and value == b"1" and any(self.pending.values()):
                self.violations.append("marked clean with segment bytes not yet fdatasync'd")

    def cut(self, dst: Path) -> Path:
        """A copy of the data directory as a power cut now would leave it."""
        with self.tier._commit_lock, self.lock:
            shutil.copytree(self.tier.root, dst)
            for path, ranges in self.pending.items():
                copy = dst / Path(path).relative_to(self.tier.root)
                if not copy.exists():
                    continue
                with open(copy, "r+b") as f:
                    size = os.fstat(f.fileno()).st_size
                    for lo, hi in ranges:
                        if lo < size:
                            f.seek(lo)
                            f.write(bytes(min(hi, size) - lo))
            for path in self.undirsynced:
                (dst / Path(path).relative_to(self.tier.root)).unlink(missing_ok=True)
        return dst


def config(path: Path, durability: str, **kw) -> SSDTierConfig:
    base = dict(path=str(path), durability=durability, segment_bytes=1 << 20,
                inline_threshold=8192, min_free_bytes=0, batch_interval_ms=3_600_000)
    base.update(kw)
    return SSDTierConfig(**base)


def put(tier: SSDTier, seed: int, i: int) -> tuple[bytes, bytes]:
    key, data = block_key(seed, i), make_block(seed, i, 2048, 300_000)
    tier.put(key, data, meta_for(i))
    return key, data


def served(path: Path, durability: str) -> dict[bytes, bytes]:
    """Open a directory and read back everything it serves; it must check clean."""
    out = {}
    with SSDTier(config(path, durability)) as tier:
        for key, _, size in tier.scan():
            buf = torch.empty(size, dtype=torch.uint8)
            assert tier.read_into(key, buf) == size
            out[key] = buf.numpy().tobytes()
        assert tier.check() == []
    return out


def lmdb_syncs(tier: SSDTier) -> bool:
    flags = tier._index.env.flags()
    return flags["sync"] and flags["metasync"]


def test_sync_acknowledges_a_put_only_once_payload_then_record_are_durable(tmp_path, monkeypatch):
    with SSDTier(config(tmp_path / "kv", "sync")) as tier:
        disk = Disk(monkeypatch, tier)
        assert lmdb_syncs(tier)
        acked = {}
        for i in range(24):
            key, data = put(tier, 61, i)
            assert key in disk.committed, f"put {i} returned before its record committed"
            acked[key] = data
        for key in list(acked)[:16]:  # compaction moves the rest: durably, before the index
            tier.delete(key)
            del acked[key]
        assert tier.compact() >= 1
        assert disk.violations == []
        copy = disk.cut(tmp_path / "cut")
    assert served(copy, "sync") == acked  # the power cut lost nothing acknowledged


def test_batch_syncs_payloads_before_its_commit_and_a_cut_loses_only_uncommitted_puts(
        tmp_path, monkeypatch):
    with SSDTier(config(tmp_path / "kv", "batch")) as tier:
        disk = Disk(monkeypatch, tier)
        assert lmdb_syncs(tier)
        first = dict(put(tier, 62, i) for i in range(12))
        assert not disk.committed & first.keys()  # returned before any commit: batched
        tier.flush()
        assert disk.committed >= first.keys()
        for i in range(12, 20):  # the next interval's puts: in memory, not committed
            put(tier, 62, i)
        assert disk.violations == []
        copy = disk.cut(tmp_path / "cut")
    assert served(copy, "batch") == first  # the last interval lost, nothing torn or wrong


def test_batch_commits_by_itself_every_interval(tmp_path, monkeypatch):
    with SSDTier(config(tmp_path / "kv", "batch", batch_interval_ms=20)) as tier:
        disk = Disk(monkeypatch, tier)
        key, _ = put(tier, 63, 0)
        deadline = time.monotonic() + 30
        while key not in disk.committed:  # no flush() call: the background commit does it
            assert time.monotonic() < deadline, "the batch was never committed"
            time.sleep(0.01)
        assert disk.violations == []


def test_a_background_compaction_pass_never_holds_up_the_batch_commit(tmp_path, monkeypatch):
    """A pass copies whole segments. Run on the flush thread, it held every batch commit, and
    with it every put waiting to be durable, until it was done."""
    entered, go = threading.Event(), threading.Event()
    real = tier_mod.compaction.compact

    def held(store, live_fraction):
        entered.set()
        assert go.wait(120)
        return real(store, live_fraction)

    monkeypatch.setattr(tier_mod.compaction, "compact", held)
    with SSDTier(config(tmp_path / "kv", "batch", batch_interval_ms=20)) as tier:
        try:
            disk = Disk(monkeypatch, tier)
            tier.space.compact_soon = True  # what a put the disk refused asks for
            assert entered.wait(60), "the background pass never started"
            key, _ = put(tier, 65, 0)
            deadline = time.monotonic() + 60
            while key not in disk.committed:  # committed by the flush thread while the pass runs
                assert time.monotonic() < deadline, "the batch waited for the compaction pass"
                time.sleep(0.01)
            assert not go.is_set() and disk.violations == []
        finally:
            go.set()


def test_none_claims_no_durability_and_recovery_drops_what_a_cut_lost(tmp_path, monkeypatch):
    with SSDTier(config(tmp_path / "kv", "none")) as tier:
        disk = Disk(monkeypatch, tier)
        blocks = dict(put(tier, 64, i) for i in range(20))
        inline = {k for k, loc in tier._loc.items() if loc.segment == 0}
        assert 0 < len(inline) < len(blocks)
        assert not any(e[0] == "sync" for e in disk.events)  # none: nothing is fdatasync'd
        assert disk.violations == []  # ...and no record claims otherwise
        copy = disk.cut(tmp_path / "cut")
        tier.close()  # a clean close syncs the segments before it marks the directory clean
        assert disk.violations == []
    after_cut = served(copy, "none")
    assert inline <= after_cut.keys()  # their bytes live in the (kept) index
    assert all(blocks[k] == v for k, v in after_cut.items())  # nothing lost is served
    assert served(tmp_path / "kv", "none") == blocks  # and a clean close kept everything


@pytest.mark.parametrize("durability", ["sync", "batch"])
def test_new_segment_files_are_in_their_directory_before_a_record_names_them(
        tmp_path, monkeypatch, durability):
    with SSDTier(config(tmp_path / "kv", durability, segment_bytes=256 << 10)) as tier:
        disk = Disk(monkeypatch, tier)
        acked = dict(put(tier, 65, i) for i in range(10))  # several segments
        tier.flush()
        assert sum(e[0] == "create" for e in disk.events) >= 3
        assert disk.violations == []
        copy = disk.cut(tmp_path / "cut")
    assert served(copy, durability) == acked


def put_many(tier: SSDTier, seed: int, ids: range) -> dict[bytes, bytes]:
    blocks = {block_key(seed, i): make_block(seed, i, 2048, 300_000) for i in ids}
    res = tier.put_many([(k, d, meta_for(i)) for i, (k, d) in zip(ids, blocks.items(), strict=True)])
    assert res == [None] * len(blocks)
    return blocks


def test_sync_put_many_is_one_group_commit_after_every_payload_is_durable(tmp_path, monkeypatch):
    with SSDTier(config(tmp_path / "kv", "sync", segment_bytes=4 << 20)) as tier:
        disk = Disk(monkeypatch, tier)
        commits, recorded = [], tier._index.commit

        def commit(puts=(), deletes=()):
            puts = list(puts)
            commits.append([k for k, _, _ in puts])
            return recorded(puts, deletes)

        monkeypatch.setattr(tier._index, "commit", commit)
        acked = put_many(tier, 66, range(16))
        assert disk.committed >= acked.keys()  # returned after its commit
        assert commits == [list(acked)]  # one transaction for the whole batch
        syncs = [e for e in disk.events if e[0] == "sync"]
        assert 1 <= len(syncs) <= len({e[1] for e in disk.events if e[0] == "write"})
        assert disk.violations == []
        copy = disk.cut(tmp_path / "cut")
    assert served(copy, "sync") == acked


def test_batch_put_many_waits_for_the_batch_commit_like_put(tmp_path, monkeypatch):
    with SSDTier(config(tmp_path / "kv", "batch")) as tier:
        disk = Disk(monkeypatch, tier)
        first = put_many(tier, 67, range(10))
        assert not disk.committed & first.keys()
        tier.flush()
        assert disk.committed >= first.keys()
        put_many(tier, 67, range(10, 16))  # the next interval: in memory only
        assert disk.violations == []
        copy = disk.cut(tmp_path / "cut")
    assert served(copy, "batch") == first
