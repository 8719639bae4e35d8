"""The sidecar's data plane against the in-process API, and its lookup throughput.

    python -m kvtier.bench.http_load --kv-bytes 1GiB --rounds 5 --busy 1

Starts ``kvtier serve`` in a subprocess on a free loopback port and a Unix socket (memory tier
only; its own GIL) and a ``TieredCache`` in this process with the same host capacity, then moves the same KV
(``--kv-bytes`` of an 8-layer, 8x128 K/V, float16 layout by default) every way, interleaved:
each round runs every variant once, in a rotated order, so a noisy neighbour hits all of them
alike. Reported per variant: median and p99 seconds over the rounds, GB/s (KV bytes / median),
and the ratio to in-process (in-process median seconds / the variant's: above 1 is faster).

Variants:

- put: ``in_process`` (``TieredCache.put``), ``msgpack`` (``PUT /v1/kv``, the body streamed
  from the tensors), ``msgpack_uds`` (the same over the server's ``--uds`` socket), ``shm`` (the caller's own tensors, packed into a pooled region by the
  client), ``shm_kv_buffer`` (KV already in a ``kv_buffer``: only a control message crosses
  HTTP). Each put stores fresh token ids (every block new), evicted untimed after it.
- get: ``in_process`` (``TieredCache.get``: its output in the memory the last get returned,
  ``CacheConfig.reload_pool_bytes``), ``in_process_into``
  (``get_into`` pre-allocated tensors), ``msgpack`` (``POST /v1/kv/get``), ``msgpack_uds`` (the
  same over ``--uds``), ``shm`` (decoded into
  a pooled region; the caller gets views). Results are dropped before the next call.
- floors: ``socket`` (the same bytes over a bare loopback TCP connection into a reused buffer
  in another process: the transport alone), ``socket_uds`` (the same over a Unix socket) and ``memcpy`` (one copy of the same bytes into
  pre-faulted memory). ``msgpack`` puts are also compared to in-process put + their socket:
  the least a put that crosses a socket can cost.

``--busy N`` keeps N cores busy for the whole run (``stress-ng --cpu N`` if installed, else
spinning Python processes), started and stopped here. ``--seconds S`` adds the lookup load:
``--clients`` asyncio clients looking up a cached ``--prefix-tokens`` prefix for S seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from kvtier import CacheConfig, KVLayout, TieredCache
from kvtier.bench.common import median, p99, table
from kvtier.bytecopy import copy_bytes
from kvtier.client import AsyncKVTierClient, KVTierClient
from kvtier.config import HostTierConfig, SSDTierConfig, parse_size
from kvtier.server.testing import free_port

log = logging.getLogger("kvtier.bench.http_load")
ROOT = Path(__file__).resolve().parents[1]
BT = 256
PIECE = 1 << 20


# ---- processes --------------------------------------------------------------------------------
def start_server(port: int, capacity: int, max_kv: int, data_dir: str, uds: str = "",
                 ssd_capacity: int = 0) -> subprocess.Popen:
    """``kvtier serve`` on ``port`` (and ``uds``): memory tier only, or with its default SSD tier
    (``DATA_DIR/ssd``, write-through, durability ``batch``) of ``ssd_capacity`` bytes."""
    ssd = ["--ssd-capacity", str(ssd_capacity)] if ssd_capacity else ["--ssd", "false"]
    cmd = [sys.executable, "-m", "kvtier.commands.serve", "--port", str(port), *ssd,
           "--host-capacity", str(capacity), "--block-tokens", str(BT), "--log-level", "warning",
           "--max-kv-bytes", str(max_kv), "--data-dir", data_dir, *(["--uds", uds] if uds else [])]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("kvtier serve did not start")


def busy(n: int) -> list[subprocess.Popen]:
    """``n`` cores kept busy: ``stress-ng --cpu n`` if installed, else ``n`` spinning Pythons."""
    if n <= 0:
        return []
    if shutil.which("stress-ng"):
        return [subprocess.Popen(["stress-ng", "--cpu", str(n), "--quiet"], start_new_session=True)]
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def sink(port_file: str) -> None:
    """The socket floor's receiving end: messages of ``<length:8><bytes>``, each received into
    one reused buffer (faulted in once) and answered with one byte. Listens on loopback TCP
    (its port written to ``port_file``), or on the Unix socket ``port_file.sock`` when
    ``port_file`` already holds ``unix``."""
    if os.path.exists(port_file) and Path(port_file).read_text() == "unix":
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(port_file + ".sock")
        srv.listen(1)
        Path(port_file).write_text(port_file + ".sock")
    else:
        srv = socket.create_server(("127.0.0.1", 0))
        Path(port_file).write_text(str(srv.getsockname()[1]))
    conn, _ = srv.accept()
    buf = np.zeros(0, np.uint8).data
    while True:
        head = conn.recv(8, socket.MSG_WAITALL)
        if len(head) < 8:
            return
        (n,) = struct.unpack("<Q", head)
        if len(buf) < n:
            buf = np.ones(n, np.uint8).data
        at = 0
        while at < n:
            got = conn.recv_into(buf[at:n])
            if not got:
                return
            at += got
        conn.sendall(b"k")


class SocketFloor:
    """Sends bytes to a ``sink`` subprocess over loopback TCP (or a Unix socket), in the
    client's piece size."""

    def __init__(self, unix: bool = False) -> None:
        fd, self._port_file = tempfile.mkstemp(prefix="kvtier-sink-")
        os.write(fd, b"unix" if unix else b"")
        os.close(fd)
        if not unix:
            os.unlink(self._port_file)
        self.proc = subprocess.Popen([sys.executable, "-m", "kvtier.bench.http_load", "--sink", self._port_file],
                                     cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.monotonic() + 30
        while not os.path.exists(self._port_file) or Path(self._port_file).read_text() in ("", "unix"):
            if time.monotonic() > deadline:
                raise RuntimeError("the socket sink did not start")
            time.sleep(0.02)
        where = Path(self._port_file).read_text()
        if unix:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.connect(where)
        else:
            self.sock = socket.create_connection(("127.0.0.1", int(where)))
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, views: list[memoryview]) -> None:
        self.sock.sendall(struct.pack("<Q", sum(len(v) for v in views)))
        for data in views:
            for i in range(0, len(data), PIECE):
                self.sock.sendall(data[i:i + PIECE])
        if self.sock.recv(1) != b"k":
            raise RuntimeError("the socket sink went away")

    def close(self) -> None:
        self.sock.close()
        self.proc.wait(30)
        for path in (self._port_file, self._port_file + ".sock"):
            Path(path).unlink(missing_ok=True)


