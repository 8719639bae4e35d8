"""The remote tier says when it degrades the cache: unreachable at startup (a warning in the log,
a problem in ``health()``, hence in ``/readyz``), and its breaker open; ``/v1/stats`` shows both."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import torch

from kvtier import CacheConfig, HostTierConfig, RemoteTierConfig, TieredCache
from kvtier.server.testing import free_port, serve_in_thread
from kvtier.tiers.base import ReportsHealth
from kvtier.tiers.remote import RemoteTier
from kvtier.tiers.remote.breaker import CircuitBreaker
from tests.conftest import stop_serve
from tests.integration.remote_servers import wait_for

ROOT = Path(__file__).resolve().parents[1]
UNREACHABLE = "redis://127.0.0.1:1/0"  # port 1: nothing listens, connections are refused at once


class FakeBackend:
    """A RemoteBackend whose engine is down until ``up`` is set; counts calls."""

    name = "fake"
    timeout_s = 0.5

    def __init__(self, up: bool) -> None:
        self.up = up
        self.calls = 0
        self.probed = threading.Event()

    def _answer(self) -> None:
        self.calls += 1
        if not self.up:
            raise ConnectionRefusedError("connection refused")

    def exists_many(self, keys):
        try:
            self._answer()
            return [False] * len(keys)
        finally:
            self.probed.set()

    def put(self, key, data) -> None:
        self._answer()

    def get_into(self, key, out: torch.Tensor, offset: int = 0) -> int:
        self._answer()
        raise KeyError(key)

    def size(self, key):
        self._answer()

    def delete(self, key) -> bool:
        self._answer()
        return False

    def close(self) -> None:
        pass


def tier_over(backend: FakeBackend, failures: int = 100) -> RemoteTier:
    return RemoteTier(backend, RemoteTierConfig(backend="redis", url="redis://x"),
                      breaker=CircuitBreaker(failures, 60.0))


def test_unreachable_at_startup_is_a_warning_and_a_problem_until_it_answers(caplog):
    backend = FakeBackend(up=False)
    with caplog.at_level(logging.WARNING, logger="kvtier.tiers.remote.tier"):
        tier = tier_over(backend)
        try:
            assert isinstance(tier, ReportsHealth)
            wait_for(lambda: tier.health() != [], 30, "the startup probe")
            assert any("unreachable since startup" in p and "connection refused" in p for p in tier.health())
            assert any("unreachable at startup" in r.getMessage() for r in caplog.records)
            s = tier.stats()
            assert s["reachable"] is False and s["errors"] == 0  # the probe moves no counter
            assert s["breaker"]["state"] == "closed"
            backend.up = True
            assert tier.contains_many([b"k" * 16]) == [False]  # the engine answers again
            assert tier.health() == [] and tier.stats()["reachable"] is True
        finally:
            tier.close()


def test_a_reachable_engine_is_healthy_and_logs_nothing(caplog):
    backend = FakeBackend(up=True)
    with caplog.at_level(logging.WARNING, logger="kvtier.tiers.remote.tier"):
        tier = tier_over(backend)
        try:
            assert backend.probed.wait(30)
            wait_for(lambda: tier.stats()["reachable"] is True, 30, "the probe's answer")
            assert tier.health() == [] and not caplog.records
        finally:
            tier.close()


def test_an_open_breaker_is_a_problem():
    backend = FakeBackend(up=True)
    tier = tier_over(backend, failures=2)
    try:
        assert backend.probed.wait(30)
        backend.up = False
        for _ in range(2):
            tier.contains_many([b"k" * 16])
        assert tier.breaker.state == "open"
        assert any("circuit breaker open after 2 consecutive failed calls" in p for p in tier.health())
    finally:
        tier.close()


def test_readyz_is_degraded_and_stats_show_the_breaker_with_an_unreachable_remote():
    pytest.importorskip("redis", reason="redis-py missing: pip install 'kvtier[redis]'")
    cfg = CacheConfig(block_tokens=16, host=HostTierConfig(capacity_bytes="4MiB"),
                      remote=RemoteTierConfig(backend="redis", url=UNREACHABLE, timeout_s=0.5))
    with TieredCache(cfg) as cache, serve_in_thread(cache) as url:
        def degraded() -> bool:
            r = httpx.get(f"{url}/readyz", timeout=10)
            return r.status_code == 200 and r.json()["status"] == "degraded"

        wait_for(degraded, 30, "/readyz to report the unreachable remote tier")
        body = httpx.get(f"{url}/readyz", timeout=10).json()
        assert any(p.startswith("remote: redis unreachable since startup") for p in body["problems"])
        remote = httpx.get(f"{url}/v1/stats", timeout=10).json()["tiers"]["remote"]["extra"]
        assert remote["breaker"]["state"] == "closed" and remote["reachable"] is False


def test_kvtier_serve_warns_and_readyz_says_degraded(tmp_path):
    """As a user runs it: ``kvtier serve --remote-backend redis --remote-url redis://127.0.0.1:1/0``."""
    pytest.importorskip("redis", reason="redis-py missing: pip install 'kvtier[redis]'")
    port = free_port()
    log = tmp_path / "serve.log"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("KVTIER_")},
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "kvtier", "serve", "--port", str(port), "--ssd", "false",
           "--host-capacity", "16MiB", "--remote-backend", "redis", "--remote-url", UNREACHABLE]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        def degraded() -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
            except httpx.TransportError:
                return False
            return r.status_code == 200 and r.json()["status"] == "degraded"

        wait_for(degraded, 60, "kvtier serve's /readyz to say degraded")
        wait_for(lambda: "unreachable at startup" in log.read_text(), 30, "the startup warning")
        assert "WARNING" in log.read_text() and "Traceback" not in log.read_text()
    finally:
        stop_serve(proc)
