"""The README's table of kvtier next to fio: random reads across block sizes and queue depths,
sequential writes, and the latency CDF of each tier; medians of repeated rounds.

    python -m kvtier.bench.matrix --directory DIR --out OUT --size 4GiB --runtime 3 --repeat 7

Each cell runs ``kvtier bench io``'s engine (``kvtier.bench.io``) and fio (``kvtier.bench.fio``)
with the same job, back to back.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from kvtier.bench.fio import compare_figures, median_job, run, version
from kvtier.bench.io import IOParams
from kvtier.bench.io import run as run_kvtier
from kvtier.config import format_size, parse_size


def matrix(directory: str, out: str, size: int, runtime: float, repeat: int, remote_url: str | None = None,
           block_sizes: tuple[int, ...] = (256 * 1024, 2 * 1024**2, 16 * 1024**2),
           depths: tuple[int, ...] = (1, 4, 16), verify_reference: bool = True) -> str:
    """Random reads per block size and depth: kvtier, fio and (``verify_reference``) fio checking
    a crc32c of every read, run back to back in rounds, medians of ``repeat`` rounds.

    The order rotates each round (``_order``). "paired" ratios are medians of the per-round
    ratios: on a disk whose speed drifts, runs of one round saw the same disk.

    Writes ``matrix.json`` and the PNGs under ``out``; returns the Markdown tables.
    """
    from kvtier.bench.common import table
    from kvtier.bench.plots import latency_cdf

    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    rows: list[list[object]] = []
    doc: dict[str, Any] = {"fio": version(), "reads": [], "writes": []}
    cdf: dict[str, list[float]] = {}
    members = ("kvtier", "fio", "fio+crc") if verify_reference else ("kvtier", "fio")
    for bs in block_sizes:
        for qd in depths:
            p = IOParams(bs=bs, iodepth=qd, size=size, runtime=runtime, directory=directory)
            jobs: dict[str, list[dict]] = {m: [] for m in members}
            for i in range(repeat):
                say(f"matrix: randread bs={format_size(bs)} qd={qd} run {i + 1}/{repeat}")
                for who in _order(i, members):
                    if who != "kvtier":
                        jobs[who].append(run(p, verify=who == "fio+crc")[0])
                        continue
                    res = run_kvtier(p)
                    jobs["kvtier"].append(res.to_fio_job())
                    if bs == 2 * 1024**2 and qd == 1 and i == 0:
                        cdf["ssd (kvtier, 2 MiB QD1)"] = (res.read.clat_ns / 1e9).tolist()
            kv, fj = jobs["kvtier"], jobs["fio"]
            a, b = compare_figures(median_job(kv), "read"), compare_figures(median_job(fj), "read")
            doc["reads"].append({"bs": bs, "iodepth": qd, **jobs})
            row = [format_size(bs), qd, f"{a['GB/s']:.2f}", f"{b['GB/s']:.2f}",
                   f"{a['GB/s'] / b['GB/s']:.2f}", f"{_paired(kv, fj):.2f}"]
            if verify_reference:
                c = compare_figures(median_job(jobs["fio+crc"]), "read")
                row += [f"{c['GB/s']:.2f}", f"{_paired(kv, jobs['fio+crc']):.2f}"]
            rows.append(row + [f"{a['IOPS']:.0f}", f"{b['IOPS']:.0f}",
                               *(f"{a[x]:.2f} / {b[x]:.2f}" for x in ("p50 ms", "p99 ms", "p99.9 ms")),
                               f"{a['p99 ms'] / b['p99 ms']:.2f}"])
    head = ["block", "QD", "kvtier GB/s", "fio GB/s", "ratio", "paired ratio"]
    if verify_reference:
        head += ["fio+crc GB/s", "paired vs fio+crc"]
    reads = table(head + ["kvtier IOPS", "fio IOPS", "p50 ms kv / fio", "p99 ms kv / fio",
                          "p99.9 ms kv / fio", "p99 ratio"], rows)
    say(f"matrix: reads done\n{reads}")  # kept even if a later phase fails (e.g. a full disk)
    host = run_kvtier(IOParams(tier="host", bs=2 * 1024**2, size=min(size, 1024**3), runtime=runtime))
    cdf["host (kvtier, 2 MiB QD1)"] = (host.read.clat_ns / 1e9).tolist()
    if remote_url:
        rem = run_kvtier(IOParams(tier="remote", remote_url=remote_url, bs=2 * 1024**2,
                                  size=min(size, 512 * 1024**2), runtime=runtime))
        cdf["remote redis (kvtier, 2 MiB QD1)"] = (rem.read.clat_ns / 1e9).tolist()
    wrows = []
    for qd in (1, 4):
        p = IOParams(rw="write", bs=2 * 1024**2, iodepth=qd, size=min(size, 1024**3), runtime=0,
                     directory=directory)
        kv, fj = [], []
        for i in range(repeat):
            say(f"matrix: sequential write qd={qd} run {i + 1}/{repeat}")
            for who in _order(i):
                if who == "fio":
                    fj.append(run(p)[0])
                else:
                    kv.append(run_kvtier(p).to_fio_job())
        k, f = median_job(kv), median_job(fj)
        doc["writes"].append({"bs": p.bs, "iodepth": qd, "kvtier": kv, "fio": fj})
        a, b = k["write"]["bw_bytes"] / 1e9, f["write"]["bw_bytes"] / 1e9
        wrows.append([format_size(p.bs), qd, f"{a:.2f}", f"{b:.2f}", f"{a / b:.2f}"])
    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    doc["cdf_samples"] = {k: len(v) for k, v in cdf.items()}
    bandwidth_plots(doc, dest)
    latency_cdf(dest / "bench_io_latency_cdf.png", cdf, title="2 MiB random read latency per tier (QD1)")
    writes = table(["block", "QD", "kvtier put GB/s", "fio write GB/s", "ratio"], wrows)
    doc["tables"] = {"reads": reads, "writes": writes}
    (dest / "matrix.json").write_text(json.dumps(doc))
    return f"{reads}\n\n{writes}\n"


def _paired(a: list[dict], b: list[dict]) -> float:
    """Median over rounds of a's read GB/s over b's in the same round."""
    return float(np.median([x["read"]["bw_bytes"] / y["read"]["bw_bytes"]
                            for x, y in zip(a, b, strict=True)]))


def _order(i: int, members: tuple[str, ...] = ("kvtier", "fio")) -> tuple[str, ...]:
    """Who runs when in round ``i``: rotated each round, so no one always inherits the same
    neighbour's disk state (a shared virtual disk's cache and bursts favour some positions)."""
    k = i % len(members)
    return members[k:] + members[:k]


def bandwidth_plots(doc: dict, dest: Path) -> list[Path]:
    """One PNG per queue depth: median random-read GB/s against block size, kvtier next to fio."""
    from kvtier.bench.plots import bandwidth_vs_block_size

    by_qd: dict[int, dict[str, list[tuple[int, float]]]] = {}
    for r in doc["reads"]:
        s = by_qd.setdefault(r["iodepth"], {})
        s.setdefault("kvtier ssd tier", []).append((r["bs"], median_job(r["kvtier"])["read"]["bw_bytes"]))
        s.setdefault("fio (libaio)", []).append((r["bs"], median_job(r["fio"])["read"]["bw_bytes"]))
        if r.get("fio+crc"):
            s.setdefault("fio verifying crc32c", []).append(
                (r["bs"], median_job(r["fio+crc"])["read"]["bw_bytes"]))
    return [bandwidth_vs_block_size(dest / f"bench_io_bandwidth_qd{qd}.png", s,
                                    title=f"random read, O_DIRECT, QD{qd}: kvtier vs fio "
                                          f"(median of {len(doc['reads'][0]['kvtier'])})")
            for qd, s in sorted(by_qd.items())]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvtier.bench.matrix",
                                 description="kvtier next to fio across block sizes and queue depths")
    ap.add_argument("--directory", default=tempfile.gettempdir())
    ap.add_argument("--out", default="bench/out/io")
    ap.add_argument("--size", default="2GiB")
    ap.add_argument("--runtime", type=float, default=4.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--remote-url", help="also plot the remote tier's latency (e.g. redis://...)")
    ap.add_argument("--no-fio-verify", action="store_true",
                    help="skip the reference run of fio checking a crc32c of every read")
    a = ap.parse_args(argv)
    print(matrix(a.directory, a.out, parse_size(a.size), a.runtime, a.repeat, a.remote_url,
                 verify_reference=not a.no_fio_verify))
    return 0


if __name__ == "__main__":
    sys.exit(main())
