"""After a workload through the real sidecar, every metric the README lists is exported and
moves as expected. The list is parsed from the doc, so the doc and the exporter cannot drift."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from kvtier import CacheConfig, KVLayout, TieredCache
from kvtier.client import KVTierClient
from kvtier.config import HostTierConfig, SSDTierConfig
from kvtier.server.testing import serve_in_thread

DOC = Path(__file__).resolve().parents[2] / "README.md"
BT = 256
LAYOUT = KVLayout(2, ((4, 64), (4, 64)), "float32")  # 4 KiB per token: 1 MiB blocks


def documented_metrics() -> dict[str, str]:
    """{name: type} from the metric table of the README."""
    rows = re.findall(r"^\| `(kvtier_[a-z_]+)` \| ([a-z ]+) \|", DOC.read_text(), re.M)
    assert len(rows) >= 20, "the metric table in README.md was not found"
    return dict(rows)


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(snap: dict, name: str, **labels: str) -> float:
    return snap.get((name, frozenset(labels.items())), 0.0)


def kv_for(tokens: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(tokens, 4, 64, generator=g) for _ in range(2)) for _ in range(2)]


def wait_for(cond, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


@pytest.fixture
def cache(tmp_path):
    cfg = CacheConfig(block_tokens=BT, host=HostTierConfig(capacity_bytes="4MiB"),
                      ssd=SSDTierConfig(path=str(tmp_path / "ssd"), capacity_bytes="256MiB",
                                        direct_io=False, min_free_bytes=0))
    with TieredCache(cfg) as c:
        yield c


def test_every_documented_metric_is_exported_and_moves(cache):
    a = list(range(2 * BT))
    b = list(range(10_000, 10_000 + 3 * BT))
    with serve_in_thread(cache) as url, KVTierClient(url) as client:
        client.register_namespace("m", layout=LAYOUT, block_tokens=BT)
        before = samples(client.metrics_text())

        assert client.put("m", a, kv_for(len(a), 1)) == len(a)
        wait_for(lambda: client.stats().tiers["ssd"].blocks_written >= 2)  # write-through
        assert client.put("m", b, kv_for(len(b), 2)) == len(b)  # host is full: a's blocks demote
        hit = client.lookup("m", a + [1, 2, 3])
        assert hit.tokens == len(a) and {blk.tier for blk in hit.blocks} == {"ssd"}
        kv, n = client.get("m", a)  # read from SSD, promoted back into host
        assert n == len(a) and torch.equal(kv[1][1], kv_for(len(a), 1)[1][1])
        handle = client.prefetch("m", b)
        assert handle.wait(30)
        assert client.prefetch_status(handle.id).state == "done"  # the GET route, counted below
        client.lookup("m", list(range(50_000, 50_000 + BT)))  # a miss
        assert client.evict("m", b) == 3

        text = client.metrics_text()
        stats = client.stats()
    after = samples(text)

    for name, kind in documented_metrics().items():
        prom_type = {"gauge histogram": "histogram"}.get(kind, kind)
        assert f"# TYPE {name} {prom_type}\n" in text, f"{name} ({kind}) missing from /metrics"

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("kvtier_lookups_total") >= 4
    assert delta("kvtier_lookup_hits_total") >= 3
    assert delta("kvtier_lookup_tokens_total") >= len(a) + 3 + BT
    assert delta("kvtier_lookup_hit_tokens_total") >= 2 * len(a)
    assert 0 < value(after, "kvtier_hit_rate_tokens") < 1
    assert 0 < value(after, "kvtier_hit_rate_lookups") < 1
    assert delta("kvtier_block_hits_total", tier="ssd") >= 2  # the lookup of a, served by SSD
    assert delta("kvtier_hit_tokens_total", tier="ssd") >= len(a)
    assert delta("kvtier_block_misses_total", tier="host") >= 2  # a was not in host any more
    assert delta("kvtier_block_misses_total", tier="ssd") >= 1  # the miss
    assert delta("kvtier_puts_total") == 2 and delta("kvtier_put_tokens_total") == len(a) + len(b)
    assert delta("kvtier_blocks_written_total", tier="host") >= 5
    assert delta("kvtier_written_bytes_total", tier="host") >= 5 * BT * LAYOUT.bytes_per_token
    assert delta("kvtier_blocks_written_total", tier="ssd") >= 2
    assert delta("kvtier_written_bytes_total", tier="ssd") >= 2 * BT * LAYOUT.bytes_per_token
    assert delta("kvtier_blocks_read_total", tier="ssd") >= 2
    assert delta("kvtier_read_bytes_total", tier="ssd") >= 2 * BT * LAYOUT.bytes_per_token
    assert delta("kvtier_reload_seconds_count", tier="ssd") >= 2
    assert delta("kvtier_reload_seconds_sum", tier="ssd") > 0
    assert delta("kvtier_demotions_total", tier="host") >= 2
    assert delta("kvtier_promotions_total", tier="host") >= 2
    assert delta("kvtier_evictions_total", tier="host", reason="capacity") >= 2
    assert delta("kvtier_evictions_total", tier="host", reason="evicted") >= 1
    assert delta("kvtier_blocks_dropped_total") >= 3
    assert delta("kvtier_prefetches_total", outcome="done") == 1
    assert value(after, "kvtier_tier_capacity_bytes", tier="host") == 4 * 1024**2
    assert value(after, "kvtier_tier_capacity_bytes", tier="ssd") == 256 * 1024**2
    assert value(after, "kvtier_tier_used_bytes", tier="ssd") >= 2 * BT * LAYOUT.bytes_per_token
    assert value(after, "kvtier_tier_used_bytes", tier="host") == stats.tiers["host"].used_bytes
    assert value(after, "kvtier_tier_blocks", tier="ssd") == stats.tiers["ssd"].blocks >= 2
    assert value(after, "kvtier_block_age_seconds_gcount", tier="ssd") == stats.tiers["ssd"].blocks
    assert value(after, "kvtier_corrupt_blocks_total", tier="ssd") == 0  # present, nothing corrupt
    assert value(after, "kvtier_put_failures_total", tier="host") == 0
    assert delta("kvtier_http_request_duration_seconds_count",
                 route="/v1/lookup", method="POST", status="200") == 2
    assert delta("kvtier_http_request_duration_seconds_count",
                 route="/v1/prefetch/{prefetch_id}", method="GET", status="200") >= 1
    # /v1/stats and /metrics read the same snapshot source
    assert value(after, "kvtier_block_hits_total", tier="ssd") == stats.tiers["ssd"].hits
    assert value(after, "kvtier_lookups_total") == stats.lookups
