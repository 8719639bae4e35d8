"""kvtier._fastcopy: a put's copy and its crc32c in one pass. It must give exactly the bytes and
the crc32c that numpy and the crc32c package give (blocks written by either read back under the
other), refuse bad arguments before writing anything, and be built wherever CI can build it."""

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
from kvtier.block import decode_block_into, prepare_block
from kvtier.codecs import get_codec
from kvtier.errors import CorruptBlock
from tests.conftest import random_kv

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


# lengths around every boundary of the C loop: words of 8 bytes, folds of 256 from 512 bytes on
EDGES = [0, 1, 7, 8, 9, 511, 512, 513, 767, 768, 769, 1000, 4096 + 7, 32768, 65536 + 255]


@native
@pytest.mark.parametrize("n", EDGES)
@pytest.mark.parametrize("skew", [0, 3])
def test_copy_crc_is_a_copy_and_its_crc32c(n, skew):
    rng = np.random.default_rng(n)
    src = rng.integers(0, 256, n + skew, dtype=np.uint8)[skew:]  # unaligned source too
    dst = np.full(n + 16, 0xAB, np.uint8)
    parts = [src[: n // 3], src[n // 3: n // 2], src[n // 2:]]
    assert block_mod.copy_crc(dst, 5, parts, 7) == crc32c.crc32c(src.tobytes(), 7)
    assert np.array_equal(dst[5: 5 + n], src)
    assert (dst[:5] == 0xAB).all() and (dst[5 + n:] == 0xAB).all()  # nothing outside written


@native
@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=70_000), max_size=5), st.integers(0, 64), st.integers(0, 2**32 - 1))
def test_copy_crc_matches_for_any_parts(parts, offset, crc):
    arrays = [np.frombuffer(p, np.uint8) for p in parts]
    total = sum(len(p) for p in parts)
    dst = np.zeros(offset + total, np.uint8)
    assert block_mod.copy_crc(dst, offset, arrays, crc) == crc32c.crc32c(b"".join(parts), crc)
    assert dst[offset:].tobytes() == b"".join(parts)


@native
def test_bad_arguments_are_refused_and_write_nothing():
    src = np.arange(100, dtype=np.uint8)
    dst = np.zeros(64, np.uint8)
    with pytest.raises(ValueError, match="100 bytes from offset 0 do not fit a buffer of 64"):
        block_mod.copy_crc(dst, 0, [src])
    with pytest.raises(ValueError, match="from offset 60"):
        block_mod.copy_crc(dst, 60, [src[:10]])
    with pytest.raises(ValueError, match="offset must be >= 0"):
        block_mod.copy_crc(dst, -1, [src[:10]])
    with pytest.raises(ValueError, match="not 32-bit"):
        block_mod.copy_crc(dst, 0, [src[:10]], 2**32)
    with pytest.raises((BufferError, ValueError)):  # a strided part is not one run of bytes
        block_mod.copy_crc(dst, 0, [src[::2]])
    with pytest.raises((BufferError, ValueError, TypeError)):  # read-only destination
        block_mod.copy_crc(np.frombuffer(bytes(64), np.uint8), 0, [src[:10]])
    with pytest.raises(TypeError, match="sequence of buffers"):
        block_mod.copy_crc(dst, 0, 5)
    assert not dst.any()


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
def test_the_gil_is_released_for_large_copies_only():
    """Another thread runs during a copy of 256 KiB or more (a reload's threads are not held up
    by a put), never during a smaller one (giving the GIL up costs more than such a copy). The
    switch interval is made long, so the other thread can only get the GIL when a call gives
    it up."""
    import sys
    import threading

    def other_runs_during(nbytes: int, calls: int) -> bool:
        src, dst = np.ones(nbytes, np.uint8), np.empty(nbytes, np.uint8)
        go, ran = threading.Event(), []
        t = threading.Thread(target=lambda: go.wait() and ran.append(1))
        t.start()
        interval = sys.getswitchinterval()
        sys.setswitchinterval(30.0)
        try:
            go.set()  # the thread is runnable now, but needs the GIL this thread holds
            for _ in range(calls):
                block_mod.copy_crc(dst, 0, [src])
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
