"""kvtier._fastcopy: a put's copy and its crc32c in one pass, a reload's copies of runs. They must
give exactly the bytes and the crc32c that numpy and the crc32c package give (blocks written by
either read back under the other), in the streamed (large) and the cached (small) way alike,
write nothing outside their runs, refuse bad arguments before writing anything, and be built
wherever CI can build it."""

import os
import platform
import shutil

import crc32c
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvtier.block as block_mod
from kvtier import bytecopy
from kvtier.block import decode_block_into, prepare_block
from kvtier.codecs import get_codec
from kvtier.errors import CorruptBlock
from tests.conftest import random_kv

needs_runs = pytest.mark.skipif(bytecopy.copy_runs is None, reason="kvtier._fastcopy is not built here")
native = pytest.mark.skipif(not block_mod.ONE_PASS_COPY,
                            reason="kvtier._fastcopy is not built here (no C compiler at install, not x86-64) or "
                                   "this CPU lacks AVX2 + VPCLMULQDQ")


def test_ci_builds_the_extension():
    """Optional at install, so a broken build would only show as slower puts: where CI has a
    compiler on x86-64, the module must be there (whether this CPU can run it is ``available``)."""
    if not (os.environ.get("CI") and platform.machine() == "x86_64" and shutil.which("cc")):
        pytest.skip("only checked in CI on x86-64 with a C compiler")
    try:
        import kvtier._fastcopy  # noqa: F401
    except ImportError as e:
        pytest.fail(f"kvtier._fastcopy did not build ({e}): see pip's output for kvtier")


# lengths around every boundary of the C loop: words of 8 bytes, folds of 256 from 544 bytes on,
# and copies streamed past the cache (STREAM_BYTES in a call) from dst's first 32-byte boundary
EDGES = [0, 1, 7, 8, 9, 511, 543, 544, 545, 767, 800, 801, 1000, 4096 + 7, 32768, 65536 + 255]
STREAMED = [256 << 10, (256 << 10) + 1, (1 << 20) + 4095]


