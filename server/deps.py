"""Per-request context: the cache, the settings and the authenticated caller."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from kvtier.errors import LayoutMismatch, UnknownNamespace
from kvtier.layout import KVLayout
from kvtier.manager import TieredCache
from kvtier.namespaces import Namespace
from kvtier.server.auth import Principal, authenticate
from kvtier.server.errors import PayloadTooLarge
from kvtier.settings import ServerSettings

T = TypeVar("T")


@dataclass(slots=True)
class Ctx:
    cache: TieredCache
    settings: ServerSettings
    principal: Principal

    def check_tokens(self, token_ids: list[int] | Any) -> None:
        n = len(token_ids)
        if n > self.settings.max_tokens:
            raise PayloadTooLarge(f"token_ids has {n} ids, the limit is {self.settings.max_tokens}")

    def namespace(self, name: str) -> Namespace:
        """The caller's registered namespace ``name`` (403 another tenant's, 404 unknown)."""
        return self.cache.get_namespace(self.principal.scoped(name))

    def namespace_for_put(self, name: str, layout: KVLayout) -> Namespace:
        """The caller's namespace ``name`` for a put of KV in ``layout``: registered first (this
        tenant, this layout, the server's block size and codec) if unknown, as in-process."""
        scoped = self.principal.scoped(name)
        ns = self.find_namespace(name)
        if ns is None:
            ns = self.cache.register_namespace(scoped, model_id=self.principal.external(scoped),
                                               layout=layout, tenant=self.principal.tenant)
        if ns.layout is not None and ns.layout != layout:
            raise LayoutMismatch(f"KV shape and dtype {layout.fingerprint()} do not match namespace "
                                 f"{name!r} layout {ns.layout.fingerprint()}")
        return ns

    def find_namespace(self, name: str) -> Namespace | None:
        """The caller's namespace ``name``, None if it is unknown (a read of it is a miss, as
        in-process); 403 for another tenant's."""
        scoped = self.principal.scoped(name)
        try:
            return self.cache.get_namespace(scoped)
        except UnknownNamespace:
            return None

    def out(self, ns: Namespace) -> dict:
        d = ns.to_dict()
        d["name"] = self.principal.external(ns.name)
        return d

    async def call(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """Run blocking cache work off the event loop."""
        return await run_in_threadpool(fn, *args, **kw)


def get_ctx(request: Request) -> Ctx:
    state = request.app.state
    return Ctx(state.cache, state.settings, authenticate(state.settings.tokens, request))


CtxDep = Depends(get_ctx)
