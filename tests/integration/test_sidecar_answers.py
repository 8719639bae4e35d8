"""msgpack ``get`` answers read straight into pooled memory (``kvtier.client_answers``), against
the real sidecar on loopback: the KV is bit-exact, memory the caller still holds is never
reused, a kept-alive connection the server dropped is retried once, a server that dies or stalls
mid-answer is a transport error (never a short answer), and error answers and exceptions are
the ones httpx's path gives."""

from __future__ import annotations

import asyncio
import gc
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import torch
from fastapi import FastAPI

from kvtier import CacheConfig, KVLayout, TieredCache
from kvtier.bufpool import MAPPED_BYTES
from kvtier.client import AsyncKVTierClient, KVTierClient, RemoteError
from kvtier.client_answers import DirectAnswers
from kvtier.config import HostTierConfig
from kvtier.server.testing import free_port, serve_in_thread
from kvtier.settings import ServerSettings
from tests.conftest import random_bytes, random_kv

BT = 64
LAYOUT = KVLayout(2, ((8, 64), (8, 64)), "float32")  # 8 KiB a token
TOKENS = MAPPED_BYTES // LAYOUT.bytes_per_token + BT  # an answer just over the pooled size


def rand_kv(seed: int, tokens: int = TOKENS) -> list[tuple[torch.Tensor, ...]]:
    return random_kv(tokens, LAYOUT.num_layers, 8, 64, seed=seed)  # LAYOUT's shapes


def ids(start: int, n: int = TOKENS) -> list[int]:
    return list(range(start, start + n))


def assert_kv(got, want) -> None:
    assert got is not None
    for lg, lw in zip(got, want, strict=True):
        for g, w in zip(lg, lw, strict=True):
            assert torch.equal(g, w)


@pytest.fixture(scope="module")
def cache() -> Iterator[TieredCache]:
    config = CacheConfig(block_tokens=BT, host=HostTierConfig(capacity_bytes="512MiB"))
    with TieredCache(config) as c:
        c.register_namespace("ns", layout=LAYOUT)
        for seed in (1, 2):
            c.put("ns", ids(seed * 10**6), rand_kv(seed))
        yield c


@pytest.fixture(scope="module")
def url(cache) -> Iterator[str]:
    with serve_in_thread(cache) as u:
        yield u


def test_get_reads_the_answer_into_pooled_memory_bit_exact(url):
    with KVTierClient(url) as c:
        assert c._direct is not None
        got, n = c.get("ns", ids(10**6))
        assert n == TOKENS and c._direct.calls == 1
        assert_kv(got, rand_kv(1))
        first = got[0][0].data_ptr()
        del got
        assert c._direct.pool.idle_bytes >= MAPPED_BYTES  # the answer's memory came back
        got, n = c.get("ns", ids(10**6))
        assert got is not None and got[0][0].data_ptr() == first  # and was read into again
        assert_kv(got, rand_kv(1))
        assert c._direct.pool.idle_bytes == 0


def test_memory_the_caller_holds_is_never_read_into(url):
    with KVTierClient(url) as c:
        held, _ = c.get("ns", ids(10**6))
        other, n = c.get("ns", ids(2 * 10**6))
        assert n == TOKENS
        assert_kv(held, rand_kv(1))  # the second answer went elsewhere
        assert_kv(other, rand_kv(2))
        del other
        again, _ = c.get("ns", ids(2 * 10**6))
        assert_kv(held, rand_kv(1))
        assert_kv(again, rand_kv(2))


def test_a_miss_and_a_small_answer(url):
    with KVTierClient(url) as c:
        assert c.get("ns", ids(5 * 10**6, 100)) == (None, 0)
        got, n = c.get("ns", ids(10**6, 3 * BT))  # well under MAPPED_BYTES: plain bytes
        assert n == 3 * BT
        assert_kv(got, [tuple(t[:n] for t in layer) for layer in rand_kv(1)])
        assert c._direct is not None and c._direct.calls == 2


