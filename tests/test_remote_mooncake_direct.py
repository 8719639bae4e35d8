"""Direct reads into registered memory (``RegisteredReads``) against a real Mooncake Store."""

from __future__ import annotations

import os

import pytest
import torch

from kvtier.config import RemoteTierConfig
from kvtier.errors import CorruptBlock
from kvtier.tiers.base import BlockMeta
from kvtier.tiers.remote import make_remote_tier
from kvtier.tiers.remote.mooncake import TRAILER
from tests.conftest import random_bytes
from tests.integration.remote_mooncake import mooncake_skip_reason

SKIP = mooncake_skip_reason()
pytestmark = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")

META = BlockMeta("ns", None, 16, "none", 0.0)
MiB = 1024**2



@pytest.fixture
def tier(mooncake_store):
    cfg = RemoteTierConfig(backend="mooncake", url=mooncake_store.url, timeout_s=5.0)
    t = make_remote_tier(cfg, prefix=f"d{os.getpid()}-{os.urandom(3).hex()}:")
    yield t
    t.close()



def _put(tier, blocks: dict) -> None:
    for key, data in blocks.items():
        tier.put(key, data, META)
    assert tier.flush(30) and tier.stats()["put_failures"] == 0


def test_registered_reads_are_direct_bit_exact_and_batched(tier):
    sizes = (2 * MiB, 16 * MiB, 3 * MiB + 5)
    blocks = {os.urandom(16): random_bytes(n, i) for i, n in enumerate(sizes)}
    _put(tier, blocks)
    ring = torch.zeros(sum(sizes) + 4 * MiB, dtype=torch.uint8)
    assert tier.register(ring) and tier.register(ring[:100])  # idempotent, views included
    outs, at = [], 0
    for n in sizes:
        outs.append(ring[at:at + n])
        at += n
    for (key, data), out in zip(blocks.items(), outs, strict=True):
        out.zero_()
        assert tier.read_into(key, out) == data.numel()
        assert torch.equal(out, data)
    for out in outs:
        out.zero_()
    missing = os.urandom(16)
    spare = ring[at:at + 2 * MiB]
    got = tier.read_blocks_into([*blocks, missing], [*outs, spare])
    assert got[:3] == list(sizes) and isinstance(got[3], KeyError)
    for data, out in zip(blocks.values(), outs, strict=True):
        assert torch.equal(out, data)
    s = tier.stats()
    assert s["blocks_read"] == 6 and s["read_misses"] == 1
    # a registered buffer of another size than the value, or a span: the staged path
    first_key, first = next(iter(blocks.items()))
    part = ring[at:at + MiB]
    assert tier.read_into(first_key, part, offset=4096) == MiB
    assert torch.equal(part, first[4096:4096 + MiB])
    part.zero_()
    assert tier.read_blocks_into([first_key], [part]) == [MiB]  # the first MiB, as read_into
    assert torch.equal(part, first[:MiB])
    assert tier.unregister(ring) is True
    assert tier.unregister(ring) is False


def test_direct_read_of_a_corrupt_value_raises_and_deletes_it(tier):
    key = os.urandom(16)
    data = random_bytes(2 * MiB, 7)
    store = tier.backend.raw_store()
    bad = TRAILER.pack(12345)
    assert store.put_parts(tier.backend._key(key), memoryview(data.numpy()), bad) == 0
    out = torch.empty(2 * MiB, dtype=torch.uint8)
    assert tier.register(out)
    with pytest.raises(CorruptBlock, match="crc32c"):
        tier.read_into(key, out)
    assert tier.stats()["corrupt_blocks"] == 1
    assert tier.contains(key) is False
    got = tier.read_blocks_into([key], [out])
    assert isinstance(got[0], KeyError)


def test_unregistered_reads_still_work_and_register_rejects_device_or_strided(tier):
    key = os.urandom(16)
    data = random_bytes(2 * MiB, 3)
    _put(tier, {key: data})
    out = torch.empty(2 * MiB, dtype=torch.uint8)
    assert tier.read_blocks_into([key], [out]) == [2 * MiB]
    assert torch.equal(out, data)
    from kvtier.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="contiguous"):
        tier.backend.register(torch.empty(8, 8, dtype=torch.uint8).t())
