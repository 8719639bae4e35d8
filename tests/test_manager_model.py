"""Stateful property test: TieredCache against a plain reference model of what was put.

With room for everything the cache must hit exactly the reference's longest stored prefix; under
pressure it may hit less, but whatever it returns must be exactly what was put for those tokens.
"""

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvtier import CacheConfig, DeviceTierConfig, HostTierConfig, TieredCache

BT = 4
VOCAB = 3  # tiny vocabulary: prompts share prefixes often


def kv_for(tokens: list[int]):
    """KV that is a pure function of the token prefix, so any correct reload is checkable."""
    t = torch.tensor(tokens, dtype=torch.float32)
    pos = torch.arange(len(tokens), dtype=torch.float32)
    k = (t.cumsum(0) * 7 + pos)[:, None, None].expand(-1, 1, 2).contiguous()
    return [(k, -k), (k * 2, k + 1)]


class CacheModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.roomy = TieredCache(CacheConfig(block_tokens=BT, host=HostTierConfig(capacity_bytes="4MiB")))
        self.tight = TieredCache(CacheConfig(block_tokens=BT, host=HostTierConfig(capacity_bytes="24KiB", page_bytes="8KiB"),
                                             device=DeviceTierConfig(capacity_bytes="16KiB", slot_bytes="4KiB"),
                                             ))
        self.stored: set[tuple[int, ...]] = set()  # reference: every block-aligned prefix put

    def teardown(self):
        self.roomy.close()
        self.tight.close()

    def ref_hit(self, tokens):
        n = 0
        while n + BT <= len(tokens) and tuple(tokens[: n + BT]) in self.stored:
            n += BT
        return n

    @rule(tokens=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6 * BT))
    def put(self, tokens):
        kv = kv_for(tokens)
        for c in (self.roomy, self.tight):
            c.put("m", tokens, kv)
        for end in range(BT, len(tokens) + 1, BT):
            self.stored.add(tuple(tokens[:end]))

    @precondition(lambda self: self.stored)
    @rule(data=st.data())
    def get(self, data):
        base = list(data.draw(st.sampled_from(sorted(self.stored))))
        tokens = base + data.draw(st.lists(st.integers(0, VOCAB - 1), max_size=2 * BT))
        expected = self.ref_hit(tokens)
        assert self.roomy.lookup("m", tokens).tokens == expected
        for c in (self.roomy, self.tight):
            kv, n = c.get("m", tokens)
            assert n <= expected and n % BT == 0
            if c is self.roomy:
                assert n == expected
            if n:
                want = kv_for(tokens[:n])
                for la, lb in zip(kv, want, strict=True):
                    for a, b in zip(la, lb, strict=True):
                        assert torch.equal(a, b)

    @invariant()
    def tiers_within_capacity(self):
        for tier in self.tight.tiers:
            assert tier.used_bytes <= tier.capacity_bytes


TestCacheModel = CacheModel.TestCase
TestCacheModel.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
