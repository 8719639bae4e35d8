"""Whole-block reloads (``kvtier.reload``) over real tiers: a block decoded bit-exact from its
fastest copy and counted, promotion to the fastest tier when configured, a corrupt copy dropped
and the next one read, a block with no good copy left dropped, and promotions that never evict
what they must keep."""

from __future__ import annotations

import time

import torch

from kvtier.block import encode_block
from kvtier.codecs import get_codec
from kvtier.index import BlockEntry
from kvtier.reload import Reloads
from tests.conftest import random_kv
from tests.parts import BLOCK, host, key, placement, remote, ssd

TOKENS = 8  # random_kv(8): 2 layers of 2 x 2 x 8 float32 per token, a block under BLOCK bytes


def block(seed: int) -> tuple[list, torch.Tensor]:
    kv = random_kv(TOKENS, seed=seed)
    payload = torch.frombuffer(bytearray(encode_block(get_codec("none"), kv)), dtype=torch.uint8)
    assert payload.numel() <= BLOCK
    return kv, payload


def put_in(p, t: int, name: str, payload: torch.Tensor) -> BlockEntry:
    """Store a block in tier ``t`` only, indexed as a demotion or warm start leaves it."""
    e = BlockEntry(key(name), "ns", None, 0, TOKENS, payload.numel(), time.time())
    p.tiers[t].put(e.key, payload, e.meta())
    with p.lock:
        p.publish(e, t, payload.numel())
    return e


def add_copy(p, t: int, e: BlockEntry, payload: torch.Tensor) -> None:
    """A second copy of an indexed block, in tier ``t``."""
    p.tiers[t].put(e.key, payload, e.meta())
    with p.lock:
        p.publish(e, t, payload.numel())


def empty_like(kv) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.empty_like(k), torch.empty_like(v)) for k, v in kv]


def equal(a, b) -> bool:
    return all(torch.equal(x, y) for la, lb in zip(a, b, strict=True) for x, y in zip(la, lb, strict=True))


def test_a_block_is_decoded_bit_exact_from_its_fastest_copy_and_counted(tmp_path):
    p = placement([host(4 * BLOCK), ssd(tmp_path / "ssd")])
    kv, payload = block(1)
    e = put_in(p, 1, "a", payload)
    add_copy(p, 0, e, payload)  # a second copy, in the faster tier
    r = Reloads(p, promote_on_get=False)
    out = empty_like(kv)
    assert r.load_block(e.key, out) and equal(out, kv)
    s = p.stats.tiers
    assert (s["host"].blocks_read, s["host"].bytes_read, s["ssd"].blocks_read) == (1, payload.numel(), 0)
    assert s["host"].reload_seconds.count == 1
    assert not r.load_block(key("never stored"), out)


def test_a_block_read_from_a_slower_tier_is_promoted_only_when_configured(tmp_path):
    for promote in (False, True):
        p = placement([host(4 * BLOCK), ssd(tmp_path / f"ssd-{promote}")])
        kv, payload = block(2)
        e = put_in(p, 1, "a", payload)
        out = empty_like(kv)
        assert Reloads(p, promote_on_get=promote).load_block(e.key, out) and equal(out, kv)
        assert p.stats.tiers["ssd"].blocks_read == 1
        assert e.tiers == ((0, 1) if promote else (1,))
        assert p.stats.tiers["host"].promotions == int(promote)
        assert p.tiers[0].contains(e.key) == promote
        if promote:  # the promoted copy is the verified bytes: read back from the host tier
            again = empty_like(kv)
            assert Reloads(p, promote_on_get=True).load_block(e.key, again) and equal(again, kv)
            assert p.stats.tiers["host"].blocks_read == 1


