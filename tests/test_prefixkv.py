"""PrefixKV: blocks moved between the block format and a prefix's tensors, exactly, fast where the
memory layout allows and by the general decoder where it does not."""

import ctypes

import numpy as np
import pytest
import torch

import kvtier.prefixkv as prefixkv_mod
from kvtier.block import decode_block_into, encode_block, parse_header, prepare_block
from kvtier.codecs import get_codec
from kvtier.errors import CorruptBlock
from kvtier.layout import KVLayout
from kvtier.prefixkv import PrefixKV

BT = 16
GQA = KVLayout(4, ((8, 64), (8, 64)), "bfloat16")  # 16 KiB per tensor per block: an aligned block
ODD = KVLayout(3, ((3, 5), (2, 7)), "float16")  # K and V of different sizes, nothing page-sized
MLA = KVLayout(3, ((40,),), "float32")


def filled(layout, blocks, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(blocks * BT, *s, generator=g).to(layout.torch_dtype) for s in layout.tensor_shapes)
            for _ in range(layout.num_layers)]


def blocks_of(kv, n, spec="none"):
    src = PrefixKV(kv, BT)
    return [torch.frombuffer(bytearray(encode_block(get_codec(spec), src.views(i))), dtype=torch.uint8)
            for i in range(n)]


def same(a, b):
    return all(torch.equal(x, y) for la, lb in zip(a, b, strict=True) for x, y in zip(la, lb, strict=True))


def dirty(kv):
    """``kv`` with every byte 0x77: what a copy did not write stays so."""
    for layer in kv:
        for t in layer:
            t.view(torch.uint8).fill_(0x77)
    return kv


def dirty_dest(kind: str, src, tokens: int):
    """Destination KV, dirty: ``KVLayout.empty``'s (strided) or a tensor per layer and K/V."""
    return dirty(GQA.empty(tokens) if kind == "layout_empty" else [tuple(torch.empty_like(t) for t in layer) for layer in src])


@pytest.fixture
def copies(monkeypatch):
    """Counts numpy copies, memmoves, torch copy_ calls and ``copy_runs`` calls (kvtier._fastcopy)."""
    calls = {"numpy": 0, "memmove": 0, "torch": 0, "runs": 0}
    copyto, copy_, memmove, copy_runs = np.copyto, torch.Tensor.copy_, ctypes.memmove, prefixkv_mod.copy_runs

    def runs(*a):
        calls["runs"] += 1
        return copy_runs(*a)

    def np_copy(dst, src, **k):
        calls["numpy"] += 1
        return copyto(dst, src, **k)

    def torch_copy(self, *a, **k):
        calls["torch"] += 1
        return copy_(self, *a, **k)

    def move(*a):
        calls["memmove"] += 1
        return memmove(*a)

    monkeypatch.setattr(np, "copyto", np_copy)
    monkeypatch.setattr(torch.Tensor, "copy_", torch_copy)
    monkeypatch.setattr(ctypes, "memmove", move)
    if copy_runs is not None:
        monkeypatch.setattr(prefixkv_mod, "copy_runs", runs)
    return calls


def copy_blocks_calls(monkeypatch, one_pass: bool) -> list:
    """``kvtier.block.ONE_PASS_COPY`` set to ``one_pass`` (skipped where the C module cannot do
    it); the rows of each ``copy_blocks`` call made from then on."""
    import kvtier.block as block_mod

    if one_pass and not block_mod.ONE_PASS_COPY:
        pytest.skip("kvtier._fastcopy is not built here, or this CPU lacks AVX2 + VPCLMULQDQ")
    monkeypatch.setattr(block_mod, "ONE_PASS_COPY", one_pass)
    calls: list = []
    if one_pass:
        copy_blocks = block_mod.copy_blocks
        monkeypatch.setattr(block_mod, "copy_blocks", lambda *a: calls.append(a[3]) or copy_blocks(*a))
    return calls


