"""Namespace lifecycle races through the real sidecar: a drop while a put is in flight."""

from __future__ import annotations

import contextlib
import threading

import torch

from kvtier import CacheConfig, HostTierConfig, TieredCache
from kvtier.client import KVTierClient
from kvtier.errors import KVTierError, UnknownNamespace
from kvtier.server.testing import serve_in_thread
from kvtier.settings import ServerSettings
from tests.conftest import random_kv

BT = 16
TOKEN = "token-of-tenant-a"


def test_drop_during_a_put_never_recreates_the_namespace_outside_its_tenant(monkeypatch):
    cfg = CacheConfig(block_tokens=256, host=HostTierConfig(capacity_bytes="4MiB"))
    with TieredCache(cfg) as cache, \
            serve_in_thread(cache, ServerSettings(tokens={TOKEN: "alice"})) as url, \
            KVTierClient(url, token=TOKEN) as client:
        client.register_namespace("chat", model_id="m", block_tokens=BT)
        kv = random_kv(64)
        client.put("chat", list(range(16)), [tuple(t[:16] for t in layer) for layer in kv])

        # A put in flight on the server (blocked while it writes its new blocks) ...
        result: dict = {}

        def put() -> None:
            try:
                result["tokens"] = client.put("chat", list(range(64)), kv)
            except Exception as e:  # noqa: BLE001  inspected below
                result["error"] = e

        import kvtier.placement as placement_mod

        real, calls = placement_mod.write_blocks, []
        entered, gate = threading.Event(), threading.Event()

        def slow(blocks, outs):  # a put's window of new blocks, written into their host slots
            calls.append(1)
            if len(calls) == 1:
                entered.set()
                assert gate.wait(30)
            return real(blocks, outs)

        monkeypatch.setattr(placement_mod, "write_blocks", slow)
        t = threading.Thread(target=put)
        t.start()
        assert entered.wait(30)
        # ... while the tenant drops the namespace.
        with KVTierClient(url, token=TOKEN) as other:
            assert other.drop_namespace("chat") >= 1
        gate.set()
        t.join(60)
        assert isinstance(result.get("error"), UnknownNamespace), result
        assert client.namespaces() == []
        assert cache.namespaces() == []  # not re-created with defaults under tenant ""
        ns = client.register_namespace("chat", model_id="m", block_tokens=BT)
        assert ns.name == "chat" and cache.get_namespace("alice/chat").tenant == "alice"
        assert client.put("chat", list(range(64)), kv) == 64


def test_two_sidecars_sharing_redis_find_a_prefix_with_no_registration_call(tmp_path, redis_server):
    """A's put reaches the shared tier; B's lookup (same tenant) finds it, with no call to
    register the namespace on B: its record travels with the shared tier."""
    from kvtier.config import RemoteTierConfig, SSDTierConfig

    def config(name: str) -> CacheConfig:
        return CacheConfig(block_tokens=256, host=HostTierConfig(capacity_bytes="16MiB"),
                           ssd=SSDTierConfig(path=str(tmp_path / name), min_free_bytes=0, direct_io=False),
                           remote=RemoteTierConfig(backend="redis", url=redis_server.url, timeout_s=2.0))

    settings = ServerSettings(tokens={TOKEN: "alice"})
    kv = random_kv(768, seed=3)
    ids = list(range(1000, 1768))
    with TieredCache(config("a")) as a, TieredCache(config("b")) as b, \
            serve_in_thread(a, settings) as url_a, serve_in_thread(b, ServerSettings(tokens={TOKEN: "alice"})) as url_b, \
            KVTierClient(url_a, token=TOKEN) as client_a, KVTierClient(url_b, token=TOKEN) as client_b:
        client_a.register_namespace("chat", model_id="m")
        assert client_a.put("chat", ids, kv) == 768
        assert a.tier("remote").flush(60)
        hit = client_b.lookup("chat", ids)
        assert hit.tokens == 768 and hit.tiers == {"remote": 3}
        out, n = client_b.get("chat", ids)
        assert n == 768 and all(torch.equal(x, y) for la, lb in zip(out, kv, strict=True)
                                for x, y in zip(la, lb, strict=True))
        assert [ns.name for ns in client_b.namespaces()] == ["chat"]


def test_a_name_or_id_with_dot_segments_never_reaches_another_namespace():
    """The client put a namespace name (and a prefetch id) into the URL as it was, and the URL
    library removes ``.``/``..`` segments: ``drop_namespace("zz/../victim")`` sent ``DELETE
    /v1/namespaces/victim`` and dropped another namespace with all its blocks; a crafted
    prefetch id could do the same. Each is now one escaped path segment."""
    toks, kv = list(range(32)), random_kv(32, seed=5)
    with TieredCache(CacheConfig(block_tokens=16, host=HostTierConfig(capacity_bytes="4MiB"))) as cache, \
            serve_in_thread(cache) as url, KVTierClient(url) as client:
        assert client.put("victim", toks, kv) == 32
        for call in (lambda: client.drop_namespace("zz/../victim"),
                     lambda: client.drop_namespace("../victim"),
                     lambda: client.get_namespace("."),
                     lambda: client.get_namespace(".."),
                     lambda: client._run(client._ops.cancel_prefetch("../namespaces/victim")),
                     lambda: client._run(client._ops.prefetch_status("../namespaces/victim"))):
            with contextlib.suppress(KVTierError, KeyError):  # refused, each in its own words
                call()
        assert client.get_namespace("victim").name == "victim"
        assert client.get("victim", toks)[1] == 32


def test_a_client_follows_a_namespace_another_client_registered_again():
    """A client keeps a namespace's layout and page size. Another client dropped the namespace
    and registered it again with another shape: every shared-memory get of the first client
    was refused for good (its region sized from the old layout), and its engine-page calls
    too. A call the server refuses now learns the namespace again and is asked once more."""
    toks = list(range(32))
    with TieredCache(CacheConfig(block_tokens=16, host=HostTierConfig(capacity_bytes="4MiB"))) as cache, \
            serve_in_thread(cache) as url, KVTierClient(url, use_shm=True) as a, KVTierClient(url) as b:
        a.put("x", toks, [(torch.ones(32, 2, 4),)] * 2)
        assert a.get("x", toks)[1] == 32  # a keeps x's layout now
        b.drop_namespace("x")
        wide = [(torch.full((32, 8, 4), 3.0),)] * 2
        b.put("x", toks, wide)
        got, n = a.get("x", toks)
        assert n == 32 and torch.equal(got[0][0], wide[0][0])
        assert tuple(a.kv_buffer("x", 16)[0][0].shape) == (16, 8, 4)

        a.register_block_namespace("p", page_bytes=64, fingerprint="f")
        a.put_blocks("p", [b"k"], torch.ones(1, 64, dtype=torch.uint8))
        b.drop_namespace("p")
        b.register_block_namespace("p", page_bytes=128, fingerprint="g")
        page = torch.full((1, 128), 5, dtype=torch.uint8)
        out = torch.zeros(1, 128, dtype=torch.uint8)
        assert a.put_blocks("p", [b"q"], page) == 1
        assert a.get_blocks_into("p", [b"q"], out) == 1 and torch.equal(out, page)
