"""Key-addressed engine blocks in TieredCache: round trips on every tier, the guarantees of
ordinary blocks (checksums, warm restart, eviction, TTL, metrics), and bad input."""

from __future__ import annotations

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
)
from kvtier.errors import InvalidType
from kvtier.keys import namespace_digest
from kvtier.namespaces import Namespace
from tests.conftest import random_bytes

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
