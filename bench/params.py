"""What the ``kvtier bench`` command line needs before a benchmark runs: the job vocabularies
and parameter defaults, kept free of torch and the cache so every ``--help`` answers at once.
``kvtier.bench.io`` and ``kvtier.bench.trace`` re-export these names.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvtier.errors import InvalidRequest

# kvtier bench io
RW = ("randread", "read", "randwrite", "write", "randrw")
TIERS = ("host", "ssd", "remote")
ENGINES = ("sync", "batch")


# kvtier bench trace
@dataclass(frozen=True, slots=True)
class TraceParams:
    """A generated agentic workload. Lengths are means; each draw is uniform in [0.5x, 1.5x]."""

    sessions: int = 200
    system_prompts: int = 4
    system_tokens: int = 4096
    user_tokens: int = 1024  # user text and tool results appended per turn
    assistant_tokens: int = 256
    mean_turns: float = 8.0
    max_turns: int = 64
    zipf_alpha: float = 1.0  # turns of the session of popularity rank r ~ r**-alpha
    think_time_s: float = 30.0  # mean (exponential) gap between a session's turns
    arrival_rate: float = 1.0  # new sessions per second (Poisson)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("sessions", "system_prompts", "system_tokens", "user_tokens",
                     "assistant_tokens", "max_turns"):
            if getattr(self, name) < 1:
                raise InvalidRequest(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("mean_turns", "arrival_rate"):
            if not getattr(self, name) > 0:
                raise InvalidRequest(f"{name} must be > 0, got {getattr(self, name)}")
        if self.zipf_alpha < 0 or self.think_time_s < 0:
            raise InvalidRequest("zipf_alpha and think_time_s must be >= 0")
