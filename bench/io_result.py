"""The figures of a ``kvtier bench io`` job, shaped as fio's JSON (``jobs[].read.bw_bytes``...)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from kvtier.bench.io import IOParams

PERCENTILES = (1.0, 5.0, 10.0, 50.0, 90.0, 99.0, 99.9, 99.99)


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
