"""The namespace catalog (``kvtier.catalog``): registration for a put, a dropped namespace never
re-created, and records shared through a real Redis remote tier, so a second instance finds a
namespace it never registered."""

from __future__ import annotations

import pytest

from kvtier.catalog import NamespaceCatalog
from kvtier.errors import InvalidRequest, UnknownNamespace
from kvtier.layout import KVLayout
from kvtier.namespaces import Namespace, NamespaceRegistry
from kvtier.shared_namespaces import SharedNamespaces
from tests.conftest import random_kv
from tests.parts import remote

KV = random_kv(32)  # 2 layers of (K, V), each [32, 2, 8] float32
LAYOUT = KVLayout.from_kv(KV)


def catalog(shared=None, path=None) -> NamespaceCatalog:
    return NamespaceCatalog(NamespaceRegistry(path), SharedNamespaces(shared) if shared else None,
                            block_tokens=16, codec="int8")


def test_a_put_registers_an_unknown_namespace_from_its_kv_with_the_defaults():
    c = catalog()
    ns = c.for_put("m", KV, create=True)
    assert (ns.name, ns.model_id, ns.block_tokens, ns.codec, ns.layout) == ("m", "m", 16, "int8", LAYOUT)
    assert c.get("m") == ns and c.all() == [ns]
    assert c.for_put("m", KV, create=True) == ns  # found, not registered again


def test_a_put_without_create_never_registers():
    c = catalog()
    with pytest.raises(UnknownNamespace, match="register it first"):
        c.for_put("m", KV, create=False)
    assert c.find("m") is None and c.all() == []
    with pytest.raises(UnknownNamespace):
        c.get("m")


def test_the_first_put_fixes_the_layout_of_a_namespace_registered_without_one():
    c = catalog()
    c.register(Namespace("m", "llama", 32, "none"))
    ns = c.for_put("m", KV, create=False)
    assert ns.layout == LAYOUT and (ns.model_id, ns.block_tokens, ns.codec) == ("llama", 32, "none")
    assert c.get("m").layout == LAYOUT


def test_registration_is_idempotent_and_a_conflicting_one_raises():
    c = catalog()
    ns = Namespace("m", "llama", 16, "none", LAYOUT)
    assert c.register(ns) == ns and c.register(ns) == ns
    with pytest.raises(InvalidRequest, match="different settings"):
        c.register(Namespace("m", "llama", 16, "fp8", LAYOUT))
    assert c.get("m") == ns


def test_a_put_notices_its_namespace_was_dropped_or_replaced():
    c = catalog()
    ns = c.for_put("m", KV, create=True)
    c.check_live(ns)
    c.remove("m")
    with pytest.raises(UnknownNamespace, match="dropped while the put ran"):
        c.check_live(ns)
    c.register(Namespace("m", "other model", 16, "int8", LAYOUT))  # same name, other settings
    with pytest.raises(UnknownNamespace):
        c.check_live(ns)


def test_ttls_name_only_namespaces_with_one():
    c = catalog()
    c.register(Namespace("short", "m", 16, "none", LAYOUT, ttl_s=5.0))
    c.register(Namespace("forever", "m", 16, "none", LAYOUT))
    assert c.ttls() == {"short": 5.0}


def test_a_registration_survives_a_restart(tmp_path):
    ns = catalog(path=tmp_path / "namespaces.json").for_put("m", KV, create=True)
    assert catalog(path=tmp_path / "namespaces.json").find("m") == ns


def test_a_second_instance_finds_a_namespace_through_the_shared_tier(redis_server):
    a_tier, b_tier = remote(redis_server, prefix="fleet"), remote(redis_server, prefix="fleet")
    try:
        a, b = catalog(a_tier), catalog(b_tier)
        ns = a.for_put("m", KV, create=True)  # published with the put
        registered = a.register(Namespace("registered", "llama", 16, "none", LAYOUT))
        a.register(Namespace("no layout yet", "m", 16, "none"))  # nothing to publish yet
        assert a_tier.flush(30)
        found = b.find("m")  # no registration call on b
        assert found == ns and found.digest == ns.digest
        assert b.registry.find("m") == ns  # registered on b: its keys can be computed
        assert b.find("registered") == registered  # published when registered
        assert b.find("no layout yet") is None
        a.remove("m")
        a.unpublish("m")
        assert catalog(b_tier).find("m") is None  # a third instance: the record is gone
    finally:
        a_tier.close()
        b_tier.close()
