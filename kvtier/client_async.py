"""asyncio client of the kvtier sidecar: ``KVTierClient``'s methods as coroutines, running the
same operations (``kvtier.client_ops``) over an ``httpx.AsyncClient``."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from typing import Any

import httpx
import torch

from kvtier.blocks import BlockHits
from kvtier.client_answers import RELOAD_POOL_BYTES, Answer, DirectAnswers, split_url
from kvtier.client_calls import Call, Op, Pieces, bulk_request, headers_for, raise_for
from kvtier.client_ops import Ops, RemotePrefetch
from kvtier.keys import TokenIds
from kvtier.layout import KV, KVLayout
from kvtier.namespaces import Namespace
from kvtier.records import Hit
from kvtier.stats import CacheStats


class AsyncRemotePrefetch(RemotePrefetch):
    """``RemotePrefetch`` for ``AsyncKVTierClient``: refresh, cancel and wait are coroutines."""

    async def refresh(self) -> AsyncRemotePrefetch:  # type: ignore[override]
        self._update(await self._client._run(self._client._ops.prefetch_status(self.id)))
        return self

    async def cancel(self) -> bool:  # type: ignore[override]
        d = await self._client._run(self._client._ops.cancel_prefetch(self.id))
        self._update(d)
        return bool(d.get("cancelled"))

    async def wait(self, timeout: float | None = None) -> bool:  # type: ignore[override]
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.state not in self.TERMINAL:
            left = 10.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                return False
            self._update(await self._client._run(self._client._ops.prefetch_status(self.id, min(left, 10.0))))
        return True


class AsyncKVTierClient:
    """asyncio sidecar client: ``KVTierClient``'s methods as coroutines."""

    def __init__(self, base_url: str = "http://127.0.0.1:8400", token: str | None = None, *,
                 use_shm: bool = False, timeout: float = 120.0,
                 transport: httpx.AsyncBaseTransport | None = None,
                 reload_pool_bytes: int = RELOAD_POOL_BYTES) -> None:
        url, uds = split_url(base_url)
        self._direct = DirectAnswers.for_client(base_url, transport, timeout, reload_pool_bytes)
        if uds is not None and transport is None:
            transport = httpx.AsyncHTTPTransport(uds=uds)
        self._http = httpx.AsyncClient(base_url=url, headers=headers_for(token), timeout=timeout,
                                       transport=transport)
        self._ops = Ops(use_shm, token, timeout)

    async def _run(self, op: Op) -> Any:
        try:
            call = next(op)
            while True:
                resp: httpx.Response | Answer
                if call.direct and self._direct is not None:  # a blocking read into memory: off the loop
                    resp = await self._fetch(call, self._direct)
                else:
                    content: Any = aiter(call.content) if isinstance(call.content, Pieces) else call.content
                    resp = await self._http.request(call.method, call.path, json=call.json, content=content,
                                                    headers=call.headers, params=call.params)
                try:
                    raise_for(resp)
                except Exception as e:
                    call = op.throw(e)
                    continue
                call = op.send(resp)
        except StopIteration as stop:
            return stop.value

    async def _fetch(self, call: Call, direct: DirectAnswers) -> Answer:
        """``DirectAnswers.fetch`` in a worker thread. Cancelled, it stops sending the body
        (the server stores nothing) and returns only once the thread is done with it: no byte of
        the caller's tensors is read after a cancelled put returns, even if they are reused."""
        request, pieces = bulk_request(self._http, call)
        stop = threading.Event()
        task = asyncio.ensure_future(asyncio.to_thread(direct.fetch, request, pieces, resend=call.resend,
                                                       stop=stop))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            stop.set()
            await asyncio.wait({task})
            if not task.cancelled():
                task.exception()  # retrieved: the caller gets the cancellation, not this
            raise

    async def register_namespace(self, name: str, **kw: Any) -> Namespace:
        return await self._run(self._ops.register_namespace(name, **kw))

    async def get_namespace(self, name: str) -> Namespace:
        return await self._run(self._ops.get_namespace(name))

    async def namespaces(self) -> list[Namespace]:
        return await self._run(self._ops.namespaces())

    async def drop_namespace(self, name: str) -> int:
        return await self._run(self._ops.drop_namespace(name))

    async def kv_buffer(self, namespace: str, tokens: int, *,
                        layout: KVLayout | None = None) -> list[tuple[torch.Tensor, ...]]:
        """``KVTierClient.kv_buffer`` as a coroutine."""
        return await self._run(self._ops.kv_buffer(namespace, tokens, layout=layout))

    async def put(self, namespace: str, token_ids: TokenIds, kv: KV) -> int:
        return await self._run(self._ops.put(namespace, token_ids, kv))

    async def lookup(self, namespace: str, token_ids: TokenIds) -> Hit:
        return await self._run(self._ops.lookup(namespace, token_ids))

    async def get(self, namespace: str, token_ids: TokenIds) -> tuple[list[tuple[torch.Tensor, ...]] | None, int]:
        return await self._run(self._ops.get(namespace, token_ids))

    async def prefetch(self, namespace: str, token_ids: TokenIds, to: str = "host", *,
                       policy: str = "best_effort", timeout_s: float | None = None) -> AsyncRemotePrefetch:
        op = self._ops.prefetch(namespace, token_ids, to, policy=policy, timeout_s=timeout_s)
        return AsyncRemotePrefetch(self, await self._run(op))

    async def prefetch_status(self, prefetch_id: str) -> AsyncRemotePrefetch:
        return AsyncRemotePrefetch(self, await self._run(self._ops.prefetch_status(prefetch_id)))

    async def evict(self, namespace: str, token_ids: TokenIds) -> int:
        return await self._run(self._ops.evict(namespace, token_ids))

    async def register_block_namespace(self, name: str, *, page_bytes: int, fingerprint: dict | str,
                                       codec: str = "none", ttl_s: float | None = None) -> Namespace:
        return await self._run(self._ops.register_block_namespace(
            name, page_bytes=page_bytes, fingerprint=fingerprint, codec=codec, ttl_s=ttl_s))

    async def block_exists(self, namespace: str, keys: Sequence[bytes]) -> BlockHits:
        return await self._run(self._ops.block_exists(namespace, keys))

    async def put_blocks(self, namespace: str, keys: Sequence[bytes], pages: Any) -> int:
        return await self._run(self._ops.put_blocks(namespace, keys, pages))

    async def get_blocks_into(self, namespace: str, keys: Sequence[bytes], out: Any) -> int:
        return await self._run(self._ops.get_blocks_into(namespace, keys, out))

    async def evict_blocks(self, namespace: str, keys: Sequence[bytes]) -> int:
        return await self._run(self._ops.evict_blocks(namespace, keys))

    async def stats(self) -> CacheStats:
        return await self._run(self._ops.stats())

    async def metrics_text(self) -> str:
        return await self._run(self._ops.metrics_text())

    async def ready(self) -> bool:
        return await self._run(self._ops.ready())

    async def aclose(self) -> None:
        self._ops.close()
        if self._direct is not None:
            self._direct.close()
        await self._http.aclose()

    async def __aenter__(self) -> AsyncKVTierClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
