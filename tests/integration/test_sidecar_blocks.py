"""The key-addressed block API through the real sidecar on loopback: both clients, raw HTTP
with hex keys in JSON, bad input (4xx, nothing stored) and tenancy."""

from __future__ import annotations

import httpx
import msgpack
import numpy as np
import pytest
import torch

from kvtier import BlockHits, CacheConfig, FingerprintMismatch, TieredCache, UnknownNamespace
from kvtier.client import AsyncKVTierClient, KVTierClient, RemoteError
from kvtier.client_calls import Pieces
from kvtier.config import HostTierConfig, SSDTierConfig
from kvtier.errors import InvalidRequest, InvalidType
from kvtier.server.testing import serve_in_thread
from kvtier.settings import ServerSettings
from kvtier.wire import MSGPACK, PIECE_BYTES
from tests.conftest import random_bytes

PAGE = 4096
FP = {"model": "tiny", "kv_dtype": "float16", "block_tokens": 16, "tp_rank": 0}


@pytest.fixture
def cache(tmp_path):
    cfg = CacheConfig(host=HostTierConfig(capacity_bytes="1MiB", page_bytes="16KiB"),
                      ssd=SSDTierConfig(path=str(tmp_path / "ssd"), capacity_bytes="64MiB",
                                        direct_io=False, min_free_bytes=0))
    with TieredCache(cfg) as c:
        yield c


def keys(n: int, start: int = 0) -> list[bytes]:
    return [i.to_bytes(32, "big") for i in range(start, start + n)]


def pages(n: int, seed: int = 0) -> torch.Tensor:
    return random_bytes(n * PAGE, seed).view(n, PAGE)


def test_blocks_round_trip_through_the_client(cache):
    p = pages(5)
    with serve_in_thread(cache) as url, KVTierClient(url) as client:
        ns = client.register_block_namespace("eng", page_bytes=PAGE, fingerprint=FP)
        assert ns.kind == "pages" and ns.page_bytes == PAGE
        assert client.put_blocks("eng", keys(5), p) == 5
        assert client.put_blocks("eng", keys(2), [r.numpy().tobytes() for r in pages(2, 7)]) == 0
        assert client.block_exists("eng", [*keys(3), b"no", *keys(2, 3)]) == BlockHits(
            3, [True, True, True, False, True, True])
        out = torch.zeros(6, PAGE, dtype=torch.uint8)
        assert client.get_blocks_into("eng", [*keys(2), b"no", *keys(3, 2)], out) == 2
        assert torch.equal(out[:2], p[:2]) and not out[2:].any()
        rows = [torch.zeros(PAGE, dtype=torch.uint8) for _ in range(5)]
        assert client.get_blocks_into("eng", keys(5), rows) == 5
        assert all(torch.equal(r, p[i]) for i, r in enumerate(rows))
        assert client.evict_blocks("eng", keys(1)) == 1
        assert client.block_exists("eng", keys(2)).present == [False, True]
        s = client.stats().namespaces["eng"]
        assert s.lookups == 2 and s.tokens_put == 5


def test_a_miss_is_a_count_of_zero_never_an_error(cache):
    """No stored page at the head of the keys (a cold cache, an evicted first page): the answer
    is 0 rows, on both clients. Every such call used to answer 500 (an empty run of pages could
    not be sent), and a miss is what the engines' connectors meet most."""
    p = pages(3, seed=11)
    with serve_in_thread(cache) as url, KVTierClient(url) as client:
        client.register_block_namespace("eng", page_bytes=PAGE, fingerprint=FP)
        out = torch.full((3, PAGE), 7, dtype=torch.uint8)
        assert client.get_blocks_into("eng", keys(3), out) == 0  # nothing stored yet
        assert client.put_blocks("eng", keys(3), p) == 3
        assert client.evict_blocks("eng", keys(1)) == 1
        assert client.get_blocks_into("eng", keys(3), out) == 0  # the first page is gone
        assert client.get_blocks_into("eng", [], torch.empty(0, PAGE, dtype=torch.uint8)) == 0
        assert client.put_blocks("eng", [], torch.empty(0, PAGE, dtype=torch.uint8)) == 0  # raised TypeError
        assert client.get_blocks_into("eng", keys(2, 1), out) == 2
        assert torch.equal(out[:2], p[1:])


