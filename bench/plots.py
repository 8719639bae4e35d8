"""PNG plots for the benchmarks (matplotlib, headless): what a person would rather look at.

Each helper takes plain numbers, writes one PNG and returns its path; none of them runs a
benchmark. Byte axes are binary (GiB, MiB) and labelled as such.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

_UNITS = ((1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB"), (1, "B"))


def binary_size(n: float) -> str:
    """``1.5 GiB``-style tick label."""
    for scale, unit in _UNITS:
        if abs(n) >= scale:
            v = n / scale
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.3g} {unit}"
    return "0 B"


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def hit_rate_vs_capacity(path: str | Path, series: Mapping[str, Sequence[tuple[int, float]]], *,
                         xlabel: str = "capacity", title: str = "hit rate vs capacity") -> Path:
    """One line per series of ``(capacity_bytes, hit_rate in 0..1)``; log2 capacity axis."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, pts in series.items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: binary_size(v)))
    ax.set_xlabel(f"{xlabel} (binary units)")
    ax.set_ylabel("hit rate (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title)
    if series:
        ax.legend()
    return _save(fig, path)


def latency_cdf(path: str | Path, samples: Mapping[str, Sequence[float]], *,
                title: str = "completion latency CDF per tier") -> Path:
    """Empirical CDF of latencies (seconds) per tier, on a log time axis in milliseconds."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, xs in samples.items():
        if len(xs) == 0:
            continue
        v = np.sort(np.asarray(xs, dtype=float)) * 1e3
        ax.step(v, np.arange(1, len(v) + 1) / len(v), where="post", label=f"{label} (n={len(v)})")
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)


def bandwidth_vs_block_size(path: str | Path, series: Mapping[str, Sequence[tuple[int, float]]], *,
                            title: str = "bandwidth vs block size") -> Path:
    """One line per series of ``(block_bytes, bytes_per_second)`` (e.g. kvtier next to fio)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, pts in series.items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] / (1 << 30) for p in pts], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: binary_size(v)))
    ax.set_xlabel("block size (binary units)")
    ax.set_ylabel("bandwidth (GiB/s)")
    ax.set_ylim(bottom=0)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)
