"""kvtier as a secondary tier of vLLM's ``TieringOffloadingSpec`` (vLLM >= 0.33).

vLLM's CPU tier sits in front of a list of secondary tiers; pages move GPU -> CPU (vLLM's
worker) -> secondary (this tier) and back. Configure it like vLLM's own ``fs`` tier::

    --kv-transfer-config '{"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
      "kv_connector_extra_config": {"spec_name": "TieringOffloadingSpec",
        "cpu_bytes_to_use": 8589934592,
        "secondary_tiers": [{"type": "KVTierSecondaryTier",
                             "module_path": "kvtier.integrations.vllm",
                             "data_dir": "/mnt/nvme/kvtier", "capacity": "500GiB"}]}}'

Embedded (the default): a ``TieredCache`` with the SSD tier under ``data_dir`` lives in the
scheduler process (one process per data dir: it is locked). Against a running ``kvtier serve``:
give ``"url"`` (and ``"token"``) instead; several engines can then share one cache.

What it adds over ``fs``: a capacity bound with LRU eviction, checksummed pages (a corrupt one
is a miss, never served), durable index and warm restarts, TTL, per-namespace metrics, and the
namespace fingerprint: pages of another model, KV dtype, block size, parallel layout or
``salt`` are never served (vLLM also folds a request's ``cache_salt`` into its block hashes).

Every method runs in the scheduler under vLLM's manager lock and returns at once: lookups are
batched per request and step on a background thread (``AsyncLookupManager``: RETRY while in
flight), stores and loads run on a small thread pool and report through
``get_finished_jobs`` with their bytes and time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from vllm.v1.kv_offload.base import (
    LookupResult,
    Medium,
    OffloadKey,
    ReqContext,
    RequestOffloadingContext,
    ScheduleEndContext,
)
from vllm.v1.kv_offload.tiering.async_lookup import AsyncLookupManager
from vllm.v1.kv_offload.tiering.base import JobId, JobResult, SecondaryTierManager, TransferJob

from kvtier.blocks import bytes_tensor
from kvtier.config import CacheConfig, HostTierConfig, SSDTierConfig
from kvtier.errors import InvalidRequest, KVTierError
from kvtier.integrations.backend import BackendUnavailable, EngineBackend

if TYPE_CHECKING:
    from vllm.v1.kv_offload.base import OffloadingSpec
    from vllm.v1.kv_offload.tiering.backpressure import BackpressureDetector

log = logging.getLogger(__name__)


def vllm_fingerprint(spec: OffloadingSpec, page_bytes: int, salt: str = "") -> dict[str, Any]:
    """What makes a vLLM page interchangeable: model, KV dtype, tokens per hash and per chunk,
    KV cache groups, parallel layout and rank, the cache layout, the page size and a salt."""
    c = spec.config
    p = c.parallel
    return {
        "engine": "vllm", "model": c.model.name, "kv_dtype": str(c.model.dtype),
        "tokens_per_hash": c.cache.tokens_per_hash, "blocks_per_chunk": c.cache.blocks_per_chunk,
        "groups": [{"tokens_per_block": g.tokens_per_block, "layers": list(g.layer_names)}
                   for g in c.groups],
        "tp": p.tp_size, "pp": p.pp_size, "pcp": p.pcp_size, "dcp": p.dcp_size, "rank": p.rank,
        "world": p.world_size, "kv_cache_layout": c.kv_cache_layout,
        "canonical_layout": c.canonical_layout, "replicated_layout": c.replicated_layout,
        "page_bytes": page_bytes, "salt": salt,
    }


def _open_backend(*, data_dir: str | None, url: str | None, token: str | None, capacity: Any,
                  durability: Any, batch_interval_ms: int, io_threads: int, direct_io: bool,
                  min_free: Any, timeout_s: float) -> Any:
    """A ``TieredCache`` over ``data_dir``, or a client of the sidecar at ``url``: both offer the
    block methods with the same signatures. Sizes and durability as the user wrote them
    (``"64GiB"``): ``SSDTierConfig`` checks them."""
    if (data_dir is None) == (url is None):
        raise InvalidRequest("the kvtier vLLM tier needs exactly one of 'data_dir' (embedded) or "
                             "'url' (a running kvtier serve)")
    if url is not None:
        from kvtier.client import KVTierClient

        return KVTierClient(url, token, timeout=timeout_s)
    from kvtier.manager import TieredCache

    return TieredCache(CacheConfig(
        host=HostTierConfig(capacity_bytes=0),  # vLLM's CPU tier is the host tier
        ssd=SSDTierConfig(path=data_dir, capacity_bytes=capacity, durability=durability,
                          batch_interval_ms=batch_interval_ms, io_threads=io_threads,
                          direct_io=direct_io, min_free_bytes=min_free)))


class _Lookups(AsyncLookupManager):
    """One ``block_exists`` per request and step, on vLLM's lookup thread."""

    def __init__(self, tier: KVTierSecondaryTier, tier_type: str) -> None:
        super().__init__(tier_type=tier_type)
        self._tier = tier

    def batch_lookup(self, keys: list[OffloadKey], req_context: ReqContext) -> Iterable[bool]:
        try:
            return self._tier.calls.block_exists(list(keys)).present
        except BackendUnavailable:  # a sidecar that did not answer lately: misses, at once
            return [False] * len(keys)


