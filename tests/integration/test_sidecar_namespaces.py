"""Namespace lifecycle races through the real sidecar: a drop while a put is in flight."""

from __future__ import annotations

import threading

from kvtier import CacheConfig, HostTierConfig, TieredCache
from kvtier.client import KVTierClient
from kvtier.errors import UnknownNamespace
from kvtier.settings import ServerSettings
from server.testing import serve_in_thread
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

        # A put in flight on the server (blocked before its second new block) ...
        result: dict = {}

        def put() -> None:
            try:
                result["tokens"] = client.put("chat", list(range(64)), kv)
            except Exception as e:  # noqa: BLE001  inspected below
                result["error"] = e

        import kvtier.manager as manager

        real, calls = manager.encode_block_pooled, []
        entered, gate = threading.Event(), threading.Event()

        def slow(codec, layers):
            calls.append(1)
            if len(calls) == 2:
                entered.set()
                assert gate.wait(30)
            return real(codec, layers)

        monkeypatch.setattr(manager, "encode_block_pooled", slow)
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
