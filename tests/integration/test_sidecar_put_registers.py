"""``KVTierClient.put`` to an unknown namespace registers it, as ``TieredCache.put`` does:
same keys as in-process, scoped to the caller's tenant, and a failing put registers nothing."""

from __future__ import annotations

import pytest
import torch

from kvtier import CacheConfig, KVLayout, TieredCache
from kvtier.client import KVTierClient
from kvtier.config import HostTierConfig
from kvtier.errors import InvalidRequest, LayoutMismatch
from kvtier.server.testing import serve_in_thread
from kvtier.settings import ServerSettings
from tests.conftest import random_kv

BT = 16


def small_cache() -> TieredCache:
    return TieredCache(CacheConfig(block_tokens=BT, host=HostTierConfig(capacity_bytes="4MiB")))


def test_first_put_registers_the_namespace_like_in_process():
    ids, kv = list(range(3 * BT)), random_kv(3 * BT)
    with small_cache() as local:
        assert local.put("demo", ids, kv) == 3 * BT
        want = [b.key for b in local.lookup("demo", ids).blocks]
    with small_cache() as cache, serve_in_thread(cache) as url, KVTierClient(url) as client:
        assert client.put("demo", ids, kv) == 3 * BT
        hit = client.lookup("demo", ids)
        assert hit.tokens == 3 * BT and [b.key for b in hit.blocks] == want  # the same keys
        ns = client.get_namespace("demo")
        assert ns.layout == KVLayout.from_kv(kv) and ns.block_tokens == BT
        out, n = client.get("demo", ids)
        assert n == 3 * BT and all(torch.equal(a, b) for la, lb in zip(out, kv, strict=True)
                                   for a, b in zip(la, lb, strict=True))
        with pytest.raises(LayoutMismatch):  # the layout is now fixed, as in-process
            client.put("demo", ids, random_kv(3 * BT, heads=4))


def test_first_put_registers_in_the_callers_tenant_and_a_bad_put_registers_nothing():
    settings = ServerSettings(tokens={"alpha-token-1": "alpha", "beta-token-22": "beta"})
    ids, kv = list(range(2 * BT)), random_kv(2 * BT)
    with small_cache() as cache, serve_in_thread(cache, settings) as url, \
            KVTierClient(url, "alpha-token-1") as alpha, KVTierClient(url, "beta-token-22") as beta:
        assert alpha.put("chat", ids, kv) == 2 * BT
        assert [n.name for n in alpha.namespaces()] == ["chat"]
        assert cache.get_namespace("alpha/chat").tenant == "alpha"
        assert beta.namespaces() == []
        with pytest.raises(InvalidRequest, match="token"):  # KV shorter than the token list
            beta.put("other", ids, random_kv(BT))
        assert beta.namespaces() == []
