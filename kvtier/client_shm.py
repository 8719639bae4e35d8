"""The sidecar client's shared-memory data plane (``use_shm=True``, same host only).

KV travels through memory regions the client creates (sealed memfds, ``kvtier.shm_pool``),
hands to the server once as file descriptors over its region socket, and then names by id: only
control messages cross HTTP. ``kv_buffer`` lends tensors already in the packed layout the server
reads, so a put of them copies nothing on the client; ``get`` returns views of the region the
server decoded into (the region goes back to the pool once the last view is freed). A server
that lost its registrations (a restart) is handed the region again and asked once more.
See docs/sidecar-data-plane.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from kvtier.client_calls import Call, Op, RemoteError, error_for, tokens_call, with_fresh_namespace
from kvtier.errors import InvalidRequest, KVTierError, LayoutMismatch, UnknownNamespace
from kvtier.layout import KV, KVLayout
from kvtier.shm_pool import Region, RegionError, ShmPool
from kvtier.wire import pack_into, packed_nbytes


class ShmPlane:
    """put, get and kv_buffer through shared-memory regions; ``layout(namespace)`` is the
    client's (cached) operation answering a namespace's layout, or None before its first put;
    ``forget_layout(namespace)`` drops the cached one."""

    def __init__(self, pool: ShmPool, layout: Callable[[str], Op],
                 forget_layout: Callable[[str], None]) -> None:
        self._shm = pool
        self._layout = layout
        self._forget_layout = forget_layout

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

    def put(self, namespace: str, ids: np.ndarray, kv: KV) -> Op:
        """Store ``kv`` for token ids ``ids`` (already checked): straight from a region when
        ``kv`` is a ``kv_buffer`` loan, else packed into a pooled region first."""
        loan = self._shm.find_loan(kv)
        if loan is not None:  # the KV already lies in shared memory as the server reads it
            loan.layout.validate(kv, len(ids))
            try:
                resp = yield from self._shm_call("PUT", "/v1/kv/shm", {
                    "namespace": namespace, "layout": loan.layout.to_dict(),
                    "slot_tokens": loan.slot_tokens}, ids,
                    loan.region, packed_nbytes(loan.layout, loan.slot_tokens))
            except KVTierError:
                raise
            except BaseException:  # no answer: the server may still read it (see _give_back)
                loan.spoiled = True
                raise
            return resp.json()["tokens"]
        layout = KVLayout.from_kv(kv)
        layout.validate(kv, len(ids))
        nbytes = packed_nbytes(layout, len(ids))
        region = self._shm.acquire(nbytes)
        answered = False
        try:
            pack_into(kv, memoryview(region.mm)[:nbytes])
            resp = yield from self._shm_call("PUT", "/v1/kv/shm", {
                "namespace": namespace, "layout": layout.to_dict()}, ids, region, nbytes)
            answered = True
            return resp.json()["tokens"]
        except KVTierError:  # an error answer (or refused before sending): the server is done with it
            answered = True
            raise
        finally:
            self._give_back(region, answered)

    def get(self, namespace: str, ids: np.ndarray) -> Op:
        """The longest cached prefix of ``ids`` (already checked) as views of a region.

        The region is sized from the namespace's layout, which the client keeps; a namespace
        dropped and registered again (by another client) with another layout makes the server
        refuse that size (400): the layout is learned again and the get asked once more."""
        return (yield from with_fresh_namespace(lambda: self._get(namespace, ids),
                                                lambda: self._forget_layout(namespace)))

    def _get(self, namespace: str, ids: np.ndarray) -> Op:
        try:
            layout = yield from self._layout(namespace)
        except UnknownNamespace:  # never stored into: a miss, as in-process
            return None, 0
        if layout is None:
            return None, 0
        nbytes = packed_nbytes(layout, len(ids))
        # The server decodes straight into a pooled region (pages already faulted in) and the
        # returned tensors alias it: no copy on either side. The region goes back to the pool
        # when the last tensor viewing it is freed.
        region = self._shm.acquire(nbytes)
        loaned = answered = False
        try:
            resp = yield from self._shm_call("POST", "/v1/kv/shm/get", {"namespace": namespace},
                                             ids, region, max(nbytes, 1))
            answered = True
            d = resp.json()
            if d["tokens"] == 0:
                return None, 0
            views = self._shm.loan(region, KVLayout.from_dict(d["layout"]), d["slot_tokens"])
            loaned = True
            return [tuple(t[:d["tokens"]] for t in layer) for layer in views], d["tokens"]
        except KVTierError:
            answered = True
            raise
        finally:
            if not loaned:
                self._give_back(region, answered)

    def _give_back(self, region: Region, answered: bool) -> None:
        """A pooled region back to the pool once the server answered the request naming it;
        discarded where it did not (``ShmPool.discard``: it may still be in use there)."""
        if answered:
            self._shm.release(region)
        else:
            self._shm.discard(region)

    def _region_id(self, region: Region) -> Op:
        """``region``'s id at the server, handing it over first if the server does not hold it."""
        rid = self._shm.registered_id(region)
        if rid is None:
            if self._shm.socket_path is None:
                resp = yield Call("GET", "/v1/kv/shm/socket")
                self._shm.socket_path = resp.json()["path"]
            try:
                rid = self._shm.register(region)
            except RegionError as e:
                raise error_for(e.status, e.error, e.message) from None
        return rid

    def _shm_call(self, method: str, path: str, body: dict[str, Any], token_ids: Any,
                  region: Region, size: int) -> Op:
        """A shared-memory request naming ``size`` bytes of ``region``. A server that lost its
        registrations (restarted) is told about the region again and asked once more."""
        for attempt in (0, 1):
            try:
                rid = yield from self._region_id(region)
                return (yield tokens_call(method, path, {
                    **body, "region": {"id": rid, "offset": 0, "size": size}}, token_ids))
            except (RemoteError, ConnectionError) as e:
                if attempt or (isinstance(e, RemoteError) and e.error != "UnknownRegion"):
                    raise
                self._shm.forget_server()
        raise AssertionError("unreachable")
