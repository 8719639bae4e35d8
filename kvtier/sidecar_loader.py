"""The loader ``prefill`` uses when the cache is a sidecar (``KVTierClient``), not in-process.

A block cannot be pinned across HTTP, so a sidecar "lease" is a lookup that remembers the token
ids; the load reads the prefix with one ``get`` (straight into shared memory the server writes,
when the client has ``use_shm=True``) on a background thread, copies it into the caller's KV, and
signals every layer at once. If blocks were evicted between the lookup and the get, the stream
ends short and ``prefill`` recomputes from there: the result is always correct. The cost check
learns the sidecar's reload bandwidth from its own loads (one path, ``"sidecar"``), and accepts
everything until it has measured one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
import torch

from kvtier.costmodel import CostDecision, CostModel
from kvtier.errors import InvalidRequest, KVTierError
from kvtier.index import Lease
from kvtier.loadstream import LoadStream

log = logging.getLogger(__name__)

PATH = "sidecar"


class SidecarCache(Protocol):
    """What the sidecar loader needs from a client."""

    def acquire(self, namespace: str, token_ids: Sequence[int] | np.ndarray) -> Lease: ...

    def get(self, namespace: str, token_ids: Sequence[int] | np.ndarray) -> tuple[Any, int]: ...


class SidecarLoader:
    """``Loader``'s ``plan``/``load``/``cost``, for a cache behind a sidecar."""

    def __init__(self, client: SidecarCache, cost: CostModel | None = None) -> None:
        self.client = client
        self.cost = cost or CostModel(io_parallelism=1)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kvtier-sidecar-load")

    def plan(self, lease: Lease, *, probe: bool = True) -> CostDecision:
        """How many leading blocks of ``lease`` are worth loading (see ``Loader.plan``)."""
        ns = lease.namespace
        if ns is None or not lease.blocks:
            return CostDecision("declined", 0, 0, ns.block_tokens if ns else 0, 0.0, 0.0)
        return self.cost.decide([(PATH, b.nbytes) for b in lease.blocks], ns.block_tokens,
                                reads_per_block=0)

    def load(self, lease: Lease, dest: Sequence[Sequence[torch.Tensor]], *,
             blocks: int | None = None) -> LoadStream:
        """Start loading the first ``blocks`` (default all) blocks of ``lease`` into ``dest``."""
        ns = lease.namespace
        n = len(lease.blocks) if blocks is None else blocks
        if ns is None or ns.layout is None or lease.token_ids is None:
            raise InvalidRequest("a sidecar load needs a lease from the client's acquire()")
        if not 0 <= n <= len(lease.blocks):
            raise InvalidRequest(f"blocks must be in 0..{len(lease.blocks)}, got {n}")
        stream = LoadStream(ns.layout.num_layers, n, ns.block_tokens)
        self._pool.submit(self._run, lease, dest, n, stream)
        return stream

    def _run(self, lease: Lease, dest: Sequence[Sequence[torch.Tensor]], n: int, stream: LoadStream) -> None:
        ns = lease.namespace
        assert ns is not None and ns.layout is not None and lease.token_ids is not None  # load checked
        tokens = n * ns.block_tokens
        start = time.perf_counter()
        got, error = 0, None
        try:
            if tokens:
                kv, got = self.client.get(ns.name, lease.token_ids[:tokens])
                got = min(got, tokens)
                for layer_out, layer in zip(dest, kv or [], strict=False):
                    for out, t in zip(layer_out, layer, strict=True):
                        out[:got].copy_(t[:got])
        except (KVTierError, OSError) as e:
            got, error = 0, f"sidecar get failed: {e}"
            log.warning("%s", error)
        if got:
            self.cost.observe_path(PATH, got * ns.layout.bytes_per_token, time.perf_counter() - start, 1)
        stream.complete(got, error)

    def flush(self, timeout: float | None = None) -> None:
        """Promotions happen in the sidecar: nothing to wait for here."""

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def sidecar_lease(namespace: Any, hit: Any, token_ids: np.ndarray) -> Lease:
    """A sidecar lease from a lookup: the blocks found (sizes from the layout), no pins."""
    from kvtier.index import LeasedBlock

    size = namespace.layout.bytes_per_token * namespace.block_tokens if namespace.layout else 0
    blocks = [LeasedBlock(b.index, b.key, size, [PATH]) for b in hit.blocks]
    return Lease(namespace, blocks, len(token_ids), token_ids=token_ids)