class KVTierSecondaryTier(SecondaryTierManager):
    """A vLLM secondary tier backed by kvtier (embedded or a sidecar); see the module docstring.

    Config keys (besides vLLM's ``type``/``module_path``): ``data_dir`` or ``url`` (+ ``token``),
    ``capacity`` (embedded; default 64GiB), ``namespace`` (default: derived from the
    fingerprint), ``salt``, ``codec`` (``none`` or ``zstd``), ``durability`` (``none``, the
    default: an engine cache of recomputable KV, like every engine tier, and every read is
    verified, so a machine crash loses recent pages but never serves a wrong one; ``batch``;
    ``sync``), ``batch_interval_ms`` (``batch``: the commit window), ``io_threads``, ``direct_io``, ``min_free``, ``n_threads`` (concurrent jobs),
    ``ttl_s``, ``timeout_s`` (a sidecar call; default 10: after one times out, calls fail at
    once for a back-off, ``kvtier.integrations.backend``).
    """

    medium: ClassVar[Medium] = Medium.STORAGE

    def __init__(
        self,
        offloading_spec: OffloadingSpec,
        primary_kv_view: memoryview,
        tier_type: str,
        data_dir: str | None = None,
        url: str | None = None,
        token: str | None = None,
        capacity: str | int = "64GiB",
        namespace: str | None = None,
        salt: str = "",
        codec: str = "none",
        durability: str = "none",
        batch_interval_ms: int = 20,
        io_threads: int = 8,
        direct_io: bool = True,
        min_free: str | int = "1GiB",
        n_threads: int = 4,
        ttl_s: float | None = None,
        timeout_s: float = 10.0,
        locality: str | None = None,
        backpressure_detector: BackpressureDetector | None = None,
    ) -> None:
        super().__init__(offloading_spec, primary_kv_view, tier_type, backpressure_detector)
        if locality is not None:
            from vllm.v1.kv_offload.base import Locality

            self.locality = Locality(locality)
        page = self.block_size_bytes
        flat = primary_kv_view.cast("B") if primary_kv_view.ndim != 1 or primary_kv_view.format != "B" \
            else primary_kv_view
        self._rows: torch.Tensor | None = bytes_tensor(flat).view(-1, page)  # row c: chunk c, no copy
        fingerprint = vllm_fingerprint(offloading_spec, page, salt)
        digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
        self.namespace = namespace or f"vllm-{digest}"
        self.backend = _open_backend(data_dir=data_dir, url=url, token=token, capacity=capacity,
                                     durability=durability, batch_interval_ms=batch_interval_ms,
                                     io_threads=io_threads,
                                     direct_io=direct_io, min_free=min_free, timeout_s=timeout_s)
        self.calls = EngineBackend(self.backend)
        try:
            self.calls.register(self.namespace, page_bytes=page, fingerprint=fingerprint,
                                codec=codec, ttl_s=ttl_s)
        except Exception:
            self.backend.close()
            raise
        self._pool = ThreadPoolExecutor(max(1, n_threads), thread_name_prefix="kvtier-vllm")
        self._finished: deque[JobResult] = deque()
        self._load_keys: dict[JobId, list[OffloadKey]] = {}
        self._inflight = 0
        self._idle = threading.Condition()
        self._lookups = _Lookups(self, tier_type)
        log.info("kvtier vLLM tier: namespace %s, %d-byte pages, %s", self.namespace, page,
                 f"sidecar {url}" if url else f"data dir {data_dir}")

    # ---- vLLM's SecondaryTierManager -----------------------------------------------------
    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext:
        return RequestOffloadingContext()

    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        found = self._lookups.lookup(key, req_context)
        if found is None:
            return LookupResult.RETRY
        return LookupResult.HIT if found else LookupResult.MISS

    def on_schedule_end(self, context: ScheduleEndContext) -> None:
        self._lookups.flush()

    def on_request_finished(self, req_context: ReqContext) -> None:
        self._lookups.cleanup(req_context.req_id)

    def submit_store(self, job_metadata: TransferJob) -> None:
        keys = list(job_metadata.keys)
        rows = self._chunk_rows(job_metadata.chunk_ids)
        self._submit(job_metadata.job_id, self._store, keys, rows)

    def submit_load(self, job_metadata: TransferJob) -> None:
        keys = list(job_metadata.keys)
        self._load_keys[job_metadata.job_id] = keys
        rows = self._chunk_rows(job_metadata.chunk_ids)
        self._submit(job_metadata.job_id, self._load, keys, rows)

    def get_finished_jobs(self) -> Iterable[JobResult]:
        out = []
        while self._finished:
            r = self._finished.popleft()
            keys = self._load_keys.pop(r.job_id, None)
            if keys is not None and not r.success:  # a failed load: stop offering what failed
                done = set(r.successful_keys or ())
                self._lookups.mark_miss([k for k in keys if k not in done])
            out.append(r)
        return out

    def has_pending_work(self) -> bool:
        return self._inflight > 0

    def drain_jobs(self) -> None:
        with self._idle:
            self._idle.wait_for(lambda: self._inflight == 0)

    def shutdown(self) -> None:
        self._lookups.shutdown()
        self._pool.shutdown(wait=True)
        self.backend.close()
        self._rows = None  # our view must go before vLLM unmaps the CPU tier

    # ---- the work, on the pool ---------------------------------------------------------------
    def _chunk_rows(self, chunk_ids: Iterable[int]) -> list[torch.Tensor]:
        """Views of the CPU tier's rows of ``chunk_ids``."""
        if self._rows is None:
            raise KVTierError("the kvtier vLLM tier is shut down")
        return [self._rows[int(c)] for c in chunk_ids]

    def _submit(self, job_id: JobId, fn: Any, keys: list[OffloadKey], rows: list[torch.Tensor]) -> None:
        with self._idle:
            self._inflight += 1
        self._pool.submit(self._run, job_id, fn, keys, rows)

    def _run(self, job_id: JobId, fn: Any, keys: list[OffloadKey], rows: list[torch.Tensor]) -> None:
        start = time.monotonic()
        try:
            done = fn(keys, rows)
            result = JobResult(job_id, done == len(keys),
                               successful_keys=tuple(keys[:done]) if done < len(keys) else None,
                               transfer_time=time.monotonic() - start,
                               transfer_bytes=done * self.block_size_bytes)
        except Exception as e:  # noqa: BLE001  a failed job is reported, never raised
            log.warning("kvtier vLLM tier: job %d failed: %s", job_id, e)
            result = JobResult(job_id, False, transfer_time=time.monotonic() - start,
                               transfer_bytes=0)
        self._finished.append(result)
        with self._idle:
            self._inflight -= 1
            self._idle.notify_all()

    def _store(self, keys: list[OffloadKey], rows: list[torch.Tensor]) -> int:
        self.calls.put_blocks(keys, rows)
        return len(keys)  # a page already stored counts as stored (first writer wins)

    def _load(self, keys: list[OffloadKey], rows: list[torch.Tensor]) -> int:
        return self.calls.get_blocks_into(keys, rows)
