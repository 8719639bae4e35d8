"""The statuses no other HTTP test produced, each from a real sidecar on loopback: 413 for
``--max-kv-bytes``, 403 for a disabled shared-memory path, 503 from ``/readyz`` (a closed cache,
a data directory gone), and 503/507 for ``BackendUnavailable``/``StorageFull``."""

from __future__ import annotations

import logging
import os
import shutil

import httpx
import msgpack
import pytest
import torch

from kvtier import CacheConfig, KVLayout, TieredCache
from kvtier.client import MSGPACK, KVTierClient, RemoteError, kv_to_wire, packed_nbytes
from kvtier.config import HostTierConfig, SSDTierConfig
from kvtier.errors import BackendUnavailable, StorageFull
from kvtier.server.testing import serve_in_thread
from kvtier.settings import ServerSettings

BT = 16
LAYOUT = KVLayout(2, ((2, 8), (2, 8)), "float32")  # 256 bytes per token


def kv(tokens: int):
    return [tuple(torch.ones(tokens, 2, 8) for _ in range(2)) for _ in range(2)]


def ids(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


@pytest.fixture
def cache(tmp_path):
    cfg = CacheConfig(block_tokens=BT, host=HostTierConfig(capacity_bytes="4MiB"),
                      ssd=SSDTierConfig(path=str(tmp_path / "ssd"), capacity_bytes="64MiB",
                                        direct_io=False, min_free_bytes=0))
    with TieredCache(cfg) as c:
        yield c


def test_413_for_data_plane_transfers_over_max_kv_bytes(cache):
    limit = packed_nbytes(LAYOUT, 64)  # 16 KiB of KV
    with serve_in_thread(cache, ServerSettings(max_kv_bytes=limit)) as url, \
            KVTierClient(url) as msgpack_client, KVTierClient(url, use_shm=True) as shm_client:
        msgpack_client.register_namespace("kv", layout=LAYOUT, block_tokens=BT)
        assert msgpack_client.put("kv", ids(48), kv(48)) == 48  # under the limit: fine
        body = msgpack.packb({"namespace": "kv", "token_ids": ids(96), "kv": kv_to_wire(kv(96))})
        resp = httpx.put(url + "/v1/kv", content=body, headers={"content-type": MSGPACK})
        assert resp.status_code == 413 and "exceeds the limit" in resp.json()["message"]
        chunked = httpx.put(url + "/v1/kv", content=iter([body[:8192], body[8192:]]),
                            headers={"content-type": MSGPACK})  # no Content-Length: counted as read
        assert chunked.status_code == 413 and chunked.json()["error"] == "PayloadTooLarge"
        for client in (msgpack_client, shm_client):
            with pytest.raises(RemoteError) as e:
                client.put("kv", ids(96, 1000), kv(96))
            assert e.value.status == 413, e.value
        assert msgpack_client.lookup("kv", ids(96, 1000)).tokens == 0
        assert shm_client.put("kv", ids(64, 2000), kv(64)) == 64  # at the limit: fine
        got, n = shm_client.get("kv", ids(64, 2000))
        assert n == 64


def test_413_for_an_answer_over_max_kv_bytes(cache):
    with serve_in_thread(cache) as url, KVTierClient(url) as c:
        c.register_namespace("kv", layout=LAYOUT, block_tokens=BT)
        assert c.put("kv", ids(96), kv(96)) == 96
    with serve_in_thread(cache, ServerSettings(max_kv_bytes=packed_nbytes(LAYOUT, 64))) as url, \
            KVTierClient(url) as c, KVTierClient(url, use_shm=True) as shm:
        for client in (c, shm):
            with pytest.raises(RemoteError) as e:
                client.get("kv", ids(96))
            assert e.value.status == 413, e.value
        got, n = c.get("kv", ids(64))
        assert n == 64


def test_403_for_every_shared_memory_route_when_disabled(cache):
    with serve_in_thread(cache, ServerSettings(shm=False)) as url, KVTierClient(url, use_shm=True) as c:
        c.register_namespace("kv", layout=LAYOUT, block_tokens=BT)
        for method, path in (("GET", "/v1/kv/shm/socket"), ("PUT", "/v1/kv/shm"), ("POST", "/v1/kv/shm/get")):
            resp = httpx.request(method, url + path, json={})
            assert resp.status_code == 403, (path, resp.text)
            assert "disabled" in resp.json()["message"]
        for call in (lambda: c.put("kv", ids(32), kv(32)), lambda: c.get("kv", ids(32))):
            with pytest.raises(RemoteError) as e:
                call()
            assert e.value.status == 403 and "--shm false" in e.value.message
        assert c.lookup("kv", ids(32)).tokens == 0
        with KVTierClient(url) as plain:  # the msgpack data plane still works
            assert plain.put("kv", ids(32), kv(32)) == 32


def test_readyz_503_when_the_cache_is_closed(tmp_path):
    cfg = CacheConfig(block_tokens=BT, host=HostTierConfig(capacity_bytes="1MiB"))
    cache = TieredCache(cfg)
    with serve_in_thread(cache) as url:
        assert httpx.get(url + "/readyz").status_code == 200
        cache.close()
        resp = httpx.get(url + "/readyz")
        assert resp.status_code == 503
        assert resp.json() == {"status": "unavailable", "detail": "the cache is closed"}
        assert httpx.get(url + "/healthz").status_code == 200  # alive, just not ready


def test_readyz_503_when_the_data_directory_is_gone(cache):
    where = cache.config.ssd.path
    with serve_in_thread(cache) as url:
        assert httpx.get(url + "/readyz").status_code == 200
        moved = where + ".moved"
        shutil.move(where, moved)
        with open(where, "wb") as f:  # a file where the directory was: nothing can be written
            f.write(b"not a directory")
        try:
            resp = httpx.get(url + "/readyz")
            assert resp.status_code == 503, resp.text
            body = resp.json()
            assert body["status"] == "unavailable" and "not writable" in body["detail"]
        finally:
            os.unlink(where)
            shutil.move(moved, where)
        assert httpx.get(url + "/readyz").status_code == 200  # recovers with its directory


@pytest.mark.parametrize("exc, status", [
    (BackendUnavailable("remote redis breaker is open; put dropped"), 503),
    (StorageFull("ssd tier: no space left on the device"), 507),
])
def test_503_and_507_come_back_as_the_same_error(cache, monkeypatch, caplog, exc, status):
    """The manager turns today's remote outages into misses and full tiers into short puts, so
    no workload makes the cache raise these yet (the full-disk work will: a put that cannot be
    stored durably is ``StorageFull``). The cache's own put raises them here; everything from
    there on is the real server: status, JSON body, the client's exception class, the log."""
    with serve_in_thread(cache) as url, KVTierClient(url) as client, \
            KVTierClient(url, use_shm=True) as shm_client:
        client.register_namespace("kv", layout=LAYOUT, block_tokens=BT)

        def failing_put(*args, **kw):
            raise exc

        monkeypatch.setattr(cache, "put", failing_put)
        body = msgpack.packb({"namespace": "kv", "token_ids": ids(32), "kv": kv_to_wire(kv(32))})
        resp = httpx.put(url + "/v1/kv", content=body, headers={"content-type": MSGPACK})
        assert resp.status_code == status
        assert resp.json() == {"error": type(exc).__name__, "message": str(exc), "status": status}
        for c in (client, shm_client):
            with pytest.raises(type(exc), match=str(exc)):
                c.put("kv", ids(32), kv(32))
        assert any(r.levelno == logging.ERROR and type(exc).__name__ in r.getMessage()
                   for r in caplog.records)
        monkeypatch.undo()
        assert client.put("kv", ids(32), kv(32)) == 32
