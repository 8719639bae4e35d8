"""Cost check: accept a cached prefix only where reloading it beats recomputing it.

Moving estimates (EWMA) of what the loader measures on real reads — per-read latency and
aggregate bandwidth of each tier — and of the engine's prefill rate (tokens/s, measured by the
integration on full prefills). Reload time of the first ``k`` blocks is the slower of the two
concurrent loader paths (memory tiers; SSD/remote tiers); recompute time is ``k * block_tokens /
prefill_rate``. The accepted prefix is the ``k`` that saves the most time (0 if none saves any).
Without a prefill estimate there is nothing to compare against: every block is accepted.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

MEMORY_TIERS = ("device", "host")
# Bandwidth priors (bytes/s) used until a tier has been measured; deliberately modest.
PRIORS = {"device": 10e9, "host": 8e9, "ssd": 1e9, "remote": 0.5e9}
SMALL_READ = 64 * 1024  # reads up to this size measure latency, not bandwidth


@dataclass(slots=True)
class Ewma:
    """Exponentially weighted moving average; ``value`` is None until the first sample.

    ``alpha_up`` (if set) weighs samples above the estimate: a cost that got worse is believed
    faster than one that got better, so a slowed tier stops being used after one slow load.
    """

    alpha: float = 0.3
    value: float | None = None
    samples: int = 0
    alpha_up: float | None = None

    def observe(self, x: float) -> None:
        if self.value is None:
            self.value = x
        else:
            a = self.alpha_up if self.alpha_up is not None and x > self.value else self.alpha
            self.value = a * x + (1 - a) * self.value
        self.samples += 1


@dataclass(frozen=True, slots=True)
class CostDecision:
    """The verdict on one hit: accept the first ``blocks`` of ``offered`` blocks."""

    verdict: str  # accepted | partial | declined
    blocks: int
    offered: int
    block_tokens: int
    reload_s: float  # estimated reload time of the accepted prefix (or of all, if declined)
    recompute_s: float | None  # estimated recompute time of the same tokens; None: unmeasured

    @property
    def tokens(self) -> int:
        return self.blocks * self.block_tokens

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "blocks": self.blocks, "offered_blocks": self.offered,
                "tokens": self.tokens, "reload_s": self.reload_s, "recompute_s": self.recompute_s}


@dataclass(slots=True)
class _TierEstimate:
    latency: Ewma = field(default_factory=Ewma)  # seconds per read
    byte_time: Ewma = field(default_factory=Ewma)  # seconds per byte of a whole loader path


class CostModel:
    """Per-tier latency/bandwidth and prefill-rate estimates, and the accept decision. Thread-safe."""

    def __init__(self, *, alpha: float = 0.3, io_parallelism: int = 8, margin: float = 1.0,
                 priors: dict[str, float] | None = None) -> None:
        self.alpha = alpha
        self.io_parallelism = max(1, io_parallelism)
        self.margin = margin  # reload must be <= recompute / margin to pay
        self.priors = {**PRIORS, **(priors or {})}
        self._tiers: dict[str, _TierEstimate] = {}
        self._prefill = Ewma(alpha)
        self._lock = threading.Lock()

    # ---- measurements ------------------------------------------------------------------
    def _tier(self, name: str) -> _TierEstimate:
        est = self._tiers.get(name)
        if est is None:
            est = self._tiers[name] = _TierEstimate(Ewma(self.alpha, alpha_up=0.8), Ewma(self.alpha, alpha_up=0.8))
        return est

    def observe_latency(self, tier: str, seconds: float) -> None:
        """One small read (a header) took ``seconds``."""
        with self._lock:
            self._tier(tier).latency.observe(max(seconds, 0.0))

    def observe_path(self, tier: str, nbytes: int, seconds: float, reads: int = 0) -> None:
        """A loader path moved ``nbytes`` from ``tier`` in ``seconds`` wall time using ``reads`` reads."""
        if nbytes <= 0 or seconds <= 0:
            return
        with self._lock:
            est = self._tier(tier)
            lat = (est.latency.value or 0.0) * math.ceil(reads / self.io_parallelism)
            est.byte_time.observe(max(seconds - lat, 0.05 * seconds) / nbytes)

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """The engine computed ``tokens`` prompt tokens from scratch in ``seconds``."""
        if tokens > 0 and seconds > 0:
            with self._lock:
                self._prefill.observe(tokens / seconds)

    def has_latency(self, tier: str) -> bool:
        est = self._tiers.get(tier)
        return est is not None and est.latency.value is not None

    @property
    def prefill_tokens_per_s(self) -> float | None:
        return self._prefill.value

    def bandwidth(self, tier: str) -> float:
        est = self._tiers.get(tier)
        if est is not None and est.byte_time.value:
            return 1.0 / est.byte_time.value
        return self.priors.get(tier, self.priors["ssd"])

    def latency(self, tier: str) -> float:
        est = self._tiers.get(tier)
        return est.latency.value if est is not None and est.latency.value is not None else 0.0

    # ---- estimates and the decision ----------------------------------------------------
    def reload_seconds(self, blocks: list[tuple[str, int]], reads_per_block: int = 2) -> float:
        """Estimated time to load ``blocks`` (``(tier, nbytes)``): the slower of the two paths."""
        mem = 0.0
        io_bytes: dict[str, int] = {}
        io_reads: dict[str, int] = {}
        for tier, nbytes in blocks:
            if tier in MEMORY_TIERS:
                mem += nbytes / self.bandwidth(tier)
            else:
                io_bytes[tier] = io_bytes.get(tier, 0) + nbytes
                io_reads[tier] = io_reads.get(tier, 0) + reads_per_block
        io = sum(self.latency(t) * (1 + math.ceil(io_reads[t] / self.io_parallelism)) + b / self.bandwidth(t)
                 for t, b in io_bytes.items())
        return max(mem, io)

    def decide(self, blocks: list[tuple[str, int]], block_tokens: int, reads_per_block: int = 2) -> CostDecision:
        """Accept the prefix of ``blocks`` that saves the most time over recomputing it."""
        n = len(blocks)
        rate = self._prefill.value
        if n == 0:
            return CostDecision("declined", 0, 0, block_tokens, 0.0, 0.0)
        if rate is None:
            return CostDecision("accepted", n, n, block_tokens, self.reload_seconds(blocks, reads_per_block), None)
        best_k, best_saving = 0, 0.0
        for k in range(1, n + 1):
            saving = k * block_tokens / rate - self.margin * self.reload_seconds(blocks[:k], reads_per_block)
            if saving > best_saving:
                best_k, best_saving = k, saving
        shown = best_k or n
        verdict = "accepted" if best_k == n else "partial" if best_k else "declined"
        return CostDecision(verdict, best_k, n, block_tokens,
                            self.reload_seconds(blocks[:shown], reads_per_block), shown * block_tokens / rate)

    def snapshot(self) -> dict:
        """Both estimates, JSON-able (for cache stats)."""
        with self._lock:
            return {
                "prefill_tokens_per_s": self._prefill.value,
                "bandwidth_bytes_per_s": {t: 1 / e.byte_time.value if e.byte_time.value else None
                                          for t, e in self._tiers.items()},
                "read_latency_s": {t: e.latency.value for t, e in self._tiers.items()},
            }
