"""Records the manager hands to callers: where a prefix's blocks live."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class BlockLocation:
    """Block ``index`` of a prefix (tokens ``index*block_tokens`` onward) lives in ``tier``."""

    index: int
    key: bytes
    tier: str

    def to_dict(self) -> dict:
        return {"index": self.index, "key": self.key.hex(), "tier": self.tier}


@dataclass(slots=True)
class Hit:
    """The longest cached prefix of a lookup: ``tokens`` is a multiple of ``block_tokens``."""

    namespace: str
    tokens: int
    block_tokens: int
    requested_tokens: int
    blocks: list[BlockLocation] = field(default_factory=list)

    @property
    def tiers(self) -> dict[str, int]:
        """Blocks per tier, e.g. ``{"host": 3, "ssd": 1}``."""
        return dict(Counter(b.tier for b in self.blocks))

    def to_dict(self) -> dict:
        return {"namespace": self.namespace, "tokens": self.tokens,
                "block_tokens": self.block_tokens, "requested_tokens": self.requested_tokens,
                "tiers": self.tiers, "blocks": [b.to_dict() for b in self.blocks]}
