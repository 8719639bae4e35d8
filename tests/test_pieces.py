"""Blocks in pieces (``kvtier.pieces``): an engine page is written behind its header page
straight from the engine's memory, in the same format as a copied block, and every consumer
that needs one buffer gets an exact copy."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from kvtier import CacheConfig, HostTierConfig, SSDTierConfig, TieredCache
from kvtier.block import decode_block_into, encode_block, encode_block_for_put, prepare_block
from kvtier.bufpool import aligned_empty
from kvtier.codecs import get_codec
from kvtier.pieces import BlockPieces, contiguous
from kvtier.tiers.ssd import segments

PAGE = 256 * 1024  # the header page is at most 1/32 of it: a block laid out for direct I/O
FP = {"model": "tiny", "kv_dtype": "bfloat16", "block_tokens": 16}


def engine_rows(n: int, page: int = PAGE) -> torch.Tensor:
    """``n`` page-aligned rows of random bytes, as vLLM's CPU tier lays them out."""
    rows = aligned_empty(n * page).view(n, page)
    rows.copy_(torch.randint(0, 256, (n, page), dtype=torch.uint8))
    return rows


def test_pieces_are_the_block_a_copy_would_make():
    row = engine_rows(1)[0]
    layers = [[row.view(1, -1)]]
    block = encode_block_for_put(get_codec("none"), layers, pieces=True)
    assert isinstance(block, BlockPieces)
    assert block.pieces[1].ctypes.data == row.data_ptr()  # the payload is the row itself
    assert block.tobytes() == encode_block(get_codec("none"), layers)
    assert contiguous(block).numpy().tobytes() == block.tobytes()
    out = torch.empty(1, PAGE, dtype=torch.uint8)
    decode_block_into(contiguous(block), [[out]])
    assert torch.equal(out[0], row)


@pytest.mark.parametrize("case", ["unaligned memory", "partial page", "quantized", "not asked"])
def test_no_pieces_where_the_memory_is_not_the_layout(case):
    codec, pieces = get_codec("none"), True
    if case == "unaligned memory":
        t = engine_rows(1, PAGE + 4096)[0][64:64 + PAGE]
    elif case == "partial page":
        t = engine_rows(1)[0][:PAGE - 100]
    elif case == "quantized":
        t, codec = torch.randn(16, 512, dtype=torch.bfloat16), get_codec("int8")
    else:
        t, pieces = engine_rows(1)[0], False
    layers = [[t.reshape(1, -1) if t.dtype == torch.uint8 else t]]
    block = encode_block_for_put(codec, layers, pieces=pieces)
    assert isinstance(block, torch.Tensor)  # one buffer, copied
    assert block.numpy().tobytes() == encode_block(codec, layers)
    assert prepare_block(codec, layers).as_pieces() is None or case == "not asked"


def test_pieces_refuse_a_layout_that_cannot_be_written_gathered():
    page = engine_rows(1)[0].numpy()
    with pytest.raises(ValueError, match="aligned 4 KiB pages"):
        BlockPieces((page[:100], page), 100 + PAGE)
    with pytest.raises(ValueError, match="bytes for a"):
        BlockPieces((page,), PAGE + 1)


def writes_from(monkeypatch) -> list[int]:
    """Addresses of every buffer the SSD tier hands to a gathered write."""
    seen: list[int] = []
    real = segments._pwritev

    def pwritev(fd, buffers, offset):
        seen.extend(np.asarray(b).ctypes.data for b in buffers)
        return real(fd, buffers, offset)

    monkeypatch.setattr(segments, "_pwritev", pwritev)
    return seen


def ssd_cache(path, host="0", direct=True) -> TieredCache:
    return TieredCache(CacheConfig(
        host=HostTierConfig(capacity_bytes=host, page_bytes="512KiB"),
        ssd=SSDTierConfig(path=str(path), capacity_bytes="64MiB", min_free_bytes=0, durability="sync",
                          segment_bytes="8MiB", direct_io=direct, inline_threshold=0)))


