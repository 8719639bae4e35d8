"""Key-addressed engine blocks in TieredCache: round trips on every tier, the guarantees of
ordinary blocks (checksums, warm restart, eviction, TTL, metrics), and bad input."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from kvtier import (
    BlockHits,
    CacheConfig,
    FingerprintMismatch,
    HostTierConfig,
    InvalidRequest,
    RemoteTierConfig,
    SSDTierConfig,
    TieredCache,
    UnknownNamespace,
    engine_blocks,
)
from kvtier.errors import InvalidType
from kvtier.keys import namespace_digest
from kvtier.namespaces import Namespace
from kvtier.reload import Reloads
from kvtier.tiers.ssd import segments
from tests.conftest import random_bytes

ROOT = Path(__file__).resolve().parents[1]
PAGE = 8192
FP = {"model": "tiny", "kv_dtype": "float16", "block_tokens": 16, "tp_rank": 0, "layout": "LBNHC"}


def ssd_cache(path, host="0", capacity="64MiB", durability="sync") -> TieredCache:
    return TieredCache(CacheConfig(
        host=HostTierConfig(capacity_bytes=host, page_bytes="16KiB"),
        ssd=SSDTierConfig(path=str(path), capacity_bytes=capacity, min_free_bytes=0, durability=durability,
                          segment_bytes="1MiB", direct_io=False, inline_threshold=0)))


def host_cache(capacity="1MiB") -> TieredCache:
    return TieredCache(CacheConfig(host=HostTierConfig(capacity_bytes=capacity, page_bytes="16KiB")))


def keys(n: int, start: int = 0) -> list[bytes]:
    return [i.to_bytes(8, "big") + b"\x00\x00\x00\x00" for i in range(start, start + n)]


def pages(n: int, seed: int = 0) -> torch.Tensor:
    return random_bytes(n * PAGE, seed).view(n, PAGE)


def test_round_trip_exists_and_first_writer_wins(tmp_path):
    with ssd_cache(tmp_path, host="1MiB") as c:
        c.register_block_namespace("e", page_bytes=PAGE, fingerprint=FP)
        p = pages(4)
        assert c.put_blocks("e", keys(4), p) == 4
        assert c.put_blocks("e", keys(4), pages(4, seed=9)) == 0  # first writer wins
        hits = c.block_exists("e", [*keys(2), b"absent", *keys(2, 2)])
        assert hits == BlockHits(2, [True, True, False, True, True])
        out = torch.zeros(5, PAGE, dtype=torch.uint8)
        assert c.get_blocks_into("e", keys(4), out) == 4
        assert torch.equal(out[:4], p) and not out[4].any()
        rows = [bytearray(PAGE) for _ in range(3)]  # writable buffers work as rows too
        assert c.get_blocks_into("e", [*keys(2), b"absent"], rows) == 2  # the leading run only
        assert bytes(rows[1]) == p[1].numpy().tobytes() and not any(rows[2])
        assert c.put_blocks("e", keys(1, 10), [p[0].numpy().tobytes()]) == 1  # bytes pages
        assert c.evict_blocks("e", keys(2)) == 2
        assert c.block_exists("e", keys(4)).present == [False, False, True, True]


def test_pages_of_one_put_go_to_the_ssd_tier_in_one_group_commit(tmp_path, monkeypatch):
    from kvtier.tiers.ssd.tier import SSDTier

    batches: list[int] = []
    put_many = SSDTier.put_many

    def spy(self, blocks):
        batches.append(len(blocks))
        return put_many(self, blocks)

    monkeypatch.setattr(SSDTier, "put_many", spy)
    monkeypatch.setattr(SSDTier, "put", lambda *a: pytest.fail("a page put alone"))
    p = pages(7)
    with ssd_cache(tmp_path) as c:
        c.register_block_namespace("e", page_bytes=PAGE, fingerprint=FP)
        ks = keys(6)
        assert c.put_blocks("e", [*ks[:3], ks[0], *ks[3:]], p) == 6  # a repeated key once
        assert batches == [7 - 1]
        out = torch.empty(6, PAGE, dtype=torch.uint8)
        assert c.get_blocks_into("e", ks, out) == 6
        assert torch.equal(out, torch.cat([p[:3], p[4:]]))
    with ssd_cache(tmp_path) as c:  # committed: a new process finds every page
        assert c.block_exists("e", keys(6)).leading == 6


def test_pages_are_ordinary_blocks_that_survive_a_restart(tmp_path):
    p = pages(6)
    with ssd_cache(tmp_path) as c:
        c.register_block_namespace("e", page_bytes=PAGE, fingerprint=FP, codec="zstd")
        assert c.put_blocks("e", keys(6), p) == 6
    with ssd_cache(tmp_path) as c:  # a new process on the same data dir
        assert c.get_namespace("e").kind == "pages"
        assert c.block_exists("e", keys(6)).leading == 6
        out = torch.empty(6, PAGE, dtype=torch.uint8)
        assert c.get_blocks_into("e", keys(6), out) == 6 and torch.equal(out, p)
        s = c.stats().namespaces["e"]
        assert (s.lookups, s.tokens_looked_up, s.tokens_hit) == (1, 6, 6)


def test_a_corrupt_page_is_a_counted_miss_never_served(tmp_path):
    p = pages(3)
    with ssd_cache(tmp_path) as c:
        c.register_block_namespace("e", page_bytes=PAGE, fingerprint=FP)
        c.put_blocks("e", keys(3), p)
    needle = p[1, 100:164].numpy().tobytes()
    for seg in Path(tmp_path).rglob("*.seg"):
        raw = bytearray(seg.read_bytes())
        at = raw.find(needle)
        if at >= 0:
            raw[at] ^= 0xFF
            seg.write_bytes(raw)
            break
    else:
        pytest.fail("page 1 not found in any segment")
    with ssd_cache(tmp_path) as c:
        out = torch.zeros(3, PAGE, dtype=torch.uint8)
        assert c.get_blocks_into("e", keys(3), out) == 1  # page 0 only: page 1 failed its checksum
        assert torch.equal(out[0], p[0]) and not out[1].any()
        assert c.stats().tiers["ssd"].corrupt_blocks == 1
        assert c.block_exists("e", keys(3)).present == [True, False, True]


def test_pages_in_host_memory_are_copied_in_one_pass_the_rest_block_by_block(tmp_path, monkeypatch):
    """``get_blocks_into`` copies the leading pages the host tier holds in one call
    (``Reloads.copy_pages``), into a 2-D ``out`` whose rows are wider than a page (its row
    stride) or into separate rows; pages only on the SSD come the block-by-block way after
    them. Bit-exact either way, the bytes around each row untouched."""
    loads = []
    real = Reloads.load_block
    monkeypatch.setattr(Reloads, "load_block", lambda self, key, outs: loads.append(key) or real(self, key, outs))
    with ssd_cache(tmp_path, host="1MiB", capacity="8MiB") as c:
        c.register_block_namespace("e", page_bytes=PAGE, fingerprint=FP)
        p = pages(100)
        assert c.put_blocks("e", keys(100), p) == 100  # the host tier holds the first ~80 (pinned
        # while written through to the SSD: the rest go straight to the SSD)
        host = c._placement.tiers[0]
        _, ikeys = c._engine._keys("e", keys(100))
        in_host = [i for i, k in enumerate(ikeys) if host.slot(k) is not None]
        on_ssd = [i for i in range(100) if i not in in_host]
        assert len(in_host) >= 40 and on_ssd
        order = in_host[:40] + on_ssd[:5]
        wide = torch.full((45, PAGE + 100), 0xAB, dtype=torch.uint8)
        assert c.get_blocks_into("e", [keys(1, i)[0] for i in order], wide[:, :PAGE]) == 45
        assert torch.equal(wide[:, :PAGE], p[order]) and bool((wide[:, PAGE:] == 0xAB).all())
        assert len(loads) == 5  # the SSD pages only
        rows = [bytearray(PAGE) for _ in range(3)]
        assert c.get_blocks_into("e", [keys(1, i)[0] for i in in_host[:3]], rows) == 3
        assert [bytes(r) for r in rows] == [p[i].numpy().tobytes() for i in in_host[:3]]
        assert len(loads) == 5


def test_a_damaged_header_in_host_memory_stops_the_one_pass_copy_and_is_never_served():
    """A page whose header in the host tier was overwritten (its checksum fails) is not copied:
    the block-by-block path finds it corrupt, drops it and counts it; the count returned stops
    before it (only a leading run is served)."""
    with host_cache() as c:
        c.register_block_namespace("e", page_bytes=PAGE, fingerprint=FP)
        p = pages(4)
        c.put_blocks("e", keys(4), p)
        host = c._placement.tiers[0]
        offset, _ = host.slot(c._engine._keys("e", keys(4))[1][2])
        host.buffer[offset + 20] ^= 0xFF  # inside the header of page 2
        out = torch.zeros(4, PAGE, dtype=torch.uint8)
        assert c.get_blocks_into("e", keys(4), out) == 2
        assert torch.equal(out[:2], p[:2]) and not out[2].any()  # rows past the count: undefined
        assert c.stats().tiers["host"].corrupt_blocks == 1
        assert c.block_exists("e", keys(4)).present == [True, True, False, True]


def test_compressed_pages_come_back_the_block_by_block_way():
    with host_cache() as c:
        c.register_block_namespace("z", page_bytes=PAGE, fingerprint=FP, codec="zstd")
        p = torch.zeros(4, PAGE, dtype=torch.uint8)
        p[:, ::7] = torch.arange(4, dtype=torch.uint8)[:, None] + 1  # compressible, distinct
        assert c.put_blocks("z", keys(4), p) == 4
        out = torch.zeros(4, PAGE, dtype=torch.uint8)
        assert c.get_blocks_into("z", keys(4), out) == 4 and torch.equal(out, p)


def test_contiguous_pages_go_straight_into_host_slots_and_are_durable_when_acknowledged(tmp_path):
    """A contiguous ``[n, page]`` tensor, and separate rows, are written into the host tier's
    slots with no page encoded on its own (``_put_in_slots``); the SSD write-through reads those slots, and the put
    returns only once it is durable: a process SIGKILLed right after the put returned loses none
    of its pages."""
    ack = tmp_path / "acked"
    child = f"""
