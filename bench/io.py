"""fio-style reload benchmark of one kvtier tier (``kvtier bench io``): the engine.

It drives the tier's own code — ``SSDTier.put`` / ``read_into`` / ``read_many_into``, the host
``MemoryTier``, or the remote tier — never a separate I/O path. Vocabulary and report follow fio:
``rw``, ``bs``, ``iodepth``, ``numjobs``, ``size``, ``runtime``; bandwidth, IOPS and completion
latency percentiles, and a JSON document with fio's field names (``jobs[].read.bw_bytes``...).

Engines: ``sync`` (default) keeps ``numjobs x iodepth`` requests in flight, each on its own thread
calling ``read_into`` (writes: ``put``) — what fio's libaio engine does with one job at that depth,
and the only way to time each request. ``batch`` issues ``read_many_into`` (writes: ``put_many``)
calls of ``iodepth`` requests per job (the loader's path); each request's completion latency is
then its batch's.

``path`` (``--path``): ``raw`` is the above; ``get`` and ``loader`` time the cache's own reload
calls over the data set instead (``kvtier.bench.io_paths``).

Destination buffers: one per request in flight, reused (fio's pattern) unless ``buffers`` asks
for a ring per request in flight (0: 16 across the jobs, what the loader's staging ring holds,
``LoaderConfig.staging_slots``). On a virtual disk a read landing in bytes the previous read's
checksum pulled into cache costs up to ~0.3 ms more per 2 MiB; a ring avoids part of that
(``python -m kvtier.bench.verify_ceiling`` measures both).

    kvtier bench io --rw randread --bs 2MiB --iodepth 4 --size 1GiB --directory DIR
    python -m kvtier.bench.matrix --directory DIR --size 4GiB --repeat 5   # the README tables
"""

from __future__ import annotations

import math
import random
import shutil
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from kvtier.bench.io_job import (  # noqa: F401  (re-exported: the job, its figures)
    DATASET_DIR,
    PERCENTILES,
    DirStats,
    IOParams,
    IOResult,
    dataset_dir,
    percentiles,
)
from kvtier.config import format_size
from kvtier.errors import InvalidRequest, StorageFull
from kvtier.tiers.base import RangedBatchReads, Tier

if TYPE_CHECKING:
    from kvtier.codecs.base import Codec


Progress = Callable[[str], None]


# ---- tiers and data sets ---------------------------------------------------------------------
def _meta(codec: str):
    from kvtier.tiers.base import BlockMeta
    return BlockMeta("bench-io", None, 256, codec, time.time())


def block_key(bs: int, i: int) -> bytes:
    return b"bench-io:%d:%d" % (bs, i)


