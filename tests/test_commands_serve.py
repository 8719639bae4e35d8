"""``kvtier serve`` with bad input: one ``kvtier serve: error:`` line, exit 2, before anything
starts (run as a real subprocess, as a user types it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def serve(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env = {k: v for k, v in env.items() if not k.startswith("KVTIER_")}
    # --port 0: should a bad value slip through, the server starts on a free port and the
    # timeout ends the test instead of a collision with a real sidecar.
    return subprocess.run([sys.executable, "-m", "kvtier", "serve", "--port", "0", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=120)


def assert_one_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "[Errno" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("kvtier serve: error: ") and line.count("kvtier serve") == 1, line
    for n in needles:
        assert n in line, line
    return line


@pytest.mark.parametrize(("args", "needles"), [
    (["--log-level", "verbose"], ["--log-level", "'verbose'", "debug, info"]),
    (["--codec", "lz4"], ["--codec", "unknown codec 'lz4'", "int8"]),
    (["--ssd-durability", "fast"], ["--ssd-durability", "'fast'", "sync, batch, none"]),
    (["--ssd-admission", "always"], ["--ssd-admission", "'always'", "write_through"]),
    (["--remote-backend", "memcached"], ["--remote-backend", "'memcached'", "redis"]),
    (["--remote-backend", "redis"], ["remote.url"]),
    (["--host-capacity", "-1GiB"], ["--host-capacity", ">= 0", "'-1GiB'"]),
    (["--host-capacity=-1GiB"], ["--host-capacity", ">= 0"]),
    (["--ssd", "maybe"], ["--ssd", "boolean"]),
    (["--graceful-timeout-s", "-1"], ["graceful_timeout_s", ">= 0"]),
])
def test_a_bad_setting_is_one_line_before_anything_starts(tmp_path, args, needles):
    assert_one_line(serve("--data-dir", str(tmp_path / "data"), *args, cwd=tmp_path), *needles)
    assert not (tmp_path / "data").exists()  # nothing was created: it failed before allocating


def test_a_bad_yaml_value_is_one_line(tmp_path):
    cfg = tmp_path / "k.yaml"
    cfg.write_text("cache: {ssd: {durability: fast}, host: {policy: mru}}\n")
    assert_one_line(serve("--config", str(cfg), "--data-dir", str(tmp_path / "d"), cwd=tmp_path),
                    "'fast'")


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux /proc")
def test_a_data_dir_that_cannot_be_created_says_so(tmp_path):
    assert_one_line(serve("--data-dir", "/proc/kvtier", cwd=tmp_path), "/proc/kvtier", "cannot be created")


def test_help_shows_plain_words_defaults_and_boolean_values(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kvtier", "serve", "--help"], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=60)
    out = proc.stdout
    assert proc.returncode == 0 and "``" not in out and "kvtier.settings" not in out
    assert "--ssd true|false" in out and "--shm true|false" in out
    assert "(default: 8400; env KVTIER_PORT)" in out
    assert "(default: 1GiB; env KVTIER_HOST_CAPACITY)" in " ".join(out.split())
    assert "{sync,batch,none}" in out
