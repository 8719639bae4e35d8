"""Reload throughput of the remote tier vs the raw engine client, in the same run.

Each run writes ``--blocks`` random blocks per size twice (through kvtier and as plain values),
warms both paths up, then reloads ``--reps`` times through both paths interleaved call by call,
alternating which goes first, so drift in a shared machine's load hits both alike. A call is
one block (``--unit block``: every block in turn) or the whole prefix of ``--blocks`` blocks
(``--unit prefix``). Reported per path: median and p99 of one call, GB/s at the median; per
size: kvtier's GB/s as a share of raw's (median over runs, with the min-max spread over runs).

What each path does (the raw side does less work, by design: it is the bar to reach):
- ``kvtier``: into host memory registered once with ``RemoteTier.register``, as raw's is (a
  loader registers its staging ring the same way): per block ``RemoteTier.read_into``, per
  prefix ``RemoteTier.read_blocks_into``; bounded calls through the breaker, crc32c of every
  byte verified, bytes delivered into the caller's tensor (Mooncake: straight into it; Redis
  ignores the registration).
- ``raw``: redis-py ``GET`` (per prefix: one pipeline of them) returning ``bytes`` (nothing
  verified, no copy into a tensor); Mooncake ``get_into`` (per prefix: one ``batch_get_into``)
  into a buffer registered once (nothing verified, no timeout bound).
- with ``--detail``, references that attribute kvtier's costs: ``raw+crc`` (raw, then crc32c
  of the bytes in one thread; per prefix Mooncake only) and, per block for Mooncake,
  ``raw+hop`` (raw ``get_into`` run on a worker thread, the price of bounding a call that may
  stall) and ``kvtier-staged`` (kvtier into an unregistered tensor: read into a staging
  buffer, then verified and copied out, as before registration existed).

    python -m kvtier.bench.remote --engine all --runs 3            # loopback redis-server + Mooncake
    python -m kvtier.bench.remote --engine all --runs 3 --unit prefix
    python -m kvtier.bench.remote --url redis://host:6379/0 --sizes 2MiB,16MiB --reps 30
    python -m kvtier.bench.remote --engine all --runs 3 --unit load   # through the loader, into KV

``--unit load`` measures the production reload path instead of the tier alone: a second
``TieredCache`` (promotion off, so every load is remote) streams the prefix one instance stored
through ``Loader.load`` into model-shaped KV tensors allocated once, as an engine's KV pool is (4
layers, K and V of 8 heads x 64 float32: 16 KiB a token, so a 2 MiB block holds 128 tokens), against the raw client reading the same
encoded blocks (stored again as plain values) in one batch call / pipeline. kvtier does more
here: the lease, the batched read into its registered staging ring, verification, and the
decode (a copy, on CPU) into the destination.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvtier.bench.common import median, p99, table  # noqa: E402
from kvtier.block import checksum  # noqa: E402
from kvtier.config import RemoteBackendName, RemoteTierConfig, format_size, parse_size  # noqa: E402
from kvtier.tiers.base import BlockMeta  # noqa: E402
from kvtier.tiers.remote import make_remote_tier  # noqa: E402
from kvtier.tiers.remote.tier import RemoteTier  # noqa: E402

log = logging.getLogger("kvtier.bench.remote")
META = BlockMeta("bench", None, 256, "none", 0.0)
BACKENDS: dict[str, RemoteBackendName] = {"redis": "redis", "cluster": "redis-cluster", "mooncake": "mooncake"}
LEASE_EXPIRED = -707  # Mooncake: the read outlived the object's lease; read it again
NOT_FOUND = -704
WARMUP_PASSES = 3
Read = Callable[[int], None]


def _raw_redis(tier, size: int, detail: bool, prefix: bool) -> tuple[Callable, Callable, dict]:
    client = tier.backend.raw_client()
    keys: list[bytes] = []

    def setup(key: bytes, data: bytes) -> None:
        client.set(b"raw:" + key, data)
        keys.append(b"raw:" + key)

    def raw(i: int) -> None:
        value = client.get(keys[i])
        assert value is not None and len(value) == size

    def raw_crc(i: int) -> None:
        checksum(client.get(keys[i]))

    def raw_prefix(_: int) -> None:
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.get(key)
        assert all(v is not None and len(v) == size for v in pipe.execute())

    def teardown() -> None:
        client.delete(*keys)

    if prefix:
        return setup, teardown, {"raw": raw_prefix}
    return setup, teardown, {"raw": raw, **({"raw+crc": raw_crc} if detail else {})}


def _raw_mooncake(tier, size: int, detail: bool, prefix: bool) -> tuple[Callable, Callable, dict]:
    store = tier.backend.raw_store()
    buf = torch.empty(size, dtype=torch.uint8)  # registered once, reused: the raw client's best
    tier.backend.register(buf)
    many: list[torch.Tensor] = []  # per prefix: one registered buffer per block
    view = buf.numpy().data
    keys: list[str] = []
    hop = cf.ThreadPoolExecutor(1)

    def setup(key: bytes, data: bytes) -> None:
        assert store.put("raw:" + key.hex(), data) == 0
        keys.append("raw:" + key.hex())

    def raw(i: int) -> None:
        n = store.get_into(keys[i], buf.data_ptr(), size)
        while n == LEASE_EXPIRED:
            n = store.get_into(keys[i], buf.data_ptr(), size)
        assert n == size, n

    def raw_crc(i: int) -> None:
        raw(i)
        checksum(view)

    def raw_prefix(_: int) -> None:
        if not many:  # once all keys are known
            whole = torch.empty(len(keys) * size, dtype=torch.uint8)
            tier.backend.register(whole)
            many.extend(whole.split(size))
        ptrs, sizes = [b.data_ptr() for b in many], [size] * len(keys)
        got = store.batch_get_into(keys, ptrs, sizes)
        for _ in range(3):  # a lease that expired under a stall: read those again
            if all(n == size for n in got):
                return
            assert all(n in (size, LEASE_EXPIRED) for n in got), got
            got = store.batch_get_into(keys, ptrs, sizes)
        raise AssertionError(got)

    def raw_prefix_crc(i: int) -> None:
        raw_prefix(i)
        for b in many:
            checksum(b.numpy().data)

    def teardown() -> None:
        hop.shutdown()
        for key in keys:  # forced: the lease of the last read may still hold it
            assert store.remove(key, True) in (0, NOT_FOUND)

    if prefix:
        return setup, teardown, {"raw": raw_prefix, **({"raw+crc": raw_prefix_crc} if detail else {})}
    extra = {"raw+crc": raw_crc, "raw+hop": lambda i: hop.submit(raw, i).result()}
    return setup, teardown, {"raw": raw, **(extra if detail else {})}


def _kvtier(tier, keys: list[bytes], size: int, register: bool = True) -> Read:
    out = torch.empty(size, dtype=torch.uint8)
    if register:  # like raw's buffer: registered once (Mooncake then reads straight into it)
        tier.register(out)

    def read(i: int) -> None:
        for attempt in range(3):
            try:
                tier.read_into(keys[i], out)
                return
            except KeyError:  # a lease that expired under a stall (Mooncake): read it again
                if attempt == 2:
                    raise

    return read


def _kvtier_prefix(tier, keys: list[bytes], size: int) -> Read:
    ring = torch.empty(len(keys) * size, dtype=torch.uint8)
    tier.register(ring)  # as a loader registers its staging ring, once
    outs = list(ring.split(size))

    def read(_: int) -> None:
        todo = list(range(len(keys)))
        for _attempt in range(3):  # blocks whose lease expired under a stall: read them again
            got = tier.read_blocks_into([keys[j] for j in todo], [outs[j] for j in todo])
            todo = [j for j, n in zip(todo, got, strict=True) if n != size]
            if not todo:
                return
        raise AssertionError(f"blocks {todo} not reloaded")

    return read


def _time_paths(paths: dict[str, Read], calls: int, reps: int) -> dict[str, list[float]]:
    """Warm every path up, then time ``reps`` rounds of ``calls`` calls each, the paths
    interleaved call by call with the order alternating; per path, the seconds of each call."""
    for _ in range(WARMUP_PASSES):  # connections, staging buffers, page faults, caches
        for read in paths.values():
            for i in range(calls):
                read(i)
    times: dict[str, list[float]] = {name: [] for name in paths}
    order = list(paths)
    for r in range(reps):
        for i in range(calls):
            for name in order if (r * calls + i) % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                paths[name](i)
                times[name].append(time.perf_counter() - t0)
    return times


def measure(engine: str, url: str, size: int, blocks: int, reps: int, detail: bool,
            prefix: bool = False) -> dict:
    """One run for one size: per path, the per-call seconds of every timed reload."""
    cfg = RemoteTierConfig(backend=BACKENDS[engine], url=url, timeout_s=10.0, max_inflight_bytes=2 * 1024**3)
    tier = make_remote_tier(cfg, prefix=f"bench{os.getpid()}-{os.urandom(4).hex()}:")
    assert tier is not None  # a backend is named
    try:
        raw = _raw_mooncake if engine == "mooncake" else _raw_redis
        setup, teardown, paths = raw(tier, size, detail, prefix)
        keys = []
        data = b""
        for _ in range(blocks):
            data, key = os.urandom(size), os.urandom(16)
            tier.put(key, data, META)
            setup(key, data)
            keys.append(key)
        assert tier.flush(120), "remote writes did not finish"
        if prefix:
            paths = {"kvtier": _kvtier_prefix(tier, keys, size), **paths}
        else:
            paths = {"kvtier": _kvtier(tier, keys, size), **paths}
            if detail and engine == "mooncake":
                paths["kvtier-staged"] = _kvtier(tier, keys, size, register=False)
        check = torch.empty(size, dtype=torch.uint8)
        tier.read_into(keys[-1], check)  # bit-exact, outside the timed region
        assert check.numpy().tobytes() == data, "kvtier reloaded other bytes than were put"
        times = _time_paths(paths, 1 if prefix else blocks, reps)  # the prefix once, or each block
        s = tier.stats()
        if s["errors"] or s["timeouts"]:
            log.warning("%s %s: %d errors, %d timeouts (retried)", engine, format_size(size),
                        s["errors"], s["timeouts"])
        for key in keys:
            tier.delete(key)
        teardown()
        return times
    finally:
        tier.close()


def summarize(engine: str, size: int, runs: list[dict], per_call: int | None = None) -> list[dict]:
    """Rows per path: p50/p99 over all runs' calls; ratio = median over runs, with spread.
    ``per_call``: bytes one call reads (default ``size``: one block)."""
    per_call = per_call or size
    ratios = {name: [median(r["raw"]) / median(r[name]) for r in runs] for name in runs[0]}
    rows = []
    for name in runs[0]:
        ts = [t for r in runs for t in r[name]]
        rows.append({"engine": engine, "size": size, "path": name, "n": len(ts),
                     "p50_ms": median(ts) * 1e3, "p99_ms": p99(ts) * 1e3,
                     "gbps": per_call / median(ts) / 1e9, "ratio": statistics.median(ratios[name]),
                     "spread": (min(ratios[name]), max(ratios[name]))})
    return rows


def render(rows: list[dict]) -> str:
    headers = ["engine", "block", "path", "calls", "p50 ms", "p99 ms", "GB/s", "vs raw",
               "spread over runs"]
    return table(headers, [[
        r["engine"], format_size(r["size"]), r["path"], r["n"], f"{r['p50_ms']:.2f}",
        f"{r['p99_ms']:.2f}", f"{r['gbps']:.2f}", f"{r['ratio']:.0%}",
        f"{r['spread'][0]:.0%}-{r['spread'][1]:.0%}"] for r in rows])


KV_TOKEN_BYTES = 4 * 2 * 8 * 64 * 4  # --unit load: 4 layers x (K, V) x 8 heads x 64 x float32


def measure_load(engine: str, url: str, size: int, blocks: int, reps: int) -> dict:
    """One run of ``--unit load``: per path, the seconds of every timed prefix reload."""
    from kvtier import CacheConfig, HostTierConfig, TieredCache
    from kvtier.layout import KVLayout
    from kvtier.loader import Loader
    from tests.conftest import random_kv

    bt = max(1, size // KV_TOKEN_BYTES)
    backend = BACKENDS[engine]
    prefix = f"bench{os.getpid()}-{os.urandom(4).hex()}"

    def cache() -> TieredCache:
        c = TieredCache(CacheConfig(
            block_tokens=bt, promote_on_get=False,
            host=HostTierConfig(capacity_bytes=parse_size("8MiB"), page_bytes=parse_size("1MiB")),
            remote=RemoteTierConfig(backend=backend, url=url, timeout_s=10.0, key_prefix=prefix,
                                    max_inflight_bytes=2 * 1024**3)))
        c.register_namespace("m", layout=KVLayout(4, ((8, 64),) * 2, "float32"))
        return c

    toks = list(range(blocks * bt))
    with cache() as a:
        a.put("m", toks, random_kv(blocks * bt, layers=4, heads=8, dim=64))
        a.flush(120)
        remote = a.tier("remote")
        assert isinstance(remote, RemoteTier) and remote.flush(120), "remote writes did not finish"
    with cache() as b:
        tier = b.tier("remote")
        loader = Loader(b)
        lease = b.acquire("m", toks)
        keys = [blk.key for blk in lease.blocks]
        b.release(lease)
        assert len(keys) == blocks, f"only {len(keys)} of {blocks} blocks found remotely"
        stored = tier.size(keys[0])
        assert stored is not None, "the first block is gone"
        data = torch.empty(stored, dtype=torch.uint8)
        raw_setup, raw_teardown, raw_paths = (_raw_mooncake if engine == "mooncake" else _raw_redis)(
            tier, stored, False, True)
        for key in keys:
            tier.read_into(key, data)
            raw_setup(key, data.numpy().tobytes())

        layout = b.get_namespace("m").layout
        assert layout is not None  # registered with one
        dest = layout.empty(blocks * bt)  # once, as an engine's KV pool
        for layer in dest:
            for t in layer:
                t.zero_()  # touched: page faults are not what this measures

        def load(_: int) -> None:
            lease = b.acquire("m", toks)
            try:
                got = loader.load(lease, dest).wait_all(60)
                assert got == blocks * bt, f"loaded {got} of {blocks * bt} tokens"
            finally:
                b.release(lease)

        paths = {"kvtier": load, "raw": raw_paths["raw"]}
        try:
            times = _time_paths(paths, 1, reps)
        finally:
            raw_teardown()
            loader.close()
            for key in keys:
                tier.delete(key)
        return times


def _engine(engine: str):
    from tests.integration import remote_servers as rs

    if engine == "mooncake":
        from tests.integration.remote_mooncake import MooncakeMaster

        return MooncakeMaster(segment_bytes=1024**3, lease_ms=5000)  # Mooncake's default lease
    return {"redis": rs.RedisServer, "cluster": rs.RedisCluster}[engine]()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=["redis", "cluster", "mooncake", "all"], default="redis")
    ap.add_argument("--url", help="an existing engine; default: start one on loopback")
    ap.add_argument("--sizes", default="2MiB,16MiB")
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--reps", type=int, default=20, help="timed reloads of each block per run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--unit", choices=["block", "prefix", "load"], default="block",
                    help="what one timed call reads: one block, the prefix of --blocks, or that "
                         "prefix through the loader into KV tensors (see the top of this file)")
    ap.add_argument("--detail", action="store_true",
                    help="add raw+crc / raw+hop / kvtier-staged references")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    engines = ["redis", "mooncake"] if args.engine == "all" else [args.engine]
    rows = []
    for engine in engines:
        srv = None if args.url else _engine(engine).start()
        try:
            url = args.url if srv is None else srv.url
            for size in sizes:
                prefix = args.unit in ("prefix", "load")
                if args.unit == "load":
                    runs = [measure_load(engine, url, size, args.blocks, args.reps)
                            for _ in range(args.runs)]
                else:
                    runs = [measure(engine, url, size, args.blocks, args.reps, args.detail, prefix)
                            for _ in range(args.runs)]
                rows += summarize(engine, size, runs, size * args.blocks if prefix else size)
                log.info("%s %s per-run kvtier/raw: %s", engine, format_size(size), " ".join(
                    f"{median(r['raw']) / median(r['kvtier']):.0%}" for r in runs))
        finally:
            if srv is not None:
                srv.stop()
    print(render(rows))


if __name__ == "__main__":
    main()
