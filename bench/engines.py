"""kvtier's vLLM tier against vLLM's own ``fs`` tier, side by side in one run.

Both tiers are built as vLLM builds them (``SecondaryTierFactory``) over one CPU-primary buffer,
on the same disk, with the same block hashes and page size. Each round stores a fresh set of
blocks through both tiers (vLLM's cascade: many jobs submitted at once), drops the page cache,
then loads them back into other rows (vLLM's promotion) and checks every byte. The order of the
tiers rotates between rounds, and the disk is synced (untimed) between one tier's phase and the
next's, so a tier's background flush is never counted in another's time. Reported: store and load throughput (bytes over the wall
time from the first submit to the last completion) and the p99 of per-job latency (submit to
completion as vLLM's scheduler sees it through ``get_finished_jobs``), medians over rounds.

    python -m kvtier.bench.engines --dir /mnt/nvme/bench --page-mib 2 --jobs 32 --blocks-per-job 8 --rounds 5

Needs vLLM installed (see tests/engines/requirements.txt) and, for cold reads, root (to write
/proc/sys/vm/drop_caches); without it the run says so and the reads may come from the cache.
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from kvtier.bench.common import drop_page_cache, p99, table


def _spec(page: int) -> SimpleNamespace:
    from vllm.v1.kv_offload.base import OffloadingKVEventsConfig
    from vllm.v1.kv_offload.config import (
        OffloadingCacheConfig,
        OffloadingConfig,
        OffloadingModelConfig,
        OffloadingParallelConfig,
    )

    config = OffloadingConfig(
        groups=(), worker_kv_bytes_per_block=page, enable_kv_cache_events=False, extra_config={},
        engine_id="bench", model=OffloadingModelConfig(name="bench-model", dtype="bfloat16"),
        cache=OffloadingCacheConfig(tokens_per_hash=16, blocks_per_chunk=1),
        parallel=OffloadingParallelConfig(rank=0, world_size=1, tp_size=1, pp_size=1, pcp_size=1,
                                          dcp_size=1, data_parallel_index=0, data_parallel_size=1,
                                          data_parallel_rank_local=None, is_parallelism_agnostic=True))
    return SimpleNamespace(config=config, blocks_per_chunk=1,
                           kv_events_config=OffloadingKVEventsConfig(False, False))


def _aligned_rows(n: int, page: int) -> torch.Tensor:
    """``n`` rows of ``page`` bytes, page aligned (O_DIRECT needs it; vLLM's region is)."""
    raw = torch.empty(n * page + mmap.PAGESIZE, dtype=torch.uint8)
    shift = (-raw.data_ptr()) % mmap.PAGESIZE
    return raw[shift: shift + n * page].view(n, page)


def _name(mode: str, modes: list[str]) -> str:
    return "kvtier" if modes == [mode] else f"kvtier ({mode})"


def run_jobs(tier, jobs: list, submit) -> tuple[float, list[float]]:
    """Submit every job at once; wall seconds to the last completion and each job's latency."""
    start = {}
    t0 = time.perf_counter()
    for job in jobs:
        start[job.job_id] = time.perf_counter()
        submit(job)
    lat: list[float] = []
    failed: list[float] = []
    while len(lat) + len(failed) < len(jobs):
        for r in tier.get_finished_jobs():
            (lat if r.success else failed).append(time.perf_counter() - start[r.job_id])
        time.sleep(0.0005)
    if failed:
        raise RuntimeError(f"{tier.tier_type}: {len(failed)} of {len(jobs)} jobs failed")
    return time.perf_counter() - t0, lat


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=os.environ.get("TMPDIR", "/tmp"), help="disk to benchmark on")
    ap.add_argument("--page-mib", type=float, default=2.0, help="bytes per vLLM CPU chunk (MiB)")
    ap.add_argument("--jobs", type=int, default=32, help="jobs per phase, submitted at once")
    ap.add_argument("--blocks-per-job", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--kvtier-threads", type=int, default=None, help="kvtier n_threads (default: the tier's)")
    ap.add_argument("--durability", default="batch",
                    help="kvtier durability modes to run side by side, comma separated (batch: the "
                         "default, fdatasync every commit window; none: no fsync, as the fs tier)")
    args = ap.parse_args(argv)

    from vllm.v1.kv_offload.base import ReqContext, make_offload_key
    from vllm.v1.kv_offload.tiering.base import TransferJob
    from vllm.v1.kv_offload.tiering.factory import SecondaryTierFactory

    page = int(args.page_mib * 1024 * 1024) // mmap.PAGESIZE * mmap.PAGESIZE
    n_blocks = args.jobs * args.blocks_per_job
    rows = _aligned_rows(2 * n_blocks, page)
    rows[:n_blocks].copy_(torch.randint(0, 256, (n_blocks, page), dtype=torch.uint8))
    view = rows.numpy().data
    root = Path(args.dir) / f"kvtier-bench-engines-{os.getpid()}"
    spec = _spec(page)
    tiers = {"fs": SecondaryTierFactory.create_secondary_tier({"type": "fs", "root_dir": str(root / "fs")},
                                                             view, spec)}
    modes = args.durability.split(",")
    for mode in modes:
        kv_cfg = {"type": "KVTierSecondaryTier", "module_path": "kvtier.integrations.vllm",
                  "data_dir": str(root / f"kvtier-{mode}"), "durability": mode,
                  "capacity": f"{4 * args.rounds * n_blocks * page}"}
        if args.kvtier_threads:
            kv_cfg["n_threads"] = args.kvtier_threads
        tiers[_name(mode, modes)] = SecondaryTierFactory.create_secondary_tier(kv_cfg, view, spec)
    ctx = ReqContext("bench")
    rng = np.random.default_rng(0)
    results: dict[str, dict[str, list[float]]] = {n: {"store": [], "load": [], "store_p99": [], "load_p99": []}
                                                  for n in tiers}
    cold = True
    job_id = 0
    total = n_blocks * page
    try:
        for rnd in range(args.rounds):
            keys = [make_offload_key(rng.bytes(32), 0) for _ in range(n_blocks)]
            names = list(tiers)
            order = names[rnd % len(names):] + names[:rnd % len(names)]  # each goes first in turn

            def jobs(promotion: bool, base: int, keys: list = keys):
                nonlocal job_id
                out = []
                for j in range(args.jobs):
                    ks = keys[j * args.blocks_per_job:(j + 1) * args.blocks_per_job]
                    ids = np.arange(base + j * args.blocks_per_job, base + (j + 1) * args.blocks_per_job)
                    out.append(TransferJob(job_id, ks, ids, promotion, ctx))
                    job_id += 1
                return out

            for name in order:
                tier = tiers[name]
                wall, lat = run_jobs(tier, jobs(False, 0), tier.submit_store)
                results[name]["store"].append(total / wall / 1e9)
                results[name]["store_p99"].append(p99(lat) * 1e3)
                os.sync()  # untimed: no tier's late flush (a group commit) lands in the next one's time
            cold = drop_page_cache() and cold
            for name in order:
                tier = tiers[name]
                rows[n_blocks:].zero_()
                wall, lat = run_jobs(tier, jobs(True, n_blocks), tier.submit_load)
                if not torch.equal(rows[n_blocks:], rows[:n_blocks]):
                    raise RuntimeError(f"{name}: loaded bytes differ from the stored ones")
                results[name]["load"].append(total / wall / 1e9)
                results[name]["load_p99"].append(p99(lat) * 1e3)
            print(f"round {rnd + 1}: " + ", ".join(
                f"{n} store {results[n]['store'][-1]:.2f} load {results[n]['load'][-1]:.2f} GB/s" for n in order),
                flush=True)
    finally:
        for tier in tiers.values():
            tier.shutdown()
        shutil.rmtree(root, ignore_errors=True)

    med = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in results.items()}
    rows_out = [[n, f"{m['store']:.2f}", f"{m['store_p99']:.0f}", f"{m['load']:.2f}", f"{m['load_p99']:.0f}"]
                for n, m in med.items()]
    for mode in modes:
        n = _name(mode, modes)
        rows_out.append([f"{n} / fs", f"{med[n]['store'] / med['fs']['store']:.2f}x", "",
                         f"{med[n]['load'] / med['fs']['load']:.2f}x", ""])
    print(f"\n{args.rounds} rounds, {args.jobs} jobs x {args.blocks_per_job} blocks x {page / 2**20:.2f} MiB "
          f"({total / 2**30:.2f} GiB per phase), page cache {'dropped before loads' if cold else 'NOT dropped (no permission)'}")
    print(table(["tier", "store GB/s", "store p99 ms/job", "load GB/s", "load p99 ms/job"], rows_out))


if __name__ == "__main__":
    main()
