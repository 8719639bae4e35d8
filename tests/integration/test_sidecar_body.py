"""msgpack put bodies received straight into the route's buffer (``kvtier.server.protocol``),
against the real sidecar on loopback: the bytes stored are the bytes sent, whatever the socket
does around the body (split in small writes, a request pipelined right behind it, the client
going away or stalling half-way), and recycled body buffers never mix two puts."""

from __future__ import annotations

import socket
import threading
import time
from urllib.parse import urlsplit

import httpx
import msgpack
import pytest
import torch

from kvtier import CacheConfig, KVLayout, TieredCache
from kvtier.client import MSGPACK, KVTierClient, kv_to_wire
from kvtier.config import HostTierConfig
from kvtier.server import protocol
from kvtier.server.testing import serve_in_thread

BT = 16
LAYOUT = KVLayout(2, ((4, 64),), "float32")  # 2 KiB a token: 1,024 tokens make a 2 MiB body
TOKENS = 1024


def rand_kv(seed: int, tokens: int = TOKENS) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(tokens, *s, generator=g) for s in LAYOUT.tensor_shapes)
            for _ in range(LAYOUT.num_layers)]


def ids(start: int, n: int = TOKENS) -> list[int]:
    return list(range(start, start + n))


def put_request(namespace: str, token_ids: list[int], kv, host: str) -> bytes:
    body = msgpack.packb({"namespace": namespace, "token_ids": token_ids, "kv": kv_to_wire(kv)})
    head = (f"PUT /v1/kv HTTP/1.1\r\nhost: {host}\r\ncontent-type: {MSGPACK}\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode()
    return head + body


def read_response(f) -> tuple[int, bytes]:
    status = int(f.readline().split()[1])
    length = 0
    while (line := f.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    return status, f.read(length)


@pytest.fixture()
def sidecar():
    config = CacheConfig(block_tokens=BT, host=HostTierConfig(capacity_bytes="64MiB"))
    with TieredCache(config) as cache, serve_in_thread(cache) as url, KVTierClient(url) as client:
        yield url, client, cache


def assert_stored(client: KVTierClient, token_ids: list[int], kv) -> None:
    got, n = client.get("ns", token_ids)
    assert n == len(token_ids)
    for lg, lw in zip(got, kv, strict=True):
        for g, w in zip(lg, lw, strict=True):
            assert torch.equal(g, w)


def test_big_put_body_goes_straight_into_the_routes_buffer(sidecar):
    _, client, _ = sidecar
    before = protocol.DirectBodyProtocol.direct_bytes
    kv = rand_kv(1)
    assert client.put("ns", ids(0), kv) == TOKENS
    assert protocol.DirectBodyProtocol.direct_bytes - before > TOKENS * LAYOUT.bytes_per_token // 2
    assert_stored(client, ids(0), kv)


def test_body_in_small_writes_then_a_pipelined_request_behind_it(sidecar):
    url, client, _ = sidecar
    u = urlsplit(url)
    kv1, kv2 = rand_kv(2), rand_kv(3)
    first, second = put_request("ns", ids(0), kv1, u.netloc), put_request("ns", ids(10_000), kv2, u.netloc)
    with socket.create_connection((u.hostname, u.port)) as s, s.makefile("rb") as f:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cut = len(first) - 100_000
        for i in range(0, cut, 65_536):  # the body arrives in many pieces while the route waits
            s.sendall(first[i:min(i + 65_536, cut)])
        s.sendall(first[cut:] + second)  # the end of one body and the next request in one write
        assert read_response(f)[0] == 200
        assert read_response(f)[0] == 200
    assert_stored(client, ids(0), kv1)
    assert_stored(client, ids(10_000), kv2)


def test_client_gone_half_way_stores_nothing_and_the_server_goes_on(sidecar):
    url, client, cache = sidecar
    u = urlsplit(url)
    req = put_request("ns", ids(0), rand_kv(4), u.netloc)
    with socket.create_connection((u.hostname, u.port)) as s:
        s.sendall(req[: len(req) // 2])
        time.sleep(0.2)  # let the route start receiving; closing earlier tests less, not wrongly
    kv = rand_kv(5)
    assert client.put("ns", ids(50_000), kv) == TOKENS  # the server still answers
    assert client.lookup("ns", ids(0)).tokens == 0
    assert_stored(client, ids(50_000), kv)


def test_stalled_body_is_a_disconnect(sidecar, monkeypatch):
    monkeypatch.setattr(protocol, "IDLE_TIMEOUT_S", 0.5)
    url, client, _ = sidecar
    u = urlsplit(url)
    req = put_request("ns", ids(0), rand_kv(6), u.netloc)
    with socket.create_connection((u.hostname, u.port)) as s:
        s.sendall(req[: len(req) // 2])
        s.settimeout(30)
        assert s.recv(1) == b""  # the server closed the connection: nothing answered, nothing stored
    assert client.lookup("ns", ids(0)).tokens == 0
    assert httpx.get(f"{url}/healthz").status_code == 200


def test_recycled_body_buffers_never_mix_puts(sidecar):
    url, _, _ = sidecar
    kvs = {i: rand_kv(100 + i) for i in range(6)}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            with KVTierClient(url) as c:
                for r in range(3):
                    assert c.put("ns", ids(1_000_000 * (i + 1) + 10_000 * r), kvs[i]) == TOKENS
        except BaseException as e:  # noqa: BLE001  reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(kvs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    with KVTierClient(url) as c:
        for i, kv in kvs.items():
            for r in range(3):
                assert_stored(c, ids(1_000_000 * (i + 1) + 10_000 * r), kv)


def test_expect_100_continue_is_answered_before_the_body(sidecar):
    url, client, _ = sidecar
    u = urlsplit(url)
    kv = rand_kv(8)
    req = put_request("ns", ids(0), kv, u.netloc)
    head, _, body = req.partition(b"\r\n\r\n")
    with socket.create_connection((u.hostname, u.port)) as s, s.makefile("rb") as f:
        s.settimeout(30)
        s.sendall(head + b"\r\nexpect: 100-continue\r\n\r\n")
        assert f.readline().startswith(b"HTTP/1.1 100")  # the client waits for this before sending
        assert f.readline() == b"\r\n"
        s.sendall(body)
        assert read_response(f)[0] == 200
    assert_stored(client, ids(0), kv)


def test_a_get_answer_is_plain_msgpack_sent_from_the_tensors_with_its_length(sidecar):
    """The answer is streamed as pieces around the tensors' own bytes: a plain msgpack peer reads
    it whole, its Content-Length is exact (no chunked framing), and a second request on the same
    connection behind it is answered too."""
    url, client, _ = sidecar
    kv = rand_kv(7)
    assert client.put("ans", ids(0), kv) == TOKENS
    body = msgpack.packb({"namespace": "ans", "token_ids": ids(0)})
    with httpx.Client(base_url=url) as http:
        for _ in range(2):  # one keep-alive connection: the first answer ended where it said
            resp = http.post("/v1/kv/get", content=body, headers={"content-type": MSGPACK})
            assert resp.status_code == 200
            assert "chunked" not in resp.headers.get("transfer-encoding", "")
            assert int(resp.headers["content-length"]) == len(resp.content)
            d = msgpack.unpackb(resp.content)
            assert d["tokens"] == TOKENS
            for layer, want in zip(d["kv"], kv, strict=True):
                for item, t in zip(layer, want, strict=True):
                    assert item["shape"] == list(t.shape) and item["dtype"] == "float32"
                    assert item["data"] == t.numpy().tobytes()
    got, n = client.get("ans", ids(0))
    assert n == TOKENS and all(torch.equal(a, b) for la, lb in zip(got, kv, strict=True) for a, b in zip(la, lb, strict=True))
