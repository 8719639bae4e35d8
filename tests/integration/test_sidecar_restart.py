"""``kvtier serve`` as a real subprocess, stopped with SIGTERM in the middle of a stream of
writes and started again, serves every block it acknowledged."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from kvtier import KVLayout
from kvtier.client import KVTierClient
from kvtier.server.testing import free_port

pytest.importorskip("kvtier.tiers.ssd")

ROOT = Path(__file__).resolve().parents[2]
BT, TOKENS = 64, 256
LAYOUT = KVLayout(4, ((8, 64), (8, 64)), "float32")  # 16 KiB per token, 4 MiB per put


def kv_for(i: int):
    g = torch.Generator().manual_seed(i)
    return [tuple(torch.randn(TOKENS, 8, 64, generator=g) for _ in range(2)) for _ in range(4)]


def ids_for(i: int) -> list[int]:
    return [i * 100_000 + t for t in range(TOKENS)]


def start(data_dir: Path, port: int, log: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KVTIER_HOST_CAPACITY": "32MiB"}
    cmd = [sys.executable, "-m", "kvtier.commands.serve", "--port", str(port), "--data-dir",
           str(data_dir), "--block-tokens", str(BT), "--ssd-capacity", "1GiB", "--log-level", "info",
           *extra]
    proc = subprocess.Popen(cmd, cwd=data_dir.parent, env=env, stdout=log.open("ab"),
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"kvtier serve exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("kvtier serve did not become ready")
        time.sleep(0.05)


def test_sigterm_mid_write_then_restart_serves_every_acknowledged_block(tmp_path):
    data, log = tmp_path / "data", tmp_path / "serve.log"
    port = free_port()
    proc = start(data, port, log)
    acked: list[int] = []
    failed: list[BaseException] = []
    stop = threading.Event()

    def writer() -> None:
        try:
            with KVTierClient(f"http://127.0.0.1:{port}", timeout=30) as client:
                client.register_namespace("w", layout=LAYOUT, block_tokens=BT)
                i = 0
                while not stop.is_set():
                    try:
                        stored = client.put("w", ids_for(i), kv_for(i))
                    except httpx.TransportError:
                        return  # not acknowledged: the server is going away
                    assert stored == TOKENS, f"put {i} acknowledged only {stored} of {TOKENS} tokens"
                    acked.append(i)
                    i += 1
        except BaseException as e:  # noqa: BLE001  re-raised in the test's thread below
            failed.append(e)

    t = threading.Thread(target=writer)
    try:
        t.start()
        deadline = time.monotonic() + 120
        while len(acked) < 8:
            if failed:
                raise failed[0]
            assert t.is_alive() and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)  # while the writer keeps putting
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        stop.set()
        t.join(60)
        if proc.poll() is None:
            proc.kill()
    if failed:
        raise failed[0]
    assert "cache closed" in log.read_text()

    proc = start(data, port, log)
    try:
        with KVTierClient(f"http://127.0.0.1:{port}") as client:
            assert client.get_namespace("w").layout == LAYOUT
            for i in acked:
                assert client.lookup("w", ids_for(i)).tokens == TOKENS, f"put {i} lost"
                kv, n = client.get("w", ids_for(i))
                assert n == TOKENS
                want = kv_for(i)
                assert all(torch.equal(g, w) for lg, lw in zip(kv, want, strict=True)
                           for g, w in zip(lg, lw, strict=True)), f"put {i} changed"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


def test_serve_keeps_its_region_socket_where_told_and_takes_it_back_after_a_kill(tmp_path):
    """``--shm-socket``: created 0600 where asked, removed on a clean stop, and a socket left by
    a SIGKILLed server is taken over on restart (nobody listens on it). A path that is some
    other file is refused in one line, with no traceback."""
    import stat

    sock = tmp_path / "run" / "regions.sock"
    data, log = tmp_path / "data", tmp_path / "serve.log"
    port = free_port()
    for round_ in range(2):
        proc = start(data, port, log, "--shm-socket", str(sock))
        try:
            assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600
            with KVTierClient(f"http://127.0.0.1:{port}", use_shm=True) as client:
                client.register_namespace("s", layout=LAYOUT, block_tokens=BT)
                kv = kv_for(round_)
                assert client.put("s", ids_for(round_), kv) == TOKENS
                got, n = client.get("s", ids_for(round_))
                assert n == TOKENS and torch.equal(got[3][1], kv[3][1])
                assert client._ops._shm.socket_path == str(sock)
        finally:
            if round_ == 0:
                proc.kill()  # leaves the socket file behind
                proc.wait(60)
            else:
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=60) == 0
    assert not sock.exists()  # a clean stop removes it
    sock.write_text("not a socket")
    r = subprocess.run([sys.executable, "-m", "kvtier.commands.serve", "--port", str(free_port()),
                        "--data-dir", str(tmp_path / "other"), "--shm-socket", str(sock)],
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "exists and is not a socket" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