class _Payloads:
    """Block payloads: random bytes (codec none), or one random bf16 KV block, encoded.

    The encoded block is shaped as a model's KV, ``[tokens, 8 heads, 128]``: codecs keep a scale
    per token and head, so a flat vector would be one "token" per value (int8 would store 2.5x
    the raw bytes instead of ~0.52x). ``stored_bytes`` is what the tier holds per block.
    """

    HEADS, HEAD_DIM = 8, 128

    def __init__(self, p: IOParams) -> None:
        self.codec: Codec | None = None
        self.shape = (p.bs // (2 * self.HEADS * self.HEAD_DIM), self.HEADS, self.HEAD_DIM)
        g = torch.Generator().manual_seed(p.seed)
        if p.codec == "none":
            # In 4 KiB-aligned buffers, as kvtier's own staging buffers are: the SSD tier then
            # writes them O_DIRECT without a staging copy.
            self.pool = [_aligned_copy(torch.randint(0, 256, (p.bs,), dtype=torch.uint8, generator=g))
                         for _ in range(4)]
            self.stored_bytes = p.bs
        else:
            from kvtier.codecs import get_codec
            self.codec = get_codec(p.codec)
            vals = torch.randn(self.shape, generator=g).to(torch.bfloat16)
            enc = self.codec.encode([vals])
            self.pool = [torch.frombuffer(bytearray(enc), dtype=torch.uint8)]
            self.stored_bytes = len(enc)

    def get(self, i: int) -> torch.Tensor:
        return self.pool[i % len(self.pool)]


def _aligned_copy(t: torch.Tensor) -> torch.Tensor:
    from kvtier.tiers.ssd.directio import aligned_empty
    out = aligned_empty(t.numel())
    out.copy_(t)
    return out


def host_tier_config(p: IOParams, block_bytes: int):
    """A host tier holding the data set with 5% + 4 blocks to spare, for blocks of
    ``block_bytes`` as stored (after the codec, which may shrink or grow them)."""
    from kvtier.config import HostTierConfig
    from kvtier.tiers.allocator import ExtentAllocator

    slot = ExtentAllocator(2 * block_bytes).slot_size(block_bytes)  # the block on the 4 KiB grid
    blocks = math.ceil(p.blocks * 1.05) + 4
    return HostTierConfig(capacity_bytes=blocks * slot)


def open_tier(p: IOParams, fresh: bool, block_bytes: int | None = None) -> tuple[Tier, Callable[[], None]]:
    """The tier to benchmark, and a cleanup callable; ``block_bytes``: stored bytes per block
    (default ``p.bs``), which sizes the host tier."""
    if p.tier == "host":
        from kvtier.tiers.memory import make_host_tier
        host = make_host_tier(host_tier_config(p, block_bytes or p.bs))
        return host, host.close
    if p.tier == "remote":
        from kvtier.config import RemoteTierConfig
        from kvtier.tiers.remote import make_remote_tier
        t = make_remote_tier(RemoteTierConfig(backend=p.remote_backend, url=p.remote_url,
                                              max_inflight_bytes=max(256 * 1024**2, 4 * p.bs),
                                              key_prefix="kvtier-bench-io"))
        assert t is not None  # a backend is named
        return t, t.close
    from kvtier.config import SSDTierConfig
    from kvtier.tiers.ssd import SSDTier
    root = dataset_dir(p)
    if fresh and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    ssd = SSDTier(SSDTierConfig(path=str(root), capacity_bytes=max(p.size * 2, 1024**3),
                              durability=p.durability, direct_io=p.direct,
                              io_threads=max(8, p.inflight), min_free_bytes=256 * 1024**2,
                              map_size=1024**3))
    return ssd, ssd.close


def populate(tier, p: IOParams, payloads: _Payloads, progress: Progress | None = None) -> int:
    """Put the ``p.blocks`` blocks reads draw from (kept when already there); returns puts made."""
    meta = _meta(p.codec)
    made = 0
    last = time.monotonic()
    for i in range(p.blocks):
        key = block_key(p.bs, i)
        if tier.contains(key):
            continue
        _put(tier, key, payloads.get(i), meta)
        made += 1
        if progress and time.monotonic() - last > 0.5:
            last = time.monotonic()
            progress(f"laying out {p.tier} data set: {i + 1}/{p.blocks} blocks")
    if hasattr(tier, "flush"):
        tier.flush()
    return made


def _put(tier, key: bytes, data: torch.Tensor, meta) -> None:
    while True:
        try:
            tier.put(key, data, meta)
            return
        except StorageFull:
            if tier.name != "remote":  # the remote tier refuses puts over its in-flight bound
                raise
            tier.flush(timeout=10.0)


# ---- the run ---------------------------------------------------------------------------------
class _Job:
    """One worker's state: its random stream, latencies and byte counts."""

    def __init__(self, p: IOParams, jid: int, payloads: _Payloads) -> None:
        from kvtier.tiers.ssd.directio import aligned_empty
        self.p, self.jid, self.payloads = p, jid, payloads
        self.rng = np.random.default_rng(p.seed * 1009 + jid)
        self.pick = random.Random(p.seed * 1009 + jid).randrange  # ~10x cheaper per draw
        self.keys: list[bytes] = []  # the data set's keys, shared by the jobs (set by _measure)
        n = p.iodepth if p.engine == "batch" else 1
        self.rings = [[aligned_empty(payloads.stored_bytes) for _ in range(n)]
                      for _ in range(p.ring_sets() if p.rw != "write" else 1)]
        self.bufs = self.rings[0]
        self.decoded = torch.empty(payloads.shape, dtype=torch.bfloat16) if payloads.codec else None
        self.lat: dict[str, list[int]] = {"read": [], "write": []}
        self.bytes = {"read": 0, "write": 0}
        self.seq = 0
        self.start = 0  # first block of this job's sequential stripe
        self.error: BaseException | None = None


def run(p: IOParams, progress: Progress | None = None) -> IOResult:
    """Lay out the data set (reads) or start empty (writes), run the job, return the figures."""
    p.check()
    if p.path != "raw":
        from kvtier.bench.io_paths import run_path
        return run_path(p, progress)
    writes = p.rw in ("write", "randwrite")
    payloads = _Payloads(p)
    tier, close = open_tier(p, fresh=writes, block_bytes=payloads.stored_bytes)
    try:
        if p.rw != "write" and p.rw != "randwrite":
            populate(tier, p, payloads, progress)
        result = _measure(tier, p, payloads, progress)
        if hasattr(tier, "stats"):
            result.tier_stats = tier.stats()
        return result
    finally:
        close()
        if writes and p.tier == "ssd":
            shutil.rmtree(dataset_dir(p), ignore_errors=True)


def _measure(tier, p: IOParams, payloads: _Payloads, progress: Progress | None) -> IOResult:
    nthreads = p.numjobs if p.engine == "batch" else p.inflight
    jobs = [_Job(p, j, payloads) for j in range(nthreads)]
    keys = [block_key(p.bs, i) for i in range(p.blocks)] if p.rw not in ("write", "randwrite") else []
    for j in jobs:
        j.start = j.jid * p.blocks // nthreads
        j.keys = keys  # no key formatting per read
    per_op = p.iodepth if p.engine == "batch" else 1  # blocks each op of a job moves
    per_job_ios = math.ceil(p.blocks / (nthreads * per_op)) if p.runtime == 0 else None
    stop = threading.Event()
    meta = _meta(p.codec)
    t0 = time.perf_counter()
    deadline = t0 + p.runtime if p.runtime > 0 else math.inf
    threads = [threading.Thread(target=_worker, args=(tier, job, stop, deadline, per_job_ios, meta),
                                name=f"bench-io-{job.jid}") for job in jobs]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        threads[0].join(timeout=0.5)
        if progress:
            done = sum(sum(j.bytes.values()) for j in jobs)
            el = time.perf_counter() - t0
            what = (f"{el:.1f}/{p.runtime:.0f} s" if p.runtime > 0
                    else f"{done / max(1, p.size) * 100:.0f}% of {format_size(p.size)}")
            progress(f"{p.rw} {p.tier} bs={format_size(p.bs)} qd={p.iodepth}: {what}, "
                     f"{done / max(el, 1e-9) / 1e9:.2f} GB/s")
        if any(j.error for j in jobs):
            stop.set()
    for t in threads:
        t.join()
    if p.rw in ("write", "randwrite", "randrw") and hasattr(tier, "flush"):
        tier.flush()  # like fio --end_fsync=1: the written bytes are on disk before the clock stops
    elapsed = time.perf_counter() - t0
    if p.rw == "randrw":  # keep the reusable read data set as it was
        for j in jobs:
            for s in range(j.seq):
                tier.delete(_write_key(p, j.jid, s))
    for j in jobs:
        if j.error is not None:
            raise j.error
    out = {}
    for d in ("read", "write"):
        lat = np.concatenate([np.asarray(j.lat[d], np.int64) for j in jobs]) if jobs else np.empty(0)
        out[d] = DirStats(sum(j.bytes[d] for j in jobs), int(lat.size), lat)
    return IOResult(p, elapsed, out["read"], out["write"])


def _worker(tier, job: _Job, stop: threading.Event, deadline: float, ios: int | None, meta) -> None:
    p = job.p
    n_ops = 0
    try:
        while not stop.is_set() and (ios is None or n_ops < ios):
            if time.perf_counter() >= deadline:
                break
            if p.rw in ("write", "randwrite") and p.engine == "batch":
                _batch_write(tier, job, meta)
            elif p.rw in ("write", "randwrite") or (p.rw == "randrw"
                                                    and job.rng.integers(100) >= p.rwmixread):
                _one_write(tier, job, meta)
            else:
                _read_batch(tier, job, n_ops)
            n_ops += 1
    except BaseException as e:  # surfaced by the caller, with the worker's context
        job.error = e


def _one_write(tier, job: _Job, meta) -> None:
    key = _write_key(job.p, job.jid, job.seq)
    job.seq += 1
    data = job.payloads.get(job.seq)
    t = time.perf_counter_ns()
    _put(tier, key, data, meta)
    job.lat["write"].append(time.perf_counter_ns() - t)
    job.bytes["write"] += job.p.bs


def _batch_write(tier, job: _Job, meta) -> None:
    """``iodepth`` blocks in one ``put_many`` (``BatchedPuts``; else one ``put`` each): the
    batch is written and made durable together; each block's latency is its batch's."""
    from kvtier.tiers.base import BatchedPuts

    p = job.p
    blocks = []
    for _ in range(p.iodepth):
        blocks.append((_write_key(p, job.jid, job.seq), job.payloads.get(job.seq + 1), meta))
        job.seq += 1
    t = time.perf_counter_ns()
    if isinstance(tier, BatchedPuts):
        for r in tier.put_many(blocks):
            if r is not None:
                raise r
    else:
        for key, data, m in blocks:
            _put(tier, key, data, m)
    dt = time.perf_counter_ns() - t
    job.lat["write"].extend([dt] * len(blocks))
    job.bytes["write"] += p.bs * len(blocks)


def _write_key(p: IOParams, jid: int, seq: int) -> bytes:
    return b"bench-io-w:%d:%d:%d" % (p.bs, jid, seq)


def _read_batch(tier, job: _Job, n_ops: int) -> None:
    p = job.p
    job.bufs = job.rings[n_ops % len(job.rings)]
    n = len(job.bufs)
    if p.rw == "read":  # sequential: each job walks its own stripe of the data set
        base = job.start + n_ops * n
        keys = [job.keys[(base + k) % p.blocks] for k in range(n)]
    else:
        keys = [job.keys[job.pick(p.blocks)] for _ in range(n)]
    t = time.perf_counter_ns()
    if n == 1 and p.engine == "sync":
        res = [tier.read_into(keys[0], job.bufs[0])]
    elif isinstance(tier, RangedBatchReads):
        res = tier.read_many_into([(k, b, 0) for k, b in zip(keys, job.bufs, strict=True)])
    else:
        res = [tier.read_into(k, b) for k, b in zip(keys, job.bufs, strict=True)]
    codec = job.payloads.codec
    if job.decoded is not None and codec is not None:
        for b in job.bufs:
            codec.decode_into(b, [job.decoded])
    dt = time.perf_counter_ns() - t
    for r in res:
        if isinstance(r, BaseException):
            raise r
        if r != job.payloads.stored_bytes:
            raise InvalidRequest(f"short read: {r} of {job.payloads.stored_bytes} bytes")
    job.lat["read"].extend([dt] * n)
    job.bytes["read"] += p.bs * n
