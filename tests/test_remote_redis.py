"""RedisBackend against a real redis-server on loopback: layout, chunking, idempotence, TTL."""

from __future__ import annotations

import os
import struct

import pytest
import torch

from kvtier.errors import CorruptBlock, InvalidRequest
from tests.integration.remote_servers import (
    REDIS_CLI,
    REDIS_SERVER,
    SKIP_REASON,
    RedisServer,
    glob_escape,
    wait_for,
)

pytestmark = pytest.mark.skipif(not (REDIS_SERVER and REDIS_CLI), reason=SKIP_REASON)

redis_mod = pytest.importorskip("redis", reason="redis-py missing: pip install 'kvtier[redis]'")
from kvtier.tiers.remote.redis import HEADER, RedisBackend  # noqa: E402

CHUNK = 1024 * 1024


@pytest.fixture(scope="module")
def server():
    srv = RedisServer().start()
    yield srv
    srv.stop()


@pytest.fixture
def backend(server):
    b = RedisBackend(server.url, timeout_s=2.0, prefix=f"t{os.getpid()}:", chunk_bytes=CHUNK)
    yield b
    b.raw_client().flushdb()
    b.close()


def _payload(n: int, seed: int = 0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).numpy().tobytes()


def _read(b: RedisBackend, key: bytes, n: int, offset: int = 0) -> bytes:
    out = torch.empty(n, dtype=torch.uint8)
    assert b.get_into(key, out, offset) == n
    return out.numpy().tobytes()


@pytest.mark.parametrize("n", [4096, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17, 16 * 1024**2])
def test_round_trip_bit_exact(backend, n):
    key = os.urandom(16)
    data = _payload(n, n)
    backend.put(key, memoryview(data))
    assert backend.size(key) == n
    assert _read(backend, key, n) == data


def test_partial_reads_cross_chunk_boundaries(backend):
    key = os.urandom(16)
    data = _payload(3 * CHUNK + 100, 7)
    backend.put(key, memoryview(data))
    for off, n in [(0, 10), (CHUNK - 5, 10), (CHUNK, CHUNK), (2 * CHUNK - 1, CHUNK + 2),
                   (3 * CHUNK, 100), (17, 3 * CHUNK + 83)]:
        assert _read(backend, key, n, off) == data[off:off + n]
    with pytest.raises(InvalidRequest, match="exceeds"):
        _read(backend, key, 200, 3 * CHUNK)


def test_large_values_are_chunked_small_values_inline(backend):
    raw = backend.raw_client()
    small, big = os.urandom(16), os.urandom(16)
    backend.put(small, memoryview(_payload(1000)))
    backend.put(big, memoryview(_payload(2 * CHUNK + 1)))
    keys = set(raw.keys(glob_escape(backend.prefix) + b"*"))
    assert backend.prefix + small in keys
    assert backend.prefix + big in keys
    chunk_keys = {k for k in keys if k.startswith(backend.prefix + big + b"#")}
    assert len(chunk_keys) == 3
    assert len(keys) == 5
    # The manifest is small: a header and one crc per chunk, not the value.
    assert raw.strlen(backend.prefix + big) == HEADER.size + 3 * 4


def test_put_is_idempotent_first_writer_wins(backend):
    for n in (5000, 2 * CHUNK + 3):
        key = os.urandom(16)
        first, second = _payload(n, 1), _payload(n, 2)
        backend.put(key, memoryview(first))
        backend.put(key, memoryview(second))
        assert _read(backend, key, n) == first


def test_missing_key_and_delete(backend):
    key = os.urandom(16)
    with pytest.raises(KeyError):
        _read(backend, key, 10)
    assert backend.size(key) is None
    assert backend.delete(key) is False
    backend.put(key, memoryview(_payload(2 * CHUNK)))
    assert backend.delete(key) is True
    assert backend.exists_many([key]) == [False]
    assert backend.raw_client().keys(glob_escape(backend.prefix + key) + b"*") == []


def test_batched_exists_is_one_round_trip_in_order(backend):
    keys = [os.urandom(16) for _ in range(50)]
    for k in keys[::2]:
        backend.put(k, memoryview(b"x" * 100))
    before = int(backend.raw_client().info("stats")["total_commands_processed"])
    found = backend.exists_many(keys)
    after = int(backend.raw_client().info("stats")["total_commands_processed"])
    assert found == [i % 2 == 0 for i in range(50)]
    assert after - before == 50 + 1  # 50 EXISTS in one pipeline, plus our INFO
    assert backend.exists_many([]) == []


