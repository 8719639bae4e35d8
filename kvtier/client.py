"""HTTP client for the kvtier sidecar, with the same methods as the in-process ``TieredCache``.

Switching an engine between in-process and sidecar is one line::

    cache = TieredCache(config)                      # in-process
    cache = KVTierClient("http://127.0.0.1:8400")    # sidecar (AsyncKVTierClient for asyncio)

KV travels as msgpack with raw tensor bytes, or with ``use_shm=True`` (same host only) through
shared-memory regions the client creates and reuses and hands to the server once as file
descriptors over its region socket, so only control messages cross HTTP. Server errors come
back as the same ``kvtier.errors`` classes; others as ``RemoteError``.

Wire formats (shared with the server) are in ``kvtier.wire``; the region pool in
``kvtier.shm_pool``.

``kv_buffer()`` hands out tensors already in the packed layout in shared memory: an engine that
writes its KV there puts with no copy on the client. ``get()`` with ``use_shm=True`` returns
views of the region the server decoded into; they stay valid while the caller holds them
(the region is reused only after the last of them is freed). See docs/sidecar-data-plane.md.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Sequence
from typing import Any

import httpx
import msgpack
import torch

from kvtier import errors as kerrors
from kvtier.blocks import BlockHits, bytes_tensor, engine_keys, page_rows
from kvtier.errors import InvalidRequest, KVTierError, LayoutMismatch
from kvtier.keys import as_token_array
from kvtier.layout import KV, KVLayout
from kvtier.namespaces import Namespace
from kvtier.records import BlockLocation, Hit
from kvtier.shm_pool import Region, RegionError, ShmPool
from kvtier.stats import CacheStats, Histogram, NamespaceStats, TierStats
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

# ---- errors and records ------------------------------------------------------------------
class RemoteError(KVTierError):
    """An error answer the client has no local class for (401, 403, 413, 5xx...)."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(f"{status} {error}: {message}")
        self.status, self.error, self.message = status, error, message


_ERRORS: dict[str, type[KVTierError]] = {
    name: cls for name, cls in vars(kerrors).items()
    if isinstance(cls, type) and issubclass(cls, KVTierError)
}


def _error(status: int, error: str, message: str) -> KVTierError:
    cls = _ERRORS.get(error)
    return cls(message) if cls is not None else RemoteError(status, error, message)


def _raise_for(resp: httpx.Response) -> None:
    if resp.status_code < 400:
        return
    try:
        body = resp.json()
        error, message = str(body["error"]), str(body["message"])
    except (ValueError, KeyError, TypeError):
        error, message = "HTTPError", resp.text[:500]
    raise _error(resp.status_code, error, message)


def _histogram(d: dict) -> Histogram:
    return Histogram(tuple(d["buckets"]), list(d["counts"]), d["sum"], d["count"])


def stats_from_dict(d: dict) -> CacheStats:
    """Rebuild a ``CacheStats`` from ``/v1/stats`` JSON."""
    from collections import Counter

    tiers = {}
    for name, t in d["tiers"].items():
        ts = TierStats(name)
        for f in TierStats.__slots__:
            if f in t and f not in ("evictions", "reload_seconds", "age_seconds"):
                setattr(ts, f, t[f])
        ts.evictions = Counter(t.get("evictions", {}))
        ts.reload_seconds = _histogram(t["reload_seconds"])
        ts.age_seconds = _histogram(t["age_seconds"])
        tiers[name] = ts
    known = {"lookups", "lookup_hits", "tokens_looked_up", "tokens_hit", "hit_rate_lookups",
             "hit_rate_tokens", "puts", "tokens_put", "blocks_dropped", "prefetch",
             "cost_decisions", "tiers", "namespaces"}
    return CacheStats(tiers, d["lookups"], d["lookup_hits"], d["tokens_looked_up"], d["tokens_hit"],
                      d["puts"], d["tokens_put"], d["blocks_dropped"], Counter(d["prefetch"]),
                      Counter(d["cost_decisions"]), {k: v for k, v in d.items() if k not in known},
                      {n: NamespaceStats.from_dict(v) for n, v in d.get("namespaces", {}).items()})


