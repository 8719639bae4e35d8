"""Real remote engines on loopback for tests and benchmarks: redis-server standalone and a
3-node Redis Cluster, started from the system binaries and stopped by their owner."""

from __future__ import annotations

import contextlib
import random
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
SKIP_REASON = (
    "redis-server/redis-cli not found on PATH: install the Debian package 'redis-server' "
    "(apt-get install -y redis-server) to run the remote-tier tests"
)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port(cluster_bus: bool = False) -> int:
    """A free loopback port; with ``cluster_bus`` also port + 10000 (Redis Cluster's bus)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not cluster_bus or (port + 10000 <= 65535 and _port_free(port + 10000)):
            return port
        port = random.randint(20000, 55000)
        if _port_free(port) and _port_free(port + 10000):
            return port
    raise RuntimeError("no free loopback port pair for a Redis Cluster node")


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``cond`` until true; raise TimeoutError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def glob_escape(raw: bytes) -> bytes:
    """``raw`` as a literal in a Redis KEYS/SCAN pattern: random key bytes may hold ``*?[]\\``."""
    return re.sub(rb"([*?\[\]\\])", rb"\\\1", raw)


def _cli(port: int, *args: str, timeout: float = 5.0) -> str:
    out = subprocess.run(
        [REDIS_CLI, "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True, text=True, timeout=timeout,
    )
    return out.stdout.strip()


class RedisServer:
    """One redis-server on 127.0.0.1, no persistence; ``kill``/``start`` for outage tests."""

    def __init__(self, port: int | None = None, workdir: str | None = None,
                 extra: tuple[str, ...] = ()) -> None:
        self.port = port or free_port(cluster_bus="--cluster-enabled" in extra)
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="kvtier-redis-"))
        self.extra = extra
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--protected-mode", "yes",
             *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for(self._up, 10.0, f"redis-server on port {self.port}")
        return self

    def _up(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"redis-server on port {self.port} exited with {self.proc.returncode}")
        return self.ping()

    def ping(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            return False
        try:
            return _cli(self.port, "PING", timeout=2.0) == "PONG"
        except subprocess.TimeoutExpired:
            return False

    def cli(self, *args: str) -> str:
        return _cli(self.port, *args)

    def kill(self) -> None:
        """SIGKILL: the engine dies mid-workload, with no goodbye on its sockets."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
            self.proc = None

    def pause(self) -> None:
        """SIGSTOP: the engine hangs; connections stay open but nothing answers."""
        assert self.proc is not None
        self.proc.send_signal(19)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(18)

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(Exception):
                self.resume()
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            self.proc = None
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)


class RedisCluster:
    """Three masters, no replicas, slots spread evenly by ``redis-cli --cluster create``."""

    def __init__(self, n: int = 3) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="kvtier-rcluster-"))
        self.nodes: list[RedisServer] = []
        for i in range(n):
            d = self.root / f"n{i}"
            d.mkdir()
            self.nodes.append(RedisServer(workdir=str(d), extra=(
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "2000")))

    @property
    def url(self) -> str:
        return "redis://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> RedisCluster:
        for node in self.nodes:
            node.start()
        subprocess.run(
            [REDIS_CLI, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=30,
        )
        wait_for(self.ok, 20.0, "cluster_state:ok on every node")
        return self

    def ok(self) -> bool:
        return all("cluster_state:ok" in n.cli("CLUSTER", "INFO") for n in self.nodes)

    def dbsizes(self) -> list[int]:
        return [int(n.cli("DBSIZE")) for n in self.nodes]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.root, ignore_errors=True)
