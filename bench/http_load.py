"""HTTP load on the sidecar: lookup throughput/latency, and data-plane GB/s vs the in-process API.

    python -m kvtier.bench.http_load --clients 8 --seconds 5 --prefix-tokens 8192 --kv-tokens 4096

Starts ``kvtier serve`` as a subprocess on a free loopback port (memory tier only), so server and
load generator do not share a GIL. Lookups: N asyncio clients for a bounded time, each looking up
an 8K-token prefix that is cached (lookups/s, p50/p99 ms). Data plane: the same KV read (get) and
written (put, fresh tokens each time) through msgpack, through shared memory, and through an
in-process ``TieredCache`` in this process; GB/s is KV bytes / wall time, median of the repeats.
Shared memory is measured twice for put: with the caller's own tensors (``shm``, packed by the
client) and from a ``kv_buffer()`` the caller wrote into (``shm_kv_buffer``); see ``data_plane``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvtier import CacheConfig, KVLayout, TieredCache  # noqa: E402
from kvtier.client import AsyncKVTierClient, KVTierClient  # noqa: E402
from kvtier.config import HostTierConfig  # noqa: E402
from kvtier.server.testing import free_port  # noqa: E402

log = logging.getLogger("kvtier.bench.http_load")
BT = 256


def start_server(port: int, capacity: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "kvtier.commands.serve", "--port", str(port), "--ssd", "false",
           "--host-capacity", capacity, "--block-tokens", str(BT), "--log-level", "warning",
           "--max-kv-bytes", "8GiB", "--data-dir", "/tmp/kvtier-bench-unused"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("kvtier serve did not start")


def make_kv(layout: KVLayout, tokens: int) -> list[tuple[torch.Tensor, ...]]:
    return [tuple(torch.randn(tokens, *s).to(layout.torch_dtype) for s in layout.tensor_shapes)
            for _ in range(layout.num_layers)]


async def lookup_load(url: str, clients: int, seconds: float, ids: list[int]) -> dict:
    lat: list[float] = []
    deadline = time.perf_counter() + seconds

    async def one(client: AsyncKVTierClient) -> None:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            hit = await client.lookup("lk", ids)
            lat.append(time.perf_counter() - t0)
            assert hit.tokens == len(ids)

    cs = [AsyncKVTierClient(url) for _ in range(clients)]
    t0 = time.perf_counter()
    await asyncio.gather(*(one(c) for c in cs))
    wall = time.perf_counter() - t0
    for c in cs:
        await c.aclose()
    lat.sort()
    return {"clients": clients, "seconds": round(wall, 2), "lookups": len(lat),
            "lookups_per_s": round(len(lat) / wall, 1),
            "p50_ms": round(1e3 * lat[len(lat) // 2], 2), "p99_ms": round(1e3 * lat[int(len(lat) * 0.99)], 2)}


def data_plane(url: str, layout: KVLayout, tokens: int, repeats: int, capacity_bytes: int) -> dict:
    """Median seconds per get/put of ``tokens`` tokens; variants interleaved so noise hits all.

    The in-process cache gets the server's host capacity (put speed depends on it).

    ``shm`` puts the caller's own tensors (the client packs them into shared memory: one copy);
    ``shm_kv_buffer`` puts KV the caller wrote into ``client.kv_buffer()`` tensors (no copy),
    the way an engine that writes its KV there would. Its fill (copying the same KV in) is not
    timed, as the in-process put does not time the engine writing its own tensors either; it is
    reported separately as ``put_with_fill``. Gets drop the returned tensors before the next
    call, so the shared-memory region goes back to the client's pool.
    """
    kv = make_kv(layout, tokens)
    nbytes = tokens * layout.bytes_per_token
    ids = list(range(tokens))
    counter = iter(range(1, 1 << 30))

    def fresh() -> list[int]:
        base = next(counter) * 10_000_000
        return [base + t for t in ids]

    def fill(buf: list[tuple[torch.Tensor, ...]]) -> None:
        for dst, src in zip(buf, kv, strict=True):
            for d, s in zip(dst, src, strict=True):
                d.copy_(s)

    local = TieredCache(CacheConfig(block_tokens=BT, host=HostTierConfig(capacity_bytes=capacity_bytes)))
    remotes = {"msgpack": KVTierClient(url), "shm": KVTierClient(url, use_shm=True)}
    caches: dict[str, TieredCache | KVTierClient] = {"in_process": local, **remotes}
    times: dict[str, dict[str, list[float]]] = {n: {"get": [], "put": []} for n in caches}
    times["shm_kv_buffer"] = {"put": [], "put_with_fill": []}
    try:
        for c in caches.values():
            c.register_namespace("dp", layout=layout, block_tokens=BT)
            c.put("dp", ids, kv)
            c.get("dp", ids)  # warm: regions created, pages faulted in
        shm = remotes["shm"]
        buf = shm.kv_buffer("dp", tokens)
        fill(buf)
        shm.put("dp", fresh(), buf)  # warm the buffer's region on the server
        for _ in range(repeats):
            for name, c in caches.items():
                t0 = time.perf_counter()
                out, n = c.get("dp", ids)
                times[name]["get"].append(time.perf_counter() - t0)
                assert n == tokens
                del out
                t = fresh()
                t0 = time.perf_counter()
                c.put("dp", t, kv)
                times[name]["put"].append(time.perf_counter() - t0)
                c.evict("dp", t)
            t = fresh()
            t0 = time.perf_counter()
            fill(buf)
            t1 = time.perf_counter()
            assert shm.put("dp", t, buf) == tokens
            t2 = time.perf_counter()
            times["shm_kv_buffer"]["put"].append(t2 - t1)
            times["shm_kv_buffer"]["put_with_fill"].append(t2 - t0)
            shm.evict("dp", t)
        del buf
    finally:
        local.close()
        for c in remotes.values():
            c.close()
    med = {n: {op: statistics.median(v) for op, v in d.items()} for n, d in times.items()}
    res: dict[str, Any] = {"kv_bytes": nbytes, "tokens": tokens, "layout": layout.fingerprint(),
                           "repeats": repeats}
    for name, ops in med.items():
        res[name] = {op: {"seconds": round(s, 4), "GB_per_s": round(nbytes / s / 1e9, 2)} for op, s in ops.items()}
        if name != "in_process":
            for op in ops:
                res[name][op]["vs_in_process"] = round(med["in_process"][op.removesuffix("_with_fill")] / ops[op], 2)
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--prefix-tokens", type=int, default=8192)
    p.add_argument("--kv-tokens", type=int, default=4096)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="float16")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="write the JSON result here too")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    layout = KVLayout(args.layers, ((args.kv_heads, args.head_dim),) * 2, args.dtype)
    capacity_mib = max(1, 4 * args.kv_tokens * layout.bytes_per_token // 2**20 + 64)
    capacity = f"{capacity_mib}MiB"
    port = free_port()
    proc = start_server(port, capacity)
    url = f"http://127.0.0.1:{port}"
    try:
        with KVTierClient(url) as c:
            c.register_namespace("lk", layout=KVLayout(1, ((1, 8),), "float16"), block_tokens=BT)
            ids = list(range(args.prefix_tokens))
            c.put("lk", ids, [(torch.zeros(args.prefix_tokens, 1, 8, dtype=torch.float16),)])
        result = {"lookup": asyncio.run(lookup_load(url, args.clients, args.seconds, ids)),
                  "data_plane": data_plane(url, layout, args.kv_tokens, args.repeats, capacity_mib << 20)}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    text = json.dumps(result, indent=2)
    log.info("%s", text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
