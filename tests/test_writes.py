"""The put path (``kvtier.writes``) over real tiers: every full block of a prefix stored once and
bit-exact, acknowledged only once the SSD tier holds it, a block missing from the durable tier
written by the next put, a put that no tier can take stopping short, and refused puts storing
nothing."""

from __future__ import annotations

import threading

import pytest
import torch

from kvtier.block import decode_block_into
from kvtier.catalog import NamespaceCatalog
from kvtier.errors import UnknownNamespace
from kvtier.keys import as_token_array, prefix_hashes
from kvtier.layout import block_slice
from kvtier.namespaces import NamespaceRegistry
from kvtier.recorder import StatsRecorder
from kvtier.writes import Puts
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
        assert len(ks) == 4 and all(p.index[k].tiers == {0} for k in ks)
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


def test_a_put_is_acknowledged_only_once_the_ssd_tier_holds_every_block(tmp_path, monkeypatch):
    p = placement([host(16 * BLOCK), ssd(tmp_path / "ssd", inline_threshold=0)])
    puts, writes, catalog = puts_over(p)
    gate = Gate(p.tiers[1], monkeypatch)
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(puts.put("m", TOKENS, KV, create=True)))
    try:
        t.start()
        gate.wait_reached(2)  # the write-throughs are under way (two writer threads), held
        t.join(0.2)
        assert t.is_alive() and not result  # not acknowledged while the SSD tier lacks them
        gate.open.set()
        t.join(30)
        assert result == [4 * BT]
        ks = keys(catalog)  # no flush: the acknowledgement itself means durable
        assert all(p.index[k].tiers == {0, 1} and p.tiers[1].contains(k) for k in ks)
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
            p.index[lost].tiers.discard(1)
        assert puts.put("m", TOKENS, KV, create=True) == 0  # nothing new, but made durable
        assert p.index[lost].tiers == {0, 1} and p.tiers[1].contains(lost)
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


