"""Building a cache's tiers from its configuration, fastest first."""

from __future__ import annotations

from kvtier.config import CacheConfig
from kvtier.errors import KVTierError
from kvtier.tiers.base import Tier


def build_tiers(config: CacheConfig) -> list[Tier]:
    """The tiers a config asks for, fastest first: device, host, SSD, remote.

    The config is checked again first (its fields may have been assigned since it was built),
    so a bad setting fails in one line before any tier is allocated.
    """
    from kvtier.tiers.memory import make_device_tier, make_host_tier

    config.__post_init__()
    tiers: list[Tier] = []
    if config.device.capacity_bytes > 0:
        tiers.append(make_device_tier(config.device))
    if config.host.capacity_bytes > 0:
        tiers.append(make_host_tier(config.host))
    if config.ssd.path:
        from kvtier.tiers.ssd import SSDTier

        tiers.append(SSDTier(config.ssd, compact_interval_s=config.ssd.compaction_interval_s))
    if config.remote.backend:
        from kvtier.tiers.remote import make_remote_tier

        rc = config.remote
        remote = make_remote_tier(rc, breaker_failures=rc.breaker_failures,
                                  breaker_cooldown_s=rc.breaker_cooldown_s, prefix=rc.key_prefix)
        if remote is not None:
            tiers.append(remote)
    if not tiers:
        raise KVTierError("no tier is configured: give the host, device or SSD tier a capacity")
    return tiers


def policy_name(config: CacheConfig, tier: Tier) -> str:
    """The eviction policy configured for ``tier`` (by its name; tiers a test builds by hand
    that the config does not name use the host tier's)."""
    policies = {"device": config.device.policy, "host": config.host.policy,
                "ssd": config.ssd.policy, "remote": config.remote.policy}
    return str(policies.get(tier.name, config.host.policy))
