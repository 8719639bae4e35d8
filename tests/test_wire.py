"""``kvtier.wire``'s msgpack without copies: ``pack_pieces`` gives ``msgpack.packb``'s bytes,
passes large binary fields through uncopied, and keeps no reference to them once its pieces go
(a sidecar ``get``'s KV goes back to the reload pool without waiting for the garbage collector)."""

from __future__ import annotations

import gc
import weakref

import msgpack
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from kvtier.wire import _INLINE_BIN, pack_pieces, unpack_views

values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.text(max_size=20)
    | st.binary(max_size=64) | st.sampled_from([b"\x01" * _INLINE_BIN, b"\x02" * (3 * _INLINE_BIN + 5)]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


@given(values)
def test_pieces_are_packb_bytes(obj):
    nbytes, pieces = pack_pieces(obj)
    body = b"".join(bytes(p) for p in pieces)
    assert nbytes == len(body) and body == msgpack.packb(obj)
    assert msgpack.unpackb(body, strict_map_key=False) == obj


def test_large_binary_fields_are_passed_through_uncopied():
    kv = np.arange(4 * _INLINE_BIN, dtype=np.uint8)
    _, pieces = pack_pieces({"kv": [memoryview(kv)], "tokens": 3})
    passed = [p for p in pieces if isinstance(p, memoryview)]
    assert passed and all(np.shares_memory(np.frombuffer(p, np.uint8), kv) for p in passed)
    d = unpack_views(b"".join(bytes(p) for p in pieces))
    assert bytes(d["kv"][0]) == kv.tobytes() and d["tokens"] == 3


def test_no_reference_is_left_once_the_pieces_go():
    kv = np.ones(2 * _INLINE_BIN, dtype=np.uint8)
    gone = weakref.ref(kv)
    was = gc.isenabled()
    gc.disable()  # a reference cycle would keep kv alive until a collection: none may run
    try:
        _, pieces = pack_pieces({"kv": [[memoryview(kv)]]})
        del kv, pieces
        assert gone() is None
    finally:
        if was:
            gc.enable()
