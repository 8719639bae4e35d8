"""kvtier's reload paths against fio and LMCache, interleaved in one run.

For each block size: lay out the data sets once (kvtier's SSD tier, fio's file, fio's file with
crc32c verify headers, LMCache's ``LocalDiskBackend`` directory), then ``--rounds`` rounds; in a
round each contender reads the whole ``--size`` once, after the page cache was dropped, in an
order that rotates from round to round. Contenders:

- ``fio``: ``fio --rw=randread --direct=1 --ioengine=libaio --iodepth=QD``, the bar;
- ``fio+crc``: the same, checking a crc32c of every block (kvtier verifies every read);
- ``fio@kvtier``: the same fio job over kvtier's own segment files of the data set the paths
  below read (``fio.run_files``): the same bytes on the same disk blocks, in the same cache
  state behind the virtual disk, so a host caching fio's file cannot make the bar swing;
- ``get``: ``TieredCache.get`` of the whole prefix (``kvtier.bench.io_paths``);
- ``loader``: ``Loader.load`` of it into preallocated KV, then ``wait_all``;
- ``sidecar``: ``KVTierClient(use_shm=True).get`` of it from a sidecar serving the same cache;
- ``lmcache``: LMCache's ``batched_get_blocking`` (``bench/lmcache_disk.py``, in its own venv).

Ratios are per round (kvtier and the reference of the same round), then the median over rounds;
``p99`` is the 99th percentile over rounds of the round's figure (with 5 rounds: the worst).
``--busy-cores N`` runs ``stress-ng --cpu N`` for the whole run (an inference server's host is
never idle). The SSD tier's direct/buffered read counters of the kvtier runs are reported.

    python -m kvtier.bench.io_compare --directory DIR --bs 2MiB,32MiB --size 2GiB --rounds 5 \\
        --busy-cores 1 --lmcache-python VENV/bin/python
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvtier.bench import fio
from kvtier.bench.common import drop_page_cache
from kvtier.bench.io import IOParams, run
from kvtier.bench.io_paths import data_root, kept_open
from kvtier.config import format_size, parse_size

CONTENDERS = ("fio", "fio+crc", "fio@kvtier", "get", "loader", "sidecar", "lmcache")
RATIOS = (("get", "fio"), ("get", "fio+crc"), ("get", "fio@kvtier"), ("loader", "fio"), ("loader", "fio+crc"),
          ("loader", "fio@kvtier"), ("sidecar", "fio"), ("sidecar", "get"), ("get", "lmcache"),
          ("loader", "lmcache"), ("lmcache", "fio"), ("fio@kvtier", "fio"))


@dataclass(slots=True)
class Series:
    """One block size's figures: GB/s per contender per round, and kvtier's read counters."""

    bs: int
    gbps: dict[str, list[float]] = field(default_factory=dict)
    counters: dict[str, dict[str, int]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def add(self, who: str, gbps: float) -> None:
        self.gbps.setdefault(who, []).append(gbps)

    def ratio(self, a: str, b: str) -> list[float]:
        xs, ys = self.gbps.get(a, []), self.gbps.get(b, [])
        return [x / y for x, y in zip(xs, ys, strict=False) if y > 0]


def p99(xs: list[float], worst_low: bool = True) -> float:
    """The 99th percentile toward the bad side (low GB/s, low ratio)."""
    return float(np.percentile(xs, 1 if worst_low else 99, method="lower" if worst_low else "higher"))


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dir = Path(args.directory)
        self.size = parse_size(args.size)
        self.lmcache = args.lmcache_python

    def params(self, bs: int, path: str = "raw") -> IOParams:
        return IOParams(rw="randread", bs=bs, iodepth=self.args.iodepth, size=self.size, runtime=0,
                        directory=str(self.dir), path=path).check()

    def lm_dir(self, bs: int) -> Path:
        return self.dir / "kvtier-bench-io" / f"lmcache-{bs}"

    def lm(self, bs: int, what: str) -> dict:
        script = Path(__file__).with_name("lmcache_disk.py")
        out = subprocess.run([self.lmcache, str(script), str(self.lm_dir(bs)), str(bs), str(self.size), what],
                             capture_output=True, text=True, timeout=1800, check=False)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        if out.returncode or not lines:
            raise RuntimeError(f"lmcache {what} failed ({out.returncode}): {out.stderr[-2000:]}")
        return json.loads(lines[-1])

    def layout(self, bs: int) -> None:
        log(f"laying out {format_size(self.size)} data sets for bs={format_size(bs)}")
        p = self.params(bs)
        fio.layout(fio.data_file(p), self.size)
        if not self.args.no_fio_verify:
            fio.layout(fio.data_file(p, verify=True), self.size, verify=True)
        run(self.params(bs, "get"))  # lays out the kvtier data set (kept), one get
        d = self.lm_dir(bs)
        if self.lmcache and (not d.exists() or len(list(d.glob("*.pt"))) < self.size // bs):
            shutil.rmtree(d, ignore_errors=True)  # a smaller data set's, or a broken one
            self.lm(bs, "put")

    def one(self, s: Series, who: str) -> None:
        if not drop_page_cache():
            s.notes["cache"] = "page cache NOT dropped (not root)"
        if who in ("fio", "fio+crc"):
            job, cmd = fio.run(self.params(s.bs), verify=who == "fio+crc")
            s.notes[who] = " ".join(cmd[1:])
            s.add(who, job["read"]["bw_bytes"] / 1e9)
        elif who == "fio@kvtier":
            segments = sorted((data_root(self.params(s.bs, "get")) / "segments").glob("*.seg"))
            job, cmd = fio.run_files(self.params(s.bs), segments)
            s.notes[who] = " ".join(cmd[1:])
            s.add(who, job["read"]["bw_bytes"] / 1e9)
        elif who == "lmcache":
            r = self.lm(s.bs, "get")
            s.add(who, r["bytes"] / r["seconds"] / 1e9)
        else:
            res = run(self.params(s.bs, who))
            s.add(who, res.read.io_bytes / res.runtime_s / 1e9)
            c = s.counters.setdefault(who, {"direct_reads": 0, "buffered_reads": 0})
            for k in c:
                c[k] += int(res.tier_stats.get(k, 0))

    def series(self, bs: int) -> Series:
        self.layout(bs)
        who = [c for c in CONTENDERS if (c != "lmcache" or self.lmcache)
               and (c != "fio+crc" or not self.args.no_fio_verify)]
        s = Series(bs)
        for r in range(self.args.rounds):
            order = who[r % len(who):] + who[:r % len(who)]
            for w in order:
                self.one(s, w)
            log(f"bs={format_size(bs)} round {r + 1}/{self.args.rounds}: "
                + ", ".join(f"{w} {s.gbps[w][-1]:.3f}" for w in who))
        return s


def report(series: list[Series], args: argparse.Namespace) -> str:
    lines = ["| block | contender | GB/s median | GB/s p99 (low) |", "|---|---|---|---|"]
    for s in series:
        for w, xs in s.gbps.items():
            lines.append(f"| {format_size(s.bs)} | {w} | {np.median(xs):.3f} | {p99(xs):.3f} |")
    lines += ["", "| block | ratio | median | p99 (low) |", "|---|---|---|---|"]
    for s in series:
        for a, b in RATIOS:
            xs = s.ratio(a, b)
            if xs:
                lines.append(f"| {format_size(s.bs)} | {a}/{b} | {np.median(xs):.2f} | {p99(xs):.2f} |")
    lines.append("")
    for s in series:
        for w, c in s.counters.items():
            lines.append(f"{format_size(s.bs)} {w}: {c['direct_reads']} direct reads, "
                         f"{c['buffered_reads']} through the page cache")
        for k, v in s.notes.items():
            lines.append(f"{format_size(s.bs)} {k}: {v}")
    return "\n".join(lines)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvtier.bench.io_compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--directory", required=True, help="where the data sets live (kept between runs)")
    ap.add_argument("--bs", default="2MiB,32MiB", help="block sizes, comma-separated (multiples of 128 KiB)")
    ap.add_argument("--size", default="2GiB", help="bytes each contender reads per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iodepth", type=int, default=8, help="fio's queue depth; kvtier's reads in flight")
    ap.add_argument("--busy-cores", type=int, default=0, help="cores kept busy by stress-ng meanwhile")
    ap.add_argument("--lmcache-python", help="python of a venv with lmcache installed (else not measured)")
    ap.add_argument("--no-fio-verify", action="store_true", help="skip fio checking crc32c")
    ap.add_argument("--json", metavar="FILE", help="also write every round's figures here")
    args = ap.parse_args(argv)
    stress = None
    if args.busy_cores:
        if shutil.which("stress-ng") is None:
            raise SystemExit("--busy-cores needs stress-ng on PATH")
        stress = subprocess.Popen(["stress-ng", "--cpu", str(args.busy_cores), "--timeout", "7200"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        runner = Runner(args)
        t0 = time.time()
        series = []
        for b in args.bs.split(","):
            with kept_open():  # each path's cache stays open across the rounds, as a user's does
                series.append(runner.series(parse_size(b)))
    finally:
        if stress is not None:
            stress.terminate()
            stress.wait(30)
    print(report(series, args))
    print(f"\n{args.rounds} rounds, {format_size(parse_size(args.size))} per contender per round, "
          f"QD {args.iodepth}, busy cores {args.busy_cores}, {time.time() - t0:.0f} s; fio {fio.version()}")
    if args.json:
        Path(args.json).write_text(json.dumps([{"bs": s.bs, "gbps": s.gbps, "counters": s.counters,
                                                "notes": s.notes} for s in series], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
