"""A real Mooncake Store on loopback for tests and benchmarks: ``mooncake_master`` (with its
HTTP metadata server) plus one storage node in a child process, both stopped by their owner."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.integration.remote_servers import free_port, wait_for

MOONCAKE_MASTER = shutil.which("mooncake_master")


def mooncake_skip_reason() -> str | None:
    """None if a Mooncake Store can run here, else why not (precisely)."""
    try:
        import mooncake.store  # noqa: F401
    except ImportError as e:
        return (f"mooncake client not importable ({e}): pip install "
                "mooncake-transfer-engine-non-cuda and apt-get install -y libibverbs1")
    if MOONCAKE_MASTER is None:
        return "mooncake_master not on PATH (comes with mooncake-transfer-engine-non-cuda)"
    return None


_NODE = """
import sys, time
from mooncake.store import MooncakeDistributedStore
s = MooncakeDistributedStore()
rc = s.setup(dict(local_hostname="127.0.0.1", metadata_server=sys.argv[1],
                  global_segment_size=int(sys.argv[3]), local_buffer_size=16 * 1024 * 1024,
                  protocol="tcp", rdma_devices="", master_server_addr=sys.argv[2]))
print("READY" if rc == 0 else f"FAILED {rc}", flush=True)
sys.stdin.read()  # serve until the parent closes our stdin
s.close()
"""


class MooncakeMaster:
    """mooncake_master bound to 127.0.0.1 and one storage node contributing ``segment_bytes``.

    ``lease_ms``: how long a read holds an object against removal; short for tests (a removed
    block is gone at once), Mooncake's own default (5 s) for benchmarks, where a batch read of
    a long prefix outlasting the lease fails with ``LEASE_EXPIRED``.
    """

    def __init__(self, segment_bytes: int = 512 * 1024**2, lease_ms: int = 50) -> None:
        self.rpc_port, self.http_port, self.metrics_port = free_port(), free_port(), free_port()
        self.segment_bytes = segment_bytes
        self.lease_ms = lease_ms
        self.workdir = Path(tempfile.mkdtemp(prefix="kvtier-mooncake-"))
        self.master: subprocess.Popen | None = None
        self.node: subprocess.Popen | None = None
        self._logs: list = []

    def _log(self, name: str):
        f = (self.workdir / name).open("a")  # closed in stop()
        self._logs.append(f)
        return f

    @property
    def metadata(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/metadata"

    @property
    def url(self) -> str:
        return f"mooncake://127.0.0.1:{self.rpc_port}?metadata={self.metadata}"

    def start(self) -> MooncakeMaster:
        self.master = subprocess.Popen(
            [MOONCAKE_MASTER, f"--rpc_port={self.rpc_port}", "--rpc_address=127.0.0.1",
             "--enable_http_metadata_server=true", f"--http_metadata_server_port={self.http_port}",
             "--http_metadata_server_host=127.0.0.1", f"--metrics_port={self.metrics_port}",
             "--metrics_host=127.0.0.1", "--rpc_thread_num=2", f"--default_kv_lease_ttl={self.lease_ms}",
             "--client_ttl=2"],
            stdout=self._log("master.log"), stderr=subprocess.STDOUT,
        )
        wait_for(self._listening, 20.0, f"mooncake_master on port {self.rpc_port}")
        self.start_node()
        return self

    def _listening(self) -> bool:
        if self.master is None or self.master.poll() is not None:
            raise RuntimeError(f"mooncake_master exited; see {self.workdir / 'master.log'}")
        try:
            for port in (self.rpc_port, self.http_port):
                socket.create_connection(("127.0.0.1", port), 0.5).close()
        except OSError:
            return False
        return True

    def start_node(self) -> None:
        self.node = subprocess.Popen(
            [sys.executable, "-c", _NODE, self.metadata, f"127.0.0.1:{self.rpc_port}",
             str(self.segment_bytes)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._log("node.log"), text=True,
        )
        line = self.node.stdout.readline().strip()
        if line != "READY":
            raise RuntimeError(f"mooncake storage node failed to start: {line!r}")

    def kill_node(self) -> None:
        """SIGKILL the storage node: its keys are gone (no replication by default)."""
        if self.node is not None:
            self.node.kill()
            self.node.wait(10)
            self.node = None

    def stop(self) -> None:
        if self.node is not None:
            with contextlib.suppress(Exception):
                self.node.stdin.close()
                self.node.wait(10)
            if self.node.poll() is None:
                self.node.kill()
                self.node.wait(10)
            self.node = None
        if self.master is not None:
            self.master.terminate()
            try:
                self.master.wait(10)
            except subprocess.TimeoutExpired:
                self.master.kill()
                self.master.wait(10)
            self.master = None
        for f in self._logs:
            f.close()
        shutil.rmtree(self.workdir, ignore_errors=True)
