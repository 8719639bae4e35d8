"""Hugging Face transformers integration: DynamicCache <-> kvtier blocks.

HF keeps each layer's keys and values as ``[batch, kv_heads, tokens, head_dim]``; kvtier's
layout puts tokens first (``[tokens, kv_heads, head_dim]``), so one block is a contiguous token
range. Only batch size 1 is supported: a cache entry is one prompt's prefix.

Two read paths: ``load_kv`` (serial: the whole prefix, then the forward pass) and ``prefill``
(pipelined: the forward pass over the uncached tokens starts at once and each layer waits only
for its own KV from the dual-path loader, after the cost check accepted the hit). Saving:
``save_kv`` (blocking) and ``save_kv_async`` (snapshot now, encode and store on a worker).

transformers renamed the forward pass's ``past_key_values`` (argument and output field) to
``cache`` in 5.24, deprecating the old name: kvtier passes and reads whichever the model's own
``forward`` declares (``cache_kwarg``, ``output_cache``), so it warns on no version.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
import weakref
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from kvtier.costmodel import CostDecision
from kvtier.errors import InvalidRequest
from kvtier.keys import as_token_array
from kvtier.layout import KV
from kvtier.loader import Loader, LoadSource, LoadStream, PrefixTruncated
from kvtier.sidecar_loader import SidecarLoader

log = logging.getLogger(__name__)


_CACHE_KWARG: dict[type, str] = {}


def cache_kwarg(model: Any) -> str:
    """The keyword ``model``'s forward takes past KV by: ``cache`` (transformers >= 5.24) or
    ``past_key_values`` (before; deprecated since). Read from its signature once per class."""
    name = _CACHE_KWARG.get(type(model))
    if name is None:
        params = inspect.signature(model.forward).parameters
        name = _CACHE_KWARG[type(model)] = "cache" if "cache" in params else "past_key_values"
    return name


def output_cache(out: Any) -> Any:
    """The KV cache a forward pass returned: ``out.cache`` (transformers >= 5.24) or
    ``out.past_key_values`` (before), without touching the deprecated alias."""
    return out["cache"] if "cache" in out else out["past_key_values"]


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


# ---- pipelined path -----------------------------------------------------------------------
_LOADERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOADERS_LOCK = threading.Lock()
_SAVER = ThreadPoolExecutor(1, thread_name_prefix="kvtier-save")


def loader_for(cache: Any) -> Loader | SidecarLoader:
    """The shared loader (and so the shared cost model) of a cache: the dual-path ``Loader``
    for an in-process ``TieredCache``, a ``SidecarLoader`` for a sidecar client."""
    with _LOADERS_LOCK:
        loader = _LOADERS.get(cache)
        if loader is None:
            loader = _LOADERS[cache] = Loader(cache) if isinstance(cache, LoadSource) else SidecarLoader(cache)
        return loader


class StreamingCache(DynamicCache):
    """A DynamicCache over KV that is still loading: layer ``i``'s first ``update`` waits for it.

    ``get_seq_length`` reports the planned prefix at once (positions and masks need it before any
    layer runs); attention reads past KV only through ``update``, which first waits on the
    loader's per-layer readiness. If the load ends short, ``update`` raises PrefixTruncated.
    """

    def __init__(self, kv: KV, stream: LoadStream, tokens: int) -> None:
        super().__init__()
        self._stream = stream
        self._tokens = tokens
        self._waited: set[int] = set()
        for k, v in kv:
            layer = DynamicLayer()
            layer.keys = k[:tokens].transpose(0, 1).unsqueeze(0)
            layer.values = v[:tokens].transpose(0, 1).unsqueeze(0)
            layer.device = k.device
            setattr(layer, "dtype", k.dtype)  # noqa: B010  transformers 4.56's layers declare it, later ones not
            layer.is_initialized = True
            self.layers.append(layer)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx not in self._waited:
            got = self._stream.wait_layer(layer_idx)
            if got < self._tokens:
                raise PrefixTruncated(got, self._tokens)
            self._waited.add(layer_idx)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


@dataclass(slots=True)
class PrefillResult:
    """One prompt's prefill: logits of the uncached tokens and the cache to decode with."""

    logits: torch.Tensor
    past_key_values: Any
    cached_tokens: int  # prompt tokens taken from kvtier
    offered_tokens: int  # tokens the cache held (before the cost check)
    decision: CostDecision | None
    seconds: float  # wall time of the whole prefill (the time to first token)


