"""docs/architecture.md: the tier it shows is a complete ``Tier`` that a cache demotes into and
reloads from, verified; the layers it draws are the ones tests/test_import_cycles.py enforces."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from kvtier import CacheConfig, TieredCache
from kvtier.config import HostTierConfig
from kvtier.errors import CorruptBlock, StorageFull
from kvtier.tiers.base import BlockMeta, MemoryTier, Tier
from kvtier.tiers.memory import make_host_tier
from tests.conftest import random_kv
from tests.test_import_cycles import LAYERS

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
META = BlockMeta("n", None, 4, "none", 0.0)


@pytest.fixture(scope="module")
def DictTier():  # noqa: N802  (a class)
    text = DOC.read_text()
    section = text[text.index("### Adding a tier"):]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code, "the tier section shows its example in a python block"
    scope: dict = {}
    exec(compile(code.group(1), str(DOC), "exec"), scope)  # noqa: S102  (our own document)
    return scope["DictTier"]


def test_the_example_is_a_tier_and_nothing_more(DictTier):  # noqa: N803
    tier = DictTier(1024)
    assert isinstance(tier, Tier) and not isinstance(tier, MemoryTier)


def test_the_example_keeps_the_contract(DictTier):  # noqa: N803
    tier = DictTier(100)
    tier.put(b"k" * 16, memoryview(bytes(range(64))), META)
    tier.put(b"k" * 16, memoryview(bytes(64)), META)  # first writer wins
    out = torch.empty(64, dtype=torch.uint8)
    assert tier.read_into(b"k" * 16, out) == 64 and bytes(out.numpy()) == bytes(range(64))
    with pytest.raises(StorageFull):
        tier.put(b"j" * 16, memoryview(bytes(64)), META)
    assert tier.used_bytes == 64 and tier.contains(b"k" * 16)
    tier._blocks[b"k" * 16][0][7] ^= 1  # a flipped byte
    with pytest.raises(CorruptBlock):
        tier.read_into(b"k" * 16, out)
    assert not tier.contains(b"k" * 16) and tier.used_bytes == 0
    with pytest.raises(KeyError):
        tier.read_into(b"k" * 16, out)


def test_a_cache_demotes_into_the_example_and_reloads_from_it(DictTier):  # noqa: N803
    kv = random_kv(64, layers=2, heads=2, dim=8)  # 16 blocks of 4 tokens, ~1 KiB each
    tokens = list(range(64))
    host = make_host_tier(HostTierConfig(capacity_bytes=4096, page_bytes=1024, pinned=False))
    slow = DictTier(1 << 20)
    with TieredCache(CacheConfig(block_tokens=4, promote_on_get=False), tiers=[host, slow]) as cache:
        assert cache.put("n", tokens, kv) == 64
        assert cache.tier("dict") is slow and slow.used_bytes > 0  # the host tier overflowed into it
        hit = cache.lookup("n", tokens)
        assert hit.tokens == 64 and "dict" in {b.tier for b in hit.blocks}
        got, n = cache.get("n", tokens)
        assert n == 64 and got is not None
        for (k, v), (gk, gv) in zip(kv, got, strict=True):
            assert torch.equal(k, gk) and torch.equal(v, gv)
        assert cache.stats().tiers["dict"].bytes_written > 0


def test_the_drawn_layers_are_the_enforced_ones():
    text = DOC.read_text()
    drawn = re.findall(r'\["<b>([a-z/ ]+)</b>', text)
    assert [d.rstrip("/") for d in drawn] == [name for name, _ in reversed(LAYERS)]
