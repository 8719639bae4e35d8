"""TieredCache: the public, in-process API — a thin facade over the cache's parts.

Each job lives in its own module; the facade wires them once and delegates:

- ``kvtier.catalog``: namespaces (the local registry plus records carried by a shared tier);
- ``kvtier.placement``: the block index and the cascade between tiers (place, demote, drop);
- ``kvtier.writethrough``: copies into the persistent tiers below, waited for when durable;
- ``kvtier.writes``: the put path; ``kvtier.lookups``: the prefix walk;
- ``kvtier.reload``: whole-block reloads and promotion; ``kvtier.loader``: streamed reloads;
- ``kvtier.prefetcher``; ``kvtier.engine_blocks``: engine pages by the engine's own keys;
- ``kvtier.recorder``: every counter and the ``stats()`` snapshot; ``kvtier.tiers.factory``.

Reads pin every block of a prefix so nothing is evicted or freed under a reader. One lock (the
placement's) guards the index, policies and counters; encoding, decoding and I/O run outside it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import torch

from kvtier.blocks import BlockHits
from kvtier.bufpool import MappedPool
from kvtier.catalog import NamespaceCatalog
from kvtier.config import CacheConfig
from kvtier.engine_blocks import EngineBlocks
from kvtier.index import Lease
from kvtier.keys import TokenIds, as_token_array, prefix_hashes
from kvtier.layout import KV, KVLayout
from kvtier.loader import Loader, LoaderConfig
from kvtier.lookups import Lookups
from kvtier.namespaces import Namespace, NamespaceRegistry, validate_name
from kvtier.placement import Placement
from kvtier.policies import make_policy
from kvtier.policies.admission import make_admission
from kvtier.prefetch import PrefetchBudget, PrefetchHandle
from kvtier.prefetcher import Prefetcher
from kvtier.recorder import LoadResult, StatsRecorder
from kvtier.records import Hit
from kvtier.reload import Reloads
from kvtier.shared_namespaces import SharedNamespaces
from kvtier.stats import CacheStats, TierStats
from kvtier.tiers.base import ReportsHealth, Tier
from kvtier.tiers.factory import build_tiers, policy_name
from kvtier.writes import Puts
from kvtier.writethrough import WriteThrough

log = logging.getLogger(__name__)

REAP_INTERVAL_S = 1.0  # how often put() sweeps expired blocks out

__all__ = ["TieredCache", "build_tiers"]

KVOut = list[tuple[torch.Tensor, ...]]


class TieredCache:
    """KV blocks keyed by prefix hashes across device -> host -> SSD (-> remote) tiers."""

    def __init__(self, config: CacheConfig | None = None, *, tiers: Sequence[Tier] | None = None) -> None:
        self.config = config or CacheConfig()
        self.tiers: list[Tier] = list(tiers) if tiers is not None else build_tiers(self.config)
        ssd = self.config.ssd
        admission = make_admission(ssd.admission, ssd.admission_min_hits)
        stats = CacheStats({t.name: TierStats(t.name) for t in self.tiers})
        p = self._placement = Placement(
            self.tiers, [make_policy(policy_name(self.config, t)) for t in self.tiers], stats, admission)
        self.namespaces_registry = NamespaceRegistry(Path(ssd.path) / "namespaces.json" if ssd.path else None)
        if self.namespaces_registry.errors:  # a damaged registry file (logged): /v1/stats counts it
            stats.extra["namespace_registry_errors"] = self.namespaces_registry.errors
        shared = SharedNamespaces(p.shared) if p.shared is not None else None
        self._catalog = NamespaceCatalog(self.namespaces_registry, shared,
                                         block_tokens=self.config.block_tokens, codec=self.config.codec)
        self._recorder = StatsRecorder(p)
        self._writes = WriteThrough(p, admit_on_put=admission.admit_on_put(),
                                    backlog_bytes=ssd.write_backlog_bytes, threads=min(4, ssd.io_threads))
        self._reloads = Reloads(p, promote_on_get=self.config.promote_on_get)
        self._lookups = Lookups(p, self._catalog, self._recorder, self.config.block_tokens)
        self._puts = Puts(self._catalog, p, self._writes, self._recorder)
        self._prefetcher = Prefetcher(self._lookups, self._reloads, self._recorder, self.config.prefetch_budget)
        self._engine = EngineBlocks(self._catalog, p, self._lookups, self._reloads, self._writes, self._recorder)
        self._loader: Loader | None = None  # get()'s reload path, started on first use
        self._get_buffers = MappedPool(self.config.reload_pool_bytes)  # get()'s KV, recycled
        self._closed = False
        self._next_reap = 0.0
        p.warm_start()

    # ---- namespaces -------------------------------------------------------------------------
    def register_namespace(self, name: str, *, model_id: str | None = None, layout: KVLayout | None = None,
                           block_tokens: int | None = None, codec: str | None = None,
                           ttl_s: float | None = None, tenant: str = "") -> Namespace:
        """Register (idempotently) a namespace; a conflicting re-registration raises InvalidRequest."""
        validate_name(name)
        return self._catalog.register(Namespace(
            name, model_id or name, block_tokens or self.config.block_tokens,
            codec or self.config.codec, layout, ttl_s, tenant))

    def get_namespace(self, name: str) -> Namespace:
        """The namespace ``name`` (found in the shared tier if another instance registered it);
        raises UnknownNamespace."""
        return self._catalog.get(name)

    def namespaces(self) -> list[Namespace]:
        return self._catalog.all()

    def drop_namespace(self, name: str) -> int:
        """Drop a namespace and every block it owns; returns the blocks dropped. A put racing
        with the drop fails with UnknownNamespace; the namespace is never re-created by it."""
        self._catalog.get(name)
        p = self._placement
        with p.lock:
            dropped = p.drop_namespace(name)
            self._catalog.remove(name)
            self._recorder.forget_namespace(name)
        p.flush_remote_deletes()
        self._writes.wait_dropped(name)
        self._catalog.unpublish(name)
        return dropped

    # ---- writes -----------------------------------------------------------------------------
    def put(self, namespace: str, token_ids: TokenIds, kv: KV, *, create: bool = True) -> int:
        """Store every full block of ``token_ids`` not already stored; returns the tokens stored.

        An unknown namespace is registered from ``kv``'s layout (``create=False``: raise
        ``UnknownNamespace`` instead, as the sidecar does for tenant-scoped names). With a
        durable tier below the one a block lands in (SSD with durability ``sync``/``batch`` and
        write-through admission) the put returns only once that tier holds every block of the
        prefix, and raises ``StorageFull``/``KVTierError`` if it could not take one. A namespace
        dropped while the put runs makes it raise ``UnknownNamespace``; it is never re-created.
        """
        stored = self._puts.put(namespace, token_ids, kv, create=create)
        self._maybe_reap()
        return stored

    def reap_expired(self) -> int:
        """Drop every block past its namespace's TTL from every tier; returns blocks dropped.

        Lookups never serve an expired block anyway; this returns their space. Runs from puts
        at most every ``REAP_INTERVAL_S``.
        """
        self._next_reap = time.monotonic() + REAP_INTERVAL_S
        ttls = self._catalog.ttls()
        if not ttls:
            return 0
        with self._placement.lock:
            return self._placement.drop_expired(ttls)

    def _maybe_reap(self) -> None:
        if time.monotonic() >= self._next_reap:
            self.reap_expired()

    def flush(self, timeout: float | None = None) -> None:
        """Wait until background writes to persistent tiers are done."""
        self._writes.flush(timeout)

    def evict(self, namespace: str, token_ids: TokenIds) -> int:
        """Remove a prefix's blocks (and anything cached beyond them); returns blocks removed."""
        ns = self._catalog.get(namespace)
        if ns.layout is None:
            return 0
        keys = prefix_hashes(ns.digest, as_token_array(token_ids), ns.block_tokens)
        p = self._placement
        with p.lock:
            dropped = sum(p.drop(k, "evicted") for k in keys if k in p.index)
        p.flush_remote_deletes()
        return dropped

    # ---- reads ------------------------------------------------------------------------------
    def lookup(self, namespace: str, token_ids: TokenIds) -> Hit:
        """The longest cached prefix of ``token_ids`` and where each block lives."""
        return self._lookups.lookup(namespace, token_ids)

    def acquire(self, namespace: str, token_ids: TokenIds) -> Lease:
        """Pin the longest cached prefix for a reader; pair with ``release(lease)``.

        While leased, no block of the prefix is evicted or freed. Used by the loader.
        """
        return self._lookups.lease(namespace, token_ids)

    def release(self, lease: Lease) -> None:
        """Unpin a lease's blocks (idempotent)."""
        entries, lease._entries = lease._entries, []
        self._placement.release(entries)

    def get(self, namespace: str, token_ids: TokenIds, *,
            device: str | torch.device = "cpu") -> tuple[KVOut | None, int]:
        """KV of the longest cached prefix (layers of tensors ``[n_tokens, ...]``) and ``n_tokens``.

        Host KV of 64 MiB or more is memory an earlier ``get`` returned and its caller dropped,
        where there is some (``CacheConfig.reload_pool_bytes``)."""
        lease = self.acquire(namespace, token_ids)
        try:
            if not lease.blocks:
                return None, 0
            ns = lease.namespace
            assert ns is not None and ns.layout is not None  # blocks were stored under both
            out = ns.layout.empty(lease.tokens, device, pool=self._get_buffers)
            n = self._load(lease, out)
            if n == 0:
                return None, 0
            return [tuple(t[:n] for t in layer) for layer in out], n
        finally:
            self.release(lease)

    def get_into(self, namespace: str, token_ids: TokenIds, dest: KV) -> int:
        """Reload the longest cached prefix into ``dest`` (KV in the namespace's layout, each
        tensor at least as long as the hit, e.g. ``layout.empty(len(token_ids))``); returns the
        tokens written. Nothing is allocated for the KV itself."""
        lease = self.acquire(namespace, token_ids)
        try:
            if not lease.blocks:
                return 0
            return self._load(lease, dest)
        finally:
            self.release(lease)

    def _load(self, lease: Lease, dest: KV) -> int:
        """Stream a leased prefix into ``dest`` through the loader (both paths, verified)."""
        if self._loader is None:
            self._loader = Loader(self, LoaderConfig())
        return self._loader.load(lease, dest, layerwise=False).wait_all()

    def tier(self, name: str) -> Tier:
        """The tier called ``name`` (``device``, ``host``, ``ssd``, ``remote``)."""
        return self.tiers[self._placement.tier_index(name)]

    # ---- the loader's source (``kvtier.loader.LoadSource``) ----------------------------------
    @property
    def promote_on_get(self) -> bool:
        return self.config.promote_on_get

    def load_block(self, key: bytes, outs: Sequence[Sequence[torch.Tensor]], codec: str | None = None) -> bool:
        """Decode one pinned block from its fastest good copy into ``outs`` (``codec`` is
        ignored: a block's codec is recorded with it); False if no copy is left."""
        return self._reloads.load_block(key, outs)

    def promote_loaded(self, key: bytes, data: torch.Tensor, codec: str | None = None, *,
                       keep: Collection[bytes] = (), created: float = 0.0) -> bool:
        """Keep a block a loader read (verified) from a slower tier in the fastest one."""
        return self._reloads.promote_loaded(key, data, keep=keep, created=created)

    def finish_load(self, result: LoadResult) -> None:
        """Count what a load (or a cost decision) did."""
        self._recorder.load_finished(result)

    # ---- prefetch ---------------------------------------------------------------------------
    def prefetch(self, namespace: str, token_ids: TokenIds, to: str = "host", *,
                 policy: str = "best_effort", timeout_s: float | None = None) -> PrefetchHandle:
        """Promote a prefix toward tier ``to`` in the background (see ``kvtier.prefetch``).

        ``best_effort`` returns at once; ``wait_complete`` when done; ``timeout`` when done or
        after ``timeout_s`` (default: grows with the prefix length, capped), stopping the
        prefetch with the contiguous tokens that arrived reported in ``ready_tokens``.
        """
        return self._prefetcher.start(namespace, token_ids, to, policy=policy, timeout_s=timeout_s)

    def prefetch_status(self, prefetch_id: str) -> PrefetchHandle:
        return self._prefetcher.status(prefetch_id)

    def prefetch_budget(self, to: str = "host") -> PrefetchBudget:
        """The budget of prefetched bytes held in tier ``to`` (stale holdings pruned first)."""
        return self._prefetcher.budget(to)

    # ---- engine pages by the engine's own keys (``kvtier.blocks``) ---------------------------
    def register_block_namespace(self, name: str, *, page_bytes: int, fingerprint: dict | str,
                                 codec: str = "none", ttl_s: float | None = None,
                                 tenant: str = "") -> Namespace:
        """Register (idempotently) a namespace of engine pages of ``page_bytes`` each.

        ``fingerprint`` describes the engine configuration (model, KV dtype, tokens per block,
        TP/PP rank, cache layout, tenant salt) and is part of every key. The same name with
        another fingerprint, page size, codec or TTL raises ``FingerprintMismatch``; lossy codecs
        raise ``InvalidRequest``.
        """
        return self._engine.register(name, page_bytes=page_bytes, fingerprint=fingerprint,
                                     codec=codec, ttl_s=ttl_s, tenant=tenant)

    def block_exists(self, namespace: str, keys: Sequence[bytes]) -> BlockHits:
        """Which engine ``keys`` are stored (``leading``: the run present from key 0); counted
        as one lookup of ``len(keys)`` pages."""
        return self._engine.exists(namespace, keys)

    def put_blocks(self, namespace: str, keys: Sequence[bytes], pages: Any) -> int:
        """Store engine pages (a 2-D uint8 ``[n, page_bytes]`` tensor or ``n`` rows of exactly
        ``page_bytes``); returns the blocks newly stored. A key already stored keeps its first
        page. Bad keys or page sizes raise before anything is stored; durable like ``put``."""
        stored = self._engine.put(namespace, keys, pages)
        self._maybe_reap()
        return stored

    def get_blocks_into(self, namespace: str, keys: Sequence[bytes], out: Any) -> int:
        """Read the leading run of stored ``keys`` into the rows of ``out`` (a 2-D uint8
        ``[>= n, page_bytes]`` tensor or writable rows), verified; returns the rows filled. A
        page read straight into its row that fails its checksum leaves the row zeroed; rows past
        the count are never a failed page's bytes."""
        return self._engine.get_into(namespace, keys, out)

    def evict_blocks(self, namespace: str, keys: Sequence[bytes]) -> int:
        """Remove engine blocks from every tier (a shared remote one included)."""
        return self._engine.evict(namespace, keys)

    # ---- stats, health, lifecycle -----------------------------------------------------------
    def stats(self) -> CacheStats:
        """A consistent snapshot of every counter, with tier fill and block ages."""
        return self._recorder.snapshot()

    def health(self) -> list[str]:
        """What degrades the cache now (``"<tier>: <problem>"``); empty when every tier is well.

        A degraded cache still serves what it can (reads from a full disk, local tiers while a
        remote engine is down); ``/readyz`` reports these in its body.
        """
        return [f"{tier.name}: {problem}" for tier in self.tiers
                if isinstance(tier, ReportsHealth) for problem in tier.health()]

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Finish background writes and close every tier. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._reloads.closed = True
        self._prefetcher.close()
        if self._loader is not None:
            self._loader.close()
        self._writes.close()
        self._get_buffers.clear()
        for tier in self.tiers:
            tier.close()

    def __enter__(self) -> TieredCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

