"""A ``kvtier bench io`` job (``IOParams``, checked) and its figures, shaped as fio's JSON
(``jobs[].read.bw_bytes``...)."""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from kvtier.bench.params import ENGINES, RW, TIERS
from kvtier.config import Durability, RemoteBackendName, format_size
from kvtier.errors import InvalidRequest

PERCENTILES = (1.0, 5.0, 10.0, 50.0, 90.0, 99.0, 99.9, 99.99)
DATASET_DIR = "kvtier-bench-io"
# --path get|get_into|loader|sidecar: a Llama-3-8B-shaped namespace (32 layers, K and V of 8 heads x 128,
# bf16), 128 KiB a token (``kvtier.bench.io_paths``)
LAYERS, HEADS, HEAD_DIM = 32, 8, 128
TOKEN_BYTES = LAYERS * 2 * HEADS * HEAD_DIM * 2
PATHS = ("raw", "get", "get_into", "loader", "sidecar")


@dataclass(frozen=True, slots=True)
class IOParams:
    """One benchmark job (sizes in bytes, times in seconds); ``check()`` validates it."""

    rw: str = "randread"
    bs: int = 2 * 1024**2
    iodepth: int = 1
    numjobs: int = 1
    size: int = 1024**3
    runtime: float = 5.0  # 0: read ``size`` bytes once (size-based, like fio without runtime)
    tier: str = "ssd"
    codec: str = "none"
    direct: bool = True
    directory: str | None = None
    engine: str = "sync"
    rwmixread: int = 50
    durability: Durability = "batch"
    remote_url: str | None = None
    remote_backend: RemoteBackendName = "redis"
    seed: int = 0
    buffers: int = 1  # destination buffers per request in flight; 0: the loader's ring (see top)
    path: str = "raw"  # raw: the tier's reads; get / loader: the cache's (``kvtier.bench.io_paths``)

    def check(self) -> IOParams:
        def bad(msg: str) -> None:
            raise InvalidRequest(msg)
        if self.rw not in RW:
            bad(f"unknown --rw {self.rw!r}: expected one of {', '.join(RW)}")
        if self.tier not in TIERS:
            bad(f"unknown --tier {self.tier!r}: expected one of {', '.join(TIERS)}")
        if self.engine not in ENGINES:
            bad(f"unknown --engine {self.engine!r}: expected one of {', '.join(ENGINES)}")
        if self.iodepth < 1:
            bad(f"--iodepth must be >= 1, got {self.iodepth}")
        if self.buffers < 0:
            bad(f"--buffers must be >= 0 (0: as the loader's staging ring), got {self.buffers}")
        if self.numjobs < 1:
            bad(f"--numjobs must be >= 1, got {self.numjobs}")
        if self.bs < 4096 or self.bs % 4096:
            bad(f"--bs must be a multiple of 4 KiB (O_DIRECT alignment), got {self.bs}")
        if self.size < self.bs:
            bad(f"--size ({self.size}) must be at least one block (--bs {self.bs})")
        if not (self.runtime >= 0 and math.isfinite(self.runtime)):
            bad(f"--runtime must be >= 0 seconds, got {self.runtime}")
        if not 0 <= self.rwmixread <= 100:
            bad(f"--rwmixread must be 0..100, got {self.rwmixread}")
        if self.tier == "remote" and not self.remote_url:
            bad("--tier remote needs --remote-url (e.g. redis://127.0.0.1:6379/0)")
        check_path(self)
        if self.codec != "none":
            from kvtier.codecs import get_codec
            get_codec(self.codec)  # raises InvalidRequest naming the known codecs
        return self

    @property
    def blocks(self) -> int:
        return self.size // self.bs

    @property
    def inflight(self) -> int:
        return self.iodepth * self.numjobs

    def ring_sets(self) -> int:
        """How many sets of destination buffers each job cycles through."""
        if self.buffers:
            return self.buffers
        from kvtier.loader import LoaderConfig

        threads = self.numjobs if self.engine == "batch" else self.inflight
        per_op = self.iodepth if self.engine == "batch" else 1
        return max(1, -(-LoaderConfig().staging_slots // (threads * per_op)))


def dataset_dir(p: IOParams) -> Path:
    """The SSD tier's data directory for job ``p`` (read sets are kept and reused; write sets not)."""
    kind = "write" if p.rw in ("write", "randwrite") else "read"
    return Path(p.directory or tempfile.gettempdir()) / DATASET_DIR / f"{kind}-{p.codec}-{p.bs}"


def default_path(tier: str, rw: str, codec: str, bs: int) -> str:
    """``get`` (what a user calls) where a job is a reload it can time, else ``raw``."""
    reload = tier == "ssd" and rw in ("read", "randread") and codec == "none"
    return "get" if reload and bs % TOKEN_BYTES == 0 else "raw"


def check_path(p: IOParams) -> None:
    """Raise InvalidRequest unless job ``p`` can run on its ``path``."""
    if p.path not in PATHS:
        raise InvalidRequest(f"unknown --path {p.path!r}: expected one of {', '.join(PATHS)}")
    if p.path == "raw":
        return
    if p.tier != "ssd" or p.rw not in ("read", "randread") or p.codec != "none":
        raise InvalidRequest(f"--path {p.path} reloads from the ssd tier: needs --tier ssd, --rw read or "
                             f"randread and --codec none; got --tier {p.tier} --rw {p.rw} --codec {p.codec}")
    if p.bs % TOKEN_BYTES:
        raise InvalidRequest(f"--path {p.path} stores Llama-3-8B-shaped blocks of {format_size(TOKEN_BYTES)} "
                             f"a token: --bs must be a multiple of it, got {format_size(p.bs)}")




@dataclass(slots=True)
class DirStats:
    """One direction (read or write) of a finished job."""

    io_bytes: int = 0
    ios: int = 0
    clat_ns: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))

    def to_fio(self, runtime_s: float) -> dict:
        """fio's JSON fields for this direction (``bw`` in KiB/s and ``runtime`` in ms, as fio)."""
        bw = self.io_bytes / runtime_s if runtime_s > 0 else 0.0
        lat = self.clat_ns
        clat = {"min": int(lat.min()) if lat.size else 0, "max": int(lat.max()) if lat.size else 0,
                "mean": float(lat.mean()) if lat.size else 0.0,
                "stddev": float(lat.std()) if lat.size else 0.0, "N": int(lat.size),
                "percentile": percentiles(lat)}
        return {"io_bytes": self.io_bytes, "io_kbytes": self.io_bytes // 1024, "bw_bytes": int(bw),
                "bw": int(bw / 1024), "iops": self.ios / runtime_s if runtime_s > 0 else 0.0,
                "runtime": int(runtime_s * 1000), "total_ios": self.ios, "clat_ns": clat}


