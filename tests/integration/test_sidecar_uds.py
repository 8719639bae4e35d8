"""The sidecar's HTTP API on a Unix socket (``kvtier serve --uds``) beside its TCP port, against the
real server: the same cache, errors and bearer tokens on both; the socket file 0600, taken over
when a dead server left it, refused when another server listens on it or it is not a socket,
removed on a clean stop. And the client's direct body path: a put's KV sent as it lies in
memory (``kvtier.client_answers``), with the server's early 413 still the answer."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from kvtier import CacheConfig, KVLayout, TieredCache
from kvtier.client import AsyncKVTierClient, KVTierClient, RemoteError
from kvtier.client_answers import split_url
from kvtier.config import HostTierConfig
from kvtier.errors import InvalidRequest
from kvtier.server.testing import free_port, serve_in_thread
from kvtier.server.unix_socket import listen_unix
from kvtier.settings import ServerSettings
from kvtier.wire import MSGPACK, PIECE_BYTES
from tests.conftest import random_kv

ROOT = Path(__file__).resolve().parents[2]
BT = 64
LAYOUT = KVLayout(2, ((8, 64), (8, 64)), "float32")  # 8 KiB a token
TOKENS = 4 * PIECE_BYTES // LAYOUT.bytes_per_token  # a body of several pieces: the direct path


def rand_kv(seed: int, tokens: int = TOKENS) -> list[tuple[torch.Tensor, ...]]:
    return random_kv(tokens, LAYOUT.num_layers, 8, 64, seed=seed)  # LAYOUT's shapes


def same(got, want) -> bool:
    return got is not None and all(torch.equal(g, w) for lg, lw in zip(got, want, strict=True)
                                   for g, w in zip(lg, lw, strict=True))


@pytest.fixture()
def cache() -> Iterator[TieredCache]:
    with TieredCache(CacheConfig(block_tokens=BT, host=HostTierConfig(capacity_bytes="256MiB"))) as c:
        yield c


def test_the_unix_socket_serves_the_same_cache_and_errors_as_tcp(cache, tmp_path):
    sock = tmp_path / "run" / "http.sock"
    with serve_in_thread(cache, ServerSettings(uds=str(sock))) as url:
        st = sock.stat()
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        with KVTierClient(f"unix://{sock}") as unix, KVTierClient(url) as tcp:
            unix.register_namespace("u", layout=LAYOUT)
            kv, ids = rand_kv(1), list(range(TOKENS))
            before = unix._direct.calls
            assert unix.put("u", ids, kv) == TOKENS
            assert unix._direct.calls == before + 1  # the KV went as it lies, not through httpx
            got, n = tcp.get("u", ids)  # stored through one listener, served by the other
            assert n == TOKENS and same(got, kv)
            got, n = unix.get("u", ids)
            assert n == TOKENS and same(got, kv)
            assert unix.lookup("u", ids).tokens == TOKENS
            assert unix.put("u", ids, kv) == 0  # already stored: nothing new, as over TCP
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://kvtier") as h:
            bad = h.put("/v1/kv", content=b"\xc1 not msgpack", headers={"content-type": MSGPACK})
            assert bad.status_code == 400 and "malformed msgpack" in bad.json()["message"]
            missing = h.post("/v1/lookup", json={"namespace": "u"})
            assert missing.status_code == 422 and "token_ids" in missing.text
            assert h.get("/metrics").status_code == 200
    assert not sock.exists()  # removed when the server stopped


def test_the_async_client_over_the_unix_socket(cache, tmp_path):
    sock = tmp_path / "http.sock"

    async def run() -> None:
        async with AsyncKVTierClient(f"unix://{sock}") as client:
            await client.register_namespace("a", layout=LAYOUT)
            kv, ids = rand_kv(2), list(range(1000, 1000 + TOKENS))
            assert await client.put("a", ids, kv) == TOKENS
            got, n = await client.get("a", ids)
            assert n == TOKENS and same(got, kv)
            assert client._direct.calls == 2

    with serve_in_thread(cache, ServerSettings(uds=str(sock))):
        asyncio.run(run())


def test_the_unix_socket_asks_for_the_same_bearer_token(cache, tmp_path):
    sock = tmp_path / "http.sock"
    with serve_in_thread(cache, ServerSettings(uds=str(sock), tokens={"tok-a": "tenant-a"})):
        with KVTierClient(f"unix://{sock}") as anonymous, pytest.raises(RemoteError) as e:
            anonymous.register_namespace("t", layout=LAYOUT)
        assert e.value.status == 401
        with KVTierClient(f"unix://{sock}", "tok-b") as wrong, pytest.raises(RemoteError) as e:
            wrong.put("t", list(range(TOKENS)), rand_kv(3))  # a KV body on the direct path
        assert e.value.status == 401
        with KVTierClient(f"unix://{sock}", "tok-a") as client:
            client.register_namespace("t", layout=LAYOUT)
            assert client.put("t", list(range(TOKENS)), rand_kv(3)) == TOKENS


def test_a_socket_path_in_use_or_not_a_socket_is_refused_and_a_dead_ones_taken_over(tmp_path):
    path = tmp_path / "http.sock"
    listener, _ = listen_unix(path, socket.SOCK_STREAM, "HTTP socket", "--uds")
    try:
        with pytest.raises(InvalidRequest, match="HTTP socket .* is in use by another server"):
            listen_unix(path, socket.SOCK_STREAM, "HTTP socket", "--uds")
    finally:
        listener.close()  # a server that died: its file stays, nobody listens
    assert path.exists()
    listener, _ = listen_unix(path, socket.SOCK_STREAM, "HTTP socket", "--uds")
    listener.close()
    regions = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # e.g. --uds set to --shm-socket's path
    regions.bind(str(tmp_path / "regions.sock"))
    regions.listen(1)
    with regions, pytest.raises(InvalidRequest, match="cannot take over"):
        listen_unix(tmp_path / "regions.sock", socket.SOCK_STREAM, "HTTP socket", "--uds")
    assert (tmp_path / "regions.sock").exists()  # another server's socket is left alone
    other = tmp_path / "data.txt"
    other.write_text("kept")
    with pytest.raises(InvalidRequest, match="exists and is not a socket"):
        listen_unix(other, socket.SOCK_STREAM, "HTTP socket", "--uds")
    assert other.read_text() == "kept"
    with pytest.raises(InvalidRequest, match="too long for a Unix socket.*--uds"):
        listen_unix(tmp_path / ("x" * 120), socket.SOCK_STREAM, "HTTP socket", "--uds")


def test_a_unix_url_names_an_absolute_socket_path():
    assert split_url("unix:///run/kvtier/http.sock") == ("http://localhost", "/run/kvtier/http.sock")
    assert split_url("http://127.0.0.1:8400") == ("http://127.0.0.1:8400", None)
    with pytest.raises(ValueError, match="absolute path"):
        KVTierClient("unix://run/kvtier.sock")


def test_a_put_over_the_limit_gets_the_servers_413_not_a_broken_pipe(cache):
    """The server answers 413 from the length alone and closes the connection while the client
    is still sending 32 MiB: the client reads that answer instead of failing on the send."""
    tokens = 32 * 2**20 // LAYOUT.bytes_per_token
    with serve_in_thread(cache, ServerSettings(max_kv_bytes=2**20)) as url, KVTierClient(url) as client:
        client.register_namespace("big", layout=LAYOUT)
        for attempt in range(3):  # and again on the connections that follow
            with pytest.raises(RemoteError) as e:
                client.put("big", list(range(attempt * tokens, (attempt + 1) * tokens)), rand_kv(4, tokens))
            assert e.value.status == 413 and "exceeds the limit" in e.value.message
        assert client.lookup("big", list(range(tokens))).tokens == 0
        small = rand_kv(5, 64)
        assert client.put("big", list(range(64)), small) == 64


def test_an_answer_sent_before_the_body_was_read_is_the_answer():
    """A server (or a proxy in front of one) that answers 413 from the headers and closes
    without reading the body: the client's send fails mid-body (a reset or a broken pipe), and
    the answer already on the connection is what the caller gets, every time."""
    body = json.dumps({"error": "PayloadTooLarge", "message": "body over the proxy's limit"}).encode()
    head = (b"HTTP/1.1 413 Payload Too Large\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body))

    def answer_early(listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # closed: the test is over
                return
            with conn:
                got = b""
                while b"\r\n\r\n" not in got:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    got += chunk
                else:
                    conn.sendall(head + body)  # and close with the body unread: a reset

    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=answer_early, args=(listener,), daemon=True).start()
    try:
        with KVTierClient(f"http://127.0.0.1:{listener.getsockname()[1]}") as client:
            for _ in range(5):
                with pytest.raises(RemoteError) as e:
                    client.put("early", list(range(8 * TOKENS)), rand_kv(7, 8 * TOKENS))  # 32 MiB
                assert e.value.status == 413 and e.value.message == "body over the proxy's limit"
    finally:
        listener.close()


def test_a_cancelled_async_put_stops_sending_before_the_cancellation_returns():
    """An ``AsyncKVTierClient.put`` cancelled mid-body: the rest of the body is not sent (the
    server sees the connection end short of the length, so stores nothing), and by the time
    the cancellation reaches the caller nothing reads the caller's tensors any more."""
    total = 64 * 2**20
    received = [0]
    started, ended = threading.Event(), threading.Event()

    def slow_reader(listener: socket.socket) -> None:
        conn, _ = listener.accept()
        with conn:
            while chunk := conn.recv(65536):
                received[0] += len(chunk)
                if received[0] >= 2**20:
                    started.set()
                time.sleep(0.002)  # a slow server: the body takes seconds to arrive
        ended.set()  # the client closed the connection

    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=slow_reader, args=(listener,), daemon=True).start()
    tokens = total // LAYOUT.bytes_per_token

    async def run() -> None:
        async with AsyncKVTierClient(f"http://127.0.0.1:{listener.getsockname()[1]}") as client:
            put = asyncio.ensure_future(client.put("c", list(range(tokens)), rand_kv(8, tokens)))
            assert await asyncio.to_thread(started.wait, 60), "the put never started sending"
            put.cancel()
            with pytest.raises(asyncio.CancelledError):
                await put
            at_cancel = received[0]
            assert ended.wait(60), "the client kept the connection open after the cancellation"
            assert received[0] < total and received[0] - at_cancel <= 8 * 2**20  # socket buffers

    try:
        asyncio.run(run())
    finally:
        listener.close()


def test_kvtier_serve_uds_from_the_command_line(tmp_path):
    """The real command: both listeners up, the socket removed on SIGTERM; a bad ``--uds`` is one
    line on stderr and exit status 2."""
    sock, port = tmp_path / "http.sock", free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "kvtier.commands.serve", "--port", str(port), "--ssd", "false",
           "--host-capacity", "64MiB", "--data-dir", str(tmp_path / "data"), "--log-level", "warning"]
    proc = subprocess.Popen([*cmd, "--uds", str(sock)], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "kvtier serve --uds did not create its socket"
            time.sleep(0.05)
        with KVTierClient(f"unix://{sock}") as unix:
            while True:
                try:
                    unix.register_namespace("c", layout=LAYOUT, block_tokens=BT)
                    break
                except httpx.TransportError:  # bound, not serving yet
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
            assert unix.put("c", list(range(BT)), rand_kv(6, BT)) == BT
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert not sock.exists()
    not_a_socket = tmp_path / "file"
    not_a_socket.write_text("x")
    r = subprocess.run([*cmd, "--uds", str(not_a_socket)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "exists and is not a socket" in r.stderr and "Traceback" not in r.stderr, r.stderr
