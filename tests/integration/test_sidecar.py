"""The real sidecar (uvicorn on a loopback port) driven only through the client, with KV from
a real transformers model: logits after reload must equal a full recompute."""

from __future__ import annotations

import pytest
import torch

from kvtier import CacheConfig, KVLayout, TieredCache
from kvtier.client import AsyncKVTierClient, KVTierClient, RemoteError
from kvtier.config import HostTierConfig, SSDTierConfig
from kvtier.server.testing import serve_in_thread
from kvtier.settings import ServerSettings

BT = 16
PROMPT, NEW = 48, 8


@pytest.fixture
def cache(tmp_path):
    cfg = CacheConfig(block_tokens=BT, host=HostTierConfig(capacity_bytes="4MiB"),
                      ssd=SSDTierConfig(path=str(tmp_path / "ssd"), capacity_bytes="64MiB",
                                        direct_io=False, min_free_bytes=0))
    with TieredCache(cfg) as c:
        yield c


def layout_of(model) -> KVLayout:
    c = model.config
    shape = (c.num_key_value_heads, c.hidden_size // c.num_attention_heads)
    return KVLayout(c.num_hidden_layers, (shape, shape), "float32")


def prefill_kv(model, ids):
    """Prefill and return KV as list of (K, V) each [tokens, kv_heads, head_dim]."""
    with torch.no_grad():
        pkv = model(ids, use_cache=True).past_key_values
    return [(layer.keys[0].transpose(0, 1).contiguous(), layer.values[0].transpose(0, 1).contiguous())
            for layer in pkv.layers]


def logits_with_kv(model, kv, new_ids):
    from transformers import DynamicCache

    dc = DynamicCache(config=model.config)
    for i, (k, v) in enumerate(kv):
        dc.update(k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0), i)
    with torch.no_grad():
        return model(new_ids, past_key_values=dc).logits


@pytest.mark.parametrize("use_shm", [False, True], ids=["msgpack", "shm"])
def test_model_kv_roundtrip_through_sidecar(cache, tiny_llama, use_shm):
    torch.manual_seed(1)
    ids = torch.randint(0, tiny_llama.config.vocab_size, (1, PROMPT + NEW))
    prompt = ids[0, :PROMPT].tolist()
    with serve_in_thread(cache) as url, KVTierClient(url, use_shm=use_shm) as client:
        ns = client.register_namespace("llama", model_id="tiny-llama", layout=layout_of(tiny_llama),
                                       block_tokens=BT)
        assert ns.name == "llama" and ns.layout == layout_of(tiny_llama)
        assert [n.name for n in client.namespaces()] == ["llama"]

        assert client.put("llama", prompt, prefill_kv(tiny_llama, ids[:, :PROMPT])) == PROMPT
        hit = client.lookup("llama", ids[0].tolist())
        assert hit.tokens == PROMPT and [b.index for b in hit.blocks] == [0, 1, 2]
        assert {b.tier for b in hit.blocks} == {"host"}

        pf = client.prefetch("llama", prompt, to="host")
        assert pf.wait(30) and pf.state == "done" and pf.ready_tokens == PROMPT
        pf = client.prefetch("llama", prompt, to="host", policy="wait_complete")
        assert pf.state == "done" and pf.ready_tokens == PROMPT  # answered only once complete

        kv, n = client.get("llama", ids[0].tolist())
        assert n == PROMPT and kv[0][0].shape == (PROMPT, 2, 16)
        got = logits_with_kv(tiny_llama, kv, ids[:, PROMPT:])
        with torch.no_grad():
            want = tiny_llama(ids).logits[:, PROMPT:]
        assert (got - want).abs().max().item() <= 1e-4

        stats = client.stats()
        assert stats.lookups >= 2 and stats.tiers["host"].hits >= 3 and stats.tokens_put == PROMPT
        text = client.metrics_text()
        assert 'kvtier_block_hits_total{tier="host"}' in text

        assert client.evict("llama", prompt) == 3
        assert client.lookup("llama", prompt).tokens == 0
        assert client.get("llama", prompt) == (None, 0)
        assert client.drop_namespace("llama") == 0
        assert client.namespaces() == []
        assert client.ready()


async def test_async_client_same_flow(cache, tiny_llama):
    torch.manual_seed(2)
    ids = torch.randint(0, tiny_llama.config.vocab_size, (1, PROMPT + NEW))
    prompt = ids[0, :PROMPT].tolist()
    with serve_in_thread(cache) as url:
        for use_shm in (False, True):
            async with AsyncKVTierClient(url, use_shm=use_shm) as client:
                await client.register_namespace("a", layout=layout_of(tiny_llama), block_tokens=BT)
                assert await client.put("a", prompt, prefill_kv(tiny_llama, ids[:, :PROMPT])) in (0, PROMPT)
                assert (await client.lookup("a", prompt)).tokens == PROMPT
                pf = await client.prefetch("a", prompt)
                assert await pf.wait(30) and pf.ready_tokens == PROMPT
                kv, n = await client.get("a", ids[0].tolist())
                got = logits_with_kv(tiny_llama, kv, ids[:, PROMPT:])
                with torch.no_grad():
                    want = tiny_llama(ids).logits[:, PROMPT:]
                assert n == PROMPT and (got - want).abs().max().item() <= 1e-4
                assert (await client.stats()).lookups >= 1
        async with AsyncKVTierClient(url) as client:
            assert await client.evict("a", prompt) == 3
            assert await client.drop_namespace("a") == 0


def test_tenants_are_isolated(cache):
    settings = ServerSettings(tokens={"alpha-token-1": "alpha", "beta-token-22": "beta"})
    kv = [(torch.randn(32, 2, 8), torch.randn(32, 2, 8))]
    ids = list(range(32))
    with serve_in_thread(cache, settings) as url, \
            KVTierClient(url, "alpha-token-1") as alpha, KVTierClient(url, "beta-token-22") as beta:
        alpha.register_namespace("chat", block_tokens=BT)
        beta.register_namespace("chat", block_tokens=BT)
        assert alpha.put("chat", ids, kv) == 32
        # Same name, same tokens, other tenant: a different, salted namespace with nothing in it.
        assert beta.lookup("chat", ids).tokens == 0
        assert beta.put("chat", ids, kv) == 32
        keys_a = {b.key for b in alpha.lookup("chat", ids).blocks}
        keys_b = {b.key for b in beta.lookup("chat", ids).blocks}
        assert keys_a and not keys_a & keys_b
        assert [n.name for n in beta.namespaces()] == ["chat"]
        with pytest.raises(RemoteError) as e:
            beta.lookup("alpha/chat", ids)
        assert e.value.status == 403 and "alpha" in e.value.message
        pf = alpha.prefetch("chat", ids)
        with pytest.raises(KeyError):
            beta.prefetch_status(pf.id)
        with pytest.raises(RemoteError) as e, KVTierClient(url) as anonymous:
            anonymous.namespaces()
        assert e.value.status == 401
