"""Crash safety through ``kvtier serve`` with its default host tier in front of the SSD tier.

A client puts prefixes while the server (forked from a pre-imported helper, tests/cache_child.py,
running the real ``kvtier serve`` entry point) is SIGKILLed at random moments; a fresh server on
the same data directory must then serve every put that was acknowledged with HTTP 200, bit-exact.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from kvtier.client import KVTierClient
from kvtier.server.testing import free_port
from tests.cache_child import BT, NAMESPACE, kv_of, tokens_of
from tests.test_manager_crash import Zygote

KILLS = 20


def gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie holds no file lock any more)."""
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in state


def start_server(zygote: Zygote, data: Path, durability: str) -> tuple[int, str]:
    port = free_port()
    pid = zygote.fork(f"serve {data} {port} {durability}")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert not gone(pid), "the server exited at startup"
        try:
            if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                return pid, url
        except httpx.TransportError:
            time.sleep(0.02)
    raise AssertionError("the server did not come up")


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while not gone(pid):
        assert time.monotonic() < deadline, "a SIGKILLed server is still running"
        time.sleep(0.01)


def check(client: KVTierClient, seed: int, i: int) -> bool:
    """True if put ``i`` is served whole and bit-exact; False if absent; fails if wrong."""
    tokens = tokens_of(seed, i)
    kv, n = client.get(NAMESPACE, tokens)
    for layer, ref in zip(kv or [], kv_of(seed, i), strict=False):
        for got, exp in zip(layer, ref, strict=True):
            assert torch.equal(got, exp[:n]), f"put {i} of seed {seed}: wrong bytes served"
    return n == len(tokens)


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


@pytest.mark.slow
def test_sigkill_of_kvtier_serve_loses_no_acknowledged_put(tmp_path, zygote):
    rng = random.Random(99)
    data = tmp_path / "data"
    pid, url = start_server(zygote, data, "sync")
    acked: dict[int, list[int]] = {}
    try:
        for trial in range(KILLS):
            seed = 500 + trial
            done: list[int] = []
            stop = threading.Event()

            def writer(url: str = url, seed: int = seed, done: list[int] = done,
                       stop: threading.Event = stop) -> None:
                with KVTierClient(url, timeout=30) as client:
                    for i in range(100_000):
                        if stop.is_set():
                            return
                        try:
                            client.put(NAMESPACE, tokens_of(seed, i), kv_of(seed, i))
                        except (httpx.TransportError, OSError):
                            return  # the server died under this put: not acknowledged
                        done.append(i)  # HTTP 200: acknowledged

            with KVTierClient(url) as client:
                if trial == 0:
                    client.register_namespace(NAMESPACE, block_tokens=BT)
            thread = threading.Thread(target=writer, daemon=True)
            thread.start()
            deadline = time.monotonic() + 120
            target = rng.randint(1, 30)
            while len(done) < target:
                assert time.monotonic() < deadline and thread.is_alive(), "no puts acknowledged"
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.05))
            kill(pid)
            stop.set()
            thread.join(60)
            assert not thread.is_alive()
            pid, url = start_server(zygote, data, "sync")
            with KVTierClient(url, timeout=60) as client:
                for s, puts in acked.items():
                    lost = [i for i in puts if not check(client, s, i)]
                    assert not lost, f"seed {s}: {len(lost)} acknowledged puts lost by a later crash"
                lost = [i for i in done if not check(client, seed, i)]
                assert not lost, f"trial {trial}: {len(lost)} of {len(done)} acknowledged puts lost"
                check(client, seed, len(done))  # the put in flight: exact or absent
            acked[seed] = list(done)
    finally:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while not gone(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert sum(map(len, acked.values())) >= KILLS