@pytest.fixture(params=["copy_runs", "numpy"])
def strided_copy(request, monkeypatch):
    """Both ways of the strided copy: ``copy_runs`` (kvtier._fastcopy) where built, numpy else."""
    if request.param == "copy_runs" and prefixkv_mod.copy_runs is None:
        pytest.skip("kvtier._fastcopy is not built here")
    if request.param == "numpy":
        monkeypatch.setattr(prefixkv_mod, "copy_runs", None)
    return request.param


def test_layout_empty_is_one_aligned_allocation_of_contiguous_tensors():
    kv = GQA.empty(3 * BT)
    flat = [t for layer in kv for t in layer]
    assert all(t.is_contiguous() and t.shape == (3 * BT, 8, 64) and t.dtype == torch.bfloat16 for t in flat)
    assert len({t.untyped_storage().data_ptr() for t in flat}) == 1
    assert flat[0].data_ptr() % 4096 == 0
    ptrs = [t.data_ptr() for t in flat]
    assert ptrs == sorted(ptrs) and len(set(ptrs)) == len(ptrs)


@pytest.mark.parametrize("layout", [GQA, ODD, MLA], ids=["gqa", "odd", "mla"])
def test_decode_into_a_layout_empty_prefix_is_one_copy_per_tensor_of_a_layer(layout, strided_copy, copies):
    src = filled(layout, 3)
    blocks = blocks_of(src, 3)
    kv = dirty(layout.empty(3 * BT))
    dest = PrefixKV(kv, BT)
    copies.update(numpy=0, memmove=0, torch=0, runs=0)
    for i in (2, 0, 1):
        dest.decode(i, blocks[i])
        if i == 2:  # blocks 0 and 1 not yet written: each block's runs land in that block only
            assert all(bool((t[:2 * BT].view(torch.uint8) == 0x77).all()) for layer in kv for t in layer)
    assert same(src, dest.kv)
    if strided_copy == "copy_runs":
        assert copies == {"numpy": 0, "memmove": 0, "torch": 0, "runs": 3}  # one call per block
    else:
        assert copies == {"numpy": 3 * len(layout.tensor_shapes), "memmove": 0, "torch": 0, "runs": 0}


def test_a_layer_group_lands_those_layers_only(strided_copy):
    """The loader lands a block's layers in groups: each group's copy writes its layers' rows of
    block i, nothing of other layers or blocks."""
    src = filled(GQA, 3)
    block = blocks_of(src, 3)[1]
    kv = dirty(GQA.empty(3 * BT))
    dest = PrefixKV(kv, BT)
    h = parse_header(block)
    dest.decode_layers(1, block.numpy(), h.layers[0].offset, dest.strided_step(h.codec, h.layers), range(1, 3))
    for n, (got, want) in enumerate(zip(kv, src, strict=True)):
        for t, w in zip(got, want, strict=True):
            rows = t.view(torch.uint8).view(3 * BT, -1)
            assert bool((rows[:BT] == 0x77).all()) and bool((rows[2 * BT:] == 0x77).all())
            if n in (1, 2):
                assert torch.equal(t[BT:2 * BT], w[BT:2 * BT])
            else:
                assert bool((rows[BT:2 * BT] == 0x77).all())


def test_fast_and_general_decodes_agree_on_aligned_and_compact_blocks(strided_copy):
    src = filled(GQA, 2)
    blocks = blocks_of(src, 2)
    assert parse_header(blocks[0]).aligned
    fast, general = PrefixKV(GQA.empty(2 * BT), BT), PrefixKV(GQA.empty(2 * BT), BT)
    for i in range(2):
        fast.decode(i, blocks[i])
        decode_block_into(blocks[i], general.views(i))
    assert same(fast.kv, general.kv) and same(fast.kv, src)
    small = filled(ODD, 2)
    compact = blocks_of(small, 2)
    assert not parse_header(compact[0]).aligned
    dest = PrefixKV(ODD.empty(2 * BT), BT)
    for i in range(2):
        dest.decode(i, compact[i])
    assert same(dest.kv, small)


