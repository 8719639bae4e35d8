"""Reload throughput of the remote tier vs the raw engine client, in the same run.

For each block size, reloads the same blocks alternately through ``RemoteTier.read_into`` (into
a preallocated uint8 tensor, checksums verified) and through the raw client (redis-py ``GET``;
Mooncake ``get_into`` on a registered buffer), and prints per-call medians and p99 with GB/s.

    python bench/remote.py                      # starts its own redis-server on loopback
    python bench/remote.py --engine mooncake    # starts mooncake_master (+ in-process segment)
    python bench/remote.py --url redis://host:6379/0 --sizes 2MiB,16MiB --reps 30
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvtier.config import RemoteTierConfig, format_size, parse_size  # noqa: E402
from kvtier.tiers.base import BlockMeta  # noqa: E402
from kvtier.tiers.remote import make_remote_tier  # noqa: E402

log = logging.getLogger("bench.remote")
META = BlockMeta("bench", None, 256, "none", 0.0)


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _redis_raw(tier):
    client = tier.backend.raw_client()

    def setup(key: bytes, data: bytes) -> bytes:
        rkey = b"raw:" + key
        client.set(rkey, data)
        return rkey

    def get(rkey: bytes, out: torch.Tensor) -> None:
        value = client.get(rkey)
        assert value is not None and len(value) == out.numel()

    return setup, get


def _mooncake_raw(tier):
    store = tier.backend.raw_store()

    def setup(key: bytes, data: bytes) -> str:
        rkey = "raw:" + key.hex()
        assert store.put(rkey, data) == 0
        return rkey

    def get(rkey: str, out: torch.Tensor) -> None:
        tier.backend.register(out)
        n = store.get_into(rkey, out.data_ptr(), out.numel())
        assert n == out.numel(), n

    return setup, get


def run(engine: str, url: str, sizes: list[int], blocks: int, reps: int) -> list[dict]:
    backend = {"redis": "redis", "cluster": "redis-cluster", "mooncake": "mooncake"}[engine]
    cfg = RemoteTierConfig(backend=backend, url=url, timeout_s=10.0, max_inflight_bytes=2 * 1024**3)
    tier = make_remote_tier(cfg, prefix=f"bench{os.getpid()}:") if engine != "mooncake" \
        else make_remote_tier(cfg)
    raw_setup, raw_get = (_mooncake_raw if engine == "mooncake" else _redis_raw)(tier)
    rows = []
    try:
        for size in sizes:
            keys, raw_keys = [], []
            for _ in range(blocks):
                data = os.urandom(size)
                key = os.urandom(16)
                tier.put(key, data, META)
                keys.append(key)
                raw_keys.append(raw_setup(key, data))
            assert tier.flush(120), "remote writes did not finish"
            out = torch.empty(size, dtype=torch.uint8)
            times = {"kvtier": [], "raw": []}
            for r in range(reps):
                for key, rkey in zip(keys, raw_keys, strict=True):
                    order = ("kvtier", "raw") if r % 2 == 0 else ("raw", "kvtier")
                    for path in order:
                        t0 = time.perf_counter()
                        if path == "raw":
                            raw_get(rkey, out)
                        else:
                            tier.read_into(key, out)
                        times[path].append(time.perf_counter() - t0)
            for path, ts in times.items():
                med = statistics.median(ts)
                rows.append({"engine": engine, "size": size, "path": path, "n": len(ts),
                             "p50_ms": med * 1e3, "p99_ms": _pct(ts, 0.99) * 1e3,
                             "gbps": size / med / 1e9})
            for key in keys:
                tier.delete(key)
    finally:
        s = tier.stats()
        tier.close()
    log.info("tier stats: errors=%s timeouts=%s", s["errors"], s["timeouts"])
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'engine':9} {'block':>9} {'path':7} {'n':>5} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'GB/s':>6} {'vs raw':>7}")
    raw = {(r["engine"], r["size"]): r["gbps"] for r in rows if r["path"] == "raw"}
    for r in rows:
        ratio = r["gbps"] / raw[(r["engine"], r["size"])]
        print(f"{r['engine']:9} {format_size(r['size']):>9} {r['path']:7} {r['n']:5d} "
              f"{r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {r['gbps']:6.2f} {ratio:7.0%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=["redis", "cluster", "mooncake", "all"], default="redis")
    ap.add_argument("--url", help="an existing engine; default: start one on loopback")
    ap.add_argument("--sizes", default="2MiB,16MiB")
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    engines = ["redis", "mooncake"] if args.engine == "all" else [args.engine]
    rows = []
    for engine in engines:
        if args.url:
            rows += run(engine, args.url, sizes, args.blocks, args.reps)
            continue
        from tests.integration import remote_servers as rs

        server = {"redis": rs.RedisServer, "cluster": rs.RedisCluster}.get(engine)
        if server is None:
            from tests.integration.remote_mooncake import MooncakeMaster

            server = MooncakeMaster
        srv = server().start()
        try:
            rows += run(engine, srv.url, sizes, args.blocks, args.reps)
        finally:
            srv.stop()
    print_table(rows)


if __name__ == "__main__":
    main()
