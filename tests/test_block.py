import pytest
import torch

from kvtier.block import (
    decode_block_into,
    decode_layer_into,
    encode_block,
    encode_block_pooled,
    parse_header,
)
from kvtier.codecs import get_codec
from kvtier.errors import CorruptBlock
from tests.conftest import random_kv


def encoded(spec="none", layers=3):
    kv = random_kv(16, layers=layers)
    return kv, bytearray(encode_block(get_codec(spec), kv))


def as_tensor(b):
    return torch.frombuffer(b, dtype=torch.uint8)


def empty_like(kv):
    return [[torch.empty_like(t) for t in layer] for layer in kv]


@pytest.mark.parametrize("spec", ["none", "fp8+zstd"])
def test_roundtrip_and_header(spec):
    kv, b = encoded(spec)
    out = empty_like(kv)
    h = decode_block_into(as_tensor(b), out)
    assert h.codec == spec and h.tokens == 16 and len(h.layers) == 3 and h.total_bytes == len(b)
    if spec == "none":
        assert all(torch.equal(a, c) for la, lc in zip(kv, out, strict=True) for a, c in zip(la, lc, strict=True))


def test_one_layer_reads_alone_from_its_byte_range():
    kv, b = encoded()
    h = parse_header(bytes(b[:h_size(b)]))
    e = h.layers[1]
    part = as_tensor(bytearray(b[e.offset:e.offset + e.length]))  # only layer 1's bytes
    out = [torch.empty_like(t) for t in kv[1]]
    decode_layer_into(h, 1, part, out, base=e.offset)
    assert all(torch.equal(a, c) for a, c in zip(kv[1], out, strict=True))


def h_size(b):
    return parse_header(bytes(b)).header_bytes


@pytest.mark.parametrize("where", ["header", "payload", "table"])
def test_every_byte_is_covered_by_a_checksum(where):
    kv, b = encoded()
    pos = {"header": 9, "table": 40, "payload": len(b) - 5}[where]
    b[pos] ^= 0x40
    with pytest.raises(CorruptBlock):
        decode_block_into(as_tensor(b), empty_like(kv))


def test_truncated_block_is_corrupt():
    kv, b = encoded()
    with pytest.raises(CorruptBlock):
        decode_block_into(as_tensor(b[:-10]), empty_like(kv))
    with pytest.raises(CorruptBlock):
        parse_header(b"KVTB")


@pytest.mark.parametrize("spec", ["none", "none+zstd", "int8", "fp8"])
def test_pooled_encoding_is_the_same_block(spec):
    kv = random_kv(16, layers=3)
    kv[1] = (kv[1][0], kv[1][1][:, :0].reshape(16, 0, 8))  # an empty tensor in a layer
    codec = get_codec(spec)
    pooled = encode_block_pooled(codec, kv)
    assert pooled.numpy().tobytes() == encode_block(codec, kv)
    if spec == "none":
        out = empty_like(kv)
        decode_block_into(pooled, out)
        assert all(torch.equal(a, c) for la, lc in zip(kv, out, strict=True) for a, c in zip(la, lc, strict=True))
