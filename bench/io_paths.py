"""``kvtier bench io --path get|get_into|loader|sidecar``: the reload paths a user calls, timed like a fio job.

``--path raw`` (``kvtier.bench.io``) times the SSD tier's ``read_into``; these paths time what
an application calls on a ``TieredCache`` whose only tier is the SSD (no host tier, no
promotion, so every round reads the disk):

- ``get``: ``TieredCache.get`` of the whole prefix (``--size`` bytes of KV): the cache
  allocates the output and reloads it through the loader, every block verified.
- ``get_into``: ``TieredCache.get_into`` of the prefix into preallocated KV that is a tensor
  per layer and K/V, each its own allocation (a model's own cache, not page-aligned: every
  range is staged, verified and copied), faulted in before the first call.
- ``loader``: ``Loader.load`` of the leased prefix into preallocated KV, layer by layer, then
  ``wait_all`` (what an engine connector does). The KV is faulted in before the first call, as
  an engine's KV memory is long before a load writes into it.
- ``sidecar``: ``KVTierClient(use_shm=True).get`` from the sidecar (the real server on a
  loopback port, in a thread of this process): the server reloads into a shared-memory region
  through the same loader, the client copies the KV out of it.

The namespace is Llama-3-8B shaped (32 layers, K and V of 8 heads x 128, bf16: 128 KiB a token),
``--bs`` bytes a block (a multiple of 128 KiB). One op is one call over the whole prefix; its
latency is the call's, its bytes the KV bytes it returned (each block is stored with one 4 KiB
header page more). The reads' ``direct_reads``/``buffered_reads`` counters of the SSD tier come
with the result, so a run shows whether the reloads went O_DIRECT.

Within ``kept_open`` (``kvtier bench io --repeat``, ``io_compare``'s rounds) each path's cache
stays open from call to call, as an application's does; outside it every call opens its own.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvtier.bench.common import drop_page_cache
from kvtier.bench.io_job import (
    HEAD_DIM,
    HEADS,
    LAYERS,
    TOKEN_BYTES,
    DirStats,
    IOResult,
    check_path,
    dataset_dir,
)
from kvtier.config import format_size
from kvtier.errors import InvalidRequest

NAMESPACE = "bench-io"


def data_root(p) -> Path:
    """The SSD tier's data directory of the product paths' data set of job ``p``
    (kept and reused: its segment files are also what ``fio@kvtier`` reads)."""
    return dataset_dir(p).with_name(f"path-{p.bs}")


def _cache(p, root: Path):
    from kvtier import CacheConfig, HostTierConfig, SSDTierConfig, TieredCache

    cfg = CacheConfig(block_tokens=p.bs // TOKEN_BYTES, host=HostTierConfig(capacity_bytes=0),
                      promote_on_get=False,
                      ssd=SSDTierConfig(path=str(root), capacity_bytes=max(p.size * 2, 1024**3),
                                        durability="batch", direct_io=p.direct, min_free_bytes=256 * 1024**2,
                                        map_size=1024**3))
    return TieredCache(cfg)


def _layout():
    from kvtier.layout import KVLayout

    return KVLayout(LAYERS, ((HEADS, HEAD_DIM), (HEADS, HEAD_DIM)), "bfloat16")


def _populate(cache, tokens: list[int], p, progress) -> None:
    import torch

    layout = _layout()
    cache.register_namespace(NAMESPACE, layout=layout)
    if cache.lookup(NAMESPACE, tokens).tokens == len(tokens):
        return
    bt = p.bs // TOKEN_BYTES
    g = torch.Generator().manual_seed(p.seed)
    chunk = max(bt, (256 * 1024**2 // p.bs) * bt)  # put 256 MiB at a time: bounded memory
    for end in range(chunk, len(tokens) + chunk, chunk):
        end = min(end, len(tokens))
        kv = [tuple(torch.randn((end, HEADS, HEAD_DIM), generator=g).to(torch.bfloat16) for _ in range(2))
              for _ in range(LAYERS)]
        cache.put(NAMESPACE, tokens[:end], kv)
        if progress:
            progress(f"laying out the {p.path} data set: {format_size(end * TOKEN_BYTES)} of {format_size(p.size)}")
    cache.tier("ssd").flush()
    if cache.lookup(NAMESPACE, tokens).tokens != len(tokens):
        raise InvalidRequest(f"the SSD tier kept only part of the {format_size(p.size)} data set")


def _sidecar(stack: contextlib.ExitStack, cache):
    """A client of a sidecar serving ``cache`` (stopped when ``stack`` closes)."""
    from kvtier.client import KVTierClient
    from kvtier.server.testing import serve_in_thread

    url = stack.enter_context(serve_in_thread(cache))
    client = KVTierClient(url, use_shm=True, timeout=600)
    stack.callback(client.close)
    return client


@dataclass(eq=False)
class _Session:
    """What the paths' calls on one data set run on: the cache, and the loader with its
    destination, and the sidecar's client, each made when first needed."""

    cache: Any
    loader: Any = None
    dest: Any = None
    kv: Any = None  # get_into's destination: a tensor per layer and K/V
    client: Any = None
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def close(self) -> None:
        self.stack.close()
        with contextlib.suppress(Exception):
            if self.loader is not None:
                self.loader.close()
        self.cache.close()


