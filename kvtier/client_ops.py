"""The sidecar client's operations, written once for the sync and the async client: each is a
generator yielding the HTTP calls it needs (``kvtier.client_calls.Call``) and returning its
result. ``put``, ``get`` and ``kv_buffer`` take the shared-memory data plane
(``kvtier.client_shm``) when the client was built with ``use_shm=True``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol
from urllib.parse import quote

import torch

from kvtier.blocks import BlockHits, bytes_tensor, engine_keys, page_rows
from kvtier.client_calls import (
    Call,
    Op,
    RemoteError,
    keys_call,
    msgpack_call,
    tokens_call,
    with_fresh_namespace,
)
from kvtier.client_shm import ShmPlane
from kvtier.errors import InvalidRequest, InvalidType, KVTierError
from kvtier.keys import TokenIds, as_token_array
from kvtier.layout import KV, KVLayout
from kvtier.namespaces import Namespace
from kvtier.records import BlockLocation, Hit
from kvtier.shm_pool import ShmPool
from kvtier.stats import CacheStats, Histogram, NamespaceStats, TierStats
from kvtier.wire import MSGPACK, kv_from_wire, kv_to_wire, unpack_views


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


def path_segment(name: str) -> str:
    """``name`` as one path segment of a URL, every character it could be read as syntax by
    escaped: ``/`` (a namespace may be ``tenant/name``), ``?``, ``#``, ``%``, and dots, since
    a URL library removes ``.`` and ``..`` segments: ``drop_namespace("zz/../victim")`` sent
    ``DELETE /v1/namespaces/victim`` and dropped another namespace. The server decodes it."""
    return quote(name, safe="").replace(".", "%2E")


class Ops:
    """Builds each operation as a generator yielding HTTP calls and returning the result."""

    def __init__(self, use_shm: bool, token: str | None = None, timeout: float = 120.0) -> None:
        self.use_shm = use_shm
        self._shm = ShmPool(token, timeout)
        self._plane = ShmPlane(self._shm, self._layout, self._forget)
        self._layouts: dict[str, KVLayout] = {}
        self._page_bytes: dict[str, int] = {}

    def register_namespace(self, name: str, *, model_id: str | None = None, layout: KVLayout | None = None,
                           block_tokens: int | None = None, codec: str | None = None,
                           ttl_s: float | None = None) -> Op:
        body = {"name": name, "model_id": model_id, "block_tokens": block_tokens, "codec": codec,
                "ttl_s": ttl_s, "layout": layout.to_dict() if layout else None}
        resp = yield Call("POST", "/v1/namespaces", json={k: v for k, v in body.items() if v is not None})
        return Namespace.from_dict(resp.json())

    def get_namespace(self, name: str) -> Op:
        resp = yield Call("GET", f"/v1/namespaces/{path_segment(name)}")
        return Namespace.from_dict(resp.json())

    def namespaces(self) -> Op:
        resp = yield Call("GET", "/v1/namespaces")
        return [Namespace.from_dict(d) for d in resp.json()]

    def drop_namespace(self, name: str) -> Op:
        resp = yield Call("DELETE", f"/v1/namespaces/{path_segment(name)}")
        self._forget(name)
        return resp.json()["blocks"]

    def _forget(self, name: str) -> None:
        """Forget what this client keeps of namespace ``name`` (its layout, its page size):
        learned again on next use. Why: another client may drop it and register it again with
        another layout, and the server then refuses sizes taken from the old one."""
        self._layouts.pop(name, None)
        self._page_bytes.pop(name, None)

    def lookup(self, namespace: str, token_ids: TokenIds) -> Op:
        resp = yield tokens_call("POST", "/v1/lookup", {"namespace": namespace}, token_ids)
        return _hit(resp.json())

    def evict(self, namespace: str, token_ids: TokenIds) -> Op:
        resp = yield tokens_call("DELETE", "/v1/kv", {"namespace": namespace}, token_ids)
        return resp.json()["blocks"]

    def stats(self) -> Op:
        resp = yield Call("GET", "/v1/stats")
        return stats_from_dict(resp.json())

    def metrics_text(self) -> Op:
        resp = yield Call("GET", "/metrics")
        return resp.text

    def ready(self) -> Op:
        resp = yield Call("GET", "/readyz")
        return resp.json()["status"] == "ok"

    def prefetch(self, namespace: str, token_ids: TokenIds, to: str = "host", *,
                 policy: str = "best_effort", timeout_s: float | None = None) -> Op:
        resp = yield tokens_call("POST", "/v1/prefetch", {
            "namespace": namespace, "to": to, "policy": policy, "timeout_s": timeout_s}, token_ids)
        return resp.json()

    def prefetch_status(self, prefetch_id: str, wait_s: float = 0.0) -> Op:
        try:
            resp = yield Call("GET", f"/v1/prefetch/{path_segment(prefetch_id)}", params={"wait_s": wait_s} if wait_s else None)
        except RemoteError as e:
            if e.status == 404:
                raise KeyError(prefetch_id) from None
            raise
        return resp.json()

    def cancel_prefetch(self, prefetch_id: str) -> Op:
        resp = yield Call("DELETE", f"/v1/prefetch/{path_segment(prefetch_id)}")
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
        return (yield from self._plane.kv_buffer(namespace, tokens, layout=layout))

    def put(self, namespace: str, token_ids: TokenIds, kv: KV) -> Op:
        ids = as_token_array(token_ids)
        if self.use_shm:
            return (yield from self._plane.put(namespace, ids, kv))
        resp = yield tokens_call("PUT", "/v1/kv", {"namespace": namespace, "kv": kv_to_wire(kv)}, ids)
        return resp.json()["tokens"]

    def get(self, namespace: str, token_ids: TokenIds) -> Op:
        ids = as_token_array(token_ids)
        if self.use_shm:
            return (yield from self._plane.get(namespace, ids))
        resp = yield tokens_call("POST", "/v1/kv/get", {"namespace": namespace}, ids, accept=MSGPACK, bulk=True)
        d = unpack_views(resp.content)  # the tensors view the body (pooled memory): no copy per tensor
        if not isinstance(d, dict) or set(d) != {"tokens", "kv"}:
            raise InvalidType("the sidecar's get answer is not a map of tokens and kv")
        return (kv_from_wire(d["kv"]) if d["kv"] is not None else None), d["tokens"]

    # ---- key-addressed engine blocks (kvtier.blocks) ------------------------------------------
    def register_block_namespace(self, name: str, *, page_bytes: int, fingerprint: dict | str,
                                 codec: str = "none", ttl_s: float | None = None) -> Op:
        body = {"name": name, "page_bytes": page_bytes, "fingerprint": fingerprint, "codec": codec,
                "ttl_s": ttl_s}
        resp = yield Call("POST", "/v1/block-namespaces", json={k: v for k, v in body.items() if v is not None})
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
        resp = yield keys_call("POST", "/v1/blocks/exists", namespace, engine_keys(keys))
        d = resp.json()
        return BlockHits(d["leading"], d["present"])

    def put_blocks(self, namespace: str, keys: Sequence[bytes], pages: Any) -> Op:
        keys = engine_keys(keys)
        return (yield from with_fresh_namespace(
            lambda: self._in_parts(functools.partial(self._put_blocks, namespace), keys, pages, False),
            lambda: self._forget(namespace)))

    def _in_parts(self, call: Callable[[list[bytes], Any], Op], keys: list[bytes], data: Any,
                  leading: bool) -> Op:
        """``call(keys, data)``, in halves where the server refuses the whole as over its
        data-plane limit (413): an engine's job of many pages used to fail whole, every time.
        ``leading``: the answer is a leading run, so a short first half ends it."""
        try:
            return (yield from call(keys, data))
        except RemoteError as e:
            if e.status != 413 or len(keys) < 2:
                raise
        half = len(keys) // 2
        n = yield from self._in_parts(call, keys[:half], data[:half], leading)
        if leading and n < half:
            return n
        return n + (yield from self._in_parts(call, keys[half:], data[half:len(keys)], leading))

    def _put_blocks(self, namespace: str, keys: list[bytes], pages: Any) -> Op:
        page = yield from self._page_size(namespace)
        rows = page_rows(pages, len(keys), page)
        if isinstance(pages, torch.Tensor) and pages.is_contiguous() and pages.device.type == "cpu":
            packed: Any = pages[:len(keys)].reshape(-1).numpy().data  # no copy before msgpack
        else:
            packed = b"".join(r.cpu().numpy().data for r in rows)
        resp = yield msgpack_call("PUT", "/v1/blocks", {"namespace": namespace, "keys": keys, "pages": packed})
        return resp.json()["stored"]

    def get_blocks_into(self, namespace: str, keys: Sequence[bytes], out: Any) -> Op:
        keys = engine_keys(keys)
        return (yield from with_fresh_namespace(
            lambda: self._in_parts(functools.partial(self._get_blocks_into, namespace), keys, out, True),
            lambda: self._forget(namespace)))

    def _get_blocks_into(self, namespace: str, keys: list[bytes], out: Any) -> Op:
        page = yield from self._page_size(namespace)
        rows = page_rows(out, len(keys), page, writable=True)
        resp = yield keys_call("POST", "/v1/blocks/get", namespace, keys, accept=MSGPACK, bulk=True)
        d = unpack_views(resp.content)  # the pages view the answer (pooled memory): copied once, below
        n, raw = d["count"], d["pages"]
        if d["page_bytes"] != page:  # registered again with another page size: learned again
            raise InvalidRequest(f"the namespace's pages are {d['page_bytes']} bytes now, not {page}")
        if len(raw) != n * page:
            raise KVTierError(f"the server answered {len(raw)} bytes for {n} pages of {page}")
        if n:
            src = bytes_tensor(raw).view(n, page)
            for i in range(n):
                rows[i].copy_(src[i])
        return n

    def evict_blocks(self, namespace: str, keys: Sequence[bytes]) -> Op:
        resp = yield keys_call("DELETE", "/v1/blocks", namespace, engine_keys(keys))
        return resp.json()["blocks"]

    def close(self) -> None:
        self._shm.close()


class Runner(Protocol):
    """A client as a prefetch handle sees it: its operations, and how it runs one (the async
    client's ``_run`` returns a coroutine)."""

    _ops: Ops

    def _run(self, op: Op) -> Any: ...


class RemotePrefetch:
    """A sidecar prefetch: same fields and methods as ``PrefetchHandle``."""

    TERMINAL = ("done", "failed", "cancelled", "timeout")

    def __init__(self, client: Runner, d: dict) -> None:
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
        """Ask the prefetch to stop; False if it had already finished (the server says which:
        this handle's last state may be stale)."""
        d = self._client._run(self._client._ops.cancel_prefetch(self.id))
        self._update(d)
        return bool(d.get("cancelled"))

    def wait(self, timeout: float | None = None) -> bool:
        """Long-poll the server until the prefetch finishes; True if it did within ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.state not in self.TERMINAL:
            left = 10.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                return False
            self._update(self._client._run(self._client._ops.prefetch_status(self.id, min(left, 10.0))))
        return True
