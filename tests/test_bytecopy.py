"""Bulk byte copies: exact, never into a silent temporary, never through torch's thread pool."""

import numpy as np
import pytest
import torch

from kvtier import bytecopy
from kvtier.block import decode_block_into, encode_block_pooled
from kvtier.bytecopy import byte_view, copy_bytes
from kvtier.codecs import get_codec
from kvtier.errors import CorruptBlock
from tests.conftest import random_kv


@pytest.fixture
def torch_copies(monkeypatch):
    """Counts calls of ``torch.Tensor.copy_`` (the path whose speed collapses on a busy host)."""
    calls = []
    real = torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    return calls


def test_copy_bytes_between_dtypes_and_shapes(torch_copies):
    src = torch.randn(64, 3, 8).to(torch.bfloat16)
    dst = torch.empty(64 * 3 * 8 * 2, dtype=torch.uint8)
    copy_bytes(dst, src)
    assert torch.equal(dst.view(torch.bfloat16).view(64, 3, 8), src) and torch_copies == []
    copy_bytes(torch.empty(0), torch.empty(0, 5))  # nothing to copy


@pytest.mark.parametrize("nbytes", [bytecopy.STREAM_BYTES - 1, bytecopy.STREAM_BYTES, (3 << 20) + 5]
                         if bytecopy.copy_runs is not None else [1 << 20])
def test_large_copies_stream_and_small_ones_memmove(monkeypatch, nbytes):
    """From ``STREAM_BYTES`` on a host copy is ``copy_runs`` (streaming stores); below, and for
    overlapping ranges (which ``copy_runs`` refuses), it stays one memmove: the same bytes."""
    import ctypes

    calls = {"runs": 0, "memmove": 0}
    runs, memmove = bytecopy.copy_runs, ctypes.memmove
    if runs is not None:
        monkeypatch.setattr(bytecopy, "copy_runs", lambda *a: calls.__setitem__("runs", calls["runs"] + 1) or runs(*a))
    monkeypatch.setattr(ctypes, "memmove", lambda *a: calls.__setitem__("memmove", calls["memmove"] + 1) or memmove(*a))
    src = torch.randint(0, 256, (nbytes + 7,), dtype=torch.uint8)
    dst = torch.full((nbytes + 16,), 0xAB, dtype=torch.uint8)
    copy_bytes(dst[3:3 + nbytes], src[7:])  # unaligned on both sides
    assert torch.equal(dst[3:3 + nbytes], src[7:])
    assert bool((dst[:3] == 0xAB).all()) and bool((dst[3 + nbytes:] == 0xAB).all())
    streamed = runs is not None and nbytes >= bytecopy.STREAM_BYTES
    assert calls == {"runs": int(streamed), "memmove": int(not streamed)}
    whole = src.clone()
    copy_bytes(whole[1:], whole[:-1].clone())  # a copy of its own: no overlap
    ref = src.clone()
    copy_bytes(src[1:], src[:-1])  # overlapping: memmove semantics, never refused
    assert torch.equal(src, whole) and torch.equal(src[1:], ref[:-1])


def test_packing_contiguous_host_kv_uses_no_torch_copies(torch_copies):
    from kvtier.layout import KVLayout
    from kvtier.wire import pack_into, packed_nbytes, packed_views

    kv = random_kv(64, layers=3, heads=4, dim=64)
    layout = KVLayout.from_kv(kv)
    buf = bytearray(packed_nbytes(layout, 64))
    assert pack_into(kv, memoryview(buf)) == len(buf)
    assert torch_copies == []
    back = packed_views(torch.frombuffer(buf, dtype=torch.uint8), layout, 64)
    assert all(torch.equal(a, b) for la, lb in zip(kv, back, strict=True) for a, b in zip(la, lb, strict=True))
    strided = [tuple(t.transpose(1, 2).contiguous().transpose(1, 2) for t in layer) for layer in kv]
    assert pack_into(strided, memoryview(buf)) == len(buf)  # not contiguous: torch copies them
    assert len(torch_copies) == 2 * 3


def test_copy_bytes_refuses_what_it_cannot_do_exactly():
    with pytest.raises(ValueError, match="contiguous"):
        copy_bytes(torch.empty(8, 8).t(), torch.empty(64))  # a silent temporary would lose it
    with pytest.raises(ValueError, match="copy of 8 bytes into 4"):
        copy_bytes(torch.empty(4, dtype=torch.uint8), torch.empty(2))
    assert byte_view(torch.empty(3, dtype=torch.float16)).numel() == 6