def test_async_client_reads_the_same_way(url):
    async def run() -> None:
        async with AsyncKVTierClient(url) as c:
            got, n = await c.get("ns", ids(10**6))
            assert n == TOKENS and c._direct is not None and c._direct.calls == 1
            assert_kv(got, rand_kv(1))

    asyncio.run(run())


def test_engine_pages_come_back_bit_exact_through_pooled_memory_on_both_sides(cache, url):
    page = 1 << 20
    n = MAPPED_BYTES // page + 2
    keys = [i.to_bytes(32, "big") for i in range(n)]
    pages = random_bytes(n * page, 7).view(n, page)
    app_pool = _answer_pool(cache, url)
    with KVTierClient(url) as c:
        c.register_block_namespace("pages", page_bytes=page, fingerprint={"model": "answers-test"})
        assert c.put_blocks("pages", keys, pages) == n
        was = gc.isenabled()
        gc.disable()  # the server's answer memory must come back by reference counting alone
        try:
            for _ in range(2):
                out = torch.zeros(n, page, dtype=torch.uint8)
                assert c.get_blocks_into("pages", keys, out) == n and torch.equal(out, pages)
                deadline = time.monotonic() + 30  # the server lets go once the answer is sent
                while app_pool.idle_bytes < n * page:
                    assert time.monotonic() < deadline, "the server kept its answer's memory"
                    time.sleep(0.01)
        finally:
            if was:
                gc.enable()
        assert c._direct is not None and c._direct.calls == 3  # the put (its pages as they lie) and both gets


def _answer_pool(cache, url):
    """The running server's ``answer_buffers`` (found through the cache it serves)."""
    for obj in gc.get_objects():
        if isinstance(obj, FastAPI) and getattr(obj.state, "cache", None) is cache:
            return obj.state.answer_buffers
    raise AssertionError("no app serves this cache")