async def test_async_client_round_trip(cache):
    p = pages(3, seed=3)
    with serve_in_thread(cache) as url:
        async with AsyncKVTierClient(url) as client:
            await client.register_block_namespace("eng", page_bytes=PAGE, fingerprint=FP, codec="zstd")
            assert await client.put_blocks("eng", keys(3), p) == 3
            assert (await client.block_exists("eng", keys(3))).leading == 3
            out = torch.empty(3, PAGE, dtype=torch.uint8)
            assert await client.get_blocks_into("eng", keys(3), out) == 3 and torch.equal(out, p)
            assert await client.evict_blocks("eng", keys(3)) == 3


def test_raw_http_json_hex_keys(cache):
    with serve_in_thread(cache) as url, httpx.Client(base_url=url) as http:
        r = http.post("/v1/block-namespaces", json={"name": "eng", "page_bytes": PAGE, "fingerprint": FP})
        assert r.status_code == 201 and r.json()["page_bytes"] == PAGE
        body = msgpack.packb({"namespace": "eng", "keys": keys(2), "pages": pages(2).numpy().tobytes()})
        r = http.put("/v1/blocks", content=body, headers={"content-type": MSGPACK})
        assert r.status_code == 200 and r.json() == {"stored": 2}
        r = http.post("/v1/blocks/exists", json={"namespace": "eng", "keys": [k.hex() for k in keys(3)]})
        assert r.json() == {"leading": 2, "present": [True, True, False]}
        r = http.post("/v1/blocks/get", json={"namespace": "eng", "keys": [k.hex() for k in keys(3)]})
        d = msgpack.unpackb(r.content)
        assert d["count"] == 2 and d["pages"] == pages(2).numpy().tobytes()


def test_bad_input_is_4xx_and_stores_nothing(cache):
    with serve_in_thread(cache) as url, KVTierClient(url) as client, httpx.Client(base_url=url) as http:
        client.register_block_namespace("eng", page_bytes=PAGE, fingerprint=FP)

        def put(body: dict, ctype: str = MSGPACK) -> httpx.Response:
            return http.put("/v1/blocks", content=msgpack.packb(body), headers={"content-type": ctype})

        r = put({"namespace": "nope", "keys": keys(1), "pages": pages(1).numpy().tobytes()})
        assert r.status_code == 404 and r.json()["error"] == "UnknownNamespace"
        r = put({"namespace": "eng", "keys": [b"x" * 65], "pages": pages(1).numpy().tobytes()})
        assert r.status_code == 400 and "1..64 bytes" in r.json()["message"]
        r = put({"namespace": "eng", "keys": keys(2), "pages": pages(2).numpy().tobytes()[:-1]})
        assert r.status_code == 400 and "need 8192" in r.json()["message"]
        r = put({"namespace": "eng", "keys": [1, 2], "pages": pages(2).numpy().tobytes()})
        assert r.status_code == 422
        r = put({"namespace": "eng", "keys": keys(1), "pages": "zz"})
        assert r.status_code == 422
        r = put({"namespace": "eng", "keys": keys(1), "pages": b"", "extra": 1})
        assert r.status_code == 400
        r = http.put("/v1/blocks", json={"namespace": "eng", "keys": [], "pages": ""})
        assert r.status_code == 415
        r = http.post("/v1/blocks/exists", json={"namespace": "eng", "keys": ["not-hex"]})
        assert r.status_code == 400
        r = http.post("/v1/block-namespaces", json={"name": "eng", "page_bytes": PAGE,
                                                    "fingerprint": {**FP, "kv_dtype": "fp8"}})
        assert r.status_code == 400 and r.json()["error"] == "FingerprintMismatch"
        r = http.post("/v1/block-namespaces", json={"name": "q", "page_bytes": PAGE, "fingerprint": FP,
                                                    "codec": "int8"})
        assert r.status_code == 400 and "lossless" in r.json()["message"]
        assert client.block_exists("eng", keys(2)).present == [False, False]
        assert cache.stats().tiers["host"].blocks == 0
        # The client raises the same classes, before sending what it can check itself.
        with pytest.raises(FingerprintMismatch):
            client.register_block_namespace("eng", page_bytes=PAGE * 2, fingerprint=FP)
        with pytest.raises(UnknownNamespace):
            client.block_exists("nope", keys(1))
        with pytest.raises(InvalidRequest, match="4096 bytes"):
            client.put_blocks("eng", keys(1), [b"short"])
        with pytest.raises(InvalidType):
            client.put_blocks("eng", ["0a"], pages(1))


