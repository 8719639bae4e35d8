import gc
import hashlib
import struct

import crc32c
import numpy as np
import pytest
import torch

from kvtier.block import (
    ALIGNED,
    COMPACT,
    HeaderTemplate,
    LayerEntry,
    _header,
    decode_block_into,
    decode_layer_into,
    encode_block,
    encode_block_pooled,
    header_size,
    layout,
    parse_header,
)
from kvtier.bufpool import block_buffers
from kvtier.codecs import get_codec
from kvtier.errors import CorruptBlock
from tests.conftest import random_kv

PAGE = 4096


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


def det_kv(tokens, layers, heads, dim, dtype=torch.float32):
    """KV from arithmetic alone (no RNG), so encodings can be pinned across versions."""
    n = tokens * heads * dim
    return [tuple(((torch.arange(n, dtype=torch.float64) * (0.37 + 0.11 * la + 0.05 * j)).sin() * (1 + j))
                  .reshape(tokens, heads, dim).to(dtype) for j in range(2)) for la in range(layers)]


def big_kv():
    """A 2 MiB block: 4 layers x (K, V) of 256 KiB, like a real page (layers of whole 4 KiB pages)."""
    return det_kv(256, 4, 8, 64, torch.bfloat16)


def equal_kv(a, b):
    return all(torch.equal(x, y) for la, lb in zip(a, b, strict=True) for x, y in zip(la, lb, strict=True))


# sha256 of blocks written by the format-1 encoder (kvtier before format 2) for det_kv(16, 2, 2, 8).
FORMAT_1 = {
    "none": "d2f29d93d3ea676d0f1154dccc9eaf6b8f86921fd5aeeee0e07f74139b665671",
    "fp8": "815474401edebcb639dcb2a2c01bcc4bf4c0987f8114464253294df486fa4887",
    "int8": "a6186af469ed9af9195601d49853a9753142cc74ae9a382588b1220142160f60",
    "int8+zstd": "3b6da872e0a56b7a724927e0d83b2435814d24f2cae1c3053aa15e54b0572dbf",
    "fp8+zstd": "4325913a1a698c3f9939d68e2774cf7f7f5ffa4663be22a1966e709eaa6a2064",
    "none+zstd": "143a2297379a528e6da285202248c69f17528a97722abb0ac971aa42d06dffa4",
}
# ... and for big_kv() with codec none (a large block format 1 wrote compact).
FORMAT_1_BIG = "872db4691f034fba835d3acdbfa0ff7f98cdcb0b3c72f871ad247f60cd168921"


@pytest.mark.parametrize("spec", sorted(FORMAT_1))
def test_small_blocks_are_still_written_in_format_1_byte_for_byte(spec):
    data = encode_block(get_codec(spec), det_kv(16, 2, 2, 8))
    assert hashlib.sha256(data).hexdigest() == FORMAT_1[spec]
    assert parse_header(data).version == COMPACT


def format_1_encode(kv):
    """Format 1 as its encoder wrote it (codec none): header, then the payloads back to back."""
    payloads = [b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in layer) for layer in kv]
    at, table = header_size(len(kv), "none"), b""
    for p in payloads:
        table += struct.pack("<QII", at, len(p), crc32c.crc32c(p))
        at += len(p)
    body = b"none".ljust(8, b"\0") + table
    fixed = struct.pack("<4sBBHIII", b"KVTB", 1, 4, 0, len(kv), kv[0][0].shape[0], 0)
    crc = crc32c.crc32c(body, crc32c.crc32c(fixed))
    return struct.pack("<4sBBHIII", b"KVTB", 1, 4, 0, len(kv), kv[0][0].shape[0], crc) + body + b"".join(payloads)


