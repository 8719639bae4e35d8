"""HTTP client for the kvtier sidecar, with the same methods as the in-process ``TieredCache``.

Switching an engine between in-process and sidecar is one line::

    cache = TieredCache(config)                      # in-process
    cache = KVTierClient("http://127.0.0.1:8400")    # sidecar (AsyncKVTierClient for asyncio)
    cache = KVTierClient("unix:///run/kvtier/http.sock")  # its Unix socket (kvtier serve --uds)

KV travels as msgpack with raw tensor bytes, or with ``use_shm=True`` (same host only) through
shared-memory regions the client creates and reuses and hands to the server once as file
descriptors over its region socket, so only control messages cross HTTP. Server errors come
back as the same ``kvtier.errors`` classes; others as ``RemoteError``.

Parts: the operations, written once for both clients, in ``kvtier.client_ops``; HTTP calls and
error answers in ``kvtier.client_calls``; the shared-memory data plane in ``kvtier.client_shm``
(its region pool in ``kvtier.shm_pool``); the asyncio client in ``kvtier.client_async``; wire
formats (shared with the server) in ``kvtier.wire``.

``kv_buffer()`` hands out tensors already in the packed layout in shared memory: an engine that
writes its KV there puts with no copy on the client. ``get()`` with ``use_shm=True`` returns
views of the region the server decoded into; they stay valid while the caller holds them
(the region is reused only after the last of them is freed). See docs/sidecar-data-plane.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx
import torch

from kvtier.blocks import BlockHits
from kvtier.client_answers import RELOAD_POOL_BYTES, Answer, DirectAnswers, split_url
from kvtier.client_async import AsyncKVTierClient, AsyncRemotePrefetch
from kvtier.client_calls import Op, Pieces, RemoteError, bulk_request, headers_for, raise_for
from kvtier.client_ops import Ops, RemotePrefetch, stats_from_dict
from kvtier.index import Lease
from kvtier.keys import TokenIds, as_token_array
from kvtier.layout import KV, KVLayout
from kvtier.namespaces import Namespace
from kvtier.records import Hit
from kvtier.stats import CacheStats
from kvtier.wire import (
    MSGPACK,
    kv_from_wire,
    kv_to_wire,
    pack_into,
    packed_nbytes,
    packed_views,
    unpack_from,
)

__all__ = [  # the wire helpers lived here first; kvtier.wire is their home now
    "MSGPACK", "AsyncKVTierClient", "AsyncRemotePrefetch", "KVTierClient", "RemoteError",
    "RemotePrefetch", "kv_from_wire", "kv_to_wire", "pack_into", "packed_nbytes", "packed_views",
    "stats_from_dict", "unpack_from",
]


class KVTierClient:
    """Synchronous sidecar client; thread-safe."""

    def __init__(self, base_url: str = "http://127.0.0.1:8400", token: str | None = None, *,
                 use_shm: bool = False, timeout: float = 120.0, transport: httpx.BaseTransport | None = None,
                 reload_pool_bytes: int = RELOAD_POOL_BYTES) -> None:
        """``reload_pool_bytes``: memory kept from msgpack ``get`` answers the caller dropped, for
        the next ones to be read into (``kvtier.client_answers``; 0 keeps none)."""
        url, uds = split_url(base_url)
        self._direct = DirectAnswers.for_client(base_url, transport, timeout, reload_pool_bytes)
        if uds is not None and transport is None:
            transport = httpx.HTTPTransport(uds=uds)
        self._http = httpx.Client(base_url=url, headers=headers_for(token), timeout=timeout, transport=transport)
        self._ops = Ops(use_shm, token, timeout)

    def _run(self, op: Op) -> Any:
        try:
            call = next(op)
            while True:
                resp: httpx.Response | Answer
                if call.direct and self._direct is not None:
                    resp = self._direct.fetch(*bulk_request(self._http, call), resend=call.resend)
                else:
                    content: Any = iter(call.content) if isinstance(call.content, Pieces) else call.content
                    resp = self._http.request(call.method, call.path, json=call.json, content=content,
                                              headers=call.headers, params=call.params)
                try:
                    raise_for(resp)
                except Exception as e:  # let the op see it (and clean up, or translate it)
                    call = op.throw(e)
                    continue
                call = op.send(resp)
        except StopIteration as stop:
            return stop.value

    def register_namespace(self, name: str, **kw: Any) -> Namespace:
        return self._run(self._ops.register_namespace(name, **kw))

    def get_namespace(self, name: str) -> Namespace:
        return self._run(self._ops.get_namespace(name))

    def namespaces(self) -> list[Namespace]:
        return self._run(self._ops.namespaces())

    def drop_namespace(self, name: str) -> int:
        return self._run(self._ops.drop_namespace(name))

    def kv_buffer(self, namespace: str, tokens: int, *,
                  layout: KVLayout | None = None) -> list[tuple[torch.Tensor, ...]]:
        """Shared-memory KV tensors for ``tokens`` tokens of ``namespace``'s layout, to write KV into.

        A list over layers of tensors ``[tokens, *shape]``, laid out exactly as the server reads
        them, so ``put(namespace, token_ids, buf)`` (with ``use_shm=True``) sends only a control
        message: no pack copy. ``buf`` may be put whole or as its first ``n`` rows
        (``[tuple(t[:n] for t in layer) for layer in buf]``). Contents start undefined (like
        ``torch.empty``); the server reads them during ``put`` only, so the buffer may be
        refilled as soon as ``put`` returns. A ``put`` that raised without the server's answer (a
        timeout, a lost connection) may still be read by the server: do not refill that buffer,
        take a new one (its region is not lent again). The region stays the caller's until the
        last tensor viewing it is freed, then returns to the client's pool. ``layout`` is needed before the
        namespace's first put; otherwise it is fetched once from the server.
        """
        return self._run(self._ops.kv_buffer(namespace, tokens, layout=layout))

    def put(self, namespace: str, token_ids: TokenIds, kv: KV) -> int:
        return self._run(self._ops.put(namespace, token_ids, kv))

    def lookup(self, namespace: str, token_ids: TokenIds) -> Hit:
        return self._run(self._ops.lookup(namespace, token_ids))

    def get(self, namespace: str, token_ids: TokenIds) -> tuple[list[tuple[torch.Tensor, ...]] | None, int]:
        return self._run(self._ops.get(namespace, token_ids))

    def get_into(self, namespace: str, token_ids: TokenIds, dest: KV) -> int:
        """``TieredCache.get_into``: the longest cached prefix written into ``dest``; the tokens
        written (over shared memory with ``use_shm=True``: one copy, out of the region)."""
        kv, n = self.get(namespace, token_ids)
        for out_layer, layer in zip(dest, kv or [], strict=False):
            for out, t in zip(out_layer, layer, strict=True):
                out[:n].copy_(t[:n])
        return n

    def acquire(self, namespace: str, token_ids: TokenIds) -> Lease:
        """``TieredCache.acquire`` for ``prefill``'s loader: the longest cached prefix as a lookup
        found it. Blocks cannot be pinned across HTTP: one evicted before the load makes the
        load end short, which ``prefill`` handles by recomputing from there."""
        from kvtier.sidecar_loader import sidecar_lease

        ids = as_token_array(token_ids)
        hit = self.lookup(namespace, ids)
        ns = self.get_namespace(namespace) if hit.blocks else None
        return sidecar_lease(ns, hit, ids)

    def release(self, lease: Lease) -> None:
        """Nothing to unpin (see ``acquire``)."""

    def prefetch(self, namespace: str, token_ids: TokenIds, to: str = "host", *,
                 policy: str = "best_effort", timeout_s: float | None = None) -> RemotePrefetch:
        return RemotePrefetch(self, self._run(self._ops.prefetch(namespace, token_ids, to, policy=policy,
                                                                 timeout_s=timeout_s)))

    def prefetch_status(self, prefetch_id: str) -> RemotePrefetch:
        return RemotePrefetch(self, self._run(self._ops.prefetch_status(prefetch_id)))

    def evict(self, namespace: str, token_ids: TokenIds) -> int:
        return self._run(self._ops.evict(namespace, token_ids))

    def register_block_namespace(self, name: str, *, page_bytes: int, fingerprint: dict | str,
                                 codec: str = "none", ttl_s: float | None = None) -> Namespace:
        """``TieredCache.register_block_namespace`` (400 ``FingerprintMismatch`` on a conflict)."""
        return self._run(self._ops.register_block_namespace(
            name, page_bytes=page_bytes, fingerprint=fingerprint, codec=codec, ttl_s=ttl_s))

    def block_exists(self, namespace: str, keys: Sequence[bytes]) -> BlockHits:
        return self._run(self._ops.block_exists(namespace, keys))

    def put_blocks(self, namespace: str, keys: Sequence[bytes], pages: Any) -> int:
        return self._run(self._ops.put_blocks(namespace, keys, pages))

    def get_blocks_into(self, namespace: str, keys: Sequence[bytes], out: Any) -> int:
        return self._run(self._ops.get_blocks_into(namespace, keys, out))

    def evict_blocks(self, namespace: str, keys: Sequence[bytes]) -> int:
        return self._run(self._ops.evict_blocks(namespace, keys))

    def stats(self) -> CacheStats:
        return self._run(self._ops.stats())

    def metrics_text(self) -> str:
        return self._run(self._ops.metrics_text())

    def ready(self) -> bool:
        return self._run(self._ops.ready())

    def close(self) -> None:
        self._ops.close()
        if self._direct is not None:
            self._direct.close()
        self._http.close()

    def __enter__(self) -> KVTierClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
