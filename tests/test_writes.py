"""The put path (``kvtier.writes``) over real tiers: every full block of a prefix stored once and
bit-exact, acknowledged only once the SSD tier holds it, a block missing from the durable tier
written by the next put, a put that no tier can take stopping short, and refused puts storing
nothing."""

from __future__ import annotations

import threading

import pytest
import torch

from kvtier.block import decode_block_into, encode_block_for_put
from kvtier.catalog import NamespaceCatalog
from kvtier.codecs import get_codec
from kvtier.errors import StorageFull, UnknownNamespace
from kvtier.keys import as_token_array, prefix_hashes
from kvtier.layout import block_slice
from kvtier.namespaces import NamespaceRegistry
from kvtier.recorder import StatsRecorder
from kvtier.writes import Puts, _EncodeAhead
from kvtier.writethrough import WriteThrough
from tests.conftest import random_kv
from tests.parts import BLOCK, entry, host, place, placement, ssd
from tests.test_writethrough import Gate

BT = 8  # random_kv(8 tokens) encodes to about 2 KiB: one host slot a block
TOKENS = list(range(4 * BT + 3))  # 4 full blocks and a partial one (never stored)
KV = random_kv(len(TOKENS))


def puts_over(p) -> tuple[Puts, WriteThrough, NamespaceCatalog]:
    catalog = NamespaceCatalog(NamespaceRegistry(), None, block_tokens=BT, codec="none")
    writes = WriteThrough(p, admit_on_put=True, backlog_bytes=64 * BLOCK, threads=2)
    return Puts(catalog, p, writes, StatsRecorder(p)), writes, catalog


def keys(catalog, tokens=TOKENS) -> list[bytes]:
    ns = catalog.get("m")
    return prefix_hashes(ns.digest, as_token_array(tokens), BT)


def decoded(tier, key: bytes, n: int) -> list[list[torch.Tensor]]:
    raw = torch.empty(n, dtype=torch.uint8)
    tier.read_into(key, raw)
    outs = [[torch.empty_like(t[:BT]) for t in layer] for layer in KV]
    decode_block_into(raw, outs)
    return outs


def test_every_full_block_is_stored_once_bit_exact_and_counted():
    p = placement([host(16 * BLOCK)])
    puts, writes, catalog = puts_over(p)
    try:
        assert puts.put("m", TOKENS, KV, create=True) == 4 * BT
        ks = keys(catalog)
        assert len(ks) == 4 and all(p.index[k].tiers == (0,) for k in ks)
        assert [p.index[k].parent for k in ks] == [None] + ks[:3]
        for i, k in enumerate(ks):
            got = decoded(p.tiers[0], k, p.index[k].nbytes)
            want = block_slice(KV, i, BT)
            assert all(torch.equal(a, b) for la, lb in zip(got, want, strict=True)
                       for a, b in zip(la, lb, strict=True))
        assert puts.put("m", TOKENS, KV, create=True) == 0  # all there: nothing stored again
        assert p.stats.tiers["host"].blocks_written == 4
        assert (p.stats.puts, p.stats.tokens_put) == (2, 4 * BT)
        assert all(p.index[k].pins == 0 for k in ks)  # the put's chain is released
    finally:
        writes.close()