def test_scattered_destinations_take_the_fast_copy_and_other_codecs_the_general_decoder(strided_copy, copies):
    """A tensor per layer and K/V (a model's own cache, one allocation each): one ``copy_runs``
    call per block (numpy: a copy per tensor), exact; int8 blocks decode as ``decode_block_into``."""
    src = filled(GQA, 2)
    scattered = [tuple(torch.full_like(t, 3.0) for t in layer) for layer in src]  # one allocation each
    dest = PrefixKV(scattered, BT)
    copies.update(numpy=0, memmove=0, torch=0, runs=0)
    dest.decode(1, blocks_of(src, 2)[1])
    if strided_copy == "copy_runs":
        assert copies == {"numpy": 0, "memmove": 0, "torch": 0, "runs": 1}
    else:
        assert copies == {"numpy": 2 * GQA.num_layers, "memmove": 0, "torch": 0, "runs": 0}
    assert all(torch.equal(a[BT:], b[BT:]) and bool((b[:BT] == 3.0).all())
               for la, lb in zip(src, scattered, strict=True) for a, b in zip(la, lb, strict=True))
    quantized = blocks_of(src, 2, "int8")
    target = PrefixKV(GQA.empty(2 * BT), BT)
    target.decode(0, quantized[0])
    ref = [[torch.empty(BT, 8, 64, dtype=torch.bfloat16) for _ in range(2)] for _ in range(4)]
    decode_block_into(quantized[0], ref)
    assert same([[t[:BT] for t in layer] for layer in target.kv], ref)


def test_tensors_of_another_size_take_the_general_decoder_which_refuses_them(copies):
    """A destination whose later layers are shorter, or of another row size, than layer 0 is not
    copied into blindly: the general decoder says what does not fit."""
    src = filled(GQA, 2)
    block = blocks_of(src, 2)[1]
    h = parse_header(block)
    short = [tuple(torch.empty_like(t) for t in layer) for layer in src]
    short[2] = (short[2][0][:BT], short[2][1])  # layer 2's K covers one block of two
    wide = [tuple(torch.empty_like(t) for t in layer) for layer in src]
    wide[3] = (torch.empty(2 * BT, 8, 32, dtype=torch.bfloat16), wide[3][1])
    for kv in (short, wide):
        dest = PrefixKV(kv, BT)
        assert dest.strided_step(h.codec, h.layers) == 0
        with pytest.raises((CorruptBlock, ValueError, RuntimeError)):
            dest.decode(1, block)


@pytest.mark.parametrize("dest_kind", ["layout_empty", "a_tensor_each"])
def test_many_blocks_of_one_arena_land_in_one_call_each_in_its_place(strided_copy, copies, dest_kind):
    """``decode_many``: blocks lying anywhere in one array (a host tier's memory), in any order,
    land each in its own block of the destination, for the layers asked, in one ``copy_runs``
    call; one out of the array refuses the call before a byte lands."""
    src = filled(GQA, 4)
    blocks = blocks_of(src, 4)
    h = parse_header(blocks[0])
    size = blocks[0].numel()
    arena = np.zeros(8 * size + 4096, np.uint8)
    at = {0: 5 * size, 1: 4096, 2: 2 * size + 4096, 3: 7 * size}  # scattered, not in block order
    for i, o in at.items():
        arena[o: o + size] = blocks[i].numpy()
    kv = dirty_dest(dest_kind, src, 4 * BT)
    dest = PrefixKV(kv, BT)
    step = dest.strided_step(h.codec, h.layers)
    assert step
    first = h.layers[0].offset
    copies.update(numpy=0, memmove=0, torch=0, runs=0)
    dest.decode_many(arena, [(3, at[3] + first), (0, at[0] + first), (2, at[2] + first)], step, range(1, 4))
    assert copies["runs"] == (1 if strided_copy == "copy_runs" else 0) and copies["torch"] == 0
    for n, (got, want) in enumerate(zip(kv, src, strict=True)):
        for t, w in zip(got, want, strict=True):
            for i in range(4):
                rows = t[i * BT:(i + 1) * BT]
                if n >= 1 and i != 1:
                    assert torch.equal(rows, w[i * BT:(i + 1) * BT])
                else:
                    assert bool((rows.view(torch.uint8) == 0x77).all())
    before = [t.clone() for layer in kv for t in layer]
    with pytest.raises(CorruptBlock, match="out of"):
        dest.decode_many(arena, [(1, at[1] + first), (0, arena.size - 100)], step, range(4))
    assert all(torch.equal(a, b) for a, b in zip(before, [t for layer in kv for t in layer], strict=True))
    with pytest.raises(IndexError):
        dest.decode_many(arena, [(4, at[1] + first)], step, range(4))


