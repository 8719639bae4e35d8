"""The public API, run against the in-process ``TieredCache`` and the sidecar client (msgpack and
shared-memory data planes) alike: the README promises switching is one line.

Each test gets ``api`` — one of the three — and must pass unchanged on all of them.
"""

from __future__ import annotations

import pytest
import torch

from kvtier import CacheConfig, HostTierConfig, KVLayout, SSDTierConfig, TieredCache
from kvtier.client import KVTierClient
from kvtier.errors import InvalidRequest, LayoutMismatch, UnknownNamespace
from kvtier.integrations.transformers import prefill, save_kv
from kvtier.server.testing import serve_in_thread
from tests.conftest import random_kv

BT = 16


def same(kv_a, kv_b, n: int) -> bool:
    return all(torch.equal(a[:n], b[:n]) for la, lb in zip(kv_a, kv_b, strict=True)
               for a, b in zip(la, lb, strict=True))


@pytest.fixture(params=["in-process", "sidecar-msgpack", "sidecar-shm"])
def api(request, tmp_path):
    cfg = CacheConfig(block_tokens=BT, host=HostTierConfig(capacity_bytes="4MiB"),
                      ssd=SSDTierConfig(path=str(tmp_path / "ssd"), capacity_bytes="64MiB",
                                        min_free_bytes=0, direct_io=False))
    with TieredCache(cfg) as cache:
        if request.param == "in-process":
            yield cache
            return
        with serve_in_thread(cache) as url, \
                KVTierClient(url, use_shm=request.param == "sidecar-shm") as client:
            yield client


def test_put_registers_then_lookup_get_and_get_into(api):
    kv, ids = random_kv(50), list(range(100, 150))
    assert api.put("chat", ids, kv) == 48  # an unknown namespace is registered from the KV
    assert api.put("chat", ids, kv) == 0
    hit = api.lookup("chat", ids + [1, 2, 3])
    assert hit.tokens == 48 and hit.block_tokens == BT and [b.index for b in hit.blocks] == [0, 1, 2]
    out, n = api.get("chat", ids)
    assert n == 48 and same(out, kv, 48)
    dest = KVLayout.from_kv(kv).empty(50)
    assert api.get_into("chat", ids, dest) == 48 and same(dest, kv, 48)
    assert api.lookup("chat", [9] + ids[1:]).tokens == 0
    assert api.get("chat", [9] * 20) == (None, 0)


def test_reads_of_a_namespace_never_stored_into_are_misses(api):
    assert api.lookup("never", list(range(64))).tokens == 0
    assert api.get("never", list(range(64))) == (None, 0)


def test_namespace_lifecycle(api):
    layout = KVLayout(2, ((2, 8), (2, 8)), "float32")
    ns = api.register_namespace("m", model_id="llama", layout=layout, block_tokens=BT, ttl_s=3600)
    assert (ns.name, ns.model_id, ns.layout, ns.block_tokens, ns.ttl_s) == ("m", "llama", layout, BT, 3600)
    assert api.register_namespace("m", model_id="llama", layout=layout, block_tokens=BT, ttl_s=3600) == ns
    assert api.get_namespace("m") == ns and [n.name for n in api.namespaces()] == ["m"]
    with pytest.raises(InvalidRequest):
        api.register_namespace("m", model_id="other", layout=layout, block_tokens=BT)
    api.put("m", list(range(32)), random_kv(32))
    assert api.drop_namespace("m") == 2
    with pytest.raises(UnknownNamespace):
        api.get_namespace("m")
    with pytest.raises(UnknownNamespace):
        api.drop_namespace("m")


def test_bad_input_raises_the_same_classes(api):
    api.put("m", list(range(16)), random_kv(16))
    with pytest.raises(LayoutMismatch):
        api.put("m", list(range(16)), random_kv(16, heads=3))
    with pytest.raises(LayoutMismatch):
        api.put("m", list(range(16)), random_kv(8))  # 8 tokens of KV for 16 ids
    with pytest.raises(InvalidRequest):
        api.lookup("m", [])
    with pytest.raises(InvalidRequest):
        api.lookup("m", [-1, 2])
    with pytest.raises(UnknownNamespace):
        api.evict("nope", list(range(16)))


def test_evict_prefetch_and_stats(api):
    kv, ids = random_kv(64), list(range(64))
    api.put("m", ids, kv)
    handle = api.prefetch("m", ids, to="host", policy="wait_complete")
    assert handle.state == "done" and handle.ready_tokens == 64
    assert api.prefetch_status(handle.id).state == "done"
    assert api.evict("m", ids[:32] + [7] * 32) == 4  # block 0 and everything cached beyond it
    assert api.lookup("m", ids).tokens == 0
    s = api.stats()
    assert s.puts == 1 and s.tokens_put == 64 and s.lookups >= 1
    assert s.namespaces["m"].tokens_put == 64 and "host" in s.tiers


def test_engine_pages_round_trip(api):
    ns = api.register_block_namespace("pages", page_bytes=4096, fingerprint={"model": "m", "kv_dtype": "bf16"})
    assert ns.kind == "pages"
    keys = [bytes([i]) * 16 for i in range(4)]
    pages = torch.randint(0, 256, (4, 4096), dtype=torch.uint8)
    assert api.put_blocks("pages", keys, pages) == 4
    hits = api.block_exists("pages", [keys[0], keys[1], b"x" * 16, keys[3]])
    assert hits.leading == 2 and hits.present == [True, True, False, True]
    out = torch.zeros(4, 4096, dtype=torch.uint8)
    assert api.get_blocks_into("pages", keys, out) == 4 and torch.equal(out, pages)
    assert api.evict_blocks("pages", keys[:1]) == 1
    assert api.block_exists("pages", keys).leading == 0


def test_prefill_reuses_the_prefix_and_matches_recompute(api, tiny_llama):
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 512, (1, 4 * BT + 5), generator=g)
    request = torch.cat([prompt, torch.randint(0, 512, (1, 7), generator=g)], dim=1)
    with torch.no_grad():
        out = tiny_llama(prompt, use_cache=True)
        key = "cache" if "cache" in out else "past_key_values"
        assert save_kv(api, "llama", prompt[0], out[key]) == 4 * BT
        full = tiny_llama(request).logits
        res = prefill(tiny_llama, api, "llama", request[0], cost_check=False)
    assert res.cached_tokens == 4 * BT
    assert (res.logits - full[:, res.cached_tokens:]).abs().max().item() <= 1e-4