def flip_a_byte(disk, e: BlockEntry) -> None:
    """Flip a byte in the middle of the SSD tier's copy of ``e``, in its segment file."""
    loc = disk._loc[e.key]
    seg = disk.config.path + f"/segments/{loc.segment:08d}.seg"
    with open(seg, "r+b") as f:
        f.seek(loc.offset + loc.length // 2)
        b = f.read(1)
        f.seek(loc.offset + loc.length // 2)
        f.write(bytes([b[0] ^ 0xFF]))


def test_a_corrupt_copy_is_dropped_and_the_next_tier_read(tmp_path, redis_server):
    disk, shared = ssd(tmp_path / "ssd", inline_threshold=0), remote(redis_server)
    try:
        p = placement([disk, shared])
        kv, payload = block(3)
        e = put_in(p, 0, "a", payload)
        add_copy(p, 1, e, payload)
        assert shared.flush(30)
        flip_a_byte(disk, e)
        out = empty_like(kv)
        assert Reloads(p, promote_on_get=False).load_block(e.key, out) and equal(out, kv)
        assert e.tiers == (1,) and not disk.contains(e.key) and e.key in p.index
        s = p.stats.tiers
        assert (s["ssd"].corrupt_blocks, s["ssd"].blocks_read, s["remote"].blocks_read) == (1, 0, 1)
    finally:
        shared.close()


def test_a_block_whose_only_copy_is_corrupt_is_dropped_never_served(tmp_path):
    disk = ssd(tmp_path / "ssd", inline_threshold=0)
    p = placement([disk])
    kv, payload = block(4)
    e = put_in(p, 0, "a", payload)
    flip_a_byte(disk, e)
    out = empty_like(kv)
    assert not Reloads(p, promote_on_get=False).load_block(e.key, out)
    assert e.key not in p.index and p.stats.tiers["ssd"].corrupt_blocks == 1
    assert p.stats.tiers["ssd"].blocks_read == 0


def test_a_lost_copy_falls_back_to_the_next_tier(tmp_path):
    p = placement([host(4 * BLOCK), ssd(tmp_path / "ssd")])
    kv, payload = block(4)
    e = put_in(p, 1, "a", payload)
    add_copy(p, 0, e, payload)
    p.tiers[0].delete(e.key)  # the host copy vanished behind the index's back
    r = Reloads(p, promote_on_get=False)
    out = empty_like(kv)
    assert r.load_block(e.key, out) and equal(out, kv)
    assert e.tiers == (1,) and p.stats.tiers["ssd"].blocks_read == 1
    assert p.stats.tiers["ssd"].corrupt_blocks == 0 == p.stats.tiers["host"].corrupt_blocks


def test_a_promotion_never_evicts_a_kept_key_and_a_doomed_block_is_never_promoted(tmp_path):
    p = placement([host(2 * BLOCK), ssd(tmp_path / "ssd")])
    kept = [put_in(p, 0, n, block(i)[1]) for i, n in enumerate(("k1", "k2"))]  # host full
    kv, payload = block(9)
    e = put_in(p, 1, "a", payload)
    r = Reloads(p, promote_on_get=True)
    assert not r.promote(e, None, keep=[k.key for k in kept])  # no room without evicting them
    assert e.tiers == (1,) and all(k.tiers == (0,) for k in kept)
    assert r.promote(e, None, keep=[kept[1].key])  # k1 may go: demoted to the SSD tier
    assert e.tiers == (0, 1) and kept[0].tiers == (1,) and kept[1].tiers == (0,)
    f = put_in(p, 1, "f", block(10)[1])
    with p.lock:
        p.touch([f], pin=True)
        p.drop(f.key, "evicted")
    assert f.doomed and not r.promote(f, None) and 0 not in f.tiers


def test_promote_loaded_learns_an_unknown_size_and_refuses_after_close(tmp_path):
    p = placement([host(4 * BLOCK), ssd(tmp_path / "ssd")])
    kv, payload = block(5)
    e = put_in(p, 1, "a", payload)
    e.nbytes = 0  # found by a shared tier's existence query: size unknown
    r = Reloads(p, promote_on_get=True)
    assert r.promote_loaded(e.key, payload) and e.nbytes == payload.numel() and 0 in e.tiers
    g = put_in(p, 1, "g", block(6)[1])
    assert not r.promote_loaded(g.key, payload[:10].clone())  # not the block's size: refused
    r.closed = True
    assert not r.promote_loaded(g.key, block(6)[1]) and g.tiers == (1,)
    assert not Reloads(p, promote_on_get=True).promote_loaded(key("unknown"), payload)