def test_a_corrupt_block_is_refused_before_any_byte_lands(strided_copy):
    src = filled(GQA, 1)
    block = blocks_of(src, 1)[0]
    h = parse_header(block)
    block[h.layers[3].offset + 100] ^= 1  # the last layer: a decoder copying first would have landed 3
    dest = PrefixKV(dirty(GQA.empty(BT)), BT)
    with pytest.raises(CorruptBlock, match="layer 3"):
        dest.decode(0, block)
    assert all(bool((t.view(torch.uint8) == 0x77).all()) for layer in dest.kv for t in layer)
    with pytest.raises(CorruptBlock):
        dest.decode(0, blocks_of(src, 1)[0][:-4096])  # truncated


def test_a_block_of_another_shape_is_not_copied_blindly():
    other = KVLayout(4, ((8, 32), (8, 32)), "bfloat16")  # same layer count, half the bytes
    block = blocks_of(filled(other, 1), 1)[0]
    with pytest.raises(CorruptBlock, match="payload of"):
        PrefixKV(GQA.empty(BT), BT).decode(0, block)


@pytest.mark.parametrize("layout", [GQA, ODD, MLA], ids=["gqa", "odd", "mla"])
@pytest.mark.parametrize("spec", ["none", "fp8", "int8+zstd"])
def test_prepare_writes_the_same_block_as_prepare_block(layout, spec):
    src = filled(layout, 3)
    prefix = PrefixKV(src, BT)
    codec = get_codec(spec)
    for i in range(3):
        ours, ref = prefix.prepare(i, codec), prepare_block(codec, prefix.views(i))
        a, b = torch.empty(ours.nbytes, dtype=torch.uint8), torch.empty(ref.nbytes, dtype=torch.uint8)
        ours.write_into(a)
        ref.write_into(b)
        assert torch.equal(a, b)


@pytest.mark.parametrize("one_pass", [True, False])
def test_a_prepared_block_is_its_rows_in_every_form(monkeypatch, one_pass):
    """``prepare`` hands over row ``i`` of per-tensor ``[blocks, bytes]`` views: written in one
    pass (C), in numpy's two passes, or as pieces for the SSD tier, it is block i's bytes."""
    import kvtier.block as block_mod

    if one_pass and not block_mod.ONE_PASS_COPY:
        pytest.skip("kvtier._fastcopy is not built here, or this CPU lacks AVX2 + VPCLMULQDQ")
    monkeypatch.setattr(block_mod, "ONE_PASS_COPY", one_pass)
    paged = KVLayout(3, ((1024,),), "float32")  # a layer of a block is 64 KiB: SSD-ready pieces
    src = paged.empty(3 * BT)  # 4 KiB-aligned, so each layer of a block is a piece as it lies
    for layer in src:
        layer[0].copy_(torch.randn(3 * BT, 1024))
    for kv in (filled(GQA, 3), src):
        prefix = PrefixKV(kv, BT)
        codec = get_codec("none")
        for i in range(3):
            block = prefix.prepare(i, codec)
            assert block.row == i and all(p.ndim == 2 for parts in block.payloads for p in parts)
            out = torch.empty(block.nbytes, dtype=torch.uint8)
            block.write_into(out)
            ref = prepare_block(codec, prefix.views(i))
            expect = torch.empty(ref.nbytes, dtype=torch.uint8)
            ref.write_into(expect)
            assert torch.equal(out, expect)
            pieces = block.as_pieces()
            assert (pieces is None) == (kv is not src)  # K and V apart: a block is no run of pieces
            assert pieces is None or torch.equal(pieces.contiguous(), expect)


