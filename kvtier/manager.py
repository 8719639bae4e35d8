"""TieredCache: the public, in-process API and the cascade across tiers.

Blocks enter the fastest tier; a full tier demotes victims (chosen by its eviction policy) one
tier down; a block leaving its last tier is dropped together with its descendants, children
before parents (a child is useless without its parent). Persistent tiers below memory receive
blocks as their admission policy says (write-through in the background, on eviction, or after N
hits). Reads pin every block of the prefix so nothing is evicted or freed under a reader.

Locking: one re-entrant lock guards the index, policies and counters. Encoding, decoding and
reads from pinned blocks happen outside it; background writes to persistent tiers take it only
to make room and to publish.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Container, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from kvtier.block import decode_block_into, encode_block_pooled
from kvtier.blocks import (
    BlockHits,
    canonical_fingerprint,
    engine_keys,
    page_rows,
    pages_codec,
    pages_layout,
)
from kvtier.codecs import get_codec
from kvtier.config import CacheConfig
from kvtier.errors import CorruptBlock, InvalidRequest, KVTierError, StorageFull, UnknownNamespace
from kvtier.index import BlockEntry, Lease, LeasedBlock, PinnedKeys, rebuild_index
from kvtier.keys import as_token_array, block_key, prefix_hashes
from kvtier.layout import KV, KVLayout
from kvtier.namespaces import Namespace, NamespaceRegistry, validate_name
from kvtier.policies import make_policy
from kvtier.policies.admission import make_admission
from kvtier.prefetch import TERMINAL, PrefetchBudget, PrefetchHandle, PrefetchTimeout, check_policy
from kvtier.records import BlockLocation, Hit
from kvtier.shared_namespaces import SharedNamespaces
from kvtier.stats import CacheStats, NamespaceStats, TierStats
from kvtier.tiers.base import DiskBound, ReportsHealth, Tier

log = logging.getLogger(__name__)

MAX_PREFETCH_HANDLES = 10_000  # finished handles kept for status queries
REAP_INTERVAL_S = 1.0  # how often put() sweeps expired blocks out


def build_tiers(config: CacheConfig) -> list[Tier]:
    """The tiers a config asks for, fastest first."""
    from kvtier.tiers.memory import make_device_tier, make_host_tier

    tiers: list[Tier] = []
    if config.device.capacity_bytes > 0:
        tiers.append(make_device_tier(config.device))
    if config.host.capacity_bytes > 0:
        tiers.append(make_host_tier(config.host))
    if config.ssd.path:
        from kvtier.tiers.ssd import SSDTier

        tiers.append(SSDTier(config.ssd, compact_interval_s=config.ssd.compaction_interval_s))
    if config.remote.backend:
        from kvtier.tiers.remote import make_remote_tier

        rc = config.remote
        remote = make_remote_tier(rc, breaker_failures=rc.breaker_failures,
                                  breaker_cooldown_s=rc.breaker_cooldown_s, prefix=rc.key_prefix)
        if remote is not None:
            tiers.append(remote)
    if not tiers:
        raise KVTierError("no tier is configured: give the host, device or SSD tier a capacity")
    return tiers


class TieredCache:
    """KV blocks keyed by prefix hashes across device -> host -> SSD (-> remote) tiers."""

    def __init__(self, config: CacheConfig | None = None, *, tiers: Sequence[Tier] | None = None) -> None:
        self.config = config or CacheConfig()
        self.tiers: list[Tier] = list(tiers) if tiers is not None else build_tiers(self.config)
        self._lock = threading.RLock()
        self._index: dict[bytes, BlockEntry] = {}
        self._protected = PinnedKeys(self._index)
        self._policies = [make_policy(self._tier_cfg(t).policy) for t in self.tiers]
        self._stats = CacheStats({t.name: TierStats(t.name) for t in self.tiers})
        self._admission = make_admission(self.config.ssd.admission, self.config.ssd.admission_min_hits)
        ssd_path = self.config.ssd.path
        self.namespaces_registry = NamespaceRegistry(Path(ssd_path) / "namespaces.json" if ssd_path else None)
        if self.namespaces_registry.errors:  # a damaged registry file (logged): /v1/stats counts it
            self._stats.extra["namespace_registry_errors"] = self.namespaces_registry.errors
        self._writer = ThreadPoolExecutor(max(1, min(4, self.config.ssd.io_threads)),
                                          thread_name_prefix="kvtier-writer")
        self._prefetcher = ThreadPoolExecutor(2, thread_name_prefix="kvtier-prefetch")
        self._pending_writes: set[Future] = set()
        self._writes: dict[tuple[bytes, int], Future] = {}  # write-throughs in flight, per tier
        self._placing: set[bytes] = set()  # engine blocks being written before they are indexed
        self._durable = [t for t, tier in enumerate(self.tiers) if tier.durable]
        self._backlog = threading.Condition()  # bytes of background writes queued
        self._backlog_bytes = 0
        self._backlog_limit = self.config.ssd.write_backlog_bytes
        self._prefetches: OrderedDict[str, PrefetchHandle] = OrderedDict()  # newest last, bounded
        self._prefetch_budgets: dict[int, PrefetchBudget] = {}  # tier index -> budget
        self._closed = False
        self._next_reap = 0.0
        self._remote = next((t for t in self.tiers if hasattr(t, "contains_many")), None)
        self._remote_idx = self.tiers.index(self._remote) if self._remote is not None else -1
        self._remote_deletes: list[bytes] = []
        self._shared = SharedNamespaces(self._remote) if self._remote is not None else None
        self._warm_start()

    # ---- namespaces -------------------------------------------------------------------
    def register_namespace(self, name: str, *, model_id: str | None = None, layout: KVLayout | None = None,
                           block_tokens: int | None = None, codec: str | None = None,
                           ttl_s: float | None = None, tenant: str = "") -> Namespace:
        """Register (idempotently) a namespace; a conflicting re-registration raises InvalidRequest."""
        validate_name(name)
        ns = Namespace(name, model_id or name, block_tokens or self.config.block_tokens,
                       codec or self.config.codec, layout, ttl_s, tenant)
        ns = self.namespaces_registry.register(ns)
        if self._shared is not None:
            self._shared.publish(ns)
        return ns

    def get_namespace(self, name: str) -> Namespace:
        """The namespace ``name`` (found in the shared tier if another instance registered it);
        raises UnknownNamespace."""
        ns = self._find_namespace(name)
        if ns is None:
            raise UnknownNamespace(f"unknown namespace {name!r}: register it first")
        return ns

    def _find_namespace(self, name: str) -> Namespace | None:
        """A registered namespace, else one another instance published to the shared tier
        (then registered here, so its blocks' keys can be computed)."""
        ns = self.namespaces_registry.find(validate_name(name))
        if ns is not None or self._shared is None:
            return ns
        found = self._shared.find(name)
        if found is None:
            return None
        try:
            return self.namespaces_registry.register(found)
        except InvalidRequest:  # registered here meanwhile, with other settings: ours wins
            return self.namespaces_registry.find(name)

    def namespaces(self) -> list[Namespace]:
        return self.namespaces_registry.all()

    def drop_namespace(self, name: str) -> int:
        """Drop a namespace and every block it owns; returns the blocks dropped."""
        self.get_namespace(name)
        with self._lock:
            roots = [e.key for e in self._index.values() if e.namespace == name and e.parent is None]
            dropped = sum(self._drop(k, "namespace_dropped") for k in roots)
            self.namespaces_registry.remove(name)
            self._stats.namespaces.pop(name, None)  # bounded label set: gone with its namespace
        self._flush_remote_deletes()
        if self._shared is not None:
            self._shared.forget(name)
        return dropped

    # ---- write path -------------------------------------------------------------------
    def put(self, namespace: str, token_ids: Sequence[int], kv: KV, *, create: bool = True) -> int:
        """Store every full block of ``token_ids`` not already stored; returns the tokens stored.

        An unknown namespace is registered from ``kv``'s layout (``create=False``: raise
        ``UnknownNamespace`` instead, as the sidecar does for tenant-scoped names). With a
        durable tier below the one a block lands in (SSD with durability ``sync``/``batch`` and
        write-through admission) the put returns only once that tier holds every block of the
        prefix, and raises ``StorageFull``/``KVTierError`` if it could not take one. A namespace
        dropped while the put runs makes it raise ``UnknownNamespace``; it is never re-created.
        """
        tokens = as_token_array(token_ids)
        ns = self._namespace_for_put(namespace, kv, create)
        ns.layout.validate(kv, len(tokens))
        if self._shared is not None:
            self._shared.publish(ns)
        bt = ns.block_tokens
        keys = prefix_hashes(ns.digest, tokens, bt)
        codec = get_codec(ns.codec)
        stored = 0
        new: set[bytes] = set()
        chain: list[BlockEntry] = []  # pinned as we go: eviction never takes this put's ancestors
        writes: list[tuple[BlockEntry, int, Future]] = []  # durable write-throughs to wait for
        try:
            for i, key in enumerate(keys):
                data = None
                with self._lock:
                    self._check_live(ns)
                    existing = self._index.get(key)
                    if existing is not None and not existing.doomed:
                        existing.pins += 1
                        chain.append(existing)
                        missing = self._durable_missing(existing)
                        if not missing:
                            continue
                if existing is not None and not existing.doomed:
                    # Stored, but not yet on a durable tier (an earlier write-through failed, or
                    # one is in flight): write it (or wait for that write) before acknowledging.
                    data = encode_block_pooled(codec, _block_slice(kv, i, bt))
                    writes += self._write_through_all(existing, data, ns.codec, missing)
                    continue
                data = encode_block_pooled(codec, _block_slice(kv, i, bt))
                parent = chain[-1].key if chain else None
                entry = BlockEntry(key, ns.name, parent, i, bt, len(data), time.time())
                with self._lock:
                    self._check_live(ns)
                    if parent is not None and chain[-1].doomed:
                        break  # the parent was dropped meanwhile: a child alone is useless
                    existing = self._index.get(key)
                    placed = None
                    if existing is None:
                        placed = self._place_new(entry, data, ns.codec)
                        if placed is None:
                            break
                        new.add(key)
                        stored += bt
                    entry = self._index[key]
                    entry.pins += 1
                    chain.append(entry)
                    missing = self._durable_missing(entry) if placed is None else ()
                if placed is not None:  # outside the lock: the backlog bound may wait
                    writes += self._schedule_write_through(entry, data, ns.codec, below=placed)
                elif missing:
                    writes += self._write_through_all(entry, data, ns.codec, missing)
            self._await_durable(ns, writes)
        finally:
            self._release(chain)
        with self._lock:
            for key in reversed(keys):  # parents end up more recent: leaves are evicted first
                e = self._index.get(key)
                for t in e.tiers if e else ():
                    if key in new:  # re-insert: reorders without counting an access
                        self._policies[t].remove(key)
                        self._policies[t].insert(key)
                    else:
                        self._policies[t].touch(key)
            self._stats.puts += 1
            self._stats.tokens_put += stored
            nst = self._ns_stats(ns.name)
            nst.puts += 1
            nst.tokens_put += stored
        if time.monotonic() >= self._next_reap:
            self.reap_expired()
        return stored

    def reap_expired(self) -> int:
        """Drop every block past its namespace's TTL from every tier; returns blocks dropped.

        Lookups never serve an expired block anyway; this returns their space. Runs from ``put``
        at most every ``REAP_INTERVAL_S``.
        """
        self._next_reap = time.monotonic() + REAP_INTERVAL_S
        now = time.time()
        ttls = {ns.name: ns.ttl_s for ns in self.namespaces_registry.all() if ns.ttl_s is not None}
        if not ttls:
            return 0
        with self._lock:
            expired = [e.key for e in self._index.values()
                       if e.namespace in ttls and now - e.created > ttls[e.namespace]]
            return sum(self._drop(k, "expired") for k in expired if k in self._index)

    def _namespace_for_put(self, name: str, kv: KV, create: bool) -> Namespace:
        """The namespace a put stores into, registered (from ``kv``'s layout) if it must be."""
        ns = self._find_namespace(name)
        if ns is None:
            if not create:
                raise UnknownNamespace(f"unknown namespace {name!r}: register it first")
            return self.namespaces_registry.register(
                Namespace(name, name, self.config.block_tokens, self.config.codec, KVLayout.from_kv(kv)))
        if ns.layout is None:
            return self.namespaces_registry.fix_layout(name, KVLayout.from_kv(kv))
        return ns

    def _check_live(self, ns: Namespace) -> None:
        """Raise if ``ns`` was dropped (or replaced) since the put began (lock held): a put never
        publishes into, or re-creates, a namespace that ``drop_namespace`` removed."""
        current = self.namespaces_registry.find(ns.name)
        if current is None or current.digest != ns.digest:
            raise UnknownNamespace(f"namespace {ns.name!r} was dropped while the put ran")

    def _place_new(self, entry: BlockEntry, data: torch.Tensor, codec: str) -> int | None:
        """Put a new block into the fastest tier that can ever hold it (lock held, parent
        pinned); the tier it landed in, or None; raises the last ``StorageFull`` if that is why
        no tier took it (a full disk). The caller schedules its write-through."""
        full: StorageFull | None = None
        for t, tier in enumerate(self.tiers):
            if not _fits_ever(tier, len(data)) or not self._make_room(t, len(data)):
                continue
            try:
                tier.put(entry.key, data, entry.meta(codec))
            except KVTierError as e:
                self._stats.tiers[tier.name].put_failures += 1
                log.warning("put to %s failed: %s", tier.name, e)
                full = e if isinstance(e, StorageFull) else full
                continue
            self._publish(entry, t, len(data))
            if entry.parent is not None:
                self._index[entry.parent].children.add(entry.key)  # pinned: still indexed
            return t
        if full is not None:
            raise full
        return None

    def _publish(self, entry: BlockEntry, t: int, nbytes: int) -> None:
        self._index[entry.key] = entry
        entry.tiers.add(t)
        self._policies[t].insert(entry.key)
        s = self._stats.tiers[self.tiers[t].name]
        s.blocks_written += 1
        s.bytes_written += nbytes

    def _make_room(self, t: int, nbytes: int, keep: Container[bytes] = ()) -> bool:
        """Demote victims of tier ``t`` until ``nbytes`` fit; False if pinned blocks (or ``keep``)
        prevent it.

        True without evicting anything when the tier is short of disk rather than of budget
        (``DiskBound``): evicting would return no disk space, only empty the tier, so the put
        is left to the tier, which refuses it with ``StorageFull`` (counted by the caller).
        """
        tier = self.tiers[t]
        if tier is self._remote:  # the shared engine evicts by itself; can_fit is its write bound
            return tier.can_fit(nbytes)
        protected = PinnedKeys(self._index, keep) if keep else self._protected
        while not tier.can_fit(nbytes):
            if _short_of_disk(tier, nbytes):
                return True
            victim = self._policies[t].evict(protected)
            if victim is None:
                return False
            self._demote(victim, t)
        return True

    def _demote(self, key: bytes, t: int) -> None:
        """Move a victim of tier ``t`` one tier down (or drop it if it leaves its last tier)."""
        entry = self._index[key]
        below = t + 1 if t + 1 < len(self.tiers) else None
        stats = self._stats.tiers[self.tiers[t].name]
        if below is not None and below not in entry.tiers and self._admission.admit_on_evict(entry.hits):
            self._copy_down(entry, t, below)
        self.tiers[t].delete(key)
        entry.tiers.discard(t)
        stats.evictions["capacity"] += 1
        if entry.tiers:
            stats.demotions += 1
        else:
            self._drop(key, "capacity")

    def _copy_down(self, entry: BlockEntry, src: int, dst: int) -> None:
        buf = torch.empty(entry.nbytes, dtype=torch.uint8)
        self.tiers[src].read_into(entry.key, buf)
        if not (_fits_ever(self.tiers[dst], entry.nbytes) and self._make_room(dst, entry.nbytes)):
            return
        try:
            self.tiers[dst].put(entry.key, buf, entry.meta(self._codec_of(entry)))
        except KVTierError as e:
            self._stats.tiers[self.tiers[dst].name].put_failures += 1
            log.warning("demotion to %s failed: %s", self.tiers[dst].name, e)
            return
        self._publish(entry, dst, entry.nbytes)

    def _schedule_write_through(self, entry: BlockEntry, data: torch.Tensor, codec: str,
                                below: int) -> list[tuple[BlockEntry, int, Future]]:
        """Write a new block to every persistent tier below ``below`` (local SSD, a shared
        remote); returns the writes to durable tiers, which the put waits for. Writes to other
        tiers run in the background, their bytes bounded by ``ssd.write_backlog_bytes``."""
        if not self._admission.admit_on_put():
            return []
        return self._write_through_all(
            entry, data, codec, [t for t in range(below + 1, len(self.tiers)) if self.tiers[t].persistent])

    def _durable_missing(self, entry: BlockEntry) -> list[int]:
        """Durable tiers that should hold ``entry`` by write-through but do not (lock held)."""
        if not self._admission.admit_on_put() or not entry.tiers:
            return []
        fastest = min(entry.tiers)
        return [t for t in self._durable if t > fastest and t not in entry.tiers]

    def _write_through_all(self, entry: BlockEntry, data: torch.Tensor, codec: str,
                           tiers: Sequence[int]) -> list[tuple[BlockEntry, int, Future]]:
        """Write ``entry`` into each of ``tiers`` (or join a write of it already in flight);
        returns the writes to durable tiers. Call without the lock: the backlog bound may wait."""
        waits = []
        for t in tiers:
            background = t not in self._durable
            if background:
                self._reserve_backlog(len(data))
            with self._lock:  # check and submit at once: one write per block and tier in flight
                fut = self._writes.get((entry.key, t))
                if fut is None:
                    fut = self._writer.submit(self._write_through, entry.key, data, codec, t)
                    self._writes[(entry.key, t)] = fut
                    self._pending_writes.add(fut)
                    fut.add_done_callback(
                        functools.partial(self._write_done, entry.key, t, len(data) if background else 0))
                elif background:
                    self._release_backlog(len(data))
            if not background:
                waits.append((entry, t, fut))
        return waits

    def _reserve_backlog(self, nbytes: int) -> None:
        with self._backlog:  # back-pressure: a put waits rather than letting memory grow
            while self._backlog_bytes and self._backlog_bytes + nbytes > self._backlog_limit:
                self._backlog.wait()
            self._backlog_bytes += nbytes

    def _release_backlog(self, nbytes: int) -> None:
        with self._backlog:
            self._backlog_bytes -= nbytes
            self._backlog.notify_all()

    def _write_done(self, key: bytes, t: int, backlog: int, fut: Future) -> None:
        with self._lock:
            self._pending_writes.discard(fut)
            if self._writes.get((key, t)) is fut:
                del self._writes[(key, t)]
        if backlog:
            self._release_backlog(backlog)

    def _write_through(self, key: bytes, data: torch.Tensor, codec: str, t: int) -> None:
        """Copy a block into tier ``t``; raises StorageFull/KVTierError if the tier cannot take
        it (counted; a put waiting on a durable tier reports it to its caller)."""
        tier = self.tiers[t]
        with self._lock:
            entry = self._index.get(key)
            if entry is None or entry.doomed or t in entry.tiers:
                return
            if not (_fits_ever(tier, len(data)) and self._make_room(t, len(data))):
                tier_stats = self._stats.tiers[tier.name]
                tier_stats.put_failures += 1
                raise StorageFull(f"{tier.name} tier has no room for a {len(data)}-byte block "
                                  f"({tier.used_bytes} of {tier.capacity_bytes} bytes used, the rest "
                                  "held by readers or unevictable)")
            meta = entry.meta(codec)
        try:
            tier.put(key, data, meta)  # disk I/O outside the lock
        except KVTierError as e:
            with self._lock:
                self._stats.tiers[tier.name].put_failures += 1
            # Counted (kvtier_put_failures_total); a full or frozen tier would flood the log.
            log.log(logging.DEBUG if isinstance(e, StorageFull) else logging.WARNING,
                    "write-through to %s failed: %s", tier.name, e)
            raise
        with self._lock:
            entry = self._index.get(key)
            if entry is None or entry.doomed:
                tier.delete(key)
            elif t not in entry.tiers:
                self._publish(entry, t, len(data))

    def _await_durable(self, ns: Namespace, writes: list[tuple[BlockEntry, int, Future]]) -> None:
        """Wait for a put's durable write-throughs; raise if a block did not reach its tier."""
        errors: list[BaseException] = []
        for entry, t, fut in writes:
            try:
                fut.result()
            except KVTierError as e:
                errors.append(e)
                continue
            with self._lock:
                if t not in entry.tiers and not entry.doomed:
                    errors.append(StorageFull(f"block {entry.index} did not reach the {self.tiers[t].name} tier"))
        with self._lock:
            self._check_live(ns)
        if errors:
            first = errors[0]
            raise type(first)(f"put not acknowledged: {len(errors)} of {len(writes)} blocks could not be "
                              f"made durable ({first})")

    def flush(self, timeout: float | None = None) -> None:
        """Wait until background writes to persistent tiers are done."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._pending_writes:
            fut = next(iter(list(self._pending_writes)), None)
            if fut is not None:
                fut.result(None if deadline is None else max(0.0, deadline - time.monotonic()))

    # ---- drops ------------------------------------------------------------------------
    def _drop(self, key: bytes, reason: str) -> int:
        """Drop a block and its descendants from every tier, children first (lock held)."""
        order: list[bytes] = []
        stack = [key]
        while stack:
            k = stack.pop()
            if k in self._index:
                order.append(k)
                stack.extend(self._index[k].children)
        explicit = reason in ("evicted", "namespace_dropped")
        for k in reversed(order):
            entry = self._index.pop(k)
            if explicit and self._remote is not None and self._remote_idx in entry.tiers:
                self._remote_deletes.append(k)
            if entry.parent is not None and entry.parent in self._index:
                self._index[entry.parent].children.discard(k)
            for t in entry.tiers:
                self._policies[t].remove(k)
                if k != key or reason != "capacity":
                    self._stats.tiers[self.tiers[t].name].evictions[reason if k == key else "orphaned"] += 1
            if entry.pins:
                entry.doomed = True
            else:
                self._free(entry)
            self._stats.blocks_dropped += 1
        return len(order)

    def _free(self, entry: BlockEntry) -> None:
        """Delete a dropped block's copies. A shared remote tier's copy is only forgotten: the
        fleet may still use it and the engine evicts by its own policy (explicit evictions delete
        it remotely, outside the lock: see ``_flush_remote_deletes``)."""
        for t in entry.tiers:
            if self.tiers[t] is not self._remote:
                self.tiers[t].delete(entry.key)
        entry.tiers.clear()

    def _flush_remote_deletes(self) -> None:
        with self._lock:
            keys, self._remote_deletes = self._remote_deletes, []
        for key in keys:  # network calls, each bounded by the remote tier's timeout
            self._remote.delete(key)

    def evict(self, namespace: str, token_ids: Sequence[int]) -> int:
        """Remove a prefix's blocks (and anything cached beyond them); returns blocks removed."""
        ns = self.get_namespace(namespace)
        if ns.layout is None:
            return 0
        keys = prefix_hashes(ns.digest, as_token_array(token_ids), ns.block_tokens)
        with self._lock:
            dropped = sum(self._drop(k, "evicted") for k in keys if k in self._index)
        self._flush_remote_deletes()
        return dropped

    # ---- read path --------------------------------------------------------------------
    def _acquire(self, namespace: str, token_ids: Sequence[int], *, pin: bool) -> tuple[Namespace | None, list[BlockEntry], int]:
        """Entries of the longest cached prefix (pinned if asked), with lookup accounting."""
        tokens = as_token_array(token_ids)
        ns = self._find_namespace(namespace)
        entries: list[BlockEntry] = []
        n_blocks = 0
        if ns is not None and ns.layout is not None:
            keys = prefix_hashes(ns.digest, tokens, ns.block_tokens)
            n_blocks = len(keys)
        with self._lock:
            if n_blocks:
                now = time.time()
                for key in keys:
                    e = self._index.get(key)
                    if e is None or e.doomed:
                        break
                    if ns.ttl_s is not None and now - e.created > ns.ttl_s:
                        self._drop(key, "expired")
                        break
                    entries.append(e)
                for e in reversed(entries):  # parents end up more recent than children
                    e.hits += 1
                    if pin:
                        e.pins += 1
                    for t in e.tiers:
                        self._policies[t].touch(e.key)
        if n_blocks and len(entries) < n_blocks and self._remote is not None:
            self._extend_from_remote(ns, keys, entries, pin)
        with self._lock:
            self._count_lookup(entries, n_blocks, len(tokens), ns)
        return ns, entries, len(tokens)

    def _extend_from_remote(self, ns: Namespace, keys: list[bytes], entries: list[BlockEntry], pin: bool) -> None:
        """Ask the shared remote tier, in one batched query, for the blocks past the local prefix."""
        start = len(entries)
        found = self._remote.contains_many(keys[start:])  # network call: outside the lock
        r = self._tier_index(self._remote.name)
        now = time.time()
        with self._lock:
            for i, present in enumerate(found, start):
                if not present:
                    break
                key = keys[i]
                parent = entries[-1] if entries else None
                if parent is not None and parent.doomed:
                    break
                e = self._index.get(key)
                if e is None:
                    e = BlockEntry(key, ns.name, parent.key if parent else None, i, ns.block_tokens, 0, now)
                    self._index[key] = e
                    e.tiers.add(r)
                    self._policies[r].insert(key)
                    if parent is not None:
                        parent.children.add(key)
                e.hits += 1
                if pin:
                    e.pins += 1
                entries.append(e)

    def _count_lookup(self, entries: list[BlockEntry], n_blocks: int, n_tokens: int, ns: Namespace | None) -> None:
        st = self._stats
        st.lookups += 1
        st.tokens_looked_up += n_tokens
        if entries:
            st.lookup_hits += 1
            st.tokens_hit += len(entries) * ns.block_tokens
        if ns is not None:
            nst = self._ns_stats(ns.name)
            nst.lookups += 1
            nst.tokens_looked_up += n_tokens
            if entries:
                nst.lookup_hits += 1
                nst.tokens_hit += len(entries) * ns.block_tokens
        for e in entries:
            if not e.tiers:  # dropped since the walk (an unpinned lookup races with eviction)
                continue
            fastest = min(e.tiers)
            for t in range(fastest):
                st.tiers[self.tiers[t].name].misses += 1
            ts = st.tiers[self.tiers[fastest].name]
            ts.hits += 1
            ts.hit_tokens += e.tokens
        for tier in self.tiers:
            st.tiers[tier.name].misses += n_blocks - len(entries)

    def _ns_stats(self, name: str) -> NamespaceStats:
        """The counters of namespace ``name`` (caller holds the lock)."""
        nst = self._stats.namespaces.get(name)
        if nst is None:
            nst = self._stats.namespaces[name] = NamespaceStats()
        return nst

    def _release(self, entries: list[BlockEntry]) -> None:
        with self._lock:
            for e in entries:
                e.pins -= 1
                if e.pins == 0 and e.doomed:
                    self._free(e)

    def acquire(self, namespace: str, token_ids: Sequence[int]) -> Lease:
        """Pin the longest cached prefix for a reader; pair with ``release(lease)``.

        While leased, no block of the prefix is evicted or freed. Used by the loader.
        """
        ns, entries, n = self._acquire(namespace, token_ids, pin=True)
        blocks = [LeasedBlock(e.index, e.key, e.nbytes, [self.tiers[t].name for t in sorted(e.tiers)])
                  for e in entries]
        return Lease(ns, blocks, n, entries)

    def release(self, lease: Lease) -> None:
        """Unpin a lease's blocks (idempotent)."""
        entries, lease._entries = lease._entries, []
        self._release(entries)

    def tier(self, name: str) -> Tier:
        """The tier called ``name`` (``device``, ``host``, ``ssd``, ``remote``)."""
        return self.tiers[self._tier_index(name)]

    def lookup(self, namespace: str, token_ids: Sequence[int]) -> Hit:
        """The longest cached prefix of ``token_ids`` and where each block lives."""
        ns, entries, n = self._acquire(namespace, token_ids, pin=False)
        bt = ns.block_tokens if ns else self.config.block_tokens
        blocks = [BlockLocation(e.index, e.key, self.tiers[min(e.tiers)].name) for e in entries if e.tiers]
        return Hit(namespace, len(blocks) * bt, bt, n, blocks)

    def get(self, namespace: str, token_ids: Sequence[int], *, device: str | torch.device = "cpu") -> tuple[list[tuple[torch.Tensor, ...]] | None, int]:
        """KV of the longest cached prefix (layers of tensors ``[n_tokens, ...]``) and ``n_tokens``."""
        ns, entries, _ = self._acquire(namespace, token_ids, pin=True)
        try:
            if not entries:
                return None, 0
            bt = ns.block_tokens
            out = ns.layout.empty(len(entries) * bt, device)
            loaded = 0
            for i, e in enumerate(entries):
                views = _block_slice(out, i, bt)
                if not self.load_block(e.key, views, ns.codec):
                    break
                loaded += 1
            if loaded == 0:
                return None, 0
            n = loaded * bt
            return [tuple(t[:n] for t in layer) for layer in out], n
        finally:
            self._release(entries)

    def load_block(self, key: bytes, outs: Sequence[Sequence[torch.Tensor]], codec: str) -> bool:
        """Decode one pinned block from its fastest tier into ``outs``; promote it if configured.

        A corrupt copy is dropped from its tier and the next tier is tried; False if none is left.
        """
        entry = self._index.get(key)
        while entry is not None and entry.tiers:
            t = min(entry.tiers)
            tier = self.tiers[t]
            start = time.perf_counter()
            try:
                if hasattr(tier, "view"):
                    data, copied = tier.view(key), False
                else:
                    if not entry.nbytes:  # learned from a remote existence query: size unknown yet
                        entry.nbytes = tier.size(key) or 0
                        if not entry.nbytes:
                            raise KeyError(key)
                    data, copied = torch.empty(entry.nbytes, dtype=torch.uint8), True
                    tier.read_into(key, data)  # whole block: the tier verified every byte
                # Verified once: a whole-block read_into checks the tier's own checksum (the Tier
                # contract) and memory tiers hold bytes verified on their way in, so a second crc
                # pass over the layers here would only cost reload time.
                decode_block_into(data, outs, verify=False)
            except (CorruptBlock, KeyError) as e:
                self._lose_copy(entry, t, e)
                continue
            elapsed = time.perf_counter() - start
            with self._lock:
                s = self._stats.tiers[tier.name]
                s.blocks_read += 1
                s.bytes_read += entry.nbytes
                s.reload_seconds.observe(elapsed)
            if t > 0 and self.config.promote_on_get:
                self._promote(entry, data if copied else None, codec)
            return True
        return False

    def promote_loaded(self, key: bytes, data: torch.Tensor, codec: str, *,
                       keep: Container[bytes] = ()) -> bool:
        """Promote a block whose verified bytes a loader just read from a slower tier.

        The loader calls this after the fact (the lease may be released): a block dropped or
        already promoted meanwhile is left alone, and making room never evicts a key in ``keep``
        (the rest of the prefix). True if the block lives in the fastest tier now.
        """
        entry = self._index.get(key)
        if self._closed or entry is None or not entry.tiers or entry.nbytes != data.numel():
            return False
        return min(entry.tiers) == 0 or self._promote(entry, data, codec, keep=keep)

    def _lose_copy(self, entry: BlockEntry, t: int, err: Exception) -> None:
        with self._lock:
            if isinstance(err, CorruptBlock):
                self._stats.tiers[self.tiers[t].name].corrupt_blocks += 1
                log.warning("corrupt block %s in %s: %s", entry.key.hex(), self.tiers[t].name, err)
            if self.tiers[t] is not self._remote:  # no network call under the lock
                self.tiers[t].delete(entry.key)
            self._policies[t].remove(entry.key)
            entry.tiers.discard(t)
            if not entry.tiers:
                self._drop(entry.key, "corrupt" if isinstance(err, CorruptBlock) else "lost")

    def _promote(self, entry: BlockEntry, data: torch.Tensor | None, codec: str, target: int = 0, *,
                 keep: Container[bytes] = ()) -> bool:
        """Copy a pinned block into tier ``target`` (a faster one); True if it lives there now."""
        if data is None:
            src = min(entry.tiers)
            data = torch.empty(entry.nbytes, dtype=torch.uint8)
            self.tiers[src].read_into(entry.key, data)
        with self._lock:
            if entry.doomed or target in entry.tiers:
                return target in entry.tiers
            tier = self.tiers[target]
            if not (_fits_ever(tier, entry.nbytes) and self._make_room(target, entry.nbytes, keep)):
                return False
            try:
                tier.put(entry.key, data, entry.meta(codec))
            except StorageFull as e:  # e.g. a disk short of space: a promotion is optional
                self._stats.tiers[tier.name].put_failures += 1
                log.debug("promotion to %s failed: %s", tier.name, e)
                return False
            self._publish(entry, target, entry.nbytes)
            self._stats.tiers[tier.name].promotions += 1
            return True

    # ---- prefetch ---------------------------------------------------------------------
    def prefetch(self, namespace: str, token_ids: Sequence[int], to: str = "host", *,
                 policy: str = "best_effort", timeout_s: float | None = None) -> PrefetchHandle:
        """Promote a prefix toward tier ``to`` in the background (see ``kvtier.prefetch``).

        ``best_effort`` returns at once; ``wait_complete`` when done; ``timeout`` when done or
        after ``timeout_s`` (default: grows with the prefix length, capped), stopping the
        prefetch with the contiguous tokens that arrived reported in ``ready_tokens``.
        """
        check_policy(policy)
        target = self._tier_index(to)
        tokens = as_token_array(token_ids)
        handle = PrefetchHandle(namespace, to, len(tokens), policy)
        with self._lock:
            self._prefetches[handle.id] = handle
            while len(self._prefetches) > MAX_PREFETCH_HANDLES:  # forget the oldest finished ones
                oldest = next(iter(self._prefetches.values()))
                if oldest.state not in TERMINAL:
                    break
                self._prefetches.popitem(last=False)
        self._prefetcher.submit(self._run_prefetch, handle, namespace, tokens, target)
        if policy == "wait_complete":
            handle.wait()
        elif policy == "timeout":
            wait_s = PrefetchTimeout().seconds(len(tokens)) if timeout_s is None else timeout_s
            if not handle.wait(wait_s):
                self._finish_prefetch(handle, "timeout", f"timed out after {wait_s:.3f} s")
        return handle

    def prefetch_status(self, prefetch_id: str) -> PrefetchHandle:
        return self._prefetches[prefetch_id]

    def prefetch_budget(self, to: str = "host") -> PrefetchBudget:
        """The budget of prefetched bytes held in tier ``to`` (stale holdings pruned first)."""
        t = self._tier_index(to)
        with self._lock:
            budget = self._prefetch_budgets.get(t)
            if budget is None:
                budget = self._prefetch_budgets[t] = PrefetchBudget(self.config.prefetch_budget)
            for key, (_, hits) in budget.held().items():
                e = self._index.get(key)
                if e is None or t not in e.tiers or e.hits > hits:  # gone, or a reader used it
                    budget.release(key)
        return budget

    def _run_prefetch(self, handle: PrefetchHandle, namespace: str, token_ids: Sequence[int], target: int) -> None:
        if not handle.start():
            return
        budget = self.prefetch_budget(self.tiers[target].name)
        ns, entries, _ = self._acquire(namespace, token_ids, pin=True)
        try:
            for e in entries:
                if handle.cancelled:
                    return self._finish_prefetch(handle, "cancelled")
                if target not in e.tiers:
                    if not budget.reserve(e.key, e.nbytes, self.tiers[target].capacity_bytes, e.hits):
                        handle.stopped_by = "budget"
                        break
                    if not self._promote(e, None, ns.codec, target):
                        budget.release(e.key)
                        break
                handle.advance(e.tokens)
            self._finish_prefetch(handle, "done")
        except Exception as e:  # noqa: BLE001  a failed prefetch is reported, never raised
            log.exception("prefetch %s failed", handle.id)
            self._finish_prefetch(handle, "failed", str(e))
        finally:
            self._release(entries)

    def _finish_prefetch(self, handle: PrefetchHandle, state: str, error: str | None = None) -> None:
        if handle.finish(state, error):
            with self._lock:
                self._stats.prefetch[state] += 1

    # ---- key-addressed blocks (engines) ----------------------------------------------------
    # Engine pages named by the engine's own keys (vLLM offloading tiers, SGLang HiCache), kept
    # as ordinary one-layer blocks of a block namespace (see kvtier.blocks). This section only
    # calls _place_new, _make_room, _publish, _schedule_write_through, load_block, _drop,
    # _release, _count_lookup, _ns_stats and _flush_remote_deletes.
    def register_block_namespace(self, name: str, *, page_bytes: int, fingerprint: dict | str,
                                 codec: str = "none", ttl_s: float | None = None,
                                 tenant: str = "") -> Namespace:
        """Register (idempotently) a namespace of engine pages of ``page_bytes`` each.

        ``fingerprint`` describes the engine configuration (model, KV dtype, tokens per block,
        TP/PP rank, cache layout, tenant salt) and is part of every key. The same name with
        another fingerprint, page size, codec or TTL raises ``FingerprintMismatch``; lossy codecs
        raise ``InvalidRequest``.
        """
        validate_name(name)
        fp = canonical_fingerprint(fingerprint)
        model = json.loads(fp).get("model") if fp.startswith("{") else None
        ns = Namespace(name, str(model or name), 1, pages_codec(codec), pages_layout(page_bytes),
                       ttl_s, tenant, "pages", fp)
        return self.namespaces_registry.register(ns)

    def block_exists(self, namespace: str, keys: Sequence[bytes]) -> BlockHits:
        """Which engine ``keys`` are stored (``leading``: the run present from key 0). Counted
        as one lookup of ``len(keys)`` pages in the namespace's metrics."""
        ns, ikeys = self._block_namespace_keys(namespace, keys)
        with self._lock:
            entries = [self._live_block(ns, k) for k in ikeys]
        if self._remote is not None and None in entries:
            self._blocks_from_remote(ns, ikeys, entries)
        present = [e is not None for e in entries]
        leading = present.index(False) if False in present else len(present)
        with self._lock:
            for e in entries[:leading]:
                e.hits += 1
                for t in e.tiers:
                    self._policies[t].touch(e.key)
            self._count_lookup(entries[:leading], len(ikeys), len(ikeys), ns)
        return BlockHits(leading, present)

    def put_blocks(self, namespace: str, keys: Sequence[bytes], pages: Any) -> int:
        """Store engine pages (``pages``: a 2-D uint8 ``[n, page_bytes]`` tensor or ``n`` rows of
        exactly ``page_bytes``); returns the blocks newly stored. A key already stored keeps its
        first page. Bad keys or page sizes raise before anything is stored."""
        ns, ikeys = self._block_namespace_keys(namespace, keys)
        rows = page_rows(pages, len(ikeys), ns.page_bytes)
        codec = get_codec(ns.codec)
        stored = 0
        writes: list[tuple[BlockEntry, int, Future]] = []
        for key, row in zip(ikeys, rows, strict=True):
            with self._lock:
                if self._live_block(ns, key) is not None:
                    continue
            data = encode_block_pooled(codec, [[row.view(1, -1)]])
            entry = BlockEntry(key, ns.name, None, 0, 1, len(data), time.time())
            placed = self._place_block(entry, data, ns.codec)
            if placed is None:
                break
            if placed >= 0:
                stored += 1
                writes += self._schedule_write_through(entry, data, ns.codec, below=placed)
        self._await_durable(ns, writes)
        with self._lock:
            self._stats.puts += 1
            self._stats.tokens_put += stored
            nst = self._ns_stats(ns.name)
            nst.puts += 1
            nst.tokens_put += stored
        if time.monotonic() >= self._next_reap:
            self.reap_expired()
        return stored

    def get_blocks_into(self, namespace: str, keys: Sequence[bytes], out: Any) -> int:
        """Read the leading run of stored ``keys`` into the rows of ``out`` (a 2-D uint8
        ``[>= n, page_bytes]`` tensor or writable rows); returns how many rows were filled.

        Every page is verified on its way (a corrupt copy is dropped and counts as a miss, so
        the run stops there); the blocks stay pinned while they are read.
        """
        ns, ikeys = self._block_namespace_keys(namespace, keys)
        rows = page_rows(out, len(ikeys), ns.page_bytes, writable=True)
        pinned: list[BlockEntry] = []
        with self._lock:
            for key in ikeys:
                e = self._live_block(ns, key)
                if e is None:
                    break
                e.pins += 1
                pinned.append(e)
        if self._remote is not None and len(pinned) < len(ikeys):
            found: list[BlockEntry | None] = [*pinned, *([None] * (len(ikeys) - len(pinned)))]
            self._blocks_from_remote(ns, ikeys, found, pin=True, start=len(pinned))
            for e in found[len(pinned):]:
                if e is None:
                    break
                pinned.append(e)
        loaded = 0
        try:
            for e, row in zip(pinned, rows, strict=False):  # rows may be more
                if not self.load_block(e.key, [[row.view(1, -1)]], ns.codec):
                    break
                loaded += 1
        finally:
            self._release(pinned)
        return loaded

    def evict_blocks(self, namespace: str, keys: Sequence[bytes]) -> int:
        """Remove engine blocks from every tier (a shared remote one included); returns how many
        were stored."""
        ns, ikeys = self._block_namespace_keys(namespace, keys)
        with self._lock:
            dropped = sum(self._drop(k, "evicted") for k in ikeys if k in self._index)
        self._flush_remote_deletes()
        return dropped

    def _place_block(self, entry: BlockEntry, data: torch.Tensor, codec: str) -> int | None:
        """Place a new engine block like ``_place_new``, but write a persistent tier's copy
        outside the lock (engines store many pages at once: disk writes must overlap). The tier
        it landed in, -1 if another writer placed it first, None if no tier can take it; the
        caller schedules its write-through."""
        with self._lock:
            if entry.key in self._index or entry.key in self._placing:
                return -1
            for t, tier in enumerate(self.tiers):
                if _fits_ever(tier, len(data)) and self._make_room(t, len(data)):
                    break
            else:
                return None
            if not tier.persistent:  # a memory copy: cheap enough under the lock
                return self._place_new(entry, data, codec)
            self._placing.add(entry.key)  # one writer per key while it is not indexed yet
        try:
            try:
                tier.put(entry.key, data, entry.meta(codec))  # not indexed yet: nothing evicts it
            except KVTierError:  # e.g. a concurrent writer took the room made above: the locked path
                with self._lock:
                    return -1 if entry.key in self._index else self._place_new(entry, data, codec)
            with self._lock:
                if entry.key in self._index:
                    return -1
                self._publish(entry, t, len(data))
                return t
        finally:
            with self._lock:
                self._placing.discard(entry.key)

    def _block_namespace_keys(self, namespace: str, keys: Sequence[bytes]) -> tuple[Namespace, list[bytes]]:
        ns = self.namespaces_registry.get(validate_name(namespace))
        if ns.kind != "pages":
            raise InvalidRequest(f"namespace {namespace!r} holds KV by token ids: register a block "
                                 "namespace (register_block_namespace) for engine pages")
        digest = ns.digest
        return ns, [block_key(digest, k) for k in engine_keys(keys)]

    def _live_block(self, ns: Namespace, key: bytes) -> BlockEntry | None:
        """The entry of a stored, unexpired block (lock held); an expired one is dropped."""
        e = self._index.get(key)
        if e is None or e.doomed or not e.tiers:
            return None
        if ns.ttl_s is not None and time.time() - e.created > ns.ttl_s:
            self._drop(key, "expired")
            return None
        return e

    def _blocks_from_remote(self, ns: Namespace, ikeys: list[bytes], entries: list, *,
                            pin: bool = False, start: int = 0) -> None:
        """Fill the ``None`` slots of ``entries`` (from ``start``) with blocks the shared remote
        tier holds, asked in one batched query outside the lock (sizes learned on first read)."""
        missing = [i for i in range(start, len(ikeys)) if entries[i] is None]
        found = self._remote.contains_many([ikeys[i] for i in missing])
        now = time.time()
        with self._lock:
            for i, present in zip(missing, found, strict=True):
                if not present:
                    if pin:
                        break
                    continue
                e = self._index.get(ikeys[i])
                if e is None:
                    e = BlockEntry(ikeys[i], ns.name, None, 0, 1, 0, now)
                    self._index[e.key] = e
                    e.tiers.add(self._remote_idx)
                    self._policies[self._remote_idx].insert(e.key)
                elif e.doomed:
                    if pin:
                        break
                    continue
                if pin:
                    e.pins += 1
                entries[i] = e

    # ---- stats, lifecycle -------------------------------------------------------------
    def stats(self) -> CacheStats:
        """A consistent snapshot of every counter, with tier fill and block ages."""
        now = time.time()
        with self._lock:
            snap = CacheStats({}, self._stats.lookups, self._stats.lookup_hits,
                              self._stats.tokens_looked_up, self._stats.tokens_hit,
                              self._stats.puts, self._stats.tokens_put, self._stats.blocks_dropped,
                              self._stats.prefetch.copy(), self._stats.cost_decisions.copy(),
                              dict(self._stats.extra),
                              {n: v.copy() for n, v in self._stats.namespaces.items()})
            for t, tier in enumerate(self.tiers):
                src = self._stats.tiers[tier.name]
                ts = TierStats(**{f: getattr(src, f) for f in TierStats.__slots__})
                ts.evictions = src.evictions.copy()
                ts.reload_seconds = src.reload_seconds.copy()
                ts.age_seconds = type(src.age_seconds)(src.age_seconds.buckets)
                ts.capacity_bytes, ts.used_bytes, ts.blocks = tier.capacity_bytes, tier.used_bytes, len(self._policies[t])
                snap.tiers[tier.name] = ts
            for e in self._index.values():
                for t in e.tiers:
                    snap.tiers[self.tiers[t].name].age_seconds.observe(now - e.created)
        for tier in self.tiers:
            extra = getattr(tier, "stats", None)
            if callable(extra):
                snap.tiers[tier.name].extra = extra()
        return snap

    def record_size(self, key: bytes, nbytes: int) -> None:
        """Remember the size a reader learned for a block a remote existence query found (its
        size is unknown until then), so later leases carry it and skip the size query."""
        with self._lock:
            entry = self._index.get(key)
            if entry is not None and not entry.nbytes:
                entry.nbytes = nbytes

    def record_reads(self, tier: str, blocks: int, nbytes: int, seconds: float) -> None:
        """Count reads done outside ``get`` (the loader's) in the tier's stats."""
        with self._lock:
            s = self._stats.tiers[tier]
            s.blocks_read += blocks
            s.bytes_read += nbytes
            if blocks:
                s.reload_seconds.observe(seconds / blocks)

    def record_cost_decision(self, verdict: str, detail: dict) -> None:
        """Count a reload-vs-recompute decision; ``detail`` shows in ``stats().extra``."""
        with self._lock:
            self._stats.cost_decisions[verdict] += 1
            self._stats.extra["cost_model"] = detail

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
        self._prefetcher.shutdown(wait=True, cancel_futures=True)
        self._writer.shutdown(wait=True)
        for tier in self.tiers:
            tier.close()

    def __enter__(self) -> TieredCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- helpers ----------------------------------------------------------------------
    def _tier_cfg(self, tier: Tier):
        return getattr(self.config, tier.name, self.config.host)

    def _tier_index(self, name: str) -> int:
        for i, t in enumerate(self.tiers):
            if t.name == name:
                return i
        raise InvalidRequest(f"unknown tier {name!r}: this cache has {[t.name for t in self.tiers]}")

    def _codec_of(self, entry: BlockEntry) -> str:
        ns = self.namespaces_registry.find(entry.namespace)
        return ns.codec if ns else self.config.codec

    def _warm_start(self) -> None:
        """Rebuild the index from persistent tiers (a warm restart)."""
        self._index.update(rebuild_index(self.tiers, self._policies))
        if self._index:
            log.info("warm start: %d blocks recovered", len(self._index))


def _short_of_disk(tier: Tier, nbytes: int) -> bool:
    """Whether ``tier`` would refuse ``nbytes`` for its disk, which evicting does not free."""
    return isinstance(tier, DiskBound) and tier.short_of_disk(nbytes)


def _fits_ever(tier: Tier, nbytes: int) -> bool:
    fits = getattr(tier, "fits_ever", None)
    return fits(nbytes) if fits else nbytes <= tier.capacity_bytes


def _block_slice(kv: KV, i: int, block_tokens: int) -> list[list[torch.Tensor]]:
    """Views of block ``i``'s tokens in every tensor of ``kv``."""
    return [[t[i * block_tokens:(i + 1) * block_tokens] for t in layer] for layer in kv]
