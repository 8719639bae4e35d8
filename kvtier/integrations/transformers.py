"""Hugging Face transformers integration: DynamicCache <-> kvtier blocks.

HF keeps each layer's keys and values as ``[batch, kv_heads, tokens, head_dim]``; kvtier's
layout puts tokens first (``[tokens, kv_heads, head_dim]``), so one block is a contiguous token
range. Only batch size 1 is supported: a cache entry is one prompt's prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kvtier.errors import InvalidRequest
from kvtier.keys import as_token_array
from kvtier.layout import KV


def dynamic_cache_to_kv(past_key_values: Any, n_tokens: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer ``(K, V)`` ``[tokens, heads, dim]`` views of a DynamicCache (first ``n_tokens``)."""
    kv = []
    for layer in past_key_values.layers:
        k, v = layer.keys, layer.values
        if k is None or k.shape[0] != 1:
            raise InvalidRequest(f"only batch size 1 caches are supported, got keys of shape {None if k is None else tuple(k.shape)}")
        end = k.shape[2] if n_tokens is None else n_tokens
        kv.append((k[0, :, :end].transpose(0, 1), v[0, :, :end].transpose(0, 1)))
    return kv


def kv_to_dynamic_cache(kv: KV, config: Any = None) -> Any:
    """A DynamicCache holding ``kv`` (layers of ``(K, V)`` ``[tokens, heads, dim]``)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config) if config is not None else DynamicCache()
    for i, (k, v) in enumerate(kv):
        cache.update(k.transpose(0, 1).unsqueeze(0).contiguous(), v.transpose(0, 1).unsqueeze(0).contiguous(), i)
    return cache


def save_kv(cache: Any, namespace: str, input_ids: Sequence[int] | torch.Tensor, past_key_values: Any) -> int:
    """Store the full blocks of a prompt's KV; returns the tokens newly stored.

    ``cache`` is a ``TieredCache`` or a ``KVTierClient`` (same methods).
    """
    tokens = as_token_array(input_ids)
    kv = dynamic_cache_to_kv(past_key_values, len(tokens))
    return cache.put(namespace, tokens, kv)


def load_kv(cache: Any, namespace: str, input_ids: Sequence[int] | torch.Tensor, *, config: Any = None,
            device: str | torch.device = "cpu", max_tokens: int | None = None) -> tuple[Any | None, int]:
    """A DynamicCache of the longest cached prefix of ``input_ids`` and its length.

    At least one token is always left uncached (``max_tokens`` defaults to ``len - 1``) so the
    model has a token to run and produce logits for.
    """
    tokens = as_token_array(input_ids)
    limit = len(tokens) - 1 if max_tokens is None else max_tokens
    if limit <= 0:
        return None, 0
    kv, n = cache.get(namespace, tokens[:limit], device=device) if _accepts_device(cache) else cache.get(namespace, tokens[:limit])
    if kv is None or n == 0:
        return None, 0
    return kv_to_dynamic_cache(kv, config), n


def _accepts_device(cache: Any) -> bool:
    from kvtier.manager import TieredCache

    return isinstance(cache, TieredCache)