@pytest.mark.parametrize("one_pass", [True, False])
@pytest.mark.parametrize("spec", ["none", "fp8"])
def test_blocks_written_together_are_each_block_written_alone(monkeypatch, one_pass, spec):
    """``write_blocks`` (a put's window: one copy call for a prefix's blocks, each tensor's
    rows read as one stream) writes exactly what ``write_into`` writes for each block, into
    recycled (dirty) destinations, in any order of blocks; blocks it cannot copy together
    (another codec, mixed prefixes) are written one by one, the same bytes."""
    import kvtier.block as block_mod

    calls = copy_blocks_calls(monkeypatch, one_pass)
    codec = get_codec(spec)
    a, b = PrefixKV(filled(GQA, 4), BT), PrefixKV(filled(ODD, 2), BT)
    for blocks in ([a.prepare(i, codec) for i in (2, 0, 3)],
                   [a.prepare(1, codec), b.prepare(1, codec), a.prepare(3, codec)]):
        outs = [torch.full((blk.nbytes,), 0xAB, dtype=torch.uint8) for blk in blocks]
        block_mod.write_blocks(blocks, outs)
        assert calls == ([[2, 0, 3]] if one_pass and spec == "none" else [])  # the first set, together
        for blk, out in zip(blocks, outs, strict=True):
            expect = torch.empty(blk.nbytes, dtype=torch.uint8)
            blk.write_into(expect)
            assert torch.equal(out, expect)
    with pytest.raises(ValueError, match="2 blocks for 1 destinations"):
        block_mod.write_blocks([a.prepare(0, codec)] * 2, [torch.empty(0, dtype=torch.uint8)])
    first = a.prepare(0, codec)
    with pytest.raises(ValueError, match=f"a block of {first.nbytes} bytes"):
        block_mod.write_blocks([first, a.prepare(1, codec)],
                               [torch.empty(first.nbytes, dtype=torch.uint8), torch.empty(8, dtype=torch.uint8)])


def test_block_indices_are_bounded():
    prefix = PrefixKV(GQA.empty(2 * BT + 3), BT)  # a partial third block is not a block
    assert prefix.blocks == 2
    for bad in (-1, 2):
        with pytest.raises(IndexError):
            prefix.views(bad)
        with pytest.raises(IndexError):
            prefix.prepare(bad, get_codec("none"))


@pytest.mark.parametrize("one_pass", [True, False])
def test_non_contiguous_host_kv_is_gathered_a_chunk_at_a_time_into_the_same_blocks(monkeypatch, one_pass):
    """KV seen token-first through transposed views (a transformers DynamicCache's
    ``[1, heads, tokens, dim]``): ``prepare`` copies a chunk of blocks at a time into one pooled
    buffer and hands out rows of it, in any order of blocks, each block exactly what
    ``prepare_block`` makes of its views; a window spanning two chunks is written as two runs;
    at most two chunks are held."""
    import kvtier.block as block_mod

    calls = copy_blocks_calls(monkeypatch, one_pass)
    g = torch.Generator().manual_seed(3)
    heads_first = [tuple(torch.randn(8, 5 * BT, 64, generator=g).to(torch.bfloat16) for _ in range(2)) for _ in range(4)]
    kv = [tuple(t.transpose(0, 1) for t in layer) for layer in heads_first]  # [tokens, heads, dim] views
    assert not kv[0][0].is_contiguous()
    block_kv = 4 * 2 * BT * 8 * 64 * 2
    monkeypatch.setattr(prefixkv_mod, "GATHER_BYTES", 2 * block_kv)  # chunks of two blocks
    prefix = PrefixKV(kv, BT)
    codec = get_codec("none")
    for i in (3, 0, 4, 1, 2):
        ours, ref = prefix.prepare(i, codec), prepare_block(codec, prefix.views(i))
        assert ours.row == i % 2 and len(prefix._chunks) <= 2
        a, b = torch.empty(ours.nbytes, dtype=torch.uint8), torch.empty(ref.nbytes, dtype=torch.uint8)
        ours.write_into(a)
        ref.write_into(b)
        assert torch.equal(a, b), i
    blocks = [prefix.prepare(i, codec) for i in (1, 2, 3)]  # chunk 0's last, chunk 1 whole
    outs = [torch.full((blk.nbytes,), 0xAB, dtype=torch.uint8) for blk in blocks]
    calls.clear()
    block_mod.write_blocks(blocks, outs)
    assert calls == ([[0, 1]] if one_pass else [])  # block 1 alone, blocks 2 and 3 together
    for i, out in zip((1, 2, 3), outs, strict=True):
        expect = torch.empty(out.numel(), dtype=torch.uint8)
        prepare_block(codec, prefix.views(i)).write_into(expect)
        assert torch.equal(out, expect)
    # other codecs take the general encoder, the same as before
    fp8 = prefix.prepare(2, get_codec("fp8"))
    assert fp8.row < 0


