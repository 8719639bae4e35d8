"""The namespace catalog: the local registry, plus the records a shared tier carries.

A name this instance never registered may still be known to the fleet: the catalog then finds
its record in the shared tier (``kvtier.shared_namespaces``) and registers it here, so its
blocks' keys can be computed. Every namespace stored into is published there in turn.
"""

from __future__ import annotations

from kvtier.errors import InvalidRequest, UnknownNamespace
from kvtier.layout import KV, KVLayout
from kvtier.namespaces import Namespace, NamespaceRegistry, validate_name
from kvtier.shared_namespaces import SharedNamespaces


class NamespaceCatalog:
    """Namespaces by name; thread-safe. ``block_tokens``/``codec`` are the cache's defaults."""

    def __init__(self, registry: NamespaceRegistry, shared: SharedNamespaces | None, *,
                 block_tokens: int, codec: str) -> None:
        self.registry = registry
        self.shared = shared
        self.block_tokens = block_tokens
        self.codec = codec

    def register(self, ns: Namespace) -> Namespace:
        """Register (idempotently) and publish; a conflicting re-registration raises."""
        ns = self.registry.register(ns)
        self.publish(ns)
        return ns

    def publish(self, ns: Namespace) -> None:
        if self.shared is not None:
            self.shared.publish(ns)

    def find(self, name: str) -> Namespace | None:
        """A registered namespace, else one another instance published to the shared tier
        (then registered here)."""
        ns = self.registry.find(validate_name(name))
        if ns is not None or self.shared is None:
            return ns
        found = self.shared.find(name)
        if found is None:
            return None
        try:
            return self.registry.register(found)
        except InvalidRequest:  # registered here meanwhile, with other settings: ours wins
            return self.registry.find(name)

    def get(self, name: str) -> Namespace:
        ns = self.find(name)
        if ns is None:
            raise UnknownNamespace(f"unknown namespace {name!r}: register it first")
        return ns

    def all(self) -> list[Namespace]:
        return self.registry.all()

    def for_put(self, name: str, kv: KV, *, create: bool) -> Namespace:
        """The namespace a put stores into, registered (from ``kv``'s layout) if it must be;
        ``create=False`` raises UnknownNamespace instead. Published to the shared tier."""
        ns = self.find(name)
        if ns is None:
            if not create:
                raise UnknownNamespace(f"unknown namespace {name!r}: register it first")
            ns = self.registry.register(
                Namespace(name, name, self.block_tokens, self.codec, KVLayout.from_kv(kv)))
        elif ns.layout is None:
            ns = self.registry.fix_layout(name, KVLayout.from_kv(kv))
        self.publish(ns)
        return ns

    def check_live(self, ns: Namespace) -> None:
        """Raise if ``ns`` was dropped (or replaced) since a put began: a put never publishes
        into, or re-creates, a namespace that was dropped meanwhile."""
        current = self.registry.find(ns.name)
        if current is ns:  # the usual answer, asked per block: no digests to compute
            return
        if current is None or current.digest != ns.digest:
            raise UnknownNamespace(f"namespace {ns.name!r} was dropped while the put ran")

    def remove(self, name: str) -> None:
        """Forget ``name`` here (its record in the shared tier: ``unpublish``)."""
        self.registry.remove(name)

    def unpublish(self, name: str) -> None:
        """Delete ``name``'s record from the shared tier (a network call: no lock held)."""
        if self.shared is not None:
            self.shared.forget(name)

    def ttls(self) -> dict[str, float]:
        return {ns.name: ns.ttl_s for ns in self.registry.all() if ns.ttl_s is not None}
