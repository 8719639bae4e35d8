"""kvtier as a vLLM 0.33 secondary tier, driven by vLLM's own classes on CPU.

- ``TieringOffloadingManager`` with vLLM's CPU primary and kvtier's tier loaded by
  ``module_path``: store, cascade, evict from the primary, look up, promote, every byte back;
  embedded and through a real ``kvtier serve``.
- A real ``Scheduler`` with ``OffloadingConnector`` -> ``TieringOffloadingSpec`` -> kvtier: a
  request sharing a long prefix with an earlier one gets its external hit tokens from kvtier;
  another KV configuration or ``cache_salt`` gets none; a new process and a second engine on one
  ``kvtier serve`` find what the first stored.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

if importlib.util.find_spec("vllm") is None:  # installed but broken must fail, not skip
    pytest.skip("vllm is not installed: .ci/run installs vllm==0.33.0 --no-deps with "
                "tests/engines/requirements.txt", allow_module_level=True)

from vllm.v1.kv_offload.base import (  # noqa: E402
    LookupResult,
    OffloadingKVEventsConfig,
    ReqContext,
    ScheduleEndContext,
    make_offload_key,
)
from vllm.v1.kv_offload.config import (  # noqa: E402
    OffloadingCacheConfig,
    OffloadingConfig,
    OffloadingModelConfig,
    OffloadingParallelConfig,
)
from vllm.v1.kv_offload.cpu.shared_offload_region import SharedOffloadRegion  # noqa: E402
from vllm.v1.kv_offload.tiering.factory import SecondaryTierFactory  # noqa: E402
from vllm.v1.kv_offload.tiering.manager import (  # noqa: E402
    CPUPrimaryTierOffloadingManager,
    TieringOffloadingManager,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource  # noqa: E402

from kvtier.integrations.vllm import KVTierSecondaryTier  # noqa: E402
from tests.engines.conftest import ROOT  # noqa: E402
from tests.engines.vllm_harness import (  # noqa: E402
    BLOCK,
    Engine,
    model_config,
    tier_config,
    vllm_config,
    write_tiny_model,
)

PAGE = 16 * 4096  # bytes per CPU chunk (page aligned, as vLLM's CPU tier lays them out)
CHUNKS = 8  # the CPU primary holds 8 chunks: storing 8 more evicts the first ones
STEP = ScheduleEndContext(new_req_ids=(), preempted_req_ids=())


def offloading_spec(model: str = "tiny", dtype: str = "float16") -> SimpleNamespace:
    config = OffloadingConfig(
        groups=(), worker_kv_bytes_per_block=PAGE, enable_kv_cache_events=False, extra_config={},
        engine_id="kvtier-test", model=OffloadingModelConfig(name=model, dtype=dtype),
        cache=OffloadingCacheConfig(tokens_per_hash=16, blocks_per_chunk=1),
        parallel=OffloadingParallelConfig(rank=0, world_size=1, tp_size=1, pp_size=1, pcp_size=1,
                                          dcp_size=1, data_parallel_index=0, data_parallel_size=1,
                                          data_parallel_rank_local=None, is_parallelism_agnostic=False))
    return SimpleNamespace(config=config, blocks_per_chunk=1,
                           kv_events_config=OffloadingKVEventsConfig(False, False))


def key(i: int) -> bytes:
    return make_offload_key(i.to_bytes(32, "big"), 0)


def wait_until(cond, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.005)


def tiering_manager(tier: dict, engine_id: str) -> tuple[TieringOffloadingManager, torch.Tensor]:
    region = SharedOffloadRegion(engine_id=engine_id, num_chunks=CHUNKS, rank=None,
                                 kv_bytes_per_chunk=PAGE, cpu_page_size=PAGE)
    primary = CPUPrimaryTierOffloadingManager(num_chunks=CHUNKS, mmap_region=region)
    view = primary.get_kv_memoryview()
    secondary = SecondaryTierFactory.create_secondary_tier(tier, view, offloading_spec())
    assert isinstance(secondary, KVTierSecondaryTier)  # found by module_path, as a user's config
    rows = torch.frombuffer(view.cast("B"), dtype=torch.uint8).view(CHUNKS, PAGE)
    return TieringOffloadingManager(primary, [secondary]), rows


def store(m: TieringOffloadingManager, rows: torch.Tensor, ctx: ReqContext, keys: list[bytes]) -> dict:
    """GPU -> CPU (writing each chunk as vLLM's worker would), then vLLM cascades to kvtier."""
    with m.lock:
        out = m.prepare_store(keys, ctx)
        written = {}
        for k, c in zip(out.keys_to_store, out.store_spec.chunk_ids, strict=True):
            page = torch.randint(0, 256, (PAGE,), dtype=torch.uint8)
            rows[int(c)].copy_(page)
            written[k] = page
        m.complete_store(out.keys_to_store, ctx)
    tier = m.secondary_tiers[0]
    tier.drain_jobs()
    with m.lock:
        m.on_schedule_end(STEP)  # vLLM polls finished jobs: the cascade releases the chunks
    return written


def lookup(m: TieringOffloadingManager, ctx: ReqContext, k: bytes) -> LookupResult:
    """Look up until kvtier's answer is in (RETRY while its batched lookup is in flight)."""
    result = LookupResult.RETRY
    deadline = time.monotonic() + 60
    while result in (LookupResult.RETRY, LookupResult.HIT_PENDING):
        if time.monotonic() > deadline:
            raise TimeoutError(f"lookup of {k.hex()} stuck at {result}")
        with m.lock:
            result = m.lookup(k, ctx)
            m.on_schedule_end(STEP)  # flushes lookups and promotions to kvtier
        m.secondary_tiers[0].drain_jobs()
        if result is LookupResult.RETRY:
            time.sleep(0.005)
    return result


@pytest.mark.parametrize("mode", ["embedded", "kvtier-serve"])
def test_tiering_manager_round_trips_every_byte(tmp_path, request, mode):
    if mode == "embedded":
        tier = tier_config(data_dir=str(tmp_path / "kv"), capacity="64MiB")
    else:
        tier = tier_config(url=request.getfixturevalue("kvtier_serve"))
    m, rows = tiering_manager(tier, f"kvtier-{mode}-{time.monotonic_ns()}")
    try:
        first, second = ReqContext("first"), ReqContext("second")
        for ctx in (first, second):
            with m.lock:
                m.on_new_request(ctx)
        written = store(m, rows, first, [key(i) for i in range(CHUNKS)])
        store(m, rows, second, [key(100 + i) for i in range(CHUNKS)])  # evicts the first ones
        with m.lock:
            assert all(m.primary_tier.lookup(key(i), first) is LookupResult.MISS for i in range(CHUNKS))
        hits = [lookup(m, first, key(i)) for i in range(4)]
        assert hits == [LookupResult.HIT] * 4  # promoted back from kvtier into the CPU tier
        with m.lock:
            assert m.get_load_source(key(0), first) is CacheHitSource.DISK
            spec = m.prepare_load([key(i) for i in range(4)], first)
            for i, c in enumerate(spec.chunk_ids):
                assert torch.equal(rows[int(c)], written[key(i)]), f"chunk of key {i} differs"
            m.complete_load([key(i) for i in range(4)], first)
        assert lookup(m, first, key(999)) is LookupResult.MISS
        stats = m.secondary_tiers[0].backend.stats()
        ns = stats.namespaces[m.secondary_tiers[0].namespace]
        assert ns.tokens_put == 2 * CHUNKS and ns.tokens_hit >= 4
    finally:
        del rows
        m.shutdown()


def test_scheduler_gets_hits_from_kvtier_and_none_for_another_configuration(tmp_path):
    mc = model_config(write_tiny_model(tmp_path / "model"))
    data = str(tmp_path / "kv")
    prefix = list(range(100, 100 + 20 * BLOCK))
    a = Engine(vllm_config(mc, tier_config(data_dir=data)))
    try:
        assert a.run(prefix + [5, 6, 7]) == 0  # nothing cached yet
    finally:
        a.shutdown()
    b = Engine(vllm_config(mc, tier_config(data_dir=data)))  # a fresh CPU tier: hits are kvtier's
    try:
        assert b.run(prefix + [9, 9, 9, 9]) == 20 * BLOCK
        assert b.run(prefix + [8, 8, 8], cache_salt="tenant-b") == 0  # vLLM salts its hashes
        assert b.tier.backend.stats().tiers["ssd"].blocks_read >= 20
    finally:
        b.shutdown()
    c = Engine(vllm_config(mc, tier_config(data_dir=data), cache_dtype="fp8"))  # same hashes, fp8 KV
    try:
        assert c.run(prefix + [7, 7, 7]) == 0
    finally:
        c.shutdown()


def test_a_new_process_on_the_same_data_dir_finds_what_an_earlier_one_stored(tmp_path):
    model_dir = write_tiny_model(tmp_path / "model")
    data = str(tmp_path / "kv")
    prefix = list(range(7, 7 + 12 * BLOCK))
    a = Engine(vllm_config(model_config(model_dir), tier_config(data_dir=data)))
    try:
        a.run(prefix + [1])
    finally:
        a.shutdown()
    child = textwrap.dedent(f"""
        from tests.engines.vllm_harness import Engine, model_config, tier_config, vllm_config
        e = Engine(vllm_config(model_config({model_dir!r}), tier_config(data_dir={data!r})))
        print("HITS", e.run({prefix!r} + [2, 3]))
        e.shutdown()
    """)
    proc = subprocess.run([sys.executable, "-c", child], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"HITS {12 * BLOCK}" in proc.stdout


def test_two_engines_share_one_kvtier_serve(tmp_path, kvtier_serve):
    mc = model_config(write_tiny_model(tmp_path / "model"))
    prefix = list(range(3, 3 + 16 * BLOCK))
    a = Engine(vllm_config(mc, tier_config(url=kvtier_serve)))
    b = Engine(vllm_config(mc, tier_config(url=kvtier_serve)))
    try:
        a.run(prefix + [4])
        a.drain()
        assert b.run(prefix + [5, 6]) == 16 * BLOCK
        assert b.run(list(range(5000, 5000 + 4 * BLOCK))) == 0
    finally:
        a.shutdown()
        b.shutdown()


def test_a_lookup_never_waits_for_the_network(tmp_path, kvtier_serve):
    """The first lookup of a key answers RETRY at once; kvtier's answer arrives in the background."""
    m, rows = tiering_manager(tier_config(url=kvtier_serve), f"kvtier-retry-{time.monotonic_ns()}")
    try:
        ctx = ReqContext("r")
        with m.lock:
            m.on_new_request(ctx)
            assert m.lookup(key(1), ctx) is LookupResult.RETRY
            m.on_schedule_end(STEP)
        tier = m.secondary_tiers[0]
        wait_until(lambda: not tier._lookups._pending_results.empty(), "the batched lookup")
        with m.lock:
            assert m.lookup(key(1), ctx) is LookupResult.MISS
    finally:
        del rows
        m.shutdown()


def test_fingerprint_follows_the_engine_configuration():
    from kvtier.integrations.vllm import vllm_fingerprint

    base = vllm_fingerprint(offloading_spec(), PAGE)
    assert vllm_fingerprint(offloading_spec(dtype="fp8_e4m3"), PAGE) != base
    assert vllm_fingerprint(offloading_spec(model="other"), PAGE) != base
    assert vllm_fingerprint(offloading_spec(), PAGE, salt="x") != base
    assert vllm_fingerprint(offloading_spec(), PAGE * 2) != base
    assert np.all([k in base for k in ("model", "kv_dtype", "tokens_per_hash", "tp", "pp", "rank",
                                       "kv_cache_layout")])


def test_the_tier_keeps_caching_after_the_sidecar_lost_its_namespace(tmp_path, kvtier_serve):
    """The tier registered its namespace once, at start: after another client dropped it (or
    the sidecar restarted without its data dir) every store failed and every lookup missed
    until the engine restarted. The tier now registers it again."""
    from kvtier.client import KVTierClient

    m, rows = tiering_manager(tier_config(url=kvtier_serve), f"kvtier-lost-{time.monotonic_ns()}")
    try:
        ctx = ReqContext("r")
        with m.lock:
            m.on_new_request(ctx)
        tier = m.secondary_tiers[0]
        with KVTierClient(kvtier_serve) as other:
            assert other.drop_namespace(tier.namespace) == 0
        store(m, rows, ctx, [key(500 + i) for i in range(CHUNKS)])
        with KVTierClient(kvtier_serve) as other:
            assert other.block_exists(tier.namespace, [key(500)]).present == [True]
    finally:
        del rows
        m.shutdown()


def test_a_sidecar_that_never_answers_costs_the_scheduler_one_timeout(tmp_path):
    """A stuck sidecar (connections accepted, nothing answered) held each request's lookup for
    the client's 120 s, one request after another on vLLM's lookup thread. With ``timeout_s``
    the first lookup misses after it, and the others of the back-off miss at once, asking
    nothing: the sidecar's ``block_exists`` is entered once for two requests."""
    import threading

    from kvtier import CacheConfig, HostTierConfig, TieredCache
    from kvtier.server.testing import serve_in_thread

    entered, go = [], threading.Event()
    with TieredCache(CacheConfig(host=HostTierConfig(capacity_bytes="8MiB"))) as cache, \
            serve_in_thread(cache) as url:
        real = cache.block_exists

        def stuck(*args, **kw):
            entered.append(1)
            go.wait(60)
            return real(*args, **kw)

        m, rows = tiering_manager(tier_config(url=url, timeout_s=0.5), f"kvtier-stuck-{time.monotonic_ns()}")
        cache.block_exists = stuck
        try:
            a, b = ReqContext("a"), ReqContext("b")
            with m.lock:  # two requests' lookups in one step: vLLM asks for them back to back
                m.on_new_request(a)
                m.on_new_request(b)
                assert m.lookup(key(1), a) is LookupResult.RETRY
                assert m.lookup(key(2), b) is LookupResult.RETRY
                m.on_schedule_end(STEP)
            assert lookup(m, a, key(1)) is LookupResult.MISS
            assert lookup(m, b, key(2)) is LookupResult.MISS
            assert len(entered) == 1
        finally:
            go.set()
            del rows
            m.shutdown()