def percentiles(lat_ns: np.ndarray) -> dict[str, int]:
    """``{"50.000000": ns, ...}`` — fio's key format."""
    if lat_ns.size == 0:
        return {f"{p:.6f}": 0 for p in PERCENTILES}
    vals = np.percentile(lat_ns, PERCENTILES, method="higher")
    return {f"{p:.6f}": int(v) for p, v in zip(PERCENTILES, vals, strict=True)}


@dataclass(slots=True)
class IOResult:
    params: IOParams
    runtime_s: float
    read: DirStats
    write: DirStats
    tier_stats: dict = field(default_factory=dict)

    def to_fio_job(self) -> dict:
        p = self.params
        return {"jobname": f"kvtier-{p.tier}", "groupid": 0, "error": 0,
                "job options": {"rw": p.rw, "bs": str(p.bs), "iodepth": str(p.iodepth),
                                "numjobs": str(p.numjobs), "size": str(p.size),
                                "runtime": str(p.runtime), "direct": str(int(p.direct)),
                                "tier": p.tier, "path": p.path, "codec": p.codec, "engine": p.engine,
                                "buffers": str(p.ring_sets() * (p.iodepth if p.engine == "batch" else 1))},
                "read": self.read.to_fio(self.runtime_s), "write": self.write.to_fio(self.runtime_s)}

    def to_json(self) -> dict:
        return {"fio version": "kvtier-bench-io", "timestamp": int(time.time()),
                "jobs": [self.to_fio_job()], "kvtier": {"params": asdict(self.params),
                                                       "tier_stats": _plain(self.tier_stats)}}


def _plain(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool, type(None)))}