@pytest.mark.parametrize("gather_blocks", [1, 3])
def test_a_put_of_transposed_views_stores_the_same_blocks_in_every_tier(tmp_path, monkeypatch, gather_blocks):
    """KV handed over as non-contiguous views (a model's ``[heads, tokens, dim]`` cache seen
    token-first) is gathered a chunk at a time (``PrefixKV._gathered``; chunks of 1 and of 3
    blocks, so windows span chunks): each block lands in the host tier and, written through,
    on the SSD tier, bit-exact, as from contiguous tensors."""
    import kvtier.prefixkv as prefixkv_mod

    block_kv = sum(t[0].numel() * t.element_size() for layer in KV for t in layer) * BT
    monkeypatch.setattr(prefixkv_mod, "GATHER_BYTES", gather_blocks * block_kv)
    views = [tuple(t.transpose(0, 1).contiguous().transpose(0, 1) for t in layer) for layer in KV]
    assert not views[0][0].is_contiguous() and all(torch.equal(a, b) for la, lb in zip(views, KV, strict=True)
                                                   for a, b in zip(la, lb, strict=True))
    p = placement([host(16 * BLOCK), ssd(tmp_path / "ssd", inline_threshold=0)])
    puts, writes, catalog = puts_over(p)
    try:
        assert puts.put("m", TOKENS, views, create=True) == 4 * BT
        ks = keys(catalog)
        for i, k in enumerate(ks):
            assert p.index[k].tiers == (0, 1)
            want = block_slice(KV, i, BT)
            for tier in p.tiers:
                got = decoded(tier, k, p.index[k].nbytes)
                assert all(torch.equal(a, b) for la, lb in zip(got, want, strict=True)
                           for a, b in zip(la, lb, strict=True)), (i, tier.name)
    finally:
        writes.close()


def test_a_put_is_acknowledged_only_once_the_ssd_tier_holds_every_block(tmp_path, monkeypatch):
    p = placement([host(16 * BLOCK), ssd(tmp_path / "ssd", inline_threshold=0)])
    puts, writes, catalog = puts_over(p)
    sizes = spy_put_many(p.tiers[1], monkeypatch)
    gate = Gate(p.tiers[1], monkeypatch, method="put_many")
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(puts.put("m", TOKENS, KV, create=True)))
    try:
        t.start()
        gate.wait_reached()  # the write-throughs are under way (together: one put_many), held
        t.join(0.2)
        assert t.is_alive() and not result  # not acknowledged while the SSD tier lacks them
        gate.open.set()
        t.join(30)
        assert result == [4 * BT] and sizes == [4]
        ks = keys(catalog)  # no flush: the acknowledgement itself means durable
        assert all(p.index[k].tiers == (0, 1) and p.tiers[1].contains(k) for k in ks)
        assert p.stats.tiers["ssd"].blocks_written == 4
    finally:
        gate.open.set()
        t.join(30)
        writes.close()


def test_a_block_missing_from_the_durable_tier_is_written_by_the_next_put(tmp_path):
    p = placement([host(16 * BLOCK), ssd(tmp_path / "ssd", inline_threshold=0)])
    puts, writes, catalog = puts_over(p)
    try:
        puts.put("m", TOKENS, KV, create=True)
        lost = keys(catalog)[2]
        with p.lock:  # as if its write-through had failed
            p.tiers[1].delete(lost)
            p.policies[1].remove(lost)
            p.index[lost].discard_tier(1)
        assert puts.put("m", TOKENS, KV, create=True) == 0  # nothing new, but made durable
        assert p.index[lost].tiers == (0, 1) and p.tiers[1].contains(lost)
    finally:
        writes.close()


def test_a_put_stops_at_the_first_block_no_tier_can_take():
    p = placement([host(3 * BLOCK)])
    puts, writes, catalog = puts_over(p)
    blockers = []
    try:
        for name in ("x", "y"):  # two of the three slots held by readers
            e = entry(name, nbytes=BLOCK)
            assert place(p, e) == 0
            e.pins += 1
            blockers.append(e)
        assert puts.put("m", TOKENS, KV, create=True) == BT  # one block fit, the prefix ends
        ks = keys(catalog)
        assert ks[0] in p.index and ks[1] not in p.index
        assert p.index[ks[0]].pins == 0
    finally:
        writes.close()


def test_refused_puts_store_nothing():
    p = placement([host(16 * BLOCK)])
    puts, writes, catalog = puts_over(p)
    try:
        with pytest.raises(UnknownNamespace):
            puts.put("never registered", TOKENS, KV, create=False)
        assert not p.index and catalog.find("never registered") is None
        puts.put("m", TOKENS[:BT], random_kv(BT), create=True)
        wrong = [tuple(t.to(torch.float16) for t in layer) for layer in KV]
        with pytest.raises(Exception, match="layout|dtype"):
            puts.put("m", TOKENS, wrong, create=True)
        assert len(p.index) == 1 and p.stats.puts == 1
    finally:
        writes.close()