def prefill(model: Any, cache: Any, namespace: str, input_ids: Sequence[int] | torch.Tensor, *,
            pipelined: bool = True, cost_check: bool = True, loader: Loader | SidecarLoader | None = None,
            **model_kwargs: Any) -> PrefillResult:
    """Prefill a prompt reusing its cached prefix (pipelined, layer-wise by default).

    The cached prefix (at most ``len - 1`` tokens) is leased, the cost check decides how much of
    it to load, and the forward pass over the rest runs while the loader streams the prefix in.
    A full prefill feeds the cost model's prefill rate. A prefix that ends short (an unreadable
    block) is handled by recomputing from where it ends: the result is always correct.
    ``model_kwargs`` go to the forward pass (e.g. ``logits_to_keep=1``).
    """
    start = time.perf_counter()
    tokens = as_token_array(input_ids)
    device = next(model.parameters()).device
    ids = torch.as_tensor(tokens).unsqueeze(0).to(device)
    loader = loader or loader_for(cache)
    lease = cache.acquire(namespace, tokens[:-1]) if len(tokens) > 1 else None
    stream: LoadStream | None = None
    decision = None
    out = None
    try:
        offered = lease.tokens if lease else 0
        n = n_blocks = 0
        if lease is not None and lease.blocks:
            decision = loader.plan(lease) if cost_check else None
            n_blocks = decision.blocks if decision else len(lease.blocks)
            n = n_blocks * lease.namespace.block_tokens
        with torch.no_grad():
            if n == 0:
                t0 = time.perf_counter()
                out = model(ids, use_cache=True, **model_kwargs)
                loader.cost.observe_prefill(len(tokens), time.perf_counter() - t0)
            else:
                assert lease is not None  # n > 0 only with a lease
                dest = lease.namespace.layout.empty(n, device)
                stream = loader.load(lease, dest, blocks=n_blocks)
                if pipelined:
                    try:
                        out = model(ids[:, n:], **{cache_kwarg(model): StreamingCache(dest, stream, n)},
                                    use_cache=True, **model_kwargs)
                        if stream.wait_all() < n:
                            raise PrefixTruncated(stream.tokens, n)
                    except PrefixTruncated as e:
                        log.warning("pipelined prefill restarts from %d tokens: %s", stream.wait_all(), e)
                        out = None
                if out is None:
                    n = stream.wait_all()
                    past = kv_to_dynamic_cache([tuple(t[:n] for t in layer) for layer in dest]) if n else None
                    out = model(ids[:, n:], **{cache_kwarg(model): past}, use_cache=True, **model_kwargs)
    finally:
        if stream is not None:
            if out is None:
                stream.cancel()
            stream.wait_all()
        if lease is not None:
            cache.release(lease)
    return PrefillResult(out.logits, output_cache(out), n, offered, decision, time.perf_counter() - start)


def save_kv_async(cache: Any, namespace: str, input_ids: Sequence[int] | torch.Tensor,
                  past_key_values: Any) -> Future:
    """Store a prompt's KV in the background; returns a Future of the tokens newly stored.

    The snapshot is per-layer references, taken now: DynamicCache replaces its tensors on every
    update and never writes into them, so the next decode step runs at once while a worker
    encodes and stores the blocks layer by layer.
    """
    tokens = as_token_array(input_ids)
    kv = [tuple(t.detach() for t in layer) for layer in dynamic_cache_to_kv(past_key_values, len(tokens))]
    return _SAVER.submit(cache.put, namespace, tokens, kv)
