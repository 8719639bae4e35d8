"""Admission to persistent tiers: which blocks are worth SSD write bandwidth and wear.

``write_through`` writes every block in the background as it is put; ``write_back`` writes a
block only when it is evicted from memory; ``selective`` writes on eviction only blocks hit at
least ``min_hits`` times (Dynamo KVBM and SGLang filter the same way).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvtier.errors import InvalidRequest

MODES = ("write_through", "write_back", "selective")


@dataclass(frozen=True, slots=True)
class AdmissionPolicy:
    mode: str = "write_through"
    min_hits: int = 2

    def admit_on_put(self) -> bool:
        return self.mode == "write_through"

    def admit_on_evict(self, hits: int) -> bool:
        return self.mode != "selective" or hits >= self.min_hits


def make_admission(mode: str, min_hits: int = 2) -> AdmissionPolicy:
    if mode not in MODES:
        raise InvalidRequest(f"unknown admission policy {mode!r}: expected one of {list(MODES)}")
    return AdmissionPolicy(mode, min_hits)