def ssd_puts(tmp_path, monkeypatch, window_blocks: int):
    """Puts over an SSD tier alone (new blocks land there: written ``window_blocks`` per
    ``put_many``), with its single-block ``put`` made to fail the test."""
    p = placement([ssd(tmp_path / "ssd", inline_threshold=0)])
    puts, writes, catalog = puts_over(p)
    nbytes = len(encode_block_for_put(get_codec("none"), block_slice(KV, 0, BT), pieces=False))
    monkeypatch.setattr("kvtier.writes.WINDOW_BYTES", window_blocks * nbytes)
    return p, puts, writes, catalog


def spy_put_many(tier, monkeypatch) -> list[int]:
    """The number of blocks of each ``put_many`` call, in order."""
    sizes: list[int] = []
    real = tier.put_many

    def put_many(blocks):
        sizes.append(len(blocks))
        return real(blocks)

    monkeypatch.setattr(tier, "put_many", put_many)
    return sizes


def test_a_put_to_the_ssd_tier_writes_its_blocks_together_outside_the_lock(tmp_path, monkeypatch):
    """With no memory tier in front, a put's new blocks go to the SSD tier a window at a time
    (one ``put_many``: writes in flight together), never one ``put`` each under the cache lock.
    Held in the middle of its first window's write, the lock is free (a lookup runs), nothing of
    the window is visible yet, and what lands is the whole chain, bit-exact and released."""
    p, puts, writes, catalog = ssd_puts(tmp_path, monkeypatch, window_blocks=2)
    monkeypatch.setattr(p.tiers[0], "put", lambda *a: pytest.fail("one block at a time"))
    sizes = spy_put_many(p.tiers[0], monkeypatch)
    gate = Gate(p.tiers[0], monkeypatch, method="put_many")
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(puts.put("m", TOKENS, KV, create=True)))
    try:
        t.start()
        gate.wait_reached()
        got = threading.Event()
        threading.Thread(target=lambda: (p.lock.acquire(), p.lock.release(), got.set()), daemon=True).start()
        assert got.wait(30), "the cache lock is held through the disk write"
        ks = keys(catalog)
        with p.lock:
            assert not any(k in p.index for k in ks)
        gate.open.set()
        t.join(30)
        assert result == [4 * BT] and sizes == [2, 2]
        assert [p.index[k].parent for k in ks] == [None] + ks[:3]
        assert all(p.index[k].tiers == (0,) and p.index[k].pins == 0 for k in ks)
        for i, k in enumerate(ks):
            want = block_slice(KV, i, BT)
            assert all(torch.equal(a, b) for la, lb in zip(decoded(p.tiers[0], k, p.index[k].nbytes), want,
                                                            strict=True) for a, b in zip(la, lb, strict=True))
        assert p.stats.tiers["ssd"].blocks_written == 4
    finally:
        gate.open.set()
        t.join(30)
        writes.close()


def test_a_failed_write_in_a_window_keeps_the_blocks_before_it_and_no_copy_after_it(tmp_path, monkeypatch):
    """Block 2 of a window of four cannot be written (as a bad sector would): block 1 is
    stored, the copies of blocks 3 and 4 written beside it are deleted (children without their
    parent), and block 2 is tried once more alone before the put ends there."""
    p, puts, writes, catalog = ssd_puts(tmp_path, monkeypatch, window_blocks=4)
    tier = p.tiers[0]
    real_many, real_put = tier.put_many, tier.put
    bad: list[bytes] = []
    tries: list[bytes] = []

    def put_many(blocks):
        bad.append(blocks[1][0])
        out = real_many(blocks)
        for i, (key, _, _) in enumerate(blocks):
            if key == bad[0]:
                tier.delete(key)
                out[i] = StorageFull("injected: the disk refused this block")
        return out

    def put(key, data, meta):
        tries.append(key)
        if key in bad:
            raise StorageFull("injected: the disk refused this block again")
        return real_put(key, data, meta)

    monkeypatch.setattr(tier, "put_many", put_many)
    monkeypatch.setattr(tier, "put", put)
    try:
        with pytest.raises(StorageFull, match="again"):
            puts.put("m", TOKENS, KV, create=True)
        ks = keys(catalog)
        assert bad == [ks[1]] and tries == [ks[1]]
        assert ks[0] in p.index and not any(k in p.index for k in ks[1:])
        assert [tier.contains(k) for k in ks] == [True, False, False, False]
        assert p.index[ks[0]].pins == 0 and not p.placing(ks[2])
    finally:
        writes.close()