def test_decoding_into_host_memory_never_uses_torch_copies(torch_copies):
    kv = random_kv(256, layers=3, heads=4, dim=64)
    block = encode_block_pooled(get_codec("none"), kv)
    torch_copies.clear()
    out = [[torch.empty_like(t) for t in layer] for layer in kv]
    decode_block_into(block, out)
    assert torch_copies == []
    assert all(torch.equal(a, b) for la, lb in zip(kv, out, strict=True) for a, b in zip(la, lb, strict=True))


def test_a_payload_that_does_not_fill_its_outputs_is_corrupt():
    data = torch.zeros(100, dtype=torch.uint8)
    with pytest.raises(CorruptBlock, match="payload of 100 bytes for outputs of 96"):
        get_codec("none").decode_into(data, [torch.empty(4, 3, 2)])


def test_the_byte_views_of_a_put_s_data_share_memory_and_keep_its_bytes():
    from kvtier.bytecopy import as_byte_view, as_uint8

    buf = bytearray(b"\x01\x02\x03\x04")
    view = as_uint8(buf)
    view[0] = 9  # a view, not a copy
    assert buf[0] == 9 and as_uint8(b"").numel() == 0 and as_uint8(bytes(buf)).tolist() == [9, 2, 3, 4]
    t = torch.arange(6, dtype=torch.float16).view(2, 3)
    assert as_uint8(t).numel() == 12 and as_uint8(t).data_ptr() == t.data_ptr()
    assert bytes(as_byte_view(t)) == t.numpy().tobytes()
    cols = t.t()  # not contiguous: copied into row-major order
    assert bytes(as_byte_view(cols)) == cols.contiguous().numpy().tobytes()
    assert as_byte_view(memoryview(buf).cast("H")).nbytes == 4 and bytes(as_byte_view(buf)) == bytes(buf)


def test_address_is_the_first_byte_of_any_array():
    import numpy as np

    from kvtier.bytecopy import address

    base = np.zeros(1 << 16, dtype=np.uint8)
    cases = {
        "writable slice": base[4096 + 3:],
        "read-only": np.frombuffer(b"kv" * 64, dtype=np.uint8),
        "strided": base[5::2],
        "empty": base[:0],
        "2-d": base.reshape(16, -1)[2:],
    }
    for name, arr in cases.items():
        assert address(arr) == arr.ctypes.data, name


@pytest.mark.parametrize("built", [True, False])
def test_copy_plan_copies_each_run_with_or_without_the_c_module(monkeypatch, built):
    if not built:
        monkeypatch.setattr(bytecopy, "copy_runs", None)
    elif bytecopy.copy_runs is None:
        pytest.skip("kvtier._fastcopy is not built here")
    src = np.arange(1000, dtype=np.int64).astype(np.uint8)
    dsts = [np.zeros(64, np.uint8), np.zeros(64, np.uint8)]
    bytecopy.copy_plan(dsts, src, np.array([(0, 8, 100, 16), (1, 0, 500, 64), (0, 40, 0, 4)], np.int64))
    assert dsts[0][8:24].tolist() == src[100:116].tolist() and dsts[0][40:44].tolist() == [0, 1, 2, 3]
    assert dsts[1].tolist() == src[500:564].tolist() and not dsts[0][:8].any() and not dsts[0][24:40].any()


def test_host_elements_is_a_view_with_the_tensors_strides_and_bits():
    """``host_elements``: a transposed bfloat16 view read through numpy gives the same bits in
    the same places, and writing through it writes the tensor; a dtype numpy has no integer of
    its size for, or a tensor off the host, is refused."""
    from kvtier.bytecopy import host_elements

    t = torch.randn(8, 4, 16).to(torch.bfloat16)
    view = t.transpose(0, 1)
    arr = host_elements(view)
    assert arr.shape == tuple(view.shape) and arr.dtype == np.int16
    assert torch.equal(torch.from_numpy(arr.copy()).view(torch.bfloat16), view.contiguous())
    arr[1, 2, 3] = 0
    assert t[2, 1, 3].item() == 0.0
    with pytest.raises(ValueError, match="no host integer view"):
        host_elements(torch.zeros(2, dtype=torch.complex128))
    with pytest.raises(ValueError, match="no host integer view"):
        host_elements(torch.zeros(2, device="meta"))