def _hit(d: dict) -> Hit:
    blocks = [BlockLocation(b["index"], bytes.fromhex(b["key"]), b["tier"]) for b in d["blocks"]]
    return Hit(d["namespace"], d["tokens"], d["block_tokens"], d["requested_tokens"], blocks)


def _packed_tokens(token_ids: Any) -> bytes:
    """Token ids as little-endian int64 bytes: what ``kvtier.server.body`` takes without parsing."""
    return as_token_array(token_ids).astype("<i8", copy=False).tobytes()


def _tokens_call(method: str, path: str, body: dict[str, Any], token_ids: Any,
                 accept: str | None = None) -> _Call:
    """A request naming a prefix: msgpack with the token ids packed (``kvtier.server.body``); a
    4K-token JSON body costs more to build and parse than the round trip itself."""
    body = {**body, "token_ids": _packed_tokens(token_ids)}
    headers = {"content-type": MSGPACK, **({"accept": accept} if accept else {})}
    return _Call(method, path, content=msgpack.packb(body), headers=headers)


def _keys_call(method: str, path: str, namespace: str, keys: list[bytes],
               accept: str | None = None) -> _Call:
    """A request naming engine blocks: msgpack with the keys as raw bytes."""
    headers = {"content-type": MSGPACK, **({"accept": accept} if accept else {})}
    return _Call(method, path, content=msgpack.packb({"namespace": namespace, "keys": keys}), headers=headers)


# ---- requests as generators: one implementation for the sync and async clients -------------
Op = Generator["_Call", httpx.Response, Any]


class _Call:
    __slots__ = ("method", "path", "json", "content", "headers", "params")

    def __init__(self, method: str, path: str, *, json: Any = None, content: bytes | None = None,
                 headers: dict | None = None, params: dict | None = None) -> None:
        self.method, self.path, self.json = method, path, json
        self.content, self.headers, self.params = content, headers, params