_kept: dict[str, _Session] | None = None


@contextlib.contextmanager
def kept_open():
    """Within this, ``run_path`` keeps each data set's cache (with the loader and its
    destination, the sidecar and its client) open from one call to the next, as an application
    keeps its cache: from the second call on, a ``get`` writes into the memory the last one
    returned (``CacheConfig.reload_pool_bytes``) and the sidecar's client reuses its regions.
    Outside it, every call opens and closes its own (a first call in a fresh process)."""
    global _kept
    outer = _kept is None
    if outer:
        _kept = {}
    try:
        yield
    finally:
        if outer:
            assert _kept is not None
            for session in _kept.values():
                session.close()
            _kept = None


def _session(p, root: Path, tokens: list[int], progress) -> _Session:
    """The open session on ``root`` (one cache per data directory: it is locked), readied for
    ``p.path``."""
    import torch

    from kvtier.bufpool import prefault
    from kvtier.loader import Loader, LoaderConfig

    s = _kept.get(str(root)) if _kept is not None else None
    fresh = s is None
    if s is None:
        s = _Session(_cache(p, root))
    try:
        if fresh:
            _populate(s.cache, tokens, p, progress)
        if p.path == "loader" and s.loader is None:
            s.loader = Loader(s.cache, LoaderConfig(io_threads=max(8, p.inflight)))
            # An engine's KV memory is in use, faulted in long before a load writes into it.
            s.dest = _layout().empty(len(tokens))
            for layer in s.dest:
                for t in layer:
                    prefault(t)
        elif p.path == "get_into" and s.kv is None:
            s.kv = [tuple(torch.empty(len(tokens), HEADS, HEAD_DIM, dtype=torch.bfloat16) for _ in range(2))
                    for _ in range(LAYERS)]
            for layer in s.kv:
                for t in layer:
                    prefault(t)
        elif p.path == "sidecar" and s.client is None:
            s.client = _sidecar(s.stack, s.cache)
    except BaseException:
        if fresh:
            s.close()
        raise
    if fresh and _kept is not None:
        _kept[str(root)] = s
    return s


def run_path(p, progress=None):
    """Run job ``p`` on ``p.path`` (``get``, ``get_into``, ``loader`` or ``sidecar``); returns an
    ``IOResult``."""
    check_path(p)
    blocks = p.size // p.bs
    tokens = list(range(1, blocks * (p.bs // TOKEN_BYTES) + 1))
    root = data_root(p)
    root.mkdir(parents=True, exist_ok=True)
    s = _session(p, root, tokens, progress)
    cache = s.cache
    # The session may have a loader and a client made for other paths: only p.path's is used.
    loader, dest = (s.loader, s.dest) if p.path == "loader" else (None, None)
    client = s.client if p.path == "sidecar" else None
    try:
        ssd = cache.tier("ssd")
        before = dict(ssd.stats())
        drop_page_cache()
        lat: list[int] = []
        t0 = time.perf_counter()
        deadline = t0 + p.runtime if p.runtime > 0 else math.inf
        while not lat or time.perf_counter() < deadline:
            t = time.perf_counter_ns()
            if loader is not None:
                assert dest is not None
                lease = cache.acquire(NAMESPACE, tokens)
                try:
                    n = loader.load(lease, dest).wait_all()
                finally:
                    cache.release(lease)
            elif client is not None:
                _, n = client.get(NAMESPACE, tokens)
            elif p.path == "get_into":
                n = cache.get_into(NAMESPACE, tokens, s.kv)
            else:
                _, n = cache.get(NAMESPACE, tokens)
            lat.append(time.perf_counter_ns() - t)
            if n != len(tokens):
                raise InvalidRequest(f"{p.path} reloaded {n} of {len(tokens)} tokens")
            if progress:
                el = time.perf_counter() - t0
                progress(f"{p.rw} {p.tier} {p.path} bs={format_size(p.bs)}: {len(lat)} calls of "
                         f"{format_size(p.size)}, {len(lat) * p.size / max(el, 1e-9) / 1e9:.2f} GB/s")
            if p.runtime <= 0:
                break
        elapsed = time.perf_counter() - t0
        after = ssd.stats()
        counters = {k: after[k] - before.get(k, 0) for k in ("direct_reads", "buffered_reads", "blocks_read",
                                                             "bytes_read") if k in after}
        nbytes = len(lat) * blocks * p.bs
        read = DirStats(nbytes, len(lat) * blocks, np.repeat(np.asarray(lat, np.int64), 1))
        res = IOResult(p, elapsed, read, DirStats())
        res.tier_stats = {**{k: v for k, v in after.items() if not isinstance(v, dict)}, **counters}
        return res
    finally:
        if _kept is None:
            s.close()
