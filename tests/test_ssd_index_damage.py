"""A damaged LMDB index never crashes the process, never raises out of a read, never serves
wrong bytes: opening it is refused in one line (DataDirError) where it cannot be read, and damage
found at run time becomes counted misses and a degraded ``health()``.

LMDB maps the file, so a bad file could kill a reader with SIGBUS: every open and read of a
damaged directory happens in a worker forked from a helper process (tests/ssd_child.py), where
a signal shows as the worker's exit status instead of taking pytest down.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal

import pytest

from kvtier.tiers.ssd import SSDTier
from tests.ssd_child import DAMAGE_SIZES, Zygote, block_key, damage_config, make_block, meta_for

SEED, COUNT = 41, 120


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A closed directory of COUNT blocks, inline and in segments, to copy and damage."""
    path = tmp_path_factory.mktemp("store") / "kv"
    with SSDTier(damage_config(str(path))) as tier:
        for i in range(COUNT):
            tier.put(block_key(SEED, i), make_block(SEED, i, *DAMAGE_SIZES), meta_for(i))
        assert tier.stats()["segments"] > 0 and len(tier._loc) == COUNT
    return path


def run(zygote: Zygote, job: str, path, tmp_path) -> dict:
    out = tmp_path / f"{job}-{random.random()}.json"
    status = zygote.run(job, path, out, SEED, COUNT)
    assert not os.WIFSIGNALED(status), (
        f"the worker was killed by {signal.Signals(os.WTERMSIG(status)).name}")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"worker status {status}"
    return json.loads(out.read_text())


def copy(store, tmp_path):
    dst = tmp_path / f"kv-{random.random()}"
    shutil.copytree(store, dst)
    return dst, dst / "index" / "data.mdb"


def assert_refused(result: dict, path, *words: str) -> None:
    msg = result["open"]
    assert msg != "ok", result
    assert "\n" not in msg and msg.startswith(f"data directory {path}: index unreadable"), msg
    for w in words:
        assert w in msg, msg


def assert_safe(result: dict) -> None:
    """Opened: only misses and right bytes, nothing raised."""
    assert result["unhandled"] == [] and result["wrong"] == 0, result


@pytest.mark.parametrize("cut", ["empty", 100, 4096, 4096 + 1000, "last-page", "last-byte"])
def test_a_truncated_index_is_refused_in_one_line(zygote, store, tmp_path, cut):
    path, mdb = copy(store, tmp_path)
    size = mdb.stat().st_size
    keep = {"empty": 0, "last-page": size - 4096, "last-byte": size - 1}.get(cut, cut)
    os.truncate(mdb, keep)
    result = run(zygote, "probe", path, tmp_path)
    assert_refused(result, path, "empty but" if keep == 0 else "truncated")
    assert mdb.stat().st_size == keep  # refused, not "repaired" into a new empty index
    assert len(list((path / "segments").iterdir())) > 0


def test_a_missing_index_with_segments_is_refused(zygote, store, tmp_path):
    path, mdb = copy(store, tmp_path)
    mdb.unlink()
    assert_refused(run(zygote, "probe", path, tmp_path), path, "missing but")


def test_a_foreign_index_file_is_refused(zygote, store, tmp_path):
    path, mdb = copy(store, tmp_path)
    mdb.write_bytes(os.urandom(3 * 4096))
    assert_refused(run(zygote, "probe", path, tmp_path), path, "not an LMDB file")


def damage(mdb, rng: random.Random, kind: str) -> str:
    size = mdb.stat().st_size
    with open(mdb, "r+b") as f:
        if kind == "truncate":
            at = rng.randrange(1, size)
            f.truncate(at)
            return f"truncated to {at}"
        if kind == "flip":
            spots = [rng.randrange(2 * 4096, size) for _ in range(rng.choice([1, 4, 32]))]
            for at in spots:
                f.seek(at)
                b = f.read(1)[0]
                f.seek(at)
                f.write(bytes([b ^ (1 << rng.randrange(8))]))
            return f"flipped {len(spots)} bits"
        pages = rng.sample(range(2, size // 4096), k=rng.choice([1, 2, 4]))
        for pg in pages:
            f.seek(pg * 4096)
            f.write(bytes(4096))
        return f"zeroed pages {pages}"


def test_random_damage_never_crashes_raises_or_serves_wrong_bytes(zygote, store, tmp_path):
    rng = random.Random(2026)
    outcomes = {"refused": 0, "opened": 0}
    for trial in range(18):
        kind = ("truncate", "flip", "zero")[trial % 3]
        path, mdb = copy(store, tmp_path)
        what = damage(mdb, rng, kind)
        result = run(zygote, "probe", path, tmp_path)
        if result["open"] == "ok":
            outcomes["opened"] += 1
            assert result["unhandled"] == [] and result["wrong"] == 0, (what, result)
            if result["index_errors"]:
                assert any("index damaged" in p for p in result["health"]), (what, result)
        else:
            outcomes["refused"] += 1
            assert_refused(result, path)
        shutil.rmtree(path)
    assert outcomes["refused"] >= 6 and outcomes["opened"] >= 1, outcomes


def test_index_damage_at_run_time_is_a_counted_miss_and_degrades_health(zygote, tmp_path):
    path = tmp_path / "kv"
    result = run(zygote, "live", path, tmp_path)
    assert_safe(result)
    assert result["missed"] > 0 and result["served"] > 0, result  # inline blocks are lost
    assert result["index_errors"] > 0
    assert len(result["health"]) == 1 and result["health"][0].startswith("index damaged under"), result


def test_a_cache_over_an_index_damaged_at_run_time_never_raises(zygote, tmp_path):
    path = tmp_path / "kv"
    out = tmp_path / "cache.json"
    status = zygote.run("live-cache", path, out, SEED, 12)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"worker status {status}"
    result = json.loads(out.read_text())
    assert result["unhandled"] == [] and result["wrong"] == 0, result
    assert result["served_tokens"]["big"] > 0, result  # segment blocks are still served
    assert result["index_errors"] > 0
    assert any(p.startswith("ssd: index damaged under") for p in result["health"]), result
