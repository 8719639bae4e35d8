"""Issue 2, acceptance 1: a real transformers decoder reuses its prefix through kvtier."""

import pytest
import torch

from kvtier import CacheConfig, TieredCache
from kvtier.integrations.transformers import (
    cache_kwarg,
    dynamic_cache_to_kv,
    load_kv,
    output_cache,
    save_kv,
)

KV_BOUND = {"none": 0.0, "fp8": 0.05, "int8": 0.01}


@pytest.mark.parametrize("codec", ["none", "fp8", "int8", "fp8+zstd"])
def test_prefix_reuse_matches_full_recompute(tiny_llama, codec):
    g = torch.Generator().manual_seed(42)
    prompt = torch.randint(0, 512, (1, 1024), generator=g)
    request = torch.cat([prompt, torch.randint(0, 512, (1, 100), generator=g)], dim=1)
    with TieredCache(CacheConfig(block_tokens=256, codec=codec)) as cache, torch.no_grad():
        out = tiny_llama(prompt, use_cache=True)
        reference_kv = [tuple(t.clone() for t in layer) for layer in dynamic_cache_to_kv(output_cache(out))]
        assert save_kv(cache, "llama", prompt[0], output_cache(out)) == 1024

        hit = cache.lookup("llama", request[0])
        assert hit.tokens == 1024 and len(hit.blocks) == 4

        past, n = load_kv(cache, "llama", request[0], config=tiny_llama.config)
        assert n == 1024
        loaded_kv = dynamic_cache_to_kv(past)
        reuse = tiny_llama(request[:, n:], **{cache_kwarg(tiny_llama): past}).logits
        full = tiny_llama(request).logits[:, n:]

    diff = (reuse - full).abs().max().item()
    errs = [((a - b).pow(2).mean().sqrt() / a.pow(2).mean().sqrt()).item()
            for la, lb in zip(reference_kv, loaded_kv, strict=True) for a, b in zip(la, lb, strict=True)]
    print(f"codec={codec}: max |logit diff| = {diff:.3e}, worst KV relative RMS error = {max(errs):.4f}")
    bound = KV_BOUND[codec.split("+")[0]]
    assert max(errs) <= bound
    if codec == "none":
        assert diff <= 1e-4
    else:
        assert diff < 1.0  # lossy but close: logits of a random model have scale ~1
