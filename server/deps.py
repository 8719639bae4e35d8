"""Per-request context: the cache, the settings and the authenticated caller."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

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
