"""The shared remote tier: ``make_remote_tier(config)`` picks a backend by ``config.backend``.

Backends: ``redis`` and ``redis-cluster`` (extra ``kvtier[redis]``), ``mooncake`` (extra
``kvtier[mooncake]``). Their client libraries are imported only when configured.
"""

from __future__ import annotations

from typing import Any

from kvtier.config import RemoteTierConfig
from kvtier.errors import InvalidRequest
from kvtier.tiers.remote.base import RemoteBackend, backend_factory, register_backend
from kvtier.tiers.remote.breaker import CircuitBreaker
from kvtier.tiers.remote.tier import RemoteTier


def _redis():
    from kvtier.tiers.remote.redis import RedisBackend

    return RedisBackend


def _redis_cluster():
    from kvtier.tiers.remote.redis import RedisBackend

    return lambda url, **kw: RedisBackend(url, cluster=True, **kw)


def _mooncake():
    from kvtier.tiers.remote.mooncake import MooncakeBackend

    return MooncakeBackend


register_backend("redis", _redis)
register_backend("redis-cluster", _redis_cluster)
register_backend("mooncake", _mooncake)


def make_remote_tier(
    config: RemoteTierConfig, *, breaker_failures: int = 5, breaker_cooldown_s: float = 2.0,
    **backend_options: Any,
) -> RemoteTier | None:
    """The configured RemoteTier, or None when ``config.backend`` is None.

    ``backend_options`` go to the backend (``prefix``, ``ttl_s`` = the namespace's retention,
    ``chunk_bytes``, ...). Raises InvalidRequest for an unknown backend or a missing url.
    """
    if config.backend is None:
        return None
    if not config.url:
        raise InvalidRequest(f"remote backend {config.backend!r} needs remote.url")
    if config.timeout_s <= 0:
        raise InvalidRequest(f"remote.timeout_s must be > 0, got {config.timeout_s!r}")
    factory = backend_factory(config.backend)
    backend = factory(config.url, timeout_s=config.timeout_s, **backend_options)
    return RemoteTier(backend, config, breaker=CircuitBreaker(breaker_failures, breaker_cooldown_s))


__all__ = ["CircuitBreaker", "RemoteBackend", "RemoteTier", "make_remote_tier", "register_backend"]