class _Ops:
    """Builds each operation as a generator yielding HTTP calls and returning the result."""

    def __init__(self, use_shm: bool, token: str | None = None, timeout: float = 120.0) -> None:
        self.use_shm = use_shm
        self._shm = ShmPool(token, timeout)
        self._layouts: dict[str, KVLayout] = {}
        self._page_bytes: dict[str, int] = {}

    def register_namespace(self, name: str, *, model_id: str | None = None, layout: KVLayout | None = None,
                           block_tokens: int | None = None, codec: str | None = None,
                           ttl_s: float | None = None) -> Op:
        body = {"name": name, "model_id": model_id, "block_tokens": block_tokens, "codec": codec,
                "ttl_s": ttl_s, "layout": layout.to_dict() if layout else None}
        resp = yield _Call("POST", "/v1/namespaces", json={k: v for k, v in body.items() if v is not None})
        return Namespace.from_dict(resp.json())

    def get_namespace(self, name: str) -> Op:
        resp = yield _Call("GET", f"/v1/namespaces/{name}")
        return Namespace.from_dict(resp.json())

    def namespaces(self) -> Op:
        resp = yield _Call("GET", "/v1/namespaces")
        return [Namespace.from_dict(d) for d in resp.json()]

    def drop_namespace(self, name: str) -> Op:
        resp = yield _Call("DELETE", f"/v1/namespaces/{name}")
        self._layouts.pop(name, None)
        self._page_bytes.pop(name, None)
        return resp.json()["blocks"]

    def lookup(self, namespace: str, token_ids: Sequence[int]) -> Op:
        resp = yield _tokens_call("POST", "/v1/lookup", {"namespace": namespace}, token_ids)
        return _hit(resp.json())

    def evict(self, namespace: str, token_ids: Sequence[int]) -> Op:
        resp = yield _tokens_call("DELETE", "/v1/kv", {"namespace": namespace}, token_ids)
        return resp.json()["blocks"]

    def stats(self) -> Op:
        resp = yield _Call("GET", "/v1/stats")
        return stats_from_dict(resp.json())

    def metrics_text(self) -> Op:
        resp = yield _Call("GET", "/metrics")
        return resp.text

    def ready(self) -> Op:
        resp = yield _Call("GET", "/readyz")
        return resp.json()["status"] == "ok"

    def prefetch(self, namespace: str, token_ids: Sequence[int], to: str = "host", *,
                 policy: str = "best_effort", timeout_s: float | None = None) -> Op:
        resp = yield _tokens_call("POST", "/v1/prefetch", {
            "namespace": namespace, "to": to, "policy": policy, "timeout_s": timeout_s}, token_ids)
        return resp.json()

    def prefetch_status(self, prefetch_id: str, wait_s: float = 0.0) -> Op:
        try:
            resp = yield _Call("GET", f"/v1/prefetch/{prefetch_id}", params={"wait_s": wait_s} if wait_s else None)
        except RemoteError as e:
            if e.status == 404:
                raise KeyError(prefetch_id) from None
            raise
        return resp.json()

    def cancel_prefetch(self, prefetch_id: str) -> Op:
        resp = yield _Call("DELETE", f"/v1/prefetch/{prefetch_id}")
        return resp.json()

    def _layout(self, namespace: str) -> Op:
        layout = self._layouts.get(namespace)
        if layout is None:
            ns = yield from self.get_namespace(namespace)
            if ns.layout is None:
                return None
            layout = self._layouts[namespace] = ns.layout
        return layout

    def kv_buffer(self, namespace: str, tokens: int, *, layout: KVLayout | None = None) -> Op:
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
            raise InvalidRequest(f"kv_buffer tokens must be a positive integer, got {tokens!r}")
        if layout is None:
            layout = yield from self._layout(namespace)
            if layout is None:
                raise LayoutMismatch(f"namespace {namespace!r} has no layout until its first put: "
                                     "pass kv_buffer(..., layout=)")
        region = self._shm.acquire(packed_nbytes(layout, tokens))
        return self._shm.loan(region, layout, tokens)

    def _region_id(self, region: Region) -> Op:
        """``region``'s id at the server, handing it over first if the server does not hold it."""
        rid = self._shm.registered_id(region)
        if rid is None:
            if self._shm.socket_path is None:
                resp = yield _Call("GET", "/v1/kv/shm/socket")
                self._shm.socket_path = resp.json()["path"]
            try:
                rid = self._shm.register(region)
            except RegionError as e:
                raise _error(e.status, e.error, e.message) from None
        return rid

    def _shm_call(self, method: str, path: str, body: dict[str, Any], token_ids: Any,
                  region: Region, size: int) -> Op:
        """A shared-memory request naming ``size`` bytes of ``region``. A server that lost its
        registrations (restarted) is told about the region again and asked once more."""
        for attempt in (0, 1):
            try:
                rid = yield from self._region_id(region)
                return (yield _tokens_call(method, path, {
                    **body, "region": {"id": rid, "offset": 0, "size": size}}, token_ids))
            except (RemoteError, ConnectionError) as e:
                if attempt or (isinstance(e, RemoteError) and e.error != "UnknownRegion"):
                    raise
                self._shm.forget_server()
        raise AssertionError("unreachable")

    def put(self, namespace: str, token_ids: Sequence[int], kv: KV) -> Op:
        ids = as_token_array(token_ids)
        if not self.use_shm:
            resp = yield _tokens_call("PUT", "/v1/kv", {"namespace": namespace, "kv": kv_to_wire(kv)}, ids)
            return resp.json()["tokens"]
        loan = self._shm.find_loan(kv)
        if loan is not None:  # the KV already lies in shared memory as the server reads it
            loan.layout.validate(kv, len(ids))
            resp = yield from self._shm_call("PUT", "/v1/kv/shm", {
                "namespace": namespace, "layout": loan.layout.to_dict(),
                "slot_tokens": loan.slot_tokens}, ids,
                loan.region, packed_nbytes(loan.layout, loan.slot_tokens))
            return resp.json()["tokens"]
        layout = KVLayout.from_kv(kv)
        layout.validate(kv, len(ids))
        nbytes = packed_nbytes(layout, len(ids))
        region = self._shm.acquire(nbytes)
        try:
            pack_into(kv, memoryview(region.mm)[:nbytes])
            resp = yield from self._shm_call("PUT", "/v1/kv/shm", {
                "namespace": namespace, "layout": layout.to_dict()}, ids, region, nbytes)
            return resp.json()["tokens"]
        finally:
            self._shm.release(region)

    def get(self, namespace: str, token_ids: Sequence[int]) -> Op:
        ids = as_token_array(token_ids)
        if not self.use_shm:
            resp = yield _tokens_call("POST", "/v1/kv/get", {"namespace": namespace}, ids, accept=MSGPACK)
            d = msgpack.unpackb(resp.content)
            return (kv_from_wire(d["kv"]) if d["kv"] is not None else None), d["tokens"]
        layout = yield from self._layout(namespace)
        if layout is None:
            return None, 0
        nbytes = packed_nbytes(layout, len(ids))
        # The server decodes straight into a pooled region (pages already faulted in) and the
        # returned tensors alias it: no copy on either side. The region goes back to the pool
        # when the last tensor viewing it is freed.
        region = self._shm.acquire(nbytes)
        loaned = False
        try:
            resp = yield from self._shm_call("POST", "/v1/kv/shm/get", {"namespace": namespace},
                                             ids, region, max(nbytes, 1))
            d = resp.json()
            if d["tokens"] == 0:
                return None, 0
            views = self._shm.loan(region, KVLayout.from_dict(d["layout"]), d["slot_tokens"])
            loaned = True
            return [tuple(t[:d["tokens"]] for t in layer) for layer in views], d["tokens"]
        finally:
            if not loaned:
                self._shm.release(region)

    # ---- key-addressed engine blocks (kvtier.blocks) ------------------------------------------
    def register_block_namespace(self, name: str, *, page_bytes: int, fingerprint: dict | str,
                                 codec: str = "none", ttl_s: float | None = None) -> Op:
        body = {"name": name, "page_bytes": page_bytes, "fingerprint": fingerprint, "codec": codec,
                "ttl_s": ttl_s}
        resp = yield _Call("POST", "/v1/block-namespaces", json={k: v for k, v in body.items() if v is not None})
        ns = Namespace.from_dict(resp.json())
        self._page_bytes[name] = ns.page_bytes
        return ns

    def _page_size(self, namespace: str) -> Op:
        page = self._page_bytes.get(namespace)
        if page is None:
            ns = yield from self.get_namespace(namespace)
            page = self._page_bytes[namespace] = ns.page_bytes
        return page

    def block_exists(self, namespace: str, keys: Sequence[bytes]) -> Op:
        resp = yield _keys_call("POST", "/v1/blocks/exists", namespace, engine_keys(keys))
        d = resp.json()
        return BlockHits(d["leading"], d["present"])

    def put_blocks(self, namespace: str, keys: Sequence[bytes], pages: Any) -> Op:
        keys = engine_keys(keys)
        page = yield from self._page_size(namespace)
        rows = page_rows(pages, len(keys), page)
        if isinstance(pages, torch.Tensor) and pages.is_contiguous() and pages.device.type == "cpu":
            packed: Any = memoryview(pages[:len(keys)].numpy()).cast("B")  # no copy before msgpack
        else:
            packed = b"".join(memoryview(r.cpu().numpy()) for r in rows)
        resp = yield _Call("PUT", "/v1/blocks", headers={"content-type": MSGPACK}, content=msgpack.packb(
            {"namespace": namespace, "keys": keys, "pages": packed}))
        return resp.json()["stored"]

    def get_blocks_into(self, namespace: str, keys: Sequence[bytes], out: Any) -> Op:
        keys = engine_keys(keys)
        page = yield from self._page_size(namespace)
        rows = page_rows(out, len(keys), page, writable=True)
        resp = yield _keys_call("POST", "/v1/blocks/get", namespace, keys, accept=MSGPACK)
        d = msgpack.unpackb(resp.content)
        n, raw = d["count"], d["pages"]
        if d["page_bytes"] != page or len(raw) != n * page:
            raise KVTierError(f"the server answered {len(raw)} bytes for {n} pages of {d['page_bytes']}")
        src = bytes_tensor(raw).view(n, page) if n else None
        for i in range(n):
            rows[i].copy_(src[i])
        return n

    def evict_blocks(self, namespace: str, keys: Sequence[bytes]) -> Op:
        resp = yield _keys_call("DELETE", "/v1/blocks", namespace, engine_keys(keys))
        return resp.json()["blocks"]

    def close(self) -> None:
        self._shm.close()


