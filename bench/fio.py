"""Run ``fio`` with the parameters of a ``kvtier bench io`` job and read its JSON.

fio reads a file it wrote first (``--rw=write``, real bytes: a ``fallocate``d file reads as zeros
without touching the disk) of the same size as kvtier's data set, in the same directory, with
the same block size, queue depth, job count and runtime; ``--direct=1 --ioengine=libaio`` when
the kvtier job reads with O_DIRECT. Writes go to a scratch file with ``--end_fsync=1`` (kvtier's
write clock also stops after its final flush).

With ``verify=True`` fio also checks a crc32c of every block it reads (``--verify=crc32c-intel
--verify_only=1`` on a file it wrote with verify headers every ``VERIFY_INTERVAL`` bytes): the
like-for-like reference for kvtier, which verifies every read, next to plain fio, which checks
nothing and is the bar.

Also here: fio-shaped reports (fio's text summary, per-figure medians of repeated runs, kvtier and
fio side by side with ratios). The README's table of both across block sizes and queue depths is
``kvtier.bench.matrix``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from kvtier.bench.io import DATASET_DIR, PERCENTILES, IOParams
from kvtier.config import format_size
from kvtier.errors import InvalidRequest, KVTierError

PERCENTILE_LIST = ":".join(f"{p:g}" for p in PERCENTILES)
VERIFY = "crc32c-intel"  # fio's SSE4.2 crc32c (it falls back to software crc32c by itself)
VERIFY_INTERVAL = 256 * 1024  # one checksummed chunk per 256 KiB: reads must be multiples of it


def fio_binary() -> str:
    path = shutil.which("fio")
    if path is None:
        raise KVTierError("fio not found on PATH: install it (Debian: apt-get install fio)")
    return path


def version() -> str:
    return subprocess.run([fio_binary(), "--version"], capture_output=True, text=True,
                          check=False).stdout.strip()


def data_file(p: IOParams, filename: str | None = None, verify: bool = False) -> Path:
    if filename:
        path = Path(filename)
        return path.with_name(path.stem + "-verify" + path.suffix) if verify else path
    name = "fio-verify.bin" if verify else "fio-data.bin"
    return Path(p.directory or tempfile.gettempdir()) / DATASET_DIR / name


def _verify_args(read: bool) -> list[str]:
    args = [f"--verify={VERIFY}", f"--verify_interval={VERIFY_INTERVAL}",
            "--verify_state_save=0"]  # else fio leaves a *-verify.state file in the cwd
    return args + (["--verify_only=1", "--verify_fatal=1"] if read else ["--do_verify=0"])


def _common(p: IOParams) -> list[str]:
    return [f"--direct={int(p.direct)}", "--ioengine=libaio" if p.direct else "--ioengine=psync",
            "--output-format=json", f"--percentile_list={PERCENTILE_LIST}", "--group_reporting",
            "--randrepeat=0"]


def layout(path: Path, size: int, direct: bool = True, verify: bool = False) -> bool:
    """Write ``path`` with ``size`` real bytes unless it already holds them; True if written.

    ``verify``: with fio's verify headers, for reads that check them (``command(verify=True)``).
    """
    if path.exists() and path.stat().st_size >= size:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    _run([fio_binary(), "--name=layout", f"--filename={path}", f"--size={size}", "--rw=write",
          "--bs=1M", "--iodepth=16", f"--direct={int(direct)}", "--ioengine=libaio",
          "--end_fsync=1", "--output-format=json", *(_verify_args(False) if verify else [])])
    return True


def command(p: IOParams, path: Path, verify: bool = False) -> list[str]:
    """The fio command line equivalent to the kvtier job ``p`` on file ``path``; ``verify``:
    fio checks the crc32c of every block it reads, as kvtier does."""
    if p.tier != "ssd":
        raise InvalidRequest(f"--compare-fio compares the ssd tier with the disk; got --tier {p.tier}")
    if verify and (p.rw not in ("read", "randread") or p.bs % VERIFY_INTERVAL):
        raise InvalidRequest(f"--fio-verify needs reads (--rw read or randread) of a block size that "
                             f"is a multiple of {format_size(VERIFY_INTERVAL)}; got --rw {p.rw} "
                             f"--bs {format_size(p.bs)}")
    cmd = [fio_binary(), "--name=fio", f"--filename={path}", f"--size={p.size}", f"--rw={p.rw}",
           f"--bs={p.bs}", f"--iodepth={p.iodepth}", f"--numjobs={p.numjobs}", *_common(p)]
    if p.runtime > 0:
        cmd += [f"--runtime={p.runtime:g}", "--time_based"]
    if p.rw == "randrw":
        cmd.append(f"--rwmixread={p.rwmixread}")
    if p.rw in ("write", "randwrite", "randrw"):
        cmd.append("--end_fsync=1")
    if verify:
        cmd += _verify_args(True)
    return cmd


def run(p: IOParams, filename: str | None = None, verify: bool = False) -> tuple[dict, list[str]]:
    """Run fio for job ``p``; returns (fio's job dict, the command line run)."""
    writes = p.rw in ("write", "randwrite")
    path = data_file(p, filename, verify)
    if writes:
        path = path.with_name("fio-write.bin")
        path.unlink(missing_ok=True)
    else:
        layout(path, p.size, p.direct, verify)
    cmd = command(p, path, verify)
    try:
        doc = _run(cmd)
    finally:
        if writes:
            path.unlink(missing_ok=True)
    return doc["jobs"][0], cmd


def run_files(p: IOParams, files: list[Path]) -> tuple[dict, list[str]]:
    """fio's read job ``p`` over ``files`` as they are, ``p.size`` bytes in all, each I/O in a
    file picked at random; returns (fio's job dict, the command line run). Why: given kvtier's
    own segment files, fio reads the very bytes, on the same disk blocks and in whatever cache
    state behind the virtual disk, that a kvtier reload of them reads: the like-for-like bar
    where a host caching its own file makes plain fio swing 4x between rounds. Reads only
    (fio opens the files read-only)."""
    if p.rw not in ("read", "randread") or not files:
        raise InvalidRequest("fio over existing files reads them: --rw read or randread, and files")
    names = ":".join(str(f).replace(":", "\\:") for f in files)
    cmd = [fio_binary(), "--name=fio", f"--filename={names}", f"--io_size={p.size}", f"--rw={p.rw}",
           f"--bs={p.bs}", f"--iodepth={p.iodepth}", f"--numjobs={p.numjobs}",
           "--file_service_type=random", *_common(p)]
    return _run(cmd)["jobs"][0], cmd


def _run(cmd: list[str]) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        proc = subprocess.run([*cmd, f"--output={out.name}"], capture_output=True, text=True,
                              check=False)
        text = Path(out.name).read_text()
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["no output"]
        why = next((ln.strip() for ln in lines if "verify failed" in ln), lines[-1])
        raise KVTierError(f"fio failed (exit {proc.returncode}): {why}")
    start = text.find("{")
    try:
        return json.loads(text[start:])
    except ValueError as e:
        raise KVTierError(f"fio wrote no readable JSON ({e})") from None


# ---- fio-shaped reports: text, medians, side by side ----------------------------------------------------------------------------------
def _bw(b: float) -> str:
    return f"{b / 1024**2:.0f}MiB/s ({b / 1e6:.0f}MB/s)" if b < 10 * 1024**3 else \
        f"{b / 1024**3:.2f}GiB/s ({b / 1e9:.2f}GB/s)"


def format_job(job: dict, title: str) -> str:
    """fio's text summary for one job dict in fio's JSON shape (kvtier's or fio's own)."""
    lines = [title]
    for d in ("read", "write"):
        s = job.get(d) or {}
        if not s.get("total_ios") and not s.get("io_bytes"):
            continue
        rt = max(1, s.get("runtime", 0))
        lines.append(f"  {d}: IOPS={s['iops']:.0f}, BW={_bw(s['bw_bytes'])}"
                     f"({format_size(s['io_bytes'])}/{rt}msec)")
        c = s["clat_ns"]
        lines.append(f"    clat (usec): min={c['min'] / 1e3:.0f}, max={c['max'] / 1e3:.0f}, "
                     f"avg={c['mean'] / 1e3:.1f}, stdev={c['stddev'] / 1e3:.1f}")
        pc = c.get("percentile", {})
        keys = ["50.000000", "90.000000", "99.000000", "99.900000", "99.990000"]
        lines.append("     clat percentiles (usec): " + ", ".join(
            f"{float(k):.2f}th=[{pc[k] / 1e3:.0f}]" for k in keys if k in pc))
    return "\n".join(lines)


def median_job(jobs: list[dict]) -> dict:
    """Per-figure medians of several runs' job dicts (fio's shape, kvtier's or fio's)."""
    if len(jobs) == 1:
        return jobs[0]
    out = {k: v for k, v in jobs[0].items() if k not in ("read", "write")}
    for d in ("read", "write"):
        runs = [j[d] for j in jobs if d in j]
        if not runs:
            continue
        m: dict[str, Any] = {k: float(np.median([r[k] for r in runs]))
             for k in ("io_bytes", "bw_bytes", "iops", "runtime", "total_ios")}
        for k in ("io_bytes", "bw_bytes", "runtime", "total_ios"):
            m[k] = int(m[k])
        clat: dict[str, Any] = {k: float(np.median([r["clat_ns"][k] for r in runs]))
                for k in ("min", "max", "mean", "stddev", "N")}
        keys = runs[0]["clat_ns"].get("percentile", {})
        clat["percentile"] = {k: int(np.median([r["clat_ns"].get("percentile", {}).get(k, 0)
                                                for r in runs])) for k in keys}
        out[d] = {**m, "clat_ns": clat}
    out["runs"] = len(jobs)
    return out


def main_direction(job: dict) -> str:
    r = job.get("read", {})
    return "read" if r.get("total_ios") or r.get("io_bytes") else "write"


COMPARE_PCT = (("p50", "50.000000"), ("p90", "90.000000"), ("p99", "99.000000"),
               ("p99.9", "99.900000"), ("p99.99", "99.990000"))


def compare_figures(job: dict, d: str) -> dict[str, float]:
    """GB/s, IOPS and latency percentiles (ms) of one direction of a job dict."""
    s = job[d]
    pc = s["clat_ns"].get("percentile", {})
    return {"GB/s": s["bw_bytes"] / 1e9, "IOPS": s["iops"],
            **{f"{n} ms": pc.get(k, 0) / 1e6 for n, k in COMPARE_PCT}}


def compare_table(kv: dict, fio_job: dict) -> tuple[str, dict[str, float]]:
    """Both results side by side and kvtier/fio ratios (>1 is better for GB/s, worse for ms)."""
    from kvtier.bench.common import table

    d = main_direction(kv)
    a, b = compare_figures(kv, d), compare_figures(fio_job, d)
    ratio = {k: (a[k] / b[k] if b[k] else float("nan")) for k in a}
    rows = [[k, f"{a[k]:.3f}" if k != "IOPS" else f"{a[k]:.0f}",
             f"{b[k]:.3f}" if k != "IOPS" else f"{b[k]:.0f}", f"{ratio[k]:.2f}"] for k in a]
    return f"{d}: kvtier vs fio\n" + table(["", "kvtier", "fio", "kvtier/fio"], rows), ratio
