"""One load's state, shared by the loader's paths (``kvtier.loader``, ``loader_ranged``,
``loader_whole``): where the KV goes, per-layer readiness, promotions, what the load did."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from kvtier.block import BlockHeader, HeaderTemplate, parse_header
from kvtier.errors import CorruptBlock
from kvtier.index import LeasedBlock
from kvtier.layout import block_slice
from kvtier.loader_promote import Assembly
from kvtier.loadstream import LoadStream
from kvtier.prefixkv import PrefixKV
from kvtier.recorder import LoadResult, TierReads
from kvtier.tiers.base import Tier

T = TypeVar("T", bound=Tier)
# A block a path reads: its index in the lease, the block, the tier it is read from.
Item = tuple[int, LeasedBlock, T]


@dataclass(slots=True)
class LoadJob:
    stream: LoadStream
    dest: Sequence[Sequence[torch.Tensor]]
    codec: str
    block_tokens: int
    n_layers: int
    promos: dict[int, Assembly] = field(default_factory=dict)  # blocks path 2 will promote
    promo_order: list[int] = field(default_factory=list)
    promo_next: int = 0
    promo_failed: bool = False
    keep: frozenset[bytes] = frozenset()  # this load's blocks: its promotions never evict them
    promote: bool = False  # the cache promotes blocks read from slower tiers
    result: LoadResult = field(default_factory=LoadResult)  # reported once the load is done
    # ``dest`` in blocks, for the paths' copies of ``none`` blocks into host KV (None: other codecs)
    prefix: PrefixKV | None = None
    # The first header a whole-block read parsed: the others are compared with it (block.py)
    template: HeaderTemplate | None = None
    _outs: dict[int, list[list[torch.Tensor]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.codec == "none" and self.prefix is None:
            self.prefix = PrefixKV(self.dest, self.block_tokens)

    def finish(self) -> None:
        """Let go of the destination once the load is done (before its waiters wake). Why: a
        worker thread holds its task's arguments, this job among them, until it takes its next
        task, and ``get``'s KV must be free to return to its pool as soon as the caller drops it."""
        self.dest = ()
        self.prefix = None
        self._outs.clear()

    def outs(self, i: int) -> list[list[torch.Tensor]]:
        """Block ``i``'s views of ``dest`` (made once per block: 64 slices for a Llama block,
        too many to remake per layer)."""
        views = self._outs.get(i)
        if views is None:
            views = self._outs[i] = block_slice(self.dest, i, self.block_tokens)
        return views

    def note_failure(self, tier: str, err: BaseException) -> None:
        """A read of ``tier`` failed: a copy the tier itself dropped as corrupt is counted here
        (the whole-block fallback then finds it gone and could not tell damage from a miss)."""
        if isinstance(err, CorruptBlock) and err.dropped:
            with self.stream._lock:
                self.result.corrupt[tier] = self.result.corrupt.get(tier, 0) + 1

    def count_reads(self, tier: str, blocks: int, nbytes: int, seconds: float) -> None:
        with self.stream._lock:
            r = self.result.reads.setdefault(tier, TierReads())
            r.blocks += blocks
            r.nbytes += nbytes
            r.seconds += seconds


# Reads block ``i`` whole through the cache (verified, corrupt copies dropped), else truncates
# the prefix before it: what a path does with a block it could not stream.
Fallback = Callable[[LoadJob, int, LeasedBlock], None]


def checked_header(buf: torch.Tensor, n_layers: int) -> BlockHeader:
    header = parse_header(buf)
    if len(header.layers) != n_layers:
        raise CorruptBlock(f"block has {len(header.layers)} layers, expected {n_layers}")
    return header


def layer_groups(lengths: Sequence[int], min_read: int) -> list[range]:
    """Consecutive layers grouped so each group's bytes reach ``min_read`` (the last may not)."""
    groups, start, acc = [], 0, 0
    for i, n in enumerate(lengths):
        acc += n
        if acc >= min_read:
            groups.append(range(start, i + 1))
            start, acc = i + 1, 0
    if start < len(lengths):
        groups.append(range(start, len(lengths)))
    return groups
