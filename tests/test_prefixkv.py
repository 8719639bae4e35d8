"""PrefixKV: blocks moved between the block format and a prefix's tensors, exactly, fast where the
memory layout allows and by the general decoder where it does not."""

import ctypes

import numpy as np
import pytest
import torch

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


@pytest.fixture
def copies(monkeypatch):
    """Counts numpy copies, memmoves and torch copy_ calls."""
    calls = {"numpy": 0, "memmove": 0, "torch": 0}
    copyto, copy_, memmove = np.copyto, torch.Tensor.copy_, ctypes.memmove

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
    return calls


def test_layout_empty_is_one_aligned_allocation_of_contiguous_tensors():
    kv = GQA.empty(3 * BT)
    flat = [t for layer in kv for t in layer]
    assert all(t.is_contiguous() and t.shape == (3 * BT, 8, 64) and t.dtype == torch.bfloat16 for t in flat)
    assert len({t.untyped_storage().data_ptr() for t in flat}) == 1
    assert flat[0].data_ptr() % 4096 == 0
    ptrs = [t.data_ptr() for t in flat]
    assert ptrs == sorted(ptrs) and len(set(ptrs)) == len(ptrs)


@pytest.mark.parametrize("layout", [GQA, ODD, MLA], ids=["gqa", "odd", "mla"])
def test_decode_into_a_layout_empty_prefix_is_one_copy_per_tensor_of_a_layer(layout, copies):
    src = filled(layout, 3)
    blocks = blocks_of(src, 3)
    dest = PrefixKV(layout.empty(3 * BT), BT)
    copies.update(numpy=0, memmove=0, torch=0)
    for i in (2, 0, 1):
        dest.decode(i, blocks[i])
    assert same(src, dest.kv)
    assert copies == {"numpy": 3 * len(layout.tensor_shapes), "memmove": 0, "torch": 0}  # not per tensor


def test_fast_and_general_decodes_agree_on_aligned_and_compact_blocks():
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


def test_scattered_destinations_and_other_codecs_take_the_general_decoder(copies):
    src = filled(GQA, 2)
    scattered = [tuple(torch.empty_like(t) for t in layer) for layer in src]  # one allocation each
    dest = PrefixKV(scattered, BT)
    copies.update(numpy=0, memmove=0, torch=0)
    dest.decode(1, blocks_of(src, 2)[1])
    assert copies == {"numpy": 0, "memmove": 2 * GQA.num_layers, "torch": 0}  # one per tensor
    assert all(torch.equal(a[BT:], b[BT:]) for la, lb in zip(src, scattered, strict=True)
               for a, b in zip(la, lb, strict=True))
    quantized = blocks_of(src, 2, "int8")
    target = PrefixKV(GQA.empty(2 * BT), BT)
    target.decode(0, quantized[0])
    ref = [[torch.empty(BT, 8, 64, dtype=torch.bfloat16) for _ in range(2)] for _ in range(4)]
    decode_block_into(quantized[0], ref)
    assert same([[t[:BT] for t in layer] for layer in target.kv], ref)


def test_a_corrupt_block_is_refused_before_any_byte_lands():
    src = filled(GQA, 1)
    block = blocks_of(src, 1)[0]
    h = parse_header(block)
    block[h.layers[3].offset + 100] ^= 1  # the last layer: a decoder copying first would have landed 3
    dest = PrefixKV(GQA.empty(BT), BT)
    for layer in dest.kv:
        for t in layer:
            t.view(torch.uint8).fill_(0x77)
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


def test_block_indices_are_bounded():
    prefix = PrefixKV(GQA.empty(2 * BT + 3), BT)  # a partial third block is not a block
    assert prefix.blocks == 2
    for bad in (-1, 2):
        with pytest.raises(IndexError):
            prefix.views(bad)
        with pytest.raises(IndexError):
            prefix.prepare(bad, get_codec("none"))