# ---- lookups ----------------------------------------------------------------------------------
async def lookup_load(url: str, clients: int, seconds: float, ids: list[int]) -> dict:
    lat: list[float] = []
    deadline = time.perf_counter() + seconds

    async def one(client: AsyncKVTierClient) -> None:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            hit = await client.lookup("lk", ids)
            lat.append(time.perf_counter() - t0)
            assert hit.tokens == len(ids)

    cs = [AsyncKVTierClient(url) for _ in range(clients)]
    t0 = time.perf_counter()
    await asyncio.gather(*(one(c) for c in cs))
    wall = time.perf_counter() - t0
    for c in cs:
        await c.aclose()
    lat.sort()
    return {"clients": clients, "seconds": round(wall, 2), "lookups": len(lat),
            "lookups_per_s": round(len(lat) / wall, 1),
            "p50_ms": round(1e3 * lat[len(lat) // 2], 2), "p99_ms": round(1e3 * p99(lat), 2)}


# ---- the data plane ---------------------------------------------------------------------------
def make_kv(layout: KVLayout, tokens: int) -> list[tuple[torch.Tensor, ...]]:
    gen = torch.Generator().manual_seed(0)
    return [tuple(torch.randint(-2**15, 2**15, (tokens, *s), generator=gen, dtype=torch.int16)
                  .view(layout.torch_dtype) for s in layout.tensor_shapes)
            for _ in range(layout.num_layers)]


def data_plane(url: str, uds_url: str, layout: KVLayout, tokens: int, rounds: int, capacity: int,
               ssd: SSDTierConfig | None = None) -> dict[str, Any]:
    """Seconds per call of every variant (see the module docstring), ``rounds`` interleaved
    rounds after one untimed warm-up round (regions created, pages faulted in). ``ssd``: the
    in-process cache's SSD tier, configured as the server's."""
    kv = make_kv(layout, tokens)
    nbytes = tokens * layout.bytes_per_token
    ids = list(range(tokens))
    counter = iter(range(1, 1 << 30))

    def fresh() -> list[int]:
        base = next(counter) * 10_000_000
        return [base + t for t in ids]

    local = TieredCache(CacheConfig(block_tokens=BT, host=HostTierConfig(capacity_bytes=capacity),
                                    ssd=ssd or SSDTierConfig()))
    msg, shm, uds = KVTierClient(url), KVTierClient(url, use_shm=True), KVTierClient(uds_url)
    floor, uds_floor = SocketFloor(), SocketFloor(unix=True)
    dest = layout.empty(tokens)
    views = [t.reshape(-1).view(torch.uint8).numpy().data for layer in kv for t in layer]
    for c in (local, msg):  # msg and shm talk to the same server
        c.register_namespace("dp", layout=layout, block_tokens=BT)
        assert c.put("dp", ids, kv) == tokens
    buf = shm.kv_buffer("dp", tokens)
    for dst, src in zip(buf, kv, strict=True):
        for d, s in zip(dst, src, strict=True):
            copy_bytes(d, s)

    def put(c: TieredCache | KVTierClient, data: Any) -> Callable[[], object]:
        def run() -> object:
            t = fresh()
            t0 = time.perf_counter()
            n = c.put("dp", t, data)
            dt = time.perf_counter() - t0
            assert n == tokens, n
            c.evict("dp", t)
            return dt
        return run

    def get(c: TieredCache | KVTierClient) -> Callable[[], object]:
        def run() -> object:
            t0 = time.perf_counter()
            out, n = c.get("dp", ids)
            dt = time.perf_counter() - t0
            assert n == tokens, n
            del out
            return dt
        return run

    def timed(fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        return run

    def memcpy() -> None:
        for dl, sl in zip(dest, kv, strict=True):
            for d, s in zip(dl, sl, strict=True):
                copy_bytes(d, s)

    variants: dict[str, Callable[[], object]] = {
        "put/in_process": put(local, kv), "put/msgpack": put(msg, kv), "put/msgpack_uds": put(uds, kv),
        "put/shm": put(shm, kv), "put/shm_kv_buffer": put(shm, buf),
        "get/in_process": get(local), "get/in_process_into": timed(lambda: local.get_into("dp", ids, dest)),
        "get/msgpack": get(msg), "get/msgpack_uds": get(uds), "get/shm": get(shm),
        "floor/socket": timed(lambda: floor.send(views)),
        "floor/socket_uds": timed(lambda: uds_floor.send(views)),
        "floor/memcpy": timed(memcpy),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    try:
        for r in range(rounds + 1):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                dt = variants[name]()
                assert isinstance(dt, float)
                if r:
                    times[name].append(dt)
            log.info("round %d/%d: %s", r, rounds, " ".join(f"{n}={times[n][-1]:.3f}" for n in names) if r else "warm-up")
        del buf
    finally:
        floor.close()
        uds_floor.close()
        local.close()
        for c in (msg, shm, uds):
            c.close()
    return summarize(times, nbytes, tokens, layout, rounds)


def summarize(times: dict[str, list[float]], nbytes: int, tokens: int, layout: KVLayout,
              rounds: int) -> dict[str, Any]:
    med = {k: median(v) for k, v in times.items()}
    out: dict[str, Any] = {"kv_bytes": nbytes, "tokens": tokens, "layout": layout.fingerprint(),
                           "rounds": rounds, "variants": {}}
    for name, ts in times.items():
        op = name.split("/")[0]
        base = {"put": "put/in_process", "get": "get/in_process"}.get(op)
        row: dict[str, Any] = {"median_s": round(med[name], 4), "p99_s": round(p99(ts), 4),
                               "GB_per_s": round(nbytes / med[name] / 1e9, 3),
                               "seconds": [round(t, 4) for t in ts]}
        if base is not None:
            row["vs_in_process"] = round(med[base] / med[name], 3)
            per_round = sorted(b / t for b, t in zip(times[base], ts, strict=True))
            row["vs_in_process_per_round"] = [round(x, 3) for x in per_round]
        out["variants"][name] = row
    floor = med["put/in_process"] + med["floor/socket"]
    out["variants"]["put/msgpack"]["vs_in_process_plus_socket"] = round(floor / med["put/msgpack"], 3)
    floor = med["put/in_process"] + med["floor/socket_uds"]
    out["variants"]["put/msgpack_uds"]["vs_in_process_plus_socket"] = round(floor / med["put/msgpack_uds"], 3)
    out["variants"]["put/shm"]["vs_in_process_plus_memcpy"] = round(
        (med["put/in_process"] + med["floor/memcpy"]) / med["put/shm"], 3)
    return out


def render(res: dict[str, Any]) -> str:
    rows = []
    for name, v in res["variants"].items():
        rows.append([name, v["median_s"], v["p99_s"], v["GB_per_s"], v.get("vs_in_process", "")])
    return table(["variant", "median s", "p99 s", "GB/s", "vs in-process"], rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kv-bytes", type=parse_size, default=parse_size("1GiB"),
                   help="KV moved per call (rounded down to whole blocks of 256 tokens)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="float16")
    p.add_argument("--rounds", "--repeats", dest="rounds", type=int, default=5)
    p.add_argument("--busy", type=int, default=0, help="cores to keep busy for the whole run")
    p.add_argument("--ssd", action="store_true",
                   help="give the server its default SSD tier (write-through, durability batch) and the "
                        "in-process cache the same, on the same file system (--data-dir): puts are "
                        "then acknowledged once on disk, as `kvtier serve` does by default")
    p.add_argument("--ssd-capacity", type=parse_size, default=parse_size("8GiB"),
                   help="SSD capacity of each cache with --ssd")
    p.add_argument("--data-dir", default=None,
                   help="where the server's and the in-process SSD tiers go (default: a temp dir)")
    p.add_argument("--clients", type=int, default=8, help="lookup clients")
    p.add_argument("--seconds", type=float, default=0.0, help="lookup load seconds (0: no lookups)")
    p.add_argument("--prefix-tokens", type=int, default=8192, help="prefix each lookup finds")
    p.add_argument("--out", default=None, help="write the JSON result here too")
    p.add_argument("--sink", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.sink:
        sink(args.sink)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    layout = KVLayout(args.layers, ((args.kv_heads, args.head_dim),) * 2, args.dtype)
    tokens = max(BT, args.kv_bytes // layout.bytes_per_token // BT * BT)
    nbytes = tokens * layout.bytes_per_token
    capacity = 2 * nbytes + (256 << 20)  # the KV gets read + one put's fresh blocks
    port = free_port()
    spinners = busy(args.busy)
    data_dir = tempfile.mkdtemp(prefix="kvtier-bench-", dir=args.data_dir)
    ssd_capacity = args.ssd_capacity if args.ssd else 0
    local_ssd = SSDTierConfig(path=os.path.join(data_dir, "in-process"), capacity_bytes=ssd_capacity) \
        if args.ssd else None
    try:
        uds = os.path.join(data_dir, "http.sock")
        proc = start_server(port, capacity, 2 * nbytes + (64 << 20), data_dir, uds, ssd_capacity)
        url = f"http://127.0.0.1:{port}"
        result: dict[str, Any] = {"busy_cores": args.busy, "cpus": os.cpu_count(),
                                  "tiers": "host+ssd (write-through, batch)" if args.ssd else "host"}
        try:
            if args.seconds > 0:
                with KVTierClient(url) as c:
                    c.register_namespace("lk", layout=KVLayout(1, ((1, 8),), "float16"), block_tokens=BT)
                    ids = list(range(args.prefix_tokens))
                    c.put("lk", ids, [(torch.zeros(args.prefix_tokens, 1, 8, dtype=torch.float16),)])
                result["lookup"] = asyncio.run(lookup_load(url, args.clients, args.seconds, ids))
            result["data_plane"] = data_plane(url, "unix://" + uds, layout, tokens, args.rounds, capacity,
                                              local_ssd)
        finally:
            stop([proc])
    finally:
        stop(spinners)
        shutil.rmtree(data_dir, ignore_errors=True)
    text = json.dumps(result, indent=2)
    log.info("%s", text)
    log.info("%s", render(result["data_plane"]))
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