def test_corrupt_chunk_is_detected_never_served(backend):
    key = os.urandom(16)
    backend.put(key, memoryview(_payload(2 * CHUNK)))
    ckey = backend.prefix + key + b"#" + (1).to_bytes(4, "big")
    backend.raw_client().setrange(ckey, 5, b"\xff\x00\xff")
    with pytest.raises(CorruptBlock):
        _read(backend, key, 2 * CHUNK)
    assert _read(backend, key, 100) == _payload(2 * CHUNK)[:100]  # chunk 0 is intact


def test_corrupt_inline_value_is_detected(backend):
    key = os.urandom(16)
    backend.put(key, memoryview(_payload(5000)))
    backend.raw_client().setrange(backend.prefix + key, HEADER.size + 4 + 10, b"\x00\x01")
    with pytest.raises(CorruptBlock):
        _read(backend, key, 5000)


def test_foreign_value_is_corrupt_not_served(backend):
    key = os.urandom(16)
    backend.raw_client().set(backend.prefix + key, b"not a kvtier manifest at all, no sir")
    with pytest.raises(CorruptBlock, match="manifest"):
        _read(backend, key, 4)


def test_ttl_is_namespace_retention(server):
    b = RedisBackend(server.url, timeout_s=2.0, prefix="ttl:", ttl_s=0.3, chunk_bytes=CHUNK)
    try:
        small, big = os.urandom(16), os.urandom(16)
        b.put(small, memoryview(b"a" * 100))
        b.put(big, memoryview(_payload(2 * CHUNK)))
        raw = b.raw_client()
        assert 0 < raw.pttl(b"ttl:" + small) <= 300
        assert 0 < raw.pttl(b"ttl:" + big) <= 300
        # Chunks outlive their manifest, so a live manifest never points at expired chunks.
        assert raw.pttl(b"ttl:" + big + b"#" + bytes(4)) > 300
        wait_for(lambda: b.exists_many([small, big]) == [False, False], 5.0, "TTL expiry")
    finally:
        b.raw_client().flushdb()
        b.close()


def test_reader_with_other_chunk_size_reads_whole_value(server):
    w = RedisBackend(server.url, prefix="cs:", chunk_bytes=CHUNK)
    r = RedisBackend(server.url, prefix="cs:", chunk_bytes=4 * CHUNK)
    try:
        key, data = os.urandom(16), _payload(3 * CHUNK + 5)
        w.put(key, memoryview(data))
        assert _read(r, key, len(data)) == data
        assert _read(r, key, 20, CHUNK - 10) == data[CHUNK - 10:CHUNK + 10]
    finally:
        w.raw_client().flushdb()
        w.close()
        r.close()


def test_bad_arguments_are_rejected():
    with pytest.raises(InvalidRequest, match="url"):
        RedisBackend("")
    with pytest.raises(InvalidRequest, match="chunk_bytes"):
        RedisBackend("redis://127.0.0.1:1", chunk_bytes=10)
    with pytest.raises(InvalidRequest, match="ttl_s"):
        RedisBackend("redis://127.0.0.1:1", ttl_s=0)
    with pytest.raises(InvalidRequest, match="cluster url"):
        RedisBackend("redis://nohostport", cluster=True).exists_many([b"k"])


def test_header_layout_is_stable():
    assert HEADER.size == 24
    assert struct.calcsize("<4sBBHQII") == HEADER.size


@pytest.mark.parametrize("n", [4096, 2 * CHUNK + 5])
def test_a_value_moved_under_another_key_is_never_served(backend, n):
    """Checksums are bound to the key: a valid value copied under another key fails its check."""
    raw = backend.raw_client()
    ka, kb = os.urandom(16), os.urandom(16)
    a = _payload(n, 1)
    backend.put(ka, memoryview(a))
    for name in raw.keys(glob_escape(backend.prefix + ka) + b"*"):  # manifest (and chunks)
        raw.set(name.replace(ka, kb), raw.get(name))
    out = torch.zeros(n, dtype=torch.uint8)
    with pytest.raises(CorruptBlock):
        backend.get_into(kb, out)
    with pytest.raises(CorruptBlock):
        backend._get_into_parsed(kb, out)  # the redis-py path (Cluster) checks it too
    assert _read(backend, ka, n) == a  # the original still serves
