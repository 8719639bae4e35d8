"""What verifying every read costs at queue depth 1: the ceiling for any read-then-verify reader.

kvtier checks a crc32c of every block it serves; plain fio checks nothing. At queue depth 1 the
verification cannot overlap another read, so a reader that verifies is bounded by
``read / (read + verify)``, whatever its code. This measures that bound on kvtier's own data set
(laid out by ``kvtier.bench.io``, same segments, same offsets) in rounds of one-second runs, rotating
which path goes first, one thread, O_DIRECT:

- ``preadv``: a bare ``os.preadv`` into one 4 KiB-aligned buffer (what fio's psync engine does);
- ``preadv+crc32c``: the same, then crc32c of the bytes (the least a verifying reader does);
- ``preadv+crc32c ring``: the same into a ring of buffers (``--ring``, as kvtier's loader reads
  into a staging ring), so the next read never lands in bytes the checksum just pulled into cache;
- ``kvtier`` / ``kvtier ring``: ``SSDTier.read_into`` of the same blocks, into one buffer or the
  ring (``kvtier.bench.io --buffers 1`` / its default).

    python -m kvtier.bench.verify_ceiling --directory DIR --bs 2MiB --size 4GiB --rounds 7
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import numpy as np

from kvtier.bench.common import table
from kvtier.bench.io import IOParams, _Payloads, block_key, open_tier, populate
from kvtier.block import checksum
from kvtier.config import format_size, parse_size
from kvtier.tiers.ssd import SSDTier
from kvtier.tiers.ssd.directio import aligned_empty

PATHS = ("preadv", "preadv+crc32c", "preadv+crc32c ring", "kvtier", "kvtier ring")


def _locations(tier, p: IOParams) -> list[tuple[int, int, bytes]]:
    """(O_DIRECT fd, file offset, key) of every block of the data set."""
    out = []
    for i in range(p.blocks):
        key = block_key(p.bs, i)
        loc = tier._loc[key]
        out.append((tier._segments.by_id[loc.segment].dfd, loc.offset, key))
    return out


def _run(path: str, tier, locs, bufs, seconds: float, rng: random.Random) -> list[int]:
    """Per-read latencies (ns) of ``path`` for ``seconds``."""
    lat: list[int] = []
    end = time.perf_counter() + seconds
    n = 0
    one = bufs[0]
    while time.perf_counter() < end:
        dfd, off, key = locs[rng.randrange(len(locs))]
        t = time.perf_counter_ns()
        if path.startswith("kvtier"):
            tier.read_into(key, bufs[n % len(bufs)][0] if path.endswith("ring") else one[0])
        else:
            arr = bufs[n % len(bufs)][1] if path.endswith("ring") else one[1]
            os.preadv(dfd, [arr], off)
            if path != "preadv":
                checksum(arr)
        lat.append(time.perf_counter_ns() - t)
        n += 1
    return lat


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvtier.bench.verify_ceiling", description=__doc__.splitlines()[0])
    ap.add_argument("--directory", required=True, help="where bench.io keeps (or lays out) its data set")
    ap.add_argument("--bs", default="2MiB")
    ap.add_argument("--size", default="4GiB")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=1.0, help="per path per round")
    ap.add_argument("--ring", type=int, default=8, help="buffers in the ring path")
    a = ap.parse_args(argv)
    p = IOParams(bs=parse_size(a.bs), size=parse_size(a.size), iodepth=1, directory=a.directory).check()
    tier, close = open_tier(p, fresh=False)
    assert isinstance(tier, SSDTier)  # IOParams' default tier
    try:
        populate(tier, p, _Payloads(p), lambda m: print(m, file=sys.stderr, flush=True))
        if not tier.direct_io:
            print("note: this file system refused O_DIRECT; reads are buffered", file=sys.stderr)
        locs = _locations(tier, p)
        bufs = []
        for _ in range(max(1, a.ring)):
            t = aligned_empty(p.bs)
            bufs.append((t, t.numpy()))
        rng = random.Random(0)
        rounds: dict[str, list[tuple[float, float, float]]] = {k: [] for k in PATHS}
        for r in range(a.rounds):
            print(f"verify_ceiling: round {r + 1}/{a.rounds}", file=sys.stderr, flush=True)
            k = r % len(PATHS)
            for path in PATHS[k:] + PATHS[:k]:
                lat = np.sort(np.asarray(_run(path, tier, locs, bufs, a.seconds, rng), np.int64))
                gbps = p.bs * lat.size / (lat.sum() / 1e9) / 1e9
                rounds[path].append((gbps, lat[lat.size // 2] / 1e6, lat[int(lat.size * 0.99)] / 1e6))
        rows = []
        for path in PATHS:
            bw = [x[0] for x in rounds[path]]
            ratio = [x[0] / y[0] for x, y in zip(rounds[path], rounds["preadv"], strict=True)]
            rows.append([path, f"{statistics.median(bw):.2f}", f"{min(bw):.2f}-{max(bw):.2f}",
                         f"{statistics.median(x[1] for x in rounds[path]):.3f}",
                         f"{statistics.median(x[2] for x in rounds[path]):.3f}",
                         f"{statistics.median(ratio):.2f}"])
        print(f"random reads of {format_size(p.bs)} at QD1, {a.rounds} rounds of {a.seconds:g} s per path")
        print(table(["path", "GB/s (median)", "range", "p50 ms", "p99 ms", "vs preadv (paired)"], rows))
    finally:
        close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
