"""One kvtier instance in its own process for the shared-remote-tier test.

``python -m tests.integration.remote_shared_child put|reload REDIS_URL DATA_DIR`` prints one
JSON line: ``put`` saves a prompt's KV of a tiny random-weight Llama, ``reload`` loads it
through the cache and compares the continuation's logits with a full recompute.
"""

from __future__ import annotations

import json
import sys

import torch

from kvtier import CacheConfig, TieredCache
from kvtier.config import HostTierConfig, RemoteTierConfig, SSDTierConfig
from kvtier.integrations.transformers import load_kv, save_kv
from tests.conftest import tiny_llama_config

PROMPT, EXTRA, BLOCK = 512, 64, 128


def main(role: str, url: str, data_dir: str) -> None:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    g = torch.Generator().manual_seed(7)
    request = torch.randint(0, 512, (1, PROMPT + EXTRA), generator=g)
    cfg = CacheConfig(block_tokens=BLOCK, host=HostTierConfig(capacity_bytes="64MiB"),
                      ssd=SSDTierConfig(path=data_dir, capacity_bytes="256MiB", min_free_bytes=0,
                                        direct_io=False),
                      remote=RemoteTierConfig(backend="redis", url=url, timeout_s=2.0))
    with TieredCache(cfg) as cache, torch.no_grad():
        if role == "put":
            out = model(request[:, :PROMPT], use_cache=True)
            stored = save_kv(cache, "llama", request[0, :PROMPT], out.past_key_values)
            cache.flush(60)
            remote = cache.tier("remote")
            remote.flush(60)
            print(json.dumps({"stored": stored, "remote": remote.stats()["blocks_written"]}))
            return
        # B never saw this namespace: no registration call, its record comes from the shared tier.
        assert cache.namespaces() == []
        hit = cache.lookup("llama", request[0])
        past, n = load_kv(cache, "llama", request[0], config=model.config)
        diff = None
        if n:
            reuse = model(request[:, n:], past_key_values=past).logits
            full = model(request).logits[:, n:]
            diff = (reuse - full).abs().max().item()
        print(json.dumps({"hit_tokens": hit.tokens, "tiers": dict(hit.tiers), "loaded": n,
                          "max_logit_diff": diff}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