def _layers_of(src: np.ndarray) -> list[list[np.ndarray]]:
    n = len(src)
    return [[src[: n // 3], src[n // 3: n // 2]], [src[n // 2:]]]


@native
@pytest.mark.parametrize("n", EDGES + STREAMED)
@pytest.mark.parametrize("skew", [0, 3])
def test_copy_layers_is_a_copy_and_each_layers_crc32c(n, skew):
    rng = np.random.default_rng(n)
    src = rng.integers(0, 256, n + skew, dtype=np.uint8)[skew:]  # unaligned source too
    dst = np.full(n + 40, 0xAB, np.uint8)
    layers = _layers_of(src)
    crcs = block_mod.copy_layers(dst, [5, 5 + n // 2 + 11], layers)  # unaligned destinations
    assert crcs == [crc32c.crc32c(src[: n // 2].tobytes()), crc32c.crc32c(src[n // 2:].tobytes())]
    assert np.array_equal(dst[5: 5 + n // 2], src[: n // 2])
    assert np.array_equal(dst[16 + n // 2: 16 + n], src[n // 2:])
    untouched = np.r_[dst[:5], dst[5 + n // 2: 16 + n // 2], dst[16 + n:]]
    assert (untouched == 0xAB).all()  # nothing outside the layers written


@native
@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.binary(max_size=70_000), max_size=4), max_size=4), st.integers(0, 64))
def test_copy_layers_matches_for_any_parts(layers, gap):
    arrays = [[np.frombuffer(p, np.uint8) for p in parts] for parts in layers]
    offsets, at = [], gap
    for parts in layers:
        offsets.append(at)
        at += sum(len(p) for p in parts) + gap
    dst = np.zeros(at, np.uint8)
    assert block_mod.copy_layers(dst, offsets, arrays) == [crc32c.crc32c(b"".join(p)) for p in layers]
    for o, parts in zip(offsets, layers, strict=True):
        joined = b"".join(parts)
        assert dst[o: o + len(joined)].tobytes() == joined


@native
def test_copy_layers_refuses_bad_arguments_and_writes_nothing():
    src = np.arange(100, dtype=np.uint8)
    dst = np.zeros(64, np.uint8)
    with pytest.raises(ValueError, match="layer 0: 100 bytes from offset 0 do not fit a buffer of 64"):
        block_mod.copy_layers(dst, [0], [[src]])
    with pytest.raises(ValueError, match="layer 1: 10 bytes from offset 60"):
        block_mod.copy_layers(dst, [0, 60], [[src[:10]], [src[:10]]])  # layer 0 would fit
    with pytest.raises(ValueError, match="offset must be >= 0"):
        block_mod.copy_layers(dst, [-1], [[src[:10]]])
    with pytest.raises(ValueError, match="2 offsets for 1 layers"):
        block_mod.copy_layers(dst, [0, 1], [[src[:10]]])
    with pytest.raises((BufferError, ValueError)):  # a strided part is not one run of bytes
        block_mod.copy_layers(dst, [0], [[src[::2]]])
    with pytest.raises((BufferError, ValueError, TypeError)):  # read-only destination
        block_mod.copy_layers(np.frombuffer(bytes(64), np.uint8), [0], [[src[:10]]])
    with pytest.raises(TypeError, match="sequence of buffers"):
        block_mod.copy_layers(dst, [0], [5])
    assert not dst.any()


@native
@pytest.mark.parametrize("row", [0, 3, 6])
def test_copy_layers_of_a_row_copies_that_row_of_each_part(row):
    """``row``: each part is row ``row`` of a ``[blocks, bytes]`` array, as PrefixKV hands them
    over: the same bytes and crcs as those rows passed as parts, nothing of other rows."""
    rng = np.random.default_rng(row)
    blocked = [rng.integers(0, 256, (7, 96 << 10), dtype=np.uint8) for _ in range(4)]  # 384 KiB a row set
    layers = [[blocked[0], blocked[1]], [blocked[2], blocked[3]]]
    a, b = np.zeros(1 << 20, np.uint8), np.zeros(1 << 20, np.uint8)
    offsets = [4096, 4096 + (192 << 10)]
    assert block_mod.copy_layers(a, offsets, layers, row) == block_mod.copy_layers(
        b, offsets, [[p[row] for p in parts] for parts in layers])
    assert np.array_equal(a, b)


@native
def test_copy_layers_refuses_a_row_past_a_part_and_writes_nothing():
    blocked = np.ones((3, 64), np.uint8)
    dst = np.zeros(256, np.uint8)
    with pytest.raises(ValueError, match="layer 1: row 3 of a part of 3 rows"):
        block_mod.copy_layers(dst, [0, 64], [[np.ones((4, 64), np.uint8)], [blocked]], 3)
    with pytest.raises(ValueError, match="row 0 of a part of 0 rows"):
        block_mod.copy_layers(dst, [0], [[np.ones((0, 64), np.uint8)]], 0)
    assert not dst.any()


@native
@pytest.mark.parametrize("rows", [[0], [2, 3, 4], [6, 0, 6, 1], []])
@pytest.mark.parametrize("size", [96, 96 << 10])  # cached, and streamed (STREAM_BYTES in the call)
def test_copy_blocks_is_copy_layers_of_each_row(rows, size):
    """Many blocks in one call, read part by part across the blocks: exactly what a
    ``copy_layers`` of each row gives (bytes and crcs), into each block's own destination, in
    any order of rows (repeated too), nothing written outside them."""
    rng = np.random.default_rng(size + len(rows))
    blocked = [rng.integers(0, 256, (7, size), dtype=np.uint8) for _ in range(3)]
    layers = [[blocked[0], blocked[1]], [blocked[2]]]
    offsets = [64, 64 + 2 * size + 5]  # an unaligned second layer
    nbytes = offsets[1] + size + 64
    outs = [np.zeros(nbytes, np.uint8) for _ in rows]
    crcs = block_mod.copy_blocks(outs, offsets, layers, rows)
    for out, row, got in zip(outs, rows, crcs, strict=True):
        want = np.zeros(nbytes, np.uint8)
        assert got == block_mod.copy_layers(want, offsets, layers, row)
        assert np.array_equal(out, want)


@native
def test_copy_blocks_refuses_bad_arguments_and_writes_nothing():
    blocked = np.ones((3, 64), np.uint8)
    outs = [np.zeros(256, np.uint8), np.zeros(256, np.uint8)]
    with pytest.raises(ValueError, match="1 rows for 2 destinations"):
        block_mod.copy_blocks(outs, [0], [[blocked]], [0])
    with pytest.raises(ValueError, match="row 3 of a part of 3 rows"):
        block_mod.copy_blocks(outs, [0], [[blocked]], [0, 3])  # the second block's row
    with pytest.raises(ValueError, match="row must be >= 0"):
        block_mod.copy_blocks(outs, [0], [[blocked]], [0, -1])
    with pytest.raises(ValueError, match="do not fit a buffer of 60"):
        block_mod.copy_blocks([outs[0], np.zeros(60, np.uint8)], [0], [[blocked]], [0, 1])
    with pytest.raises(ValueError, match="read-only"):
        block_mod.copy_blocks([outs[0], np.frombuffer(bytes(256), np.uint8)], [0], [[blocked]], [0, 1])
    assert not any(out.any() for out in outs)


def _plan(*rows: tuple[int, int, int, int]) -> np.ndarray:
    return np.array(rows, np.int64).reshape(-1, 4)


@needs_runs
@pytest.mark.parametrize("n", EDGES + STREAMED)
@pytest.mark.parametrize("skew", [0, 5])
def test_copy_runs_copies_each_run_and_nothing_else(n, skew):
    rng = np.random.default_rng(n)
    src = rng.integers(0, 256, 2 * n + skew, dtype=np.uint8)[skew:]
    a, b = np.full(n + 16, 0xAB, np.uint8), np.full(n + 16, 0xCD, np.uint8)
    bytecopy.copy_runs([a, b], src, _plan((1, 3, n, n // 2), (0, 7, 0, n), (1, 3 + n // 2, n + n // 2, n - n // 2)))
    assert np.array_equal(a[7: 7 + n], src[:n]) and (a[:7] == 0xAB).all() and (a[7 + n:] == 0xAB).all()
    assert np.array_equal(b[3: 3 + n], src[n: 2 * n]) and (b[:3] == 0xCD).all() and (b[3 + n:] == 0xCD).all()


@needs_runs
def test_copy_runs_refuses_bad_plans_and_writes_nothing():
    src = np.arange(100, dtype=np.uint8)
    a, b = np.zeros(64, np.uint8), np.zeros(64, np.uint8)
    good = (0, 0, 0, 10)  # comes first in each plan: nothing may be written before all are checked
    for bad, match in [((2, 0, 0, 1), "destination 2 at 0"), ((-1, 0, 0, 1), "destination -1"),
                       ((1, 60, 0, 10), "destination 1 at 60, source at 0, 10 bytes"),
                       ((1, 0, 95, 10), "source at 95"), ((1, -1, 0, 1), "out of bounds"),
                       ((1, 0, 0, -1), "out of bounds"), ((1, 2**62, 0, 2**62), "out of bounds")]:
        with pytest.raises(ValueError, match=f"run 1 .*{match}"):
            bytecopy.copy_runs([a, b], src, _plan(good, bad))
    with pytest.raises(ValueError, match="overlaps its source"):
        bytecopy.copy_runs([src], src, _plan(good, (0, 10, 0, 20)))
    with pytest.raises(ValueError, match="int64 rows of 4"):
        bytecopy.copy_runs([a], src, np.array([0, 0, 0, 1], np.int32))
    with pytest.raises(ValueError, match="int64 rows of 4"):
        bytecopy.copy_runs([a], src, np.array([0, 0, 0], np.int64))
    with pytest.raises((BufferError, ValueError, TypeError)):  # read-only destination
        bytecopy.copy_runs([np.frombuffer(bytes(64), np.uint8)], src, _plan(good))
    with pytest.raises(TypeError, match="writable buffers"):
        bytecopy.copy_runs(5, src, _plan(good))
    assert not a.any() and not b.any()


def _written(kv, codec: str, one_pass: bool, monkeypatch) -> bytes:
    monkeypatch.setattr(block_mod, "ONE_PASS_COPY", one_pass)
    block = prepare_block(get_codec(codec), kv)
    out = torch.full((block.nbytes,), 0x5A, dtype=torch.uint8)  # a recycled slot's stale bytes
    block.write_into(out)
    return out.numpy().tobytes()


@native
@pytest.mark.parametrize("codec", ["none", "int8", "fp8"])
@pytest.mark.parametrize("tokens", [16, 256])
def test_one_pass_writes_the_same_block_as_numpy(monkeypatch, codec, tokens):
    """The same header, layer crcs, payloads and zeroed padding, for aligned (version 2) and
    compact (version 1) blocks."""
    kv = random_kv(tokens, layers=3, heads=2, dim=64)
    fast = _written(kv, codec, True, monkeypatch)
    assert fast == _written(kv, codec, False, monkeypatch)
    out = [[torch.empty_like(t) for t in layer] for layer in kv]
    decode_block_into(torch.frombuffer(bytearray(fast), dtype=torch.uint8), out)  # verified


@native
def test_a_flipped_byte_in_a_one_pass_block_is_caught(monkeypatch):
    kv = random_kv(256, layers=2, heads=2, dim=64)
    data = bytearray(_written(kv, "none", True, monkeypatch))
    last = block_mod.parse_header(bytes(data)).layers[-1]
    data[last.offset + last.length - 1] ^= 0x01  # the last payload byte the one pass wrote
    out = [[torch.empty_like(t) for t in layer] for layer in kv]
    with pytest.raises(CorruptBlock, match="checksum"):
        decode_block_into(torch.frombuffer(data, dtype=torch.uint8), out)


@native
@pytest.mark.parametrize("copy", ["copy_layers", "copy_runs"])
def test_the_gil_is_released_for_large_copies_only(copy):
    """Another thread runs during a copy of 256 KiB or more (a reload's threads are not held up
    by a put), never during a smaller one (giving the GIL up costs more than such a copy). The
    switch interval is made long, so the other thread can only get the GIL when a call gives
    it up."""
    import sys
    import threading

    def other_runs_during(nbytes: int, calls: int) -> bool:
        src, dst = np.ones(nbytes, np.uint8), np.empty(nbytes, np.uint8)
        halves = _plan((0, 0, 0, nbytes // 2), (0, nbytes // 2, nbytes // 2, nbytes - nbytes // 2))
        go, ran = threading.Event(), []
        t = threading.Thread(target=lambda: go.wait() and ran.append(1))
        t.start()
        interval = sys.getswitchinterval()
        sys.setswitchinterval(30.0)
        try:
            go.set()  # the thread is runnable now, but needs the GIL this thread holds
            for _ in range(calls):
                if copy == "copy_layers":  # two layers of half: the threshold is the call's bytes
                    block_mod.copy_layers(dst, [0, nbytes // 2], [[src[: nbytes // 2]], [src[nbytes // 2:]]])
                else:
                    bytecopy.copy_runs([dst], src, halves)
                if ran:
                    return True
            return False
        finally:
            sys.setswitchinterval(interval)
            t.join()

    assert other_runs_during(64 << 20, calls=200)
    assert not other_runs_during(64 << 10, calls=200)
    from kvtier import _fastcopy
    assert _fastcopy.gil_free_bytes == block_mod._GIL_FREE_BYTES  # one threshold for both


# ---- crc_parts: the crc32c of a block read in pieces, in one call -------------------------------
@native
@settings(max_examples=150, deadline=None)
@given(size=st.integers(0, 70_000), cuts=st.lists(st.integers(0, 70_000), max_size=6),
       value=st.sampled_from([0, 1, 0xDEADBEEF, 0xFFFFFFFF]), seed=st.integers(0, 2**16))
def test_crc_parts_is_crc32c_of_the_pieces_laid_end_to_end(size, cuts, value, seed):
    from kvtier._fastcopy import crc_parts

    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
    parts = np.split(data, sorted(min(c, size) for c in cuts))
    want = crc32c.crc32c(data.tobytes(), value)
    assert crc_parts(parts, value) == want
    assert crc_parts([p.tobytes() for p in parts], value) == want  # read-only buffers too


@native
def test_crc_parts_of_a_large_block_with_the_gil_released_and_bad_arguments_refused():
    from kvtier._fastcopy import crc_parts

    data = np.random.default_rng(1).integers(0, 256, 2 * 1024**2 + 5, dtype=np.uint8)
    assert crc_parts(np.array_split(data, 65)) == crc32c.crc32c(data.tobytes())
    with pytest.raises(ValueError, match="2\\*\\*32"):
        crc_parts([data], 2**32)
    with pytest.raises(TypeError):
        crc_parts([data, 7])
    with pytest.raises(TypeError):
        crc_parts(data[:8], 0, 1)


def test_checksum_parts_gives_the_same_crc_with_and_without_the_extension(monkeypatch):
    data = np.random.default_rng(2).integers(0, 256, 300_000, dtype=np.uint8)
    parts = np.array_split(data, 7)
    want = crc32c.crc32c(data.tobytes(), 5)
    assert block_mod.checksum_parts(parts, 5) == want
    monkeypatch.setattr(block_mod, "ONE_PASS_COPY", False)
    assert block_mod.checksum_parts(parts, 5) == want


def test_aligned_refuses_bad_arguments():
    aligned = pytest.importorskip("kvtier._fastcopy").aligned
    with pytest.raises(ValueError, match="align"):
        aligned([], 0)
    with pytest.raises(TypeError):
        aligned([7], 4096)
    with pytest.raises(TypeError):
        aligned(7, 4096)