def test_a_large_format_1_block_still_decodes():
    kv = big_kv()
    old = bytearray(format_1_encode(kv))
    assert hashlib.sha256(old).hexdigest() == FORMAT_1_BIG  # the writer above is format 1's
    out = empty_like(kv)
    h = decode_block_into(as_tensor(old), out)
    assert h.version == COMPACT and not h.aligned and h.total_bytes == len(old) and equal_kv(kv, out)


def test_a_large_block_is_laid_out_for_direct_io():
    kv = big_kv()
    data = encode_block_pooled(get_codec("none"), kv)
    h = parse_header(data)
    assert h.version == ALIGNED and h.aligned
    assert data.data_ptr() % PAGE == 0, "the encoded buffer itself is page-aligned in memory"
    assert h.total_bytes == data.numel() == 2 * 1024**2 + PAGE  # 2 MiB of KV + the header's page
    assert [e.offset for e in h.layers] == [PAGE + i * 512 * 1024 for i in range(4)]
    for g in (range(0, 1), range(1, 3), range(3, 4), range(0, 4)):
        lo, hi = h.span(g)
        assert lo % PAGE == 0 and hi % PAGE == 0
    out = empty_like(kv)
    decode_block_into(data, out)
    assert equal_kv(kv, out)


@pytest.mark.parametrize("spec", ["none", "fp8", "int8"])
def test_aligned_layer_ranges_read_and_verify_alone(spec):
    kv = det_kv(256, 3, 8, 64)  # fp32: fp8/int8 layers are not whole pages, so they get padding
    data = bytearray(encode_block(get_codec(spec), kv))
    h = parse_header(data)
    assert h.aligned and len(data) % PAGE == 0
    ref = empty_like(kv)
    decode_block_into(as_tensor(data), ref)
    lo, hi = h.span(range(1, 3))
    part = as_tensor(bytearray(data[lo:hi]))  # only layers 1-2, padding included: a direct read
    out = [[torch.empty_like(t) for t in layer] for layer in kv[1:3]]
    for layer in (1, 2):
        decode_layer_into(h, layer, part, out[layer - 1], base=lo)
    assert equal_kv(ref[1:3], out)
    part[h.layers[2].offset - lo + 7] ^= 1
    with pytest.raises(CorruptBlock, match="layer 2"):
        decode_layer_into(h, 2, part, out[1], base=lo)


def test_padding_is_zero_even_in_a_recycled_buffer_and_under_no_checksum():
    kv = det_kv(256, 3, 8, 64)
    codec = get_codec("fp8")
    dirty = block_buffers.take(len(encode_block(codec, kv)))
    dirty.fill_(0xFF)
    ptr = dirty.data_ptr()
    del dirty
    gc.collect()
    data = encode_block_pooled(codec, kv)
    assert data.data_ptr() == ptr  # the dirty buffer, recycled
    h = parse_header(data)
    assert h.aligned
    gaps = [(h.header_bytes, h.layers[0].offset)]
    gaps += [(a.offset + a.length, b.offset) for a, b in zip(h.layers[:-1], h.layers[1:], strict=True)]
    gaps += [(h.layers[-1].offset + h.layers[-1].length, h.total_bytes)]
    assert all(b > a for a, b in gaps[1:])  # fp8 layers are not whole pages: real gaps
    assert all(int(data[a:b].sum()) == 0 for a, b in gaps)
    ref = empty_like(kv)
    decode_block_into(data, ref)
    for a, b in gaps:  # padding carries nothing: damaging it changes no decoded byte
        data[a:b] = 0x5A
    out = empty_like(kv)
    decode_block_into(data, out)
    assert equal_kv(ref, out)


@pytest.mark.parametrize("where", ["header", "table", "first payload", "last payload"])
def test_every_byte_a_decoder_reads_is_checked_in_an_aligned_block(where):
    kv = big_kv()
    b = bytearray(encode_block(get_codec("none"), kv))
    h = parse_header(b)
    pos = {"header": 9, "table": 40, "first payload": h.layers[0].offset,
           "last payload": h.layers[-1].offset + h.layers[-1].length - 1}[where]
    b[pos] ^= 0x40
    with pytest.raises(CorruptBlock):
        decode_block_into(as_tensor(b), empty_like(kv))