import sys, time, torch
sys.path.insert(0, {str(ROOT)!r})
import kvtier.engine_blocks as eb
from tests.test_blocks import FP, keys, pages, ssd_cache
from pathlib import Path
encoded = []
real = eb.encode_block_for_put
eb.encode_block_for_put = lambda *a, **k: encoded.append(1) or real(*a, **k)
c = ssd_cache(Path({str(tmp_path)!r}) / "ssd", host="1MiB")
c.register_block_namespace("e", page_bytes={PAGE}, fingerprint=FP)
n = c.put_blocks("e", keys(40), pages(40, seed=3))
n += c.put_blocks("e", keys(20, 40), list(pages(20, seed=5)))  # separate rows, as the connectors pass them
Path({str(ack)!r}).write_text(f"{{n}} {{len(encoded)}}")
time.sleep(600)
"""
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not ack.exists() or not ack.read_text():
            assert proc.poll() is None, "the child died before its put returned"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.kill()  # no close, no flush: what the put acknowledged must be on the SSD already
    finally:
        proc.kill()
        proc.wait(60)
    assert ack.read_text() == "60 0"  # all stored, none encoded one by one
    with ssd_cache(tmp_path / "ssd") as c:  # SSD only now
        out = torch.zeros(60, PAGE, dtype=torch.uint8)
        assert c.get_blocks_into("e", keys(60), out) == 60
        assert torch.equal(out[:40], pages(40, seed=3)) and torch.equal(out[40:], pages(20, seed=5))


def test_a_page_put_while_another_put_of_it_is_still_written_waits_for_that_write(tmp_path, monkeypatch):
    """Two engine workers put the same page (durability ``sync``). The second finds it stored
    (in the host tier) while the first's SSD write is not durable yet: it must not be
    acknowledged before that write is. It used to return at once, so a crash right after lost a
    page acknowledged as durable. The first write's ``fdatasync`` is held here until the second
    put had its chance. (Under ``batch`` a put returns before its interval's fsync by design.)"""
    events: list[str] = []
    entered, go = threading.Event(), threading.Event()
    real_sync = segments._fdatasync

    def held_sync(fd):
        if not entered.is_set():
            entered.set()
            assert go.wait(120)
        real_sync(fd)
        events.append("durable")

    monkeypatch.setattr(segments, "_fdatasync", held_sync)
    page = pages(1, seed=9)
    with ssd_cache(tmp_path / "ssd", host="1MiB", durability="sync") as c:
        c.register_block_namespace("e", page_bytes=PAGE, fingerprint=FP)

        def put(name: str) -> None:
            c.put_blocks("e", keys(1), page)
            events.append(name)

        first = threading.Thread(target=put, args=("first",), daemon=True)
        first.start()
        assert entered.wait(60)  # the first put's write is in flight, not durable
        second = threading.Thread(target=put, args=("second",), daemon=True)
        second.start()
        second.join(5)  # room for a wrong early return (none is expected)
        go.set()
        first.join(60)
        second.join(60)
        assert not first.is_alive() and not second.is_alive()
        assert events.index("durable") < events.index("second"), events
        assert events.index("durable") < events.index("first"), events


def test_pages_written_into_slots_keep_first_writer_wins_and_overflow_by_lru(monkeypatch):
    encoded = []
    real = engine_blocks.encode_block_for_put
    monkeypatch.setattr(engine_blocks, "encode_block_for_put", lambda *a, **k: encoded.append(1) or real(*a, **k))
    with host_cache("1MiB") as c:  # about 80 page slots
        c.register_block_namespace("e", page_bytes=PAGE, fingerprint=FP)
        first = pages(8, seed=1)
        assert c.put_blocks("e", [keys(1, 2)[0], keys(1, 5)[0]], first[[2, 5]]) == 2
        p = pages(8, seed=2)
        assert c.put_blocks("e", keys(8), p) == 6  # 2 and 5 were there: first writer wins
        assert encoded == [] and len(c.block_exists("e", keys(8)).present) == 8
        out = torch.zeros(8, PAGE, dtype=torch.uint8)
        assert c.get_blocks_into("e", keys(8), out) == 8
        want = p.clone()
        want[[2, 5]] = first[[2, 5]]
        assert torch.equal(out, want)
        big = pages(300, seed=4)  # more than the tier holds: the oldest go, the put stores all
        assert c.put_blocks("e", keys(300, 1000), big) == 300
        present = c.block_exists("e", keys(300, 1000)).present
        assert present[-1] and not present[0]
        assert c.get_blocks_into("e", keys(1, 1299), out[:1]) == 1 and torch.equal(out[0], big[299])
        rows = [bytes([k]) * PAGE for k in (7, 8, 9)]  # separate rows, as the connectors pass them
        assert c.put_blocks("e", keys(3, 5000), rows) == 3 and encoded == []
        assert c.get_blocks_into("e", keys(3, 5000), out[:3]) == 3
        assert [bytes(r.numpy()) for r in out[:3]] == rows
        c.register_block_namespace("z", page_bytes=PAGE, fingerprint=FP, codec="zstd")
        assert c.put_blocks("z", keys(3), pages(3)) == 3
        assert len(encoded) == 3  # compressed pages are encoded one by one


def test_capacity_evicts_least_recently_used_pages(tmp_path):
    with ssd_cache(tmp_path, capacity=10 * (PAGE + 64)) as c:
        c.register_block_namespace("e", page_bytes=PAGE, fingerprint=FP)
        c.put_blocks("e", keys(8), pages(8))
        c.block_exists("e", keys(4))  # touch the first four
        c.put_blocks("e", keys(4, 100), pages(4, seed=1))
        present = c.block_exists("e", keys(8)).present
        assert present[:4] == [True] * 4 and present[4:].count(False) >= 2
        assert c.stats().tiers["ssd"].used_bytes <= 10 * (PAGE + 64)


def test_ttl_expires_pages(tmp_path, monkeypatch):
    with ssd_cache(tmp_path, host="1MiB") as c:
        c.register_block_namespace("short", page_bytes=PAGE, fingerprint=FP, ttl_s=30)
        c.put_blocks("short", keys(2), pages(2))
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() + 31)
        assert c.block_exists("short", keys(2)).leading == 0
        assert c.get_blocks_into("short", keys(2), torch.empty(2, PAGE, dtype=torch.uint8)) == 0