@pytest.mark.parametrize("dest_kind", ["layout_empty", "a_tensor_each"])
def test_a_range_holding_some_layers_lands_them_from_a_negative_first(strided_copy, dest_kind):
    """What the loader's staged SSD reads hand over: bytes ``lo..hi`` of a block holding layers
    1 and 2 only, so layer 0 lies before the array (``first`` negative). Those layers land
    exactly; a range too short for them, or layers past the prefix's, is refused unwritten."""
    src = filled(GQA, 2)
    block = blocks_of(src, 2)[1]
    h = parse_header(block)
    kv = dirty_dest(dest_kind, src, 2 * BT)
    dest = PrefixKV(kv, BT)
    step = dest.strided_step(h.codec, h.layers)
    lo, hi = h.layers[1].offset, h.layers[2].offset + h.layers[2].length
    part = block.numpy()[lo:hi].copy()
    first = h.layers[0].offset - lo
    assert first < 0
    dest.decode_layers(1, part, first, step, range(1, 3))
    for n, (got, want) in enumerate(zip(kv, src, strict=True)):
        for t, w in zip(got, want, strict=True):
            if n in (1, 2):
                assert torch.equal(t[BT:], w[BT:])
            else:
                assert bool((t.view(torch.uint8) == 0x77).all())
            assert bool((t[:BT].view(torch.uint8) == 0x77).all())
    before = [t.clone() for layer in kv for t in layer]
    with pytest.raises(CorruptBlock, match="truncated"):
        dest.decode_layers(1, part[:-1], first, step, range(1, 3))
    with pytest.raises(CorruptBlock, match="truncated"):
        dest.decode_layers(1, part, first, step, range(0, 3))  # layer 0 is not in the range
    with pytest.raises(IndexError):
        dest.decode_layers(1, part, first, step, range(3, 5))
    assert all(torch.equal(a, b) for a, b in zip(before, [t for layer in kv for t in layer], strict=True))


def test_a_gathered_block_outlives_its_chunk_and_the_pools_reuse_of_memory(monkeypatch):
    """A prepared block keeps its chunk's pooled buffer: after the chunk left the cache of two and
    the pool handed buffers of that size out again (filled with garbage), it still writes the
    block's bytes."""
    import gc

    from kvtier.bufpool import block_buffers

    g = torch.Generator().manual_seed(5)
    heads_first = [tuple(torch.randn(8, 5 * BT, 64, generator=g).to(torch.bfloat16) for _ in range(2)) for _ in range(4)]
    kv = [tuple(t.transpose(0, 1) for t in layer) for layer in heads_first]
    block_kv = 4 * 2 * BT * 8 * 64 * 2
    monkeypatch.setattr(prefixkv_mod, "GATHER_BYTES", block_kv)  # a chunk per block
    prefix = PrefixKV(kv, BT)
    codec = get_codec("none")
    kept = prefix.prepare(0, codec)
    for i in (1, 2, 3, 4):
        prefix.prepare(i, codec)
    assert 0 not in prefix._chunks
    gc.collect()
    others = [block_buffers.take(block_kv) for _ in range(4)]
    for o in others:
        o.fill_(0xEE)
    out = torch.empty(kept.nbytes, dtype=torch.uint8)
    kept.write_into(out)
    expect = torch.empty(kept.nbytes, dtype=torch.uint8)
    prepare_block(codec, prefix.views(0)).write_into(expect)
    assert torch.equal(out, expect)