def test_when_a_block_is_aligned():
    kib = 1024
    # Llama-3-8B bf16: 256-token block (32 x 1 MiB) and 16-token page (32 x 64 KiB): aligned,
    # the header's page the only padding.
    for layer in (1024 * kib, 64 * kib):
        version, offsets, total = layout("none", [layer] * 32)
        assert version == ALIGNED and total == 32 * layer + PAGE and offsets[0] == PAGE
    # fp8 of a 16-token page: every layer 2 x (32 B scales + 16 KiB) would pad by ~12%: compact.
    version, offsets, total = layout("fp8", [2 * (32 + 16 * kib)] * 32)
    assert version == COMPACT and total == header_size(32, "fp8") + 32 * 2 * (32 + 16 * kib)
    assert offsets == [header_size(32, "fp8") + i * 2 * (32 + 16 * kib) for i in range(32)]
    # fp8 of a 256-token block pads by ~0.8%: aligned.
    assert layout("fp8", [2 * (32 + 256 * kib)] * 32)[0] == ALIGNED
    # Test-sized blocks stay compact.
    assert layout("none", [2 * kib] * 3)[0] == COMPACT


def forged(version, offsets, lengths):
    entries = [LayerEntry(o, n, 0) for o, n in zip(offsets, lengths, strict=True)]
    return _header("none", version, 16, entries)


def test_a_header_that_breaks_its_layout_is_corrupt_even_with_a_valid_crc():
    h = header_size(2, "none")
    parse_header(forged(ALIGNED, [PAGE, 2 * PAGE], [PAGE, 10]))  # well formed
    with pytest.raises(CorruptBlock, match="misaligned"):
        parse_header(forged(ALIGNED, [PAGE, PAGE + 512], [512, 10]))
    with pytest.raises(CorruptBlock, match="overlaps"):
        parse_header(forged(COMPACT, [h, h + 5], [10, 10]))
    with pytest.raises(CorruptBlock, match="overlaps"):
        parse_header(forged(COMPACT, [h - 1, h + 20], [10, 10]))
    with pytest.raises(CorruptBlock, match="version 3"):
        parse_header(forged(3, [h, h + 10], [10, 10]))


@pytest.mark.parametrize("layers,tokens", [(6, 256), (3, 1024), (1, 2048)])
def test_every_layer_checksum_covers_its_own_bytes_whatever_the_copy_runs(layers, tokens):
    """Layers are copied in runs of several and checksummed per run: a layer at the edge of a run,
    a run of one layer larger than a run's size, a block of one layer all carry their own crc."""
    kv = det_kv(tokens, layers, 8, 64, torch.bfloat16)  # 256 KiB..2 MiB per K/V tensor
    data = encode_block_pooled(get_codec("none"), kv)
    h = parse_header(data)
    for e in h.layers:
        assert crc32c.crc32c(data[e.offset: e.offset + e.length].numpy().tobytes()) == e.crc
    out = empty_like(kv)
    decode_block_into(data, out, verify=True)
    assert equal_kv(kv, out)


def test_checksum_combine_is_the_checksum_of_the_concatenation():
    import random

    from kvtier.block import checksum, checksum_combine

    rng = random.Random(7)
    for _ in range(200):
        a = rng.randbytes(rng.randint(0, 3000))
        b = rng.randbytes(rng.choice([0, 1, 7, 4096, rng.randint(0, 70000)]))
        seed = rng.getrandbits(32)
        assert checksum_combine(checksum(a, seed), checksum(b), len(b)) == checksum(a + b, seed)


