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
from server.testing import free_port

pytest.importorskip("kvtier.tiers.ssd")

ROOT = Path(__file__).resolve().parents[2]
BT, TOKENS = 64, 256
LAYOUT = KVLayout(4, ((8, 64), (8, 64)), "float32")  # 16 KiB per token, 4 MiB per put


def kv_for(i: int):
    g = torch.Generator().manual_seed(i)
    return [tuple(torch.randn(TOKENS, 8, 64, generator=g) for _ in range(2)) for _ in range(4)]


def ids_for(i: int) -> list[int]:
    return [i * 100_000 + t for t in range(TOKENS)]


def start(data_dir: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KVTIER_HOST_CAPACITY": "32MiB"}
    cmd = [sys.executable, "-m", "kvtier.commands.serve", "--port", str(port), "--data-dir",
           str(data_dir), "--block-tokens", str(BT), "--ssd-capacity", "1GiB", "--log-level", "info"]
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
