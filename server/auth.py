"""Bearer tokens bound to tenants, and per-tenant namespace scoping.

A tenant addresses its namespaces by short name (``chat``) or qualified name
(``tenant/chat``); internally they are stored as ``tenant/chat`` and registered with
``tenant=...`` so their keys are salted per tenant. Naming another tenant's namespace is 403.
With no tokens configured, auth is off and every caller is the anonymous tenant ``""``.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass

from fastapi import Request

from kvtier.errors import InvalidRequest
from kvtier.server.errors import Forbidden, Unauthorized
from kvtier.settings import ServerSettings

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the tenant its token is bound to (``""`` when auth is off)."""

    tenant: str

    def scoped(self, name: str) -> str:
        """The internal name of namespace ``name`` for this tenant; 403 for another's."""
        if not isinstance(name, str):
            raise InvalidRequest(f"namespace must be a string, got {type(name).__name__}")
        tenant, sep, short = name.rpartition("/")
        if sep and tenant != self.tenant:
            raise Forbidden(f"namespace {name!r} belongs to tenant {tenant!r}, "
                            f"not to this token's tenant {self.tenant!r}")
        if not NAME_RE.match(short):
            raise InvalidRequest(f"invalid namespace name {name!r}: expected 1-128 characters "
                                 "of letters, digits, '.', '_', ':' or '-'")
        return f"{self.tenant}/{short}" if self.tenant else short

    def owns(self, internal: str) -> bool:
        return internal.startswith(f"{self.tenant}/") if self.tenant else "/" not in internal

    def external(self, internal: str) -> str:
        return internal.removeprefix(f"{self.tenant}/") if self.tenant else internal


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("malformed Authorization header: expected 'Bearer <token>'")
    return token.strip()


def authenticate(tokens: dict[str, str], request: Request) -> Principal:
    """Resolve the caller's tenant. 401 for a missing or unknown token when auth is on."""
    return tenant_of(tokens, _bearer(request) if tokens else None)


def tenant_of(tokens: dict[str, str], token: str | None) -> Principal:
    """The tenant bearer ``token`` is bound to (HTTP and the region socket alike)."""
    if not tokens:
        return Principal("")
    if token is None:
        raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
    tenant = None
    for known, t in tokens.items():  # compare against all: no early exit timing leak
        if hmac.compare_digest(known.encode(), token.encode()):
            tenant = t
    if tenant is None:
        raise Unauthorized("unknown bearer token")
    return Principal(tenant)


def metrics_access(settings: ServerSettings, request: Request) -> bool:
    """May this ``/metrics`` caller see namespace names? 401/403 if it may not scrape at all.

    With a scrape token (``--metrics-token``) set, ``/metrics`` needs exactly that token and then
    shows everything, namespaces tenant-qualified (``tenant/name``); a tenant's token is 403 (its
    owner may not read the other tenants' names). Without one, ``/metrics`` is open, and shows
    per-namespace families only while auth is off (one tenant: nothing to hide).
    """
    if not settings.metrics_token:
        return not settings.tokens
    token = _bearer(request)
    if token is None:
        raise Unauthorized("missing bearer token: /metrics needs the scrape token (--metrics-token)")
    if hmac.compare_digest(settings.metrics_token.encode(), token.encode()):
        return True
    if any(hmac.compare_digest(known.encode(), token.encode()) for known in settings.tokens):
        raise Forbidden("a tenant's token cannot read /metrics: it needs the scrape token "
                        "(--metrics-token)")
    raise Unauthorized("unknown bearer token for /metrics: it needs the scrape token "
                       "(--metrics-token)")
