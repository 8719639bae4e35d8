"""The namespace registry beside the SSD data: written crash-safely, checked on open, and a
damaged one never stops the cache from opening (logged, counted, what can be is recovered)."""

from __future__ import annotations

import errno
import json
import logging
import os

import pytest

import kvtier.namespaces as namespaces_mod
from kvtier import CacheConfig, HostTierConfig, KVLayout, SSDTierConfig, TieredCache
from kvtier.errors import StorageFull
from tests.conftest import random_kv

BT = 16
FILE_FORMAT = "kvtier-namespaces"


def cache(path) -> TieredCache:
    return TieredCache(CacheConfig(
        block_tokens=BT, host=HostTierConfig(capacity_bytes=0),
        ssd=SSDTierConfig(path=str(path), capacity_bytes="64MiB", min_free_bytes=0, durability="sync",
                          segment_bytes="1MiB", direct_io=False)))


def prompt(i: int):
    return [i * 7919 + j for j in range(3 * BT)], random_kv(3 * BT, seed=i)


LAYOUT = KVLayout.from_kv(prompt(0)[1])
NAMES = ("alpha", "beta", "gamma")


def populate(path) -> None:
    with cache(path) as c:
        for i, name in enumerate(NAMES):
            c.register_namespace(name, model_id=f"model-{name}", layout=LAYOUT, tenant="t1")
            c.put(name, *prompt(i))


def served(c: TieredCache, name: str, i: int) -> int:
    return c.lookup(name, prompt(i)[0]).tokens


def test_each_copy_is_written_fsynced_renamed_and_its_directory_fsynced(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", os.path.basename(src), os.path.basename(dst)))
        return real_replace(src, dst)

    with cache(tmp_path) as c:
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        c.register_namespace("alpha", layout=LAYOUT)
        monkeypatch.undo()
    mine = [e for e in events if any("namespaces" in str(x) for x in e[1:]) or e[1] == tmp_path.name]
    assert mine == [
        ("fsync", "namespaces.json.tmp"), ("rename", "namespaces.json.tmp", "namespaces.json"),
        ("fsync", tmp_path.name),
        ("fsync", "namespaces.json.bak.tmp"), ("rename", "namespaces.json.bak.tmp", "namespaces.json.bak"),
        ("fsync", tmp_path.name),
    ], events


def test_a_garbled_registry_is_recovered_from_its_twin_and_the_cache_opens(tmp_path, caplog):
    populate(tmp_path)
    (tmp_path / "namespaces.json").write_bytes(b"\x00\x17 not json at all")
    with caplog.at_level(logging.ERROR), cache(tmp_path) as c:
        assert sorted(ns.name for ns in c.namespaces()) == sorted(NAMES)
        assert all(served(c, name, i) == 3 * BT for i, name in enumerate(NAMES))
        assert c.stats().to_dict()["namespace_registry_errors"] == 1
    assert "namespace registry" in caplog.text and "not JSON" in caplog.text
    for name in ("namespaces.json", "namespaces.json.bak"):  # both copies rewritten whole
        assert json.loads((tmp_path / name).read_text())["format"] == FILE_FORMAT
    with cache(tmp_path) as c:
        assert "namespace_registry_errors" not in c.stats().to_dict()


def test_a_damaged_entry_is_caught_by_its_checksum(tmp_path):
    populate(tmp_path)
    main = tmp_path / "namespaces.json"
    main.write_text(main.read_text().replace("model-beta", "model-bet4"))  # still valid JSON
    with cache(tmp_path) as c:
        assert c.get_namespace("beta").model_id == "model-beta"  # from the twin, not the damage
        assert served(c, "beta", 1) == 3 * BT
        assert c.namespaces_registry.errors == 1
        assert "entry 1 is damaged" in c.namespaces_registry.problems[0]


def test_both_copies_lost_the_cache_opens_and_reregistering_finds_the_blocks(tmp_path):
    populate(tmp_path)
    (tmp_path / "namespaces.json").write_bytes(b"")
    (tmp_path / "namespaces.json.bak").unlink()
    with cache(tmp_path) as c:
        assert c.namespaces() == [] and c.namespaces_registry.errors >= 1
        assert c.stats().tiers["ssd"].blocks == 3 * len(NAMES)  # the blocks are still there
        assert served(c, "alpha", 0) == 0  # unreachable without their namespace...
        c.register_namespace("alpha", model_id="model-alpha", layout=LAYOUT, tenant="t1")
        assert served(c, "alpha", 0) == 3 * BT  # ...until it is registered with the same settings
        toks, kv = prompt(0)
        out, n = c.get("alpha", toks)
        assert n == 3 * BT and all(a.equal(b) for la, lb in zip(out, kv, strict=True)
                                   for a, b in zip(la, lb, strict=True))


def test_the_first_format_still_loads(tmp_path):
    populate(tmp_path)
    main = tmp_path / "namespaces.json"
    entries = json.loads(main.read_text())["namespaces"]
    main.write_text(json.dumps([{k: v for k, v in d.items() if k != "crc"} for d in entries]))
    (tmp_path / "namespaces.json.bak").unlink()
    with cache(tmp_path) as c:
        assert sorted(ns.name for ns in c.namespaces()) == sorted(NAMES)
        assert c.namespaces_registry.errors == 0
        assert all(served(c, name, i) == 3 * BT for i, name in enumerate(NAMES))


def test_a_registration_the_disk_refuses_fails_clearly_and_is_not_kept(tmp_path, monkeypatch):
    populate(tmp_path)

    def full(path, body):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with cache(tmp_path) as c:
        monkeypatch.setattr(namespaces_mod, "_write_durably", full)
        with pytest.raises(StorageFull, match="namespace registry"):
            c.register_namespace("delta", layout=LAYOUT)
        with pytest.raises(StorageFull):
            c.put("epsilon", *prompt(5))  # a first put registers its namespace: refused too
        assert sorted(ns.name for ns in c.namespaces()) == sorted(NAMES)
        assert c.drop_namespace("gamma") == 3  # a removal is kept in memory, written later
        monkeypatch.undo()
        c.register_namespace("delta", layout=LAYOUT)
    with cache(tmp_path) as c:
        assert sorted(ns.name for ns in c.namespaces()) == ["alpha", "beta", "delta"]