def test_the_fingerprint_is_part_of_every_key():
    base = Namespace("e", "tiny", 1, "none", None, kind="pages", fingerprint='{"kv_dtype":"float16"}')
    from kvtier.blocks import pages_layout

    a = Namespace(**{**_fields(base), "layout": pages_layout(PAGE)})
    b = Namespace(**{**_fields(a), "fingerprint": '{"kv_dtype":"fp8_e4m3"}'})
    salted = Namespace(**{**_fields(a), "fingerprint": '{"kv_dtype":"float16","salt":"x"}'})
    assert len({a.digest, b.digest, salted.digest}) == 3
    kv = Namespace("m", "m", 16, "none", pages_layout(PAGE))  # token namespaces keep their digest
    assert kv.digest == namespace_digest("m", pages_layout(PAGE).fingerprint(), "none", 16, "", "m")


def _fields(ns: Namespace) -> dict:
    return {f: getattr(ns, f) for f in Namespace.__slots__}


def test_bad_input_is_refused_and_stores_nothing():
    with host_cache() as c:
        c.register_block_namespace("e", page_bytes=PAGE, fingerprint=FP)
        with pytest.raises(UnknownNamespace):
            c.put_blocks("nope", keys(1), pages(1))
        with pytest.raises(UnknownNamespace):
            c.block_exists("nope", keys(1))
        with pytest.raises(InvalidRequest, match="1..64 bytes"):
            c.put_blocks("e", [*keys(1), b""], pages(2))
        with pytest.raises(InvalidRequest, match="1..64 bytes"):
            c.put_blocks("e", [*keys(1), b"x" * 65], pages(2))
        with pytest.raises(InvalidType):
            c.put_blocks("e", [*keys(1), "0a0b"], pages(2))
        with pytest.raises(InvalidRequest, match="8192 bytes"):
            c.put_blocks("e", keys(2), [pages(1)[0], torch.zeros(PAGE - 1, dtype=torch.uint8)])
        with pytest.raises(InvalidRequest, match="shape"):
            c.put_blocks("e", keys(2), torch.zeros(2, PAGE + 1, dtype=torch.uint8))
        with pytest.raises(InvalidType):
            c.put_blocks("e", keys(1), torch.zeros(1, PAGE // 4, dtype=torch.float32))
        with pytest.raises(InvalidRequest, match="pages for 2 keys"):
            c.put_blocks("e", keys(2), [pages(1)[0]])
        assert c.block_exists("e", keys(2)).present == [False, False]
        assert c.stats().tiers["host"].blocks == 0
        with pytest.raises(FingerprintMismatch):
            c.register_block_namespace("e", page_bytes=PAGE, fingerprint={**FP, "kv_dtype": "fp8"})
        with pytest.raises(FingerprintMismatch):
            c.register_block_namespace("e", page_bytes=PAGE * 2, fingerprint=FP)
        assert c.register_block_namespace("e", page_bytes=PAGE, fingerprint=dict(reversed(FP.items())))
        with pytest.raises(InvalidRequest, match="lossless"):
            c.register_block_namespace("q", page_bytes=PAGE, fingerprint=FP, codec="fp8")
        with pytest.raises(InvalidRequest, match="token ids"):
            c.register_namespace("tok")
            c.block_exists("tok", keys(1))


def test_remote_tier_shares_pages_between_caches(redis_server):
    def remote_cache() -> TieredCache:
        return TieredCache(CacheConfig(
            host=HostTierConfig(capacity_bytes="1MiB", page_bytes="16KiB"),
            remote=RemoteTierConfig(backend="redis", url=redis_server.url, timeout_s=2.0)))

    p = pages(3)
    with remote_cache() as a, remote_cache() as b:
        for c in (a, b):
            c.register_block_namespace("e", page_bytes=PAGE, fingerprint=FP)
        assert a.put_blocks("e", keys(3), p) == 3
        a.flush(30)
        assert a.tier("remote").flush(30)  # the shared engine's writes are asynchronous
        assert b.block_exists("e", [*keys(3), b"absent"]) == BlockHits(3, [True, True, True, False])
        out = torch.zeros(3, PAGE, dtype=torch.uint8)
        assert b.get_blocks_into("e", keys(3), out) == 3 and torch.equal(out, p)
        assert b.evict_blocks("e", keys(1)) == 1  # an explicit evict deletes the shared copy
        assert a.evict_blocks("e", keys(1)) == 1
        with remote_cache() as fresh:
            fresh.register_block_namespace("e", page_bytes=PAGE, fingerprint=FP)
            assert fresh.block_exists("e", keys(3)).present == [False, True, True]