def test_a_namespace_dropped_while_a_window_is_written_leaves_nothing_on_disk(tmp_path, monkeypatch):
    p, puts, writes, catalog = ssd_puts(tmp_path, monkeypatch, window_blocks=4)
    gate = Gate(p.tiers[0], monkeypatch, method="put_many")
    result: list = []

    def run():
        try:
            result.append(puts.put("m", TOKENS, KV, create=True))
        except UnknownNamespace as e:
            result.append(e)

    t = threading.Thread(target=run)
    try:
        t.start()
        gate.wait_reached()
        ks = keys(catalog)
        catalog.remove("m")
        gate.open.set()
        t.join(30)
        assert isinstance(result[0], UnknownNamespace)
        assert not p.index and not any(p.tiers[0].contains(k) for k in ks)
        assert p.tiers[0].used_bytes == 0
    finally:
        gate.open.set()
        t.join(30)
        writes.close()


def test_concurrent_puts_of_a_prefix_to_the_ssd_tier_store_each_block_once(tmp_path, monkeypatch):
    """A second put of the prefix while the first's window is being written waits for it and
    takes its blocks: each stored once, by one of them."""
    p, puts, writes, catalog = ssd_puts(tmp_path, monkeypatch, window_blocks=4)
    sizes = spy_put_many(p.tiers[0], monkeypatch)
    gate = Gate(p.tiers[0], monkeypatch, method="put_many")
    first: list[int] = []
    second: list[int] = []
    t1 = threading.Thread(target=lambda: first.append(puts.put("m", TOKENS, KV, create=True)))
    t2 = threading.Thread(target=lambda: second.append(puts.put("m", TOKENS, KV, create=True)))
    try:
        t1.start()
        gate.wait_reached()
        t2.start()
        t2.join(0.2)
        assert t2.is_alive()  # waiting for the blocks being written, not writing them again
        gate.open.set()
        t1.join(30)
        t2.join(30)
        assert first + second == [4 * BT, 0] and sizes == [4]
        assert p.stats.tiers["ssd"].blocks_written == 4
        assert all(p.index[k].pins == 0 for k in keys(catalog))
    finally:
        gate.open.set()
        t1.join(30)
        t2.join(30)
        writes.close()


class CountedAhead(dict):
    """Blocks started ahead, counting how often one is looked at or filed."""

    touched = 0

    def __contains__(self, k):
        self.touched += 1
        return super().__contains__(k)

    def __setitem__(self, k, v):
        self.touched += 1
        super().__setitem__(k, v)


def test_encoding_ahead_starts_each_block_once_and_looks_at_no_other():
    """A window of tiny blocks is thousands of blocks ahead: looking at each of them again on
    every call made a put of 16,000 blocks of 1 KiB take 12 s."""
    n = 3000
    calls: list[int] = []
    encoded = _EncodeAhead(lambda i: calls.append(i) or torch.full((1,), i % 256, dtype=torch.uint8), n)
    encoded.ahead = CountedAhead()
    encoded.batch(encoded.encode, ahead=n)
    try:
        got = [int(encoded(i)[0]) for i in range(0, n, 2)]  # every other block asked for
    finally:
        encoded.close()
    assert got == [i % 256 for i in range(0, n, 2)]
    assert len(calls) == len(set(calls)) and set(range(0, n, 2)) <= set(calls)  # each at most once
    assert encoded.ahead.touched <= n and not encoded.ahead