@pytest.mark.parametrize("nbytes", [0, 1, 32 << 10, (256 << 10) - 1, 256 << 10, (1 << 20) + 5])
def test_checksum_is_crc32c_of_the_bytes_whatever_holds_them(nbytes):
    import numpy as np

    from kvtier.block import checksum

    raw = np.random.default_rng(nbytes).bytes(nbytes)
    want = crc32c.crc32c(raw)
    arr = np.frombuffer(raw, dtype=np.uint8).copy()
    for held in (raw, bytearray(raw), memoryview(raw), arr, arr.reshape(1, -1) if nbytes else arr):
        assert checksum(held) == want
    half = nbytes // 2
    assert checksum(arr[half:], checksum(arr[:half])) == want  # incremental, across the GIL threshold


def test_headers_like_accepts_the_same_layout_with_other_crcs_and_nothing_else():
    """``headers_like`` (the loader's one check of many host blocks' headers): blocks laid out as
    the model, whatever their layer crcs, pass; a changed offset (header checksum made right
    again), a wrong header checksum, a layer crc changed without it, another codec's block, and
    a header past the array's end do not."""
    import numpy as np

    from kvtier.block import _header, headers_like, parse_table

    blocks = [encode_block(get_codec("none"), [[t] for t in random_kv(8, layers=4, seed=s)[0]])
              for s in range(4)]
    size = len(blocks[0])
    arena = np.zeros(8 * size + 4096, dtype=np.uint8)
    starts = [s * size + (s % 3) * 8 for s in range(7)]

    def place(k, data):
        arena[starts[k]: starts[k] + len(data)] = np.frombuffer(data, dtype=np.uint8)

    for k, b in enumerate(blocks):
        place(k, b)
    codec, version, tokens, hsize, table = parse_table(blocks[1])
    shifted = bytearray(blocks[1])
    shifted[:hsize] = _header(codec, version, tokens, [(o + 8, n, c) for o, n, c in table]).ljust(hsize, b"\0")
    place(4, bytes(shifted))
    bad_crc = bytearray(blocks[2])
    bad_crc[17] ^= 1  # the header's own checksum
    place(5, bytes(bad_crc))
    layer_crc = bytearray(blocks[3])
    layer_crc[hsize - 1] ^= 1  # the last layer's crc, the header checksum left as it was
    place(6, bytes(layer_crc))
    ok = headers_like(arena, np.array([*starts, arena.size - 10]), starts[0])
    assert ok.tolist() == [True, True, True, True, False, False, False, False]
    other = encode_block(get_codec("int8"), [[t] for t in random_kv(8, layers=4)[0]])
    arena[starts[1]: starts[1] + len(other)] = np.frombuffer(other, dtype=np.uint8)
    assert headers_like(arena, np.array(starts[:2]), starts[0]).tolist() == [True, False]
    with pytest.raises(CorruptBlock):
        headers_like(arena, np.array(starts[:1]), starts[5])  # a model that fails its own check


def test_a_header_template_recognizes_its_layout_and_nothing_else():
    """Blocks of one layout differ only in their crcs; any other header byte (a layout, a
    codec, a version, damage) makes the block parsed as itself."""

    def block(seed, tokens=16, codec="none"):
        kv = random_kv(tokens, layers=3, seed=seed)
        return np.frombuffer(encode_block(get_codec(codec), kv), dtype=np.uint8).copy()

    first, second = block(1), block(2)
    template = HeaderTemplate(first)
    assert template.header == parse_header(first.tobytes())
    assert template.matches(second) and template.matches(first)
    assert [e[:2] for e in template.header.layers] == [e[:2] for e in parse_header(second.tobytes()).layers]
    assert not template.matches(block(3, tokens=8))  # other layer lengths
    assert not template.matches(block(4, codec="int8"))  # another codec
    damaged = second.copy()
    damaged[4] ^= 0x03  # the version byte
    assert not template.matches(damaged)
    assert not template.matches(second[:template.header.header_bytes - 1])  # too short to hold it
