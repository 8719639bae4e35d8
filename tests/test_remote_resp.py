"""ReplyReader on a real socket pair: bulk replies land in the caller's buffer, checksummed."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from kvtier.block import checksum
from kvtier.tiers.remote.resp import ProtocolError, ReplyError, ReplyReader


def _bulk(payload: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(payload), payload)


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def _send_slowly(sock: socket.socket, data: bytes, piece: int) -> threading.Thread:
    """Feed ``data`` in small pieces so replies arrive split at awkward places."""
    def run():
        for i in range(0, len(data), piece):
            sock.sendall(data[i:i + piece])
    t = threading.Thread(target=run)
    t.start()
    return t


@pytest.mark.parametrize("piece", [7, 4096, 1 << 20])
def test_bulk_replies_land_in_place_with_their_crc(pair, piece):
    a, b = pair
    first, second = os.urandom(300_000), os.urandom(5)
    feeder = _send_slowly(b, _bulk(first) + b"$-1\r\n" + _bulk(second) + b"_\r\n", piece)
    r = ReplyReader(a, time.monotonic() + 10, bytearray(64))  # a tiny line buffer on purpose
    out = bytearray(len(first))
    assert r.bulk_length() == len(first)
    assert r.read_into(memoryview(out)) == checksum(first)
    r.end_of_bulk()
    assert bytes(out) == first
    assert r.bulk_length() is None  # RESP2 nil
    assert r.bulk_length() == 5
    span = bytearray(3)
    assert r.span_into(5, memoryview(span), 1) == checksum(second)  # every byte checksummed
    r.end_of_bulk()
    assert bytes(span) == second[1:4]
    assert r.bulk_length() is None  # RESP3 null
    feeder.join(10)


def test_drain_consumes_whole_replies(pair):
    a, b = pair
    b.sendall(_bulk(b"x" * 1000) + b"$-1\r\n" + _bulk(b"yz") + _bulk(b"next"))
    r = ReplyReader(a, time.monotonic() + 5)
    r.drain(3)
    out = bytearray(4)
    assert r.bulk_length() == 4
    r.read_into(memoryview(out))
    assert out == b"next"


def test_error_reply_and_garbage_are_reported(pair):
    a, b = pair
    b.sendall(b"-MOVED 1234 127.0.0.1:7001\r\n+OK\r\n")
    r = ReplyReader(a, time.monotonic() + 5)
    with pytest.raises(ReplyError, match="MOVED"):
        r.bulk_length()
    with pytest.raises(ProtocolError, match="bulk"):
        r.bulk_length()


def test_missing_crlf_after_payload_is_a_protocol_error(pair):
    a, b = pair
    b.sendall(b"$2\r\nabXY")
    r = ReplyReader(a, time.monotonic() + 5)
    assert r.bulk_length() == 2
    r.read_into(memoryview(bytearray(2)))
    with pytest.raises(ProtocolError, match="CRLF"):
        r.end_of_bulk()


def test_a_stalled_reply_times_out_at_the_deadline(pair):
    a, b = pair
    b.sendall(b"$100\r\n" + b"z" * 10)  # then nothing: the server hangs mid-payload
    r = ReplyReader(a, time.monotonic() + 0.3)
    t0 = time.monotonic()
    assert r.bulk_length() == 100
    with pytest.raises(TimeoutError):
        r.read_into(memoryview(bytearray(100)))
    assert time.monotonic() - t0 < 0.3 + 0.5


def test_a_closed_connection_mid_reply_is_an_error(pair):
    a, b = pair
    b.sendall(b"$100\r\nabc")
    b.shutdown(socket.SHUT_WR)
    r = ReplyReader(a, time.monotonic() + 5)
    assert r.bulk_length() == 100
    with pytest.raises(ConnectionError, match="closed"):
        r.read_into(memoryview(bytearray(100)))


def test_an_overlong_header_line_is_refused(pair):
    a, b = pair
    b.sendall(b"$" + b"1" * 200)
    r = ReplyReader(a, time.monotonic() + 5, bytearray(64))
    with pytest.raises(ProtocolError, match="longer"):
        r.bulk_length()


redis_mod = pytest.importorskip("redis", reason="redis-py missing: pip install 'kvtier[redis]'")
from kvtier.tiers.remote.redis import RedisBackend  # noqa: E402
from tests.integration.remote_servers import REDIS_SERVER, SKIP_REASON, RedisServer  # noqa: E402

needs_redis = pytest.mark.skipif(not REDIS_SERVER, reason=SKIP_REASON)


@needs_redis
def test_direct_reads_survive_a_server_restart_and_a_timeout():
    """The direct path drops connections the server closed and ones left mid-reply."""
    import torch

    srv = RedisServer().start()
    b = RedisBackend(srv.url, timeout_s=0.5, chunk_bytes=64 * 1024)
    try:
        key, data = os.urandom(16), os.urandom(300_000)
        out = torch.empty(len(data), dtype=torch.uint8)
        b.put(key, memoryview(data))
        assert b.get_into(key, out) == len(data) and out.numpy().tobytes() == data
        srv.kill()
        srv.start()  # same port, empty: the idle pooled connection is now dead
        b.put(key, memoryview(data))
        assert b.get_into(key, out) == len(data) and out.numpy().tobytes() == data
        srv.pause()
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            b.get_into(key, out)
        assert time.monotonic() - t0 < 0.5 + 0.5
        srv.resume()
        out.zero_()
        assert b.get_into(key, out) == len(data) and out.numpy().tobytes() == data
    finally:
        b.close()
        srv.stop()