def test_engine_pages_go_to_disk_from_the_engines_memory_and_come_back_exact(tmp_path, monkeypatch):
    rows = engine_rows(8)
    keys = [os.urandom(32) for _ in range(8)]
    seen = writes_from(monkeypatch)
    with ssd_cache(tmp_path) as cache:
        if not cache.tiers[-1]._segments.direct:
            pytest.skip("no O_DIRECT on this file system: writes are buffered, copies regardless")
        cache.register_block_namespace("ns", page_bytes=PAGE, fingerprint=FP)
        assert cache.put_blocks("ns", keys, rows) == 8
        assert {r.data_ptr() for r in rows} <= set(seen)  # no copy of any page
        snapshot = rows.clone()
        rows.zero_()  # the engine reuses its rows once the store is done
        out = torch.zeros_like(rows)
        assert cache.get_blocks_into("ns", keys, out) == 8
        assert torch.equal(out, snapshot)
    import kvtier.reload as reload

    decodes = []
    real_decode = reload.decode_block_into
    monkeypatch.setattr(reload, "decode_block_into", lambda *a, **k: (decodes.append(1), real_decode(*a, **k)))
    with ssd_cache(tmp_path) as cache:  # a restart reads the same bytes, verified
        cache.register_block_namespace("ns", page_bytes=PAGE, fingerprint=FP)
        out = torch.zeros_like(rows)
        assert cache.get_blocks_into("ns", keys, out) == 8
        assert torch.equal(out, snapshot)
        assert decodes == []  # each page was read straight into its row: no staging, no copy


def test_a_host_tier_on_top_gets_its_own_copy(tmp_path):
    rows = engine_rows(4)
    keys = [os.urandom(32) for _ in range(4)]
    with ssd_cache(tmp_path, host="4MiB") as cache:
        cache.register_block_namespace("ns", page_bytes=PAGE, fingerprint=FP)
        assert cache.put_blocks("ns", keys, rows) == 4
        assert cache.stats().tiers["host"].blocks == 4
        snapshot = rows.clone()
        rows.zero_()  # nothing the cache holds may still point at the engine's rows
        cache.flush()
        out = torch.zeros_like(rows)
        assert cache.get_blocks_into("ns", keys, out) == 4
        assert torch.equal(out, snapshot)


@pytest.mark.parametrize("when", ["after encoding", "as the write starts"])
def test_a_page_changed_during_its_put_is_never_served(tmp_path, monkeypatch, when):
    """The engine must not change a page during its store. If it does, the block is dropped on
    read (its record's checksum comes from the encoding pass), never served changed."""
    import kvtier.engine_blocks as engine_blocks

    rows = engine_rows(2)
    keys = [os.urandom(32) for _ in range(2)]
    before = rows.clone()
    row0 = rows[0].data_ptr()

    def scribble() -> None:
        rows[0][:4096] = 7

    if when == "after encoding":
        real_encode = engine_blocks.encode_block_for_put

        def encode(codec, layers, *, pieces):
            block = real_encode(codec, layers, pieces=pieces)
            if layers[0][0].data_ptr() == row0:
                scribble()
            return block

        monkeypatch.setattr(engine_blocks, "encode_block_for_put", encode)
    else:
        real_pwritev = segments._pwritev

        def pwritev(fd, buffers, offset):
            if any(np.asarray(b).ctypes.data == row0 for b in buffers):
                scribble()
            return real_pwritev(fd, buffers, offset)

        monkeypatch.setattr(segments, "_pwritev", pwritev)
    with ssd_cache(tmp_path) as cache:
        if not cache.tiers[-1]._segments.direct:
            pytest.skip("no O_DIRECT on this file system")
        cache.register_block_namespace("ns", page_bytes=PAGE, fingerprint=FP)
        assert cache.put_blocks("ns", keys, rows) == 2
        out = torch.zeros_like(rows)
        assert cache.get_blocks_into("ns", keys, out) == 0  # block 0: dropped, not served
        assert cache.block_exists("ns", keys).present == [False, True]
        assert cache.get_blocks_into("ns", keys[1:], out[1:]) == 1
        assert torch.equal(out[1], before[1])  # its neighbour is untouched


@pytest.mark.parametrize("sizes", [(10,), (31,), (4096, 20), (4096, 8192, 4096)])
def test_a_record_sealed_from_pieces_is_sealed_as_its_bytes(sizes):
    """``seal`` of a block in pieces (checksums known or not, a head shorter than the head check
    or spanning pieces) gives exactly the (crc, head) of the same bytes laid end to end."""
    from kvtier.block import checksum
    from kvtier.bufpool import aligned_array
    from kvtier.tiers.ssd.index import seal

    rng = np.random.default_rng(len(sizes))
    pieces = []
    for n in sizes:
        a = aligned_array(n)
        a[:] = np.frombuffer(rng.bytes(n), dtype=np.uint8)
        pieces.append(a)
    whole = np.concatenate(pieces)
    key = b"k" * 16
    want = seal(key, whole)
    assert seal(key, BlockPieces(tuple(pieces), len(whole))) == want
    known = tuple(None if i == 0 else checksum(p) for i, p in enumerate(pieces))
    assert seal(key, BlockPieces(tuple(pieces), len(whole), known)) == want