class _LoopbackServer:
    """A raw HTTP server on a free loopback port: each connection it accepts goes to ``handle``
    (on the accepting thread)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.handle(conn)

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError


def _read_request(conn: socket.socket, data: bytes = b"") -> bytes | None:
    """Read one request with a ``Content-Length`` body (``data``: bytes already received), all of
    it: closing with bytes unread would be a reset. Returns what followed it; None at the end
    of the stream."""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, data = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(data) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    return data[length:]


class _AnswersOncePerConnection(_LoopbackServer):
    """Answers the first request on each connection and closes the connection after reading
    the second (a keep-alive close racing a request): requests counted as they arrive."""

    def __init__(self) -> None:
        self.requests = 0
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        with conn:
            data: bytes | None = b""
            for n in range(2):
                data = _read_request(conn, data or b"")
                if data is None:
                    return
                self.requests += 1
                if n == 0:
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")


def test_only_a_request_safe_to_repeat_is_sent_again_after_a_racing_close():
    """The server closes a kept-alive connection just as a request goes out on it (after the
    client's check that it is still open): a read or a put is sent again on a fresh connection;
    a POST that is neither (a prefetch) fails instead of running twice."""
    server = _AnswersOncePerConnection()
    direct = DirectAnswers("127.0.0.1", server.port, 30.0, 0)
    url = f"http://127.0.0.1:{server.port}/v1/x"

    def request(method: str) -> httpx.Request:
        return httpx.Request(method, url, content=b"body", headers={"content-length": "4"})

    try:
        assert direct.fetch(request("POST")).status_code == 200  # first on its connection
        with pytest.raises(httpx.RemoteProtocolError):
            direct.fetch(request("POST"))  # second: closed after reading it; not sent again
        assert server.requests == 2
        assert direct.fetch(request("PUT"), resend=True).status_code == 200  # a fresh connection
        assert direct.fetch(request("PUT"), resend=True).status_code == 200  # closed, sent again
        assert server.requests == 5
    finally:
        direct.close()
        server.sock.close()


def test_a_kept_alive_connection_the_server_dropped_is_retried_once(cache):
    port = free_port()
    with KVTierClient(f"http://127.0.0.1:{port}") as c:
        assert c._direct is not None
        for _ in range(2):  # the second server finds the first one's connection dead
            with serve_in_thread(cache, port=port):
                got, n = c.get("ns", ids(10**6, 4 * BT))
                assert n == 4 * BT
                del got
            assert len(c._direct._idle) == 1  # kept alive; the server going away closes it
        assert c._direct.calls == 2


class _DyingServer(_LoopbackServer):
    """Answers every request with a 200 announcing ``length`` bytes, sends ``sent`` of them and
    then closes (``sent`` None: sends nothing and never closes)."""

    def __init__(self, length: int, sent: int | None) -> None:
        self.length, self.sent = length, sent
        self.conns: list[socket.socket] = []
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        self.conns.append(conn)
        if _read_request(conn) is None or self.sent is None:
            return  # sent None: stall, the client's timeout has to end it
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/msgpack\r\n"
                     b"content-length: %d\r\n\r\n" % self.length + b"\x00" * self.sent)
        conn.close()

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


@pytest.mark.parametrize("sent", [0, 1 << 20])
def test_a_server_that_dies_mid_answer_is_a_transport_error(sent):
    server = _DyingServer(MAPPED_BYTES, sent)
    try:
        with KVTierClient(server.url) as c:
            with pytest.raises(httpx.RemoteProtocolError, match="closed the connection|RemoteDisconnected"):
                c.get("ns", ids(0, 10))
            assert c._direct is not None and c._direct._idle == [] and c._direct.calls == 0
    finally:
        server.close()


def test_a_server_that_stalls_is_a_read_timeout():
    server = _DyingServer(MAPPED_BYTES, None)
    try:
        with KVTierClient(server.url, timeout=1.0) as c, pytest.raises(httpx.ReadTimeout):
            c.get("ns", ids(0, 10))
    finally:
        server.close()


def test_no_server_is_a_connect_error():
    with KVTierClient(f"http://127.0.0.1:{free_port()}") as c, pytest.raises(httpx.ConnectError):
        c.get("ns", ids(0, 10))


def test_error_answers_are_the_ones_httpx_gives(cache):
    limited = ServerSettings(max_kv_bytes=TOKENS * LAYOUT.bytes_per_token // 2)
    with serve_in_thread(cache, limited) as u, serve_in_thread(cache, ServerSettings(tokens={"alpha-token-1": "a"})) as v:
        for transport in (None, httpx.HTTPTransport()):  # direct, then httpx's own
            with KVTierClient(u, transport=transport) as c:
                assert (c._direct is None) == (transport is not None)
                with pytest.raises(RemoteError) as too_big:
                    c.get("ns", ids(10**6))
                assert too_big.value.status == 413 and too_big.value.error == "PayloadTooLarge"
                assert c.get("ns", ids(10**6, 4 * BT))[1] == 4 * BT  # the connection still serves
            with KVTierClient(v, "wrong-token-9", transport=transport) as bad, \
                    pytest.raises(RemoteError) as denied:
                bad.get("ns", ids(10**6))
            assert denied.value.status == 401


def test_direct_only_where_httpx_would_send_the_request_as_it_is(monkeypatch):
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert DirectAnswers.for_client("http://127.0.0.1:8400", None, 5, 0) is not None
    assert DirectAnswers.for_client("https://127.0.0.1:8400", None, 5, 0) is None
    assert DirectAnswers.for_client("http://127.0.0.1:8400", httpx.HTTPTransport(), 5, 0) is None
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    assert DirectAnswers.for_client("http://sidecar.invalid:8400", None, 5, 0) is None
    monkeypatch.setenv("NO_PROXY", "sidecar.invalid")
    assert DirectAnswers.for_client("http://sidecar.invalid:8400", None, 5, 0) is not None
