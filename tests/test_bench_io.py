"""``kvtier bench io``: end to end next to fio, fio's JSON fields, and one-line errors."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kvtier.bench import io as bio
from kvtier.bench.fio import command, median_job
from kvtier.errors import InvalidRequest

ROOT = Path(__file__).resolve().parents[1]
needs_fio = pytest.mark.skipif(shutil.which("fio") is None,
                               reason="fio is not installed (Debian package 'fio')")


def kvtier(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "kvtier", "bench", "io", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


SMALL = ["--bs", "256KiB", "--size", "32MiB", "--runtime", "1", "--iodepth", "2"]


@needs_fio
def test_compare_fio_prints_both_and_the_ratio(tmp_path: Path) -> None:
    r = kvtier(*SMALL, "--directory", str(tmp_path), "--compare-fio")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith("kvtier: (tier=ssd) rw=randread")
    assert "\nfio: --name=fio" in out and "--direct=1" in out and "--ioengine=libaio" in out
    assert "--bs=262144" in out and "--iodepth=2" in out and "--size=33554432" in out
    assert out.count("read: IOPS=") == 2 and out.count("clat percentiles (usec)") == 2
    table = out[out.index("read: kvtier vs fio"):]
    for row in ("GB/s", "IOPS", "p50 ms", "p99 ms", "p99.9 ms"):
        assert f"| {row}" in table
    ratio_row = next(line for line in table.splitlines() if line.startswith("| GB/s"))
    kv, fio_bw, ratio = (float(c) for c in ratio_row.strip("| \n").split("|")[1:])
    assert kv > 0 and fio_bw > 0 and ratio == pytest.approx(kv / fio_bw, abs=0.01)
    assert "randread ssd" in r.stderr  # the progress line
    assert (tmp_path / bio.DATASET_DIR / "fio-data.bin").stat().st_size >= 32 * 1024**2


@needs_fio
def test_json_output_has_fio_field_names(tmp_path: Path) -> None:
    r = kvtier(*SMALL, "--directory", str(tmp_path), "--compare-fio", "--output-format", "json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    for job in (doc["jobs"][0], doc["fio"]["jobs"][0]):  # kvtier's and fio's, same shape
        read = job["read"]
        assert read["bw_bytes"] > 0 and read["iops"] > 0 and read["total_ios"] > 0
        pct = read["clat_ns"]["percentile"]
        assert {"50.000000", "90.000000", "99.000000", "99.900000", "99.990000"} <= set(pct)
        assert 0 < pct["50.000000"] <= pct["99.000000"] <= pct["99.990000"]
    kv_bw = doc["jobs"][0]["read"]["bw_bytes"]
    assert doc["ratio"]["GB/s"] == pytest.approx(kv_bw / doc["fio"]["jobs"][0]["read"]["bw_bytes"], rel=1e-3)
    # Every kvtier read went through the SSD tier, with O_DIRECT, all verified and none corrupt.
    ts = doc["kvtier"]["tier_stats"]
    assert ts["direct_io"] and ts["blocks_read"] == doc["jobs"][0]["read"]["total_ios"]
    assert ts["buffered_reads"] == 0 and ts["corrupt_blocks"] == 0


def test_engine_runs_writes_and_host_tier(tmp_path: Path) -> None:
    """In-process: sequential puts, batched reads, and the host tier, size-based."""
    w = bio.run(bio.IOParams(rw="write", bs=256 * 1024, size=8 * 1024**2, runtime=0,
                             directory=str(tmp_path)))
    assert w.write.io_bytes == 8 * 1024**2 and w.write.ios == 32 and w.read.ios == 0
    assert w.tier_stats["blocks_written"] == 32
    b = bio.run(bio.IOParams(bs=256 * 1024, size=8 * 1024**2, runtime=0, iodepth=4,
                             engine="batch", directory=str(tmp_path)))
    assert b.read.ios >= 32 and b.tier_stats["blocks_read"] == b.read.ios
    h = bio.run(bio.IOParams(rw="read", tier="host", bs=256 * 1024, size=8 * 1024**2, runtime=0))
    assert h.read.io_bytes == 8 * 1024**2
    job = h.to_fio_job()
    assert job["read"]["bw_bytes"] > 0 and "50.000000" in job["read"]["clat_ns"]["percentile"]


@pytest.mark.parametrize("codec, size", [("int8", 16 * 1024**2), ("int8+zstd", 64 * 1024**2),
                                         ("fp8", 16 * 1024**2)])
def test_host_tier_holds_the_data_set_of_any_codec(codec: str, size: int) -> None:
    """The host tier is sized for the blocks as stored, whatever the codec makes of them."""
    p = bio.IOParams(rw="read", tier="host", codec=codec, bs=2 * 1024**2, size=size, runtime=0)
    h = bio.run(p)
    assert h.read.io_bytes == size and h.read.ios == size // p.bs
    assert bio._Payloads(p).stored_bytes < p.bs  # KV-shaped: the codec shrinks it (a flat vector grew 2.5x)


def test_host_tier_fits_every_block_of_an_odd_encoded_size() -> None:
    from kvtier.tiers.allocator import ExtentAllocator

    p = bio.IOParams(tier="host", bs=2 * 1024**2, size=64 * 1024**2)
    block = 2_537_455  # an int8+zstd block: off the allocator's 4 KiB grid
    cfg = bio.host_tier_config(p, block)
    a = ExtentAllocator(cfg.capacity_bytes)
    assert all(a.alloc(block) is not None for _ in range(p.blocks))


def test_median_job_takes_per_figure_medians() -> None:
    jobs = [bio.IOResult(bio.IOParams(), 1.0, bio.DirStats(n, 10, _lat(n)), bio.DirStats()).to_fio_job()
            for n in (100, 300, 200)]
    m = median_job(jobs)
    assert m["read"]["bw_bytes"] == 200 and m["runs"] == 3


def _lat(n: int):
    import numpy as np
    return np.full(10, n, dtype=np.int64)


def test_fio_command_matches_the_job() -> None:
    p = bio.IOParams(bs=2 * 1024**2, iodepth=16, size=1024**3, runtime=4)
    cmd = command(p, Path("f.bin"))
    assert {"--bs=2097152", "--iodepth=16", "--size=1073741824", "--direct=1",
            "--ioengine=libaio", "--runtime=4", "--time_based", "--rw=randread"} <= set(cmd)
    with pytest.raises(InvalidRequest, match="ssd tier"):
        command(bio.IOParams(tier="host"), Path("f.bin"))


@needs_fio
def test_fio_verify_checks_a_crc_of_every_read_and_catches_a_flipped_byte(tmp_path: Path) -> None:
    r = kvtier(*SMALL, "--directory", str(tmp_path), "--compare-fio", "--fio-verify",
               "--output-format", "json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    v = doc["fio_verify"]
    assert "--verify=crc32c-intel" in v["command"] and "--verify_only=1" in v["command"]
    assert v["jobs"][0]["read"]["bw_bytes"] > 0
    assert v["ratio"]["GB/s"] == pytest.approx(
        doc["jobs"][0]["read"]["bw_bytes"] / v["jobs"][0]["read"]["bw_bytes"], rel=1e-3)
    # The reference really verifies: one flipped byte in its file makes fio fail, said in one line.
    path = tmp_path / bio.DATASET_DIR / "fio-verify.bin"
    with path.open("r+b") as f:
        f.seek(3 * 256 * 1024 + 1000)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    r = kvtier(*SMALL, "--directory", str(tmp_path), "--compare-fio", "--fio-verify")
    assert r.returncode == 2 and "fio failed" in r.stderr and "verify failed" in r.stderr, r.stderr


def test_fio_verify_needs_whole_verify_chunks() -> None:
    with pytest.raises(InvalidRequest, match="multiple of 256.00 KiB"):
        command(bio.IOParams(bs=64 * 1024), Path("f.bin"), verify=True)
    with pytest.raises(InvalidRequest, match="--rw read or randread"):
        command(bio.IOParams(rw="write", bs=1024**2), Path("f.bin"), verify=True)
    cmd = command(bio.IOParams(bs=1024**2), Path("f.bin"), verify=True)
    assert {"--verify=crc32c-intel", "--verify_interval=262144", "--verify_only=1"} <= set(cmd)


@pytest.mark.parametrize("args, words", [
    (["--fio-verify"], "--fio-verify needs --compare-fio"),
    (["--size", "12XB"], "12XB"),
    (["--tier", "tape"], "unknown --tier 'tape'"),
    (["--rw", "readwrite"], "unknown --rw 'readwrite'"),
    (["--bs", "1000"], "multiple of 4 KiB"),
    (["--codec", "gzip"], "unknown codec"),
    (["--tier", "remote"], "--remote-url"),
    (["--numjobs", "-1"], "--numjobs must be >= 1"),
    (["--repeat", "0"], "--repeat must be >= 1"),
])
def test_bad_arguments_give_one_line(args: list[str], words: str, tmp_path: Path, capsys) -> None:
    from kvtier.cli import main

    assert main(["bench", "io", *args, "--directory", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1 and words in lines[0], err
    assert lines[0].startswith("kvtier bench io: error:")
    assert not (tmp_path / bio.DATASET_DIR).exists()  # nothing was written


def test_iodepth_zero_exits_without_traceback(tmp_path: Path) -> None:
    r = kvtier("--iodepth", "0", "--directory", str(tmp_path), timeout=30)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == "kvtier bench io: error: --iodepth must be >= 1, got 0"


def test_buffers_ring_matches_the_loaders_staging_ring() -> None:
    from kvtier.loader import LoaderConfig

    slots = LoaderConfig().staging_slots
    assert bio.IOParams().ring_sets() == 1  # fio's pattern by default
    assert bio.IOParams(buffers=0, iodepth=1).ring_sets() == slots
    assert bio.IOParams(buffers=0, iodepth=4).ring_sets() * 4 >= slots
    assert bio.IOParams(buffers=0, iodepth=64).ring_sets() == 1
    assert bio.IOParams(buffers=0, engine="batch", iodepth=4).ring_sets() * 4 >= slots
    assert bio.IOParams(buffers=3).ring_sets() == 3
    with pytest.raises(InvalidRequest, match="--buffers must be >= 0"):
        bio.IOParams(buffers=-1).check()


def test_ring_reads_cycle_through_distinct_buffers(tmp_path: Path) -> None:
    p = bio.IOParams(bs=64 * 1024, size=2 * 1024**2, runtime=0, buffers=4, directory=str(tmp_path))
    res = bio.run(p)
    assert res.read.ios == p.blocks and res.tier_stats["corrupt_blocks"] == 0
    job = bio._Job(p, 0, bio._Payloads(p))
    ptrs = {b.data_ptr() for ring in job.rings for b in ring}
    assert len(job.rings) == 4 and len(ptrs) == 4


def test_verify_ceiling_reports_every_path(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "kvtier.bench.verify_ceiling", "--directory", str(tmp_path),
                        "--bs", "256KiB", "--size", "8MiB", "--rounds", "1", "--seconds", "0.2",
                        "--ring", "3"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    rows = {line.split("|")[1].strip(): line for line in r.stdout.splitlines() if line.startswith("| ")}
    from kvtier.bench.verify_ceiling import PATHS
    assert set(PATHS) <= set(rows)
    assert float(rows["preadv"].split("|")[-2]) == 1.0  # the reference, paired with itself


@needs_fio
@pytest.mark.parametrize("path", ["get", "get_into", "loader", "sidecar"])
def test_product_paths_report_direct_reads_next_to_fio(tmp_path: Path, path: str) -> None:
    """``--path get`` (the default for ssd reads) times ``TieredCache.get`` itself, and its
    counters show every read went O_DIRECT."""
    args = ["--bs", "2MiB", "--size", "32MiB", "--runtime", "0", "--iodepth", "8"]
    r = kvtier(*args, *([] if path == "get" else ["--path", path]), "--directory", str(tmp_path),
               "--compare-fio", "--fio-verify", "--output-format", "json", timeout=120)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["jobs"][0]["job options"]["path"] == path
    stats = doc["kvtier"]["tier_stats"]
    assert stats["direct_reads"] >= 16 and stats["buffered_reads"] == 0, stats
    assert doc["ratio"]["GB/s"] > 0 and doc["fio_verify"]["ratio"]["GB/s"] > 0


def test_kept_open_keeps_a_paths_cache_open_from_run_to_run(tmp_path: Path) -> None:
    """Within ``kept_open`` (``--repeat``, ``io_compare``) the get path runs on one open cache, so
    from the second run on a get writes into the memory the last one returned, as in an
    application; leaving it closes the cache."""
    from kvtier.bench import io_paths

    p = bio.IOParams(rw="randread", bs=2 * 1024**2, iodepth=8, size=64 * 1024**2, runtime=0,
                     directory=str(tmp_path), path="get").check()
    with io_paths.kept_open():
        assert bio.run(p).read.io_bytes == 64 * 1024**2
        assert io_paths._kept is not None
        (session,) = io_paths._kept.values()
        pool = session.cache._get_buffers
        assert pool.idle_bytes == 64 * 1024**2  # the first get's KV, dropped by the bench
        bio.run(p)
        assert list(io_paths._kept.values()) == [session] and pool.idle_bytes == 64 * 1024**2
        loaded = bio.run(dataclasses.replace(p, path="loader"))  # the session gains a loader...
        assert loaded.tier_stats["direct_reads"] == 64  # two groups of layers a block
        again = bio.run(p)  # ... which a get never takes: whole blocks, a read each
        assert again.tier_stats["direct_reads"] == 32 and pool.idle_bytes == 64 * 1024**2
    assert io_paths._kept is None and session.cache.closed


def test_product_paths_need_a_reload_they_can_time() -> None:
    with pytest.raises(InvalidRequest, match="--path get"):
        bio.IOParams(path="get", tier="host").check()
    with pytest.raises(InvalidRequest, match="multiple of"):
        bio.IOParams(path="loader", bs=64 * 1024).check()
    with pytest.raises(InvalidRequest, match="unknown --path"):
        bio.IOParams(path="nvme").check()


@needs_fio
def test_fio_over_existing_files_reads_them_all_and_changes_none(tmp_path: Path) -> None:
    """``fio@kvtier``'s job: fio reads kvtier's own segment files, ``size`` bytes in all, and
    never writes them (the data set stays kvtier's)."""
    import hashlib

    from kvtier.bench.fio import run_files

    files = []
    for i in range(3):
        f = tmp_path / f"0000000{i}:seg"  # a ':' in a name must not split fio's file list
        f.write_bytes(np.random.default_rng(i).bytes(1 << 20))
        files.append(f)
    before = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    p = bio.IOParams(bs=64 * 1024, iodepth=4, size=2 << 20, runtime=0, direct=False)
    job, cmd = run_files(p, files)
    assert job["read"]["io_bytes"] == 2 << 20 and job["write"]["io_bytes"] == 0
    assert "--file_service_type=random" in cmd
    assert [hashlib.sha256(f.read_bytes()).hexdigest() for f in files] == before
    with pytest.raises(InvalidRequest, match="reads them"):
        run_files(bio.IOParams(rw="randwrite"), files)


def test_put_path_times_a_put_with_and_without_a_host_tier_in_front(tmp_path):
    """``bench put_path --host``: the deployed shape (host tier written through to the SSD);
    put_once raises unless every token was stored, and leaves nothing behind."""
    from kvtier.bench.put_path import _kv, put_once

    kv = _kv(512)
    for host in (False, True):
        assert put_once(tmp_path / "c", kv, 512, 128, "batch", host=host) > 0
        assert not (tmp_path / "c").exists()