def _headers(token: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"} if token else {}


class RemotePrefetch:
    """A sidecar prefetch: same fields and methods as ``PrefetchHandle``."""

    TERMINAL = ("done", "failed", "cancelled", "timeout")

    def __init__(self, client: KVTierClient, d: dict) -> None:
        self._client = client
        self._update(d)

    def _update(self, d: dict) -> None:
        self._d = d
        self.id, self.state, self.ready_tokens = d["id"], d["state"], d["ready_tokens"]
        self.namespace, self.target, self.error = d["namespace"], d["target"], d.get("error")
        self.requested_tokens = d["requested_tokens"]

    def to_dict(self) -> dict:
        return dict(self._d)

    def refresh(self) -> RemotePrefetch:
        self._update(self._client._run(self._client._ops.prefetch_status(self.id)))
        return self

    def cancel(self) -> bool:
        was_running = self.state not in self.TERMINAL
        self._update(self._client._run(self._client._ops.cancel_prefetch(self.id)))
        return was_running

    def wait(self, timeout: float | None = None) -> bool:
        """Long-poll the server until the prefetch finishes; True if it did within ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.state not in self.TERMINAL:
            left = 10.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                return False
            self._update(self._client._run(self._client._ops.prefetch_status(self.id, min(left, 10.0))))
        return True


class AsyncRemotePrefetch(RemotePrefetch):
    """``RemotePrefetch`` for ``AsyncKVTierClient``: refresh, cancel and wait are coroutines."""

    async def refresh(self) -> AsyncRemotePrefetch:  # type: ignore[override]
        self._update(await self._client._run(self._client._ops.prefetch_status(self.id)))
        return self

    async def cancel(self) -> bool:  # type: ignore[override]
        was_running = self.state not in self.TERMINAL
        self._update(await self._client._run(self._client._ops.cancel_prefetch(self.id)))
        return was_running

    async def wait(self, timeout: float | None = None) -> bool:  # type: ignore[override]
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.state not in self.TERMINAL:
            left = 10.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                return False
            self._update(await self._client._run(self._client._ops.prefetch_status(self.id, min(left, 10.0))))
        return True


class KVTierClient:
    """Synchronous sidecar client; thread-safe."""

    def __init__(self, base_url: str = "http://127.0.0.1:8400", token: str | None = None, *,
                 use_shm: bool = False, timeout: float = 120.0, transport: httpx.BaseTransport | None = None) -> None:
        self._http = httpx.Client(base_url=base_url, headers=_headers(token), timeout=timeout, transport=transport)
        self._ops = _Ops(use_shm, token, timeout)

    def _run(self, op: Op) -> Any:
        try:
            call = next(op)
            while True:
                resp = self._http.request(call.method, call.path, json=call.json, content=call.content,
                                          headers=call.headers, params=call.params)
                try:
                    _raise_for(resp)
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
        refilled as soon as ``put`` returns. The region stays the caller's until the last tensor
        viewing it is freed, then returns to the client's pool. ``layout`` is needed before the
        namespace's first put; otherwise it is fetched once from the server.
        """
        return self._run(self._ops.kv_buffer(namespace, tokens, layout=layout))

    def put(self, namespace: str, token_ids: Sequence[int], kv: KV) -> int:
        return self._run(self._ops.put(namespace, token_ids, kv))

    def lookup(self, namespace: str, token_ids: Sequence[int]) -> Hit:
        return self._run(self._ops.lookup(namespace, token_ids))

    def get(self, namespace: str, token_ids: Sequence[int]) -> tuple[list[tuple[torch.Tensor, ...]] | None, int]:
        return self._run(self._ops.get(namespace, token_ids))

    def prefetch(self, namespace: str, token_ids: Sequence[int], to: str = "host", *,
                 policy: str = "best_effort", timeout_s: float | None = None) -> RemotePrefetch:
        return RemotePrefetch(self, self._run(self._ops.prefetch(namespace, token_ids, to, policy=policy,
                                                                 timeout_s=timeout_s)))

    def prefetch_status(self, prefetch_id: str) -> RemotePrefetch:
        return RemotePrefetch(self, self._run(self._ops.prefetch_status(prefetch_id)))

    def evict(self, namespace: str, token_ids: Sequence[int]) -> int:
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
        self._http.close()

    def __enter__(self) -> KVTierClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncKVTierClient:
    """asyncio sidecar client: ``KVTierClient``'s methods as coroutines."""

    def __init__(self, base_url: str = "http://127.0.0.1:8400", token: str | None = None, *,
                 use_shm: bool = False, timeout: float = 120.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._http = httpx.AsyncClient(base_url=base_url, headers=_headers(token), timeout=timeout,
                                       transport=transport)
        self._ops = _Ops(use_shm, token, timeout)

    async def _run(self, op: Op) -> Any:
        try:
            call = next(op)
            while True:
                resp = await self._http.request(call.method, call.path, json=call.json, content=call.content,
                                                headers=call.headers, params=call.params)
                try:
                    _raise_for(resp)
                except Exception as e:
                    call = op.throw(e)
                    continue
                call = op.send(resp)
        except StopIteration as stop:
            return stop.value

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

    async def put(self, namespace: str, token_ids: Sequence[int], kv: KV) -> int:
        return await self._run(self._ops.put(namespace, token_ids, kv))

    async def lookup(self, namespace: str, token_ids: Sequence[int]) -> Hit:
        return await self._run(self._ops.lookup(namespace, token_ids))

    async def get(self, namespace: str, token_ids: Sequence[int]) -> tuple[list[tuple[torch.Tensor, ...]] | None, int]:
        return await self._run(self._ops.get(namespace, token_ids))

    async def prefetch(self, namespace: str, token_ids: Sequence[int], to: str = "host", *,
                       policy: str = "best_effort", timeout_s: float | None = None) -> AsyncRemotePrefetch:
        op = self._ops.prefetch(namespace, token_ids, to, policy=policy, timeout_s=timeout_s)
        return AsyncRemotePrefetch(self, await self._run(op))  # type: ignore[arg-type]

    async def prefetch_status(self, prefetch_id: str) -> AsyncRemotePrefetch:
        return AsyncRemotePrefetch(self, await self._run(self._ops.prefetch_status(prefetch_id)))  # type: ignore[arg-type]

    async def evict(self, namespace: str, token_ids: Sequence[int]) -> int:
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
        await self._http.aclose()

    async def __aenter__(self) -> AsyncKVTierClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