def test_tenants_never_see_each_others_blocks(cache):
    settings = ServerSettings(tokens={"alpha-token-1": "alpha", "beta-token-22": "beta"})
    with serve_in_thread(cache, settings) as url, KVTierClient(url, "alpha-token-1") as a, \
            KVTierClient(url, "beta-token-22") as b:
        a.register_block_namespace("eng", page_bytes=PAGE, fingerprint=FP)
        b.register_block_namespace("eng", page_bytes=PAGE, fingerprint=FP)
        a.put_blocks("eng", keys(2), pages(2))
        assert b.block_exists("eng", keys(2)).leading == 0  # same short name, same keys: disjoint
        with pytest.raises(RemoteError) as e:
            b.block_exists("alpha/eng", keys(2))
        assert e.value.status == 403
        assert a.block_exists("alpha/eng", keys(2)).leading == 2


def test_pages_over_a_mebibyte(cache):
    """An engine page is often over 1 MiB (Llama-3-8B bf16, 16 tokens a block: 2 MiB); the
    namespace's answer once failed its own response model there (a 500 for every call)."""
    page = 2 << 20
    p = random_bytes(2 * page, 5).view(2, page)
    with serve_in_thread(cache) as url, KVTierClient(url) as client:
        ns = client.register_block_namespace("big", page_bytes=page, fingerprint=FP)
        assert ns.page_bytes == page and client.get_namespace("big").page_bytes == page
        assert [n.page_bytes for n in client.namespaces() if n.name == "big"] == [page]
        op = client._ops.put_blocks("big", keys(2), p)  # the pages go out as they lie, in pieces
        call = next(op)
        op.close()
        assert isinstance(call.content, Pieces) and max(map(len, call.content)) <= PIECE_BYTES
        assert any(np.shares_memory(np.frombuffer(x, np.uint8), p.numpy())
                   for x in call.content if isinstance(x, memoryview))
        assert client.put_blocks("big", keys(2), p) == 2
        out = torch.zeros(2, page, dtype=torch.uint8)
        assert client.get_blocks_into("big", keys(2), out) == 2 and torch.equal(out, p)


def test_pages_over_the_data_plane_limit_go_in_parts(cache):
    """An engine job of more pages than the sidecar's ``--max-kv-bytes`` was refused whole (413)
    every time, stores and loads alike; the client now halves a refused call until each part
    fits, and a load stops at the first part that came back short (the leading run)."""
    p = pages(20, seed=13)
    with serve_in_thread(cache, ServerSettings(max_kv_bytes=6 * PAGE)) as url, KVTierClient(url) as client:
        client.register_block_namespace("eng", page_bytes=PAGE, fingerprint=FP)
        assert client.put_blocks("eng", keys(20), p) == 20
        out = torch.zeros(20, PAGE, dtype=torch.uint8)
        assert client.get_blocks_into("eng", keys(20), out) == 20 and torch.equal(out, p)
        assert client.evict_blocks("eng", keys(1, 12)) == 1  # the run ends before page 12
        out.zero_()
        assert client.get_blocks_into("eng", keys(20), list(out)) == 12
        assert torch.equal(out[:12], p[:12])
        with pytest.raises(RemoteError) as e:  # one page over the limit cannot be split
            client.register_block_namespace("big", page_bytes=8 * PAGE, fingerprint=FP)
            client.put_blocks("big", keys(1), torch.zeros(1, 8 * PAGE, dtype=torch.uint8))
        assert e.value.status == 413
