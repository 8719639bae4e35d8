"""``TieredCache.put`` to the SSD tier against fio's sequential direct write, in one run.

What a user's put costs end to end: encode, checksum, place, O_DIRECT write and the durability
the mode promises (``batch``: acknowledged once written, fdatasync'd with the next commit
window), into a fresh SSD-only cache (no host tier), one put of a whole prefix per round. fio
writes the same bytes in blocks of the same size, sequential, ``O_DIRECT``, at ``--qd``; for
``sync`` and ``batch``, ``fio+sync`` does too with an ``fdatasync`` as often as the mode makes
kvtier's writes durable (on a disk with a volatile write cache that flush is the cost of
durability, and plain fio never pays it). Each goes first in turn; the page cache is dropped before each (when this
process may write /proc/sys/vm/drop_caches). Medians over rounds, and kvtier / fio.

    python -m kvtier.bench.put_path --dir /mnt/nvme/bench --block-mib 2 --gib 1 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from kvtier.bench.common import drop_page_cache, table
from kvtier.config import CacheConfig, HostTierConfig, SSDTierConfig
from kvtier.manager import TieredCache
from kvtier.tiers.memory import MemoryTier

LAYERS, HEADS, DIM = 4, 8, 64  # float16: a 256-token block is 2 MiB


BATCH_INTERVAL_MS = SSDTierConfig().batch_interval_ms  # the default commit window


def _kv(tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [tuple(torch.randint(-2**15, 2**15, (tokens, HEADS, DIM), dtype=torch.int16, generator=g)
                  .view(torch.float16) for _ in range(2)) for _ in range(LAYERS)]  # type: ignore[misc]


def put_once(root: Path, kv: list, tokens: int, block_tokens: int, durability: Any,
             batch_interval_ms: int = BATCH_INTERVAL_MS, host: bool = False) -> float:
    """Seconds for one put of the whole prefix into a fresh SSD-only cache (``host``: with a
    host tier in front that holds the whole prefix, written through to the SSD)."""
    shutil.rmtree(root, ignore_errors=True)
    kv_bytes = tokens * LAYERS * 2 * HEADS * DIM * 2
    cache = TieredCache(CacheConfig(
        host=HostTierConfig(capacity_bytes=2 * kv_bytes if host else 0),
        ssd=SSDTierConfig(path=str(root), capacity_bytes=4 * kv_bytes,
                          durability=durability, min_free_bytes=0, batch_interval_ms=batch_interval_ms),
        block_tokens=block_tokens))
    try:
        hst = cache.tier("host") if host else None
        if isinstance(hst, MemoryTier):  # a running sidecar's host memory is faulted in: time
            hst.wait_prefaulted()        # the put, not the page faults

        ids = torch.arange(tokens, dtype=torch.int64)
        t0 = time.perf_counter()
        stored = cache.put("bench", ids, kv)
        dt = time.perf_counter() - t0
        if stored != tokens:
            raise RuntimeError(f"stored {stored} of {tokens} tokens")
        return dt
    finally:
        cache.close()
        shutil.rmtree(root, ignore_errors=True)


def fio_once(path: Path, total: int, block: int, qd: int, sync_every: int = 0) -> float:
    """fio's sequential O_DIRECT write of ``total`` bytes in ``block``-byte writes at ``qd``
    (with an fdatasync every ``sync_every`` writes, if set): bytes per second."""
    path.unlink(missing_ok=True)
    sync = [f"--fdatasync={sync_every}"] if sync_every else []
    out = subprocess.run(["fio", "--name=seqwrite", f"--filename={path}", "--rw=write", f"--bs={block}",
                          f"--size={total}", "--direct=1", "--ioengine=libaio", f"--iodepth={qd}",
                          *sync, "--output-format=json"], check=True, capture_output=True, text=True).stdout
    path.unlink(missing_ok=True)
    return json.loads(out)["jobs"][0]["write"]["bw_bytes"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=os.environ.get("TMPDIR", "/tmp"), help="disk to benchmark on")
    ap.add_argument("--block-mib", type=int, default=2, choices=(1, 2, 4, 8, 16, 32))
    ap.add_argument("--gib", type=float, default=1.0, help="bytes per put (GiB)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--durability", default="batch", choices=("sync", "batch", "none"))
    ap.add_argument("--qd", type=int, default=4, help="fio's queue depth")
    ap.add_argument("--batch-interval-ms", type=int, default=BATCH_INTERVAL_MS,
                    help="the SSD tier's batch commit interval (durability batch)")
    ap.add_argument("--host", action="store_true",
                    help="a host tier in front that holds the prefix, as deployed: each block goes into "
                         "host memory and is written through to the SSD before the put returns")
    args = ap.parse_args(argv)

    block_tokens = 128 * args.block_mib
    block = block_tokens * LAYERS * 2 * HEADS * DIM * 2
    tokens = int(args.gib * 2**30) // block * block_tokens
    total = tokens // block_tokens * block
    kv = _kv(tokens)
    work = Path(args.dir) / f"kvtier-bench-put-{os.getpid()}"
    work.mkdir(parents=True)
    rates: dict[str, list[float]] = {"kvtier": [], "fio": []}
    if args.durability != "none":
        rates["fio+sync"] = []
    cold = True
    try:
        for rnd in range(args.rounds):
            names = list(rates)
            for name in names[rnd % len(names):] + names[:rnd % len(names)]:  # each first in turn
                cold = drop_page_cache() and cold
                if name == "kvtier":
                    rates[name].append(total / put_once(work / "cache", kv, tokens, block_tokens,
                                                        args.durability, args.batch_interval_ms,
                                                        args.host) / 1e9)
                elif name == "fio":
                    rates[name].append(fio_once(work / "fio.dat", total, block, args.qd) / 1e9)
                else:
                    rates[name].append(fio_once(work / "fio.dat", total, block, args.qd,
                                                sync_every(args.durability, block, args.batch_interval_ms)) / 1e9)
            print(f"round {rnd + 1}: " + ", ".join(f"{n} {r[-1]:.2f} GB/s" for n, r in rates.items()),
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {n: statistics.median(r) for n, r in rates.items()}
    print(f"\n{args.rounds} rounds, one put of {total / 2**30:.2f} GiB in {block / 2**20:.0f} MiB blocks, "
          f"durability {args.durability}{', host tier in front' if args.host else ''}; fio seq write O_DIRECT QD{args.qd}; page cache "
          f"{'dropped' if cold else 'NOT dropped (no permission)'}")
    print(table(["path", "GB/s (median)", "min", "max"],
                [[n, f"{med[n]:.2f}", f"{min(r):.2f}", f"{max(r):.2f}"] for n, r in rates.items()]
                + [[f"kvtier / {n}", f"{med['kvtier'] / med[n]:.2f}x", "", ""] for n in rates if n != "kvtier"]))
    if "fio+sync" in rates:
        print(f"fio+sync: fdatasync every {sync_every(args.durability, block, args.batch_interval_ms)} writes, as often as "
              f"the '{args.durability}' mode makes its writes durable")


def sync_every(durability: str, block: int, batch_interval_ms: int = BATCH_INTERVAL_MS) -> int:
    """Writes between fio's fdatasyncs that make its writes as durable as ``durability``'s:
    ``sync`` after every write; ``batch`` once per commit window (``batch_interval_ms``) at
    1 GB/s, a write rate above this machine's durable one, so fio syncs no more often than
    kvtier does."""
    if durability == "sync":
        return 1
    return max(1, round(1e9 * batch_interval_ms / 1e3 / block))


if __name__ == "__main__":
    main()
