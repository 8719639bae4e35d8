"""MooncakeBackend/RemoteTier against a real mooncake_master and storage node on loopback."""

from __future__ import annotations

import contextlib
import os
import time

import pytest
import torch

from kvtier.config import RemoteTierConfig
from kvtier.errors import CorruptBlock, InvalidRequest
from kvtier.tiers.base import BlockMeta
from kvtier.tiers.remote import make_remote_tier
from tests.conftest import random_bytes
from tests.integration.remote_mooncake import mooncake_skip_reason
from tests.integration.remote_servers import wait_for

SKIP = mooncake_skip_reason()
pytestmark = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")

TIMEOUT = 1.0
MARGIN = 0.75
META = BlockMeta("ns", None, 16, "none", 0.0)



@pytest.fixture(scope="module")
def mooncake_store():
    """This module's own store, with Mooncake's default read lease (5 s): under the shared one's
    50 ms lease a 16 MiB read on a loaded machine outlasts its lease (``LEASE_EXPIRED``, a miss).
    Removal here is forced, so a long lease never delays a delete."""
    from tests.integration.remote_mooncake import MooncakeMaster

    m = MooncakeMaster(lease_ms=5000).start()
    yield m
    m.stop()


@pytest.fixture
def tier(mooncake_store):
    cfg = RemoteTierConfig(backend="mooncake", url=mooncake_store.url, timeout_s=TIMEOUT)
    t = make_remote_tier(cfg, breaker_failures=3, breaker_cooldown_s=0.3, prefix=f"m{os.getpid()}:")
    yield t
    t.close()



def test_round_trip_bit_exact_first_writer_wins_and_batched_exists(tier):
    blocks = {os.urandom(16): random_bytes(n, n) for n in (4096, 2 * 1024**2, 16 * 1024**2)}
    for key, data in blocks.items():
        tier.put(key, data, META)
    assert tier.flush(30)
    assert tier.stats()["put_failures"] == 0
    missing = os.urandom(16)
    assert tier.contains_many([*blocks, missing]) == [True, True, True, False]
    for key, data in blocks.items():
        out = torch.empty_like(data)
        assert tier.read_into(key, out) == data.numel()
        assert torch.equal(out, data)
        assert tier.size(key) == data.numel()
    key, data = next(iter(blocks.items()))
    tier.backend.put(key, memoryview(bytes(4096)))  # a second writer: first one wins
    out = torch.empty(100, dtype=torch.uint8)
    tier.read_into(key, out, offset=50)
    assert torch.equal(out, data[50:150])
    with pytest.raises(KeyError):
        tier.read_into(missing, out)
    with pytest.raises(InvalidRequest, match="exceeds"):
        tier.read_into(key, torch.empty(5000, dtype=torch.uint8))
    assert tier.delete(key) is True
    assert tier.contains(key) is False


def test_a_value_moved_under_another_key_is_never_served(tier):
    """The stored crc32c is bound to the key: a value copied under another key is a miss."""
    ka, kb = os.urandom(16), os.urandom(16)
    data = random_bytes(2 * 1024**2, 3)
    tier.put(ka, data, META)
    assert tier.flush(30)
    store = tier.backend.raw_store()
    value = store.get(tier.backend._key(ka))
    assert len(value) > data.numel()
    assert store.put(tier.backend._key(kb), value) == 0
    out = torch.zeros_like(data)
    with pytest.raises(CorruptBlock):
        tier.read_into(kb, out)  # staged read
    tier.put(kb, data, META)  # the bad copy was deleted: a writer can store the real one
    assert tier.flush(30)
    store.remove(tier.backend._key(kb))
    assert store.put(tier.backend._key(kb), value) == 0
    tier.register(out)
    try:
        assert isinstance(tier.read_blocks_into([kb], [out])[0], CorruptBlock)  # direct read
        assert tier.read_blocks_into([ka], [out]) == [data.numel()]
        assert torch.equal(out, data)
    finally:
        tier.unregister(out)


def test_losing_the_storage_node_gives_bounded_misses_then_recovery(mooncake_store, tier):
    keys = [os.urandom(16) for _ in range(4)]
    for i, k in enumerate(keys):
        tier.put(k, random_bytes(1024**2, i), META)
    assert tier.flush(30) and tier.contains_many(keys) == [True] * 4

    mooncake_store.kill_node()
    durations = []
    deadline = time.monotonic() + 3.0
    out = torch.empty(1024**2, dtype=torch.uint8)
    while time.monotonic() < deadline:
        for k in keys:
            t0 = time.perf_counter()
            with contextlib.suppress(KeyError):
                tier.read_into(k, out)
            durations.append(time.perf_counter() - t0)
    assert max(durations) <= TIMEOUT + MARGIN, max(durations)
    s = tier.stats()
    assert s["read_misses"] > 0

    mooncake_store.start_node()
    for i, k in enumerate(keys):  # the lost node's keys are gone: write them again
        tier.put(k, random_bytes(1024**2, i), META)

    def served() -> bool:
        tier.flush(5)
        try:
            for i, k in enumerate(keys):
                tier.read_into(k, out)
                assert torch.equal(out, random_bytes(1024**2, i))
        except KeyError:  # stale metadata of the lost node, until the master drops it
            for i, k in enumerate(keys):
                tier.put(k, random_bytes(1024**2, i), META)
            return False
        return True

    wait_for(served, 30.0, "blocks served again after the storage node came back")
    assert tier.breaker.state == "closed"


def test_malformed_url_is_rejected():
    for url in ("redis://x:1", "mooncake://host", "mooncake://h:1"):
        with pytest.raises(InvalidRequest, match="mooncake"):
            make_remote_tier(RemoteTierConfig(backend="mooncake", url=url))
