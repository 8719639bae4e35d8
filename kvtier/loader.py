"""The dual-path, layer-wise loader: stream a leased prefix into destination KV, layer by layer.

Path 1 copies blocks resident in a memory tier (host/device) straight from the tier's zero-copy
view into the destination. Path 2 reads blocks from slower tiers, many reads in flight on a
thread pool: from the SSD tier (``kvtier.loader_ranged``) contiguous ranges covering groups of
layers, O_DIRECT straight into the destination where the codec is ``none`` and its tensors are
whole pages, else into a bounded staging ring (pinned when CUDA is present) and decoded from
there, every layer's checksum verified; from a remote tier (``kvtier.loader_whole``) whole
blocks a batch per call. Both paths run at once, both in layer order, so layer ``i`` is ready
as soon as every block's layer ``i`` has landed — while later layers are still in flight. On a
GPU the copies run on a dedicated stream and each layer's readiness is a CUDA event the
consumer's stream waits on; on CPU it is a thread event.

Blocks path 2 reads whole and verified are promoted to the fastest tier in the background (when
the cache's ``promote_on_get`` is on), from the bytes already read: the next turn of a
conversation finds its prefix in host memory without a second SSD read.

A block that cannot be read or fails its checksum is retried whole through
``TieredCache.load_block`` (which drops the corrupt copy and tries slower tiers); if no copy is
left the prefix is truncated before it. Readers see a shorter, still-correct prefix, never
corrupt bytes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from kvtier.block import decode_layer_into, header_of, header_size, headers_like, parse_table
from kvtier.costmodel import MEMORY_TIERS, CostDecision, CostModel
from kvtier.errors import CorruptBlock, InvalidRequest, KVTierError
from kvtier.index import Lease, LeasedBlock
from kvtier.loader_job import Item, LoadJob, T, layer_groups
from kvtier.loader_promote import Assembly, Promoter
from kvtier.loader_ranged import RangedReads
from kvtier.loader_whole import WholeReads
from kvtier.loadstream import LoadStream, PrefixTruncated
from kvtier.prefixkv import PrefixKV
from kvtier.recorder import LoadResult
from kvtier.staging import StagingRing
from kvtier.tiers.base import MemoryTier, RegisteredBatchReads, Tier, kind_check

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LoaderConfig:
    """Knobs of the loader; the defaults suit a local NVMe/virtio disk."""

    io_threads: int = 8  # reads in flight on path 2
    staging_slots: int = 16  # staging ring size: bounds path 2's memory (slots x slot bytes)
    staging_slot_bytes: int = 2 * 1024**2  # grown automatically to the largest range read
    min_read_bytes: int = 1024**2  # layers are grouped until one read is at least this big
    pinned: bool | None = None  # staging in pinned memory; None: when CUDA is available


@runtime_checkable
class LoadSource(Protocol):
    """What the loader needs from a cache (``TieredCache`` is one).

    - ``tier(name)``: the tier a leased block names.
    - ``load_block(key, outs)``: the whole-block fallback for a block the loader could not
      stream: reads it verified from its fastest good copy into ``outs`` (dropping corrupt
      copies); False if no copy is left.
    - ``promote_loaded(key, data, keep=..., created=...)``: keep a block's verified bytes, read
      from a slower tier, in the fastest one (never evicting a key in ``keep``), if its entry is
      still the one leased (``created``: a namespace registered again reuses the keys).
    - ``promote_on_get``: whether blocks read from slower tiers are promoted.
    - ``finish_load(result)``: told once per load (and per cost decision) what it did.
    """

    @property
    def promote_on_get(self) -> bool: ...

    def tier(self, name: str) -> Tier: ...

    def load_block(self, key: bytes, outs: Sequence[Sequence[torch.Tensor]]) -> bool: ...

    def promote_loaded(self, key: bytes, data: torch.Tensor, *, keep: Collection[bytes] = (),
                       created: float = 0.0) -> bool: ...

    def finish_load(self, result: LoadResult) -> None: ...


class Loader:
    """Loads leased prefixes along two concurrent paths; owns the staging ring and cost model."""

    def __init__(self, cache: LoadSource, config: LoaderConfig | None = None,
                 cost: CostModel | None = None) -> None:
        self.cache = cache
        self.config = c = config or LoaderConfig()
        self.cost = cost or CostModel(io_parallelism=c.io_threads)
        self._io = ThreadPoolExecutor(c.io_threads, thread_name_prefix="kvtier-load-io")
        self._paths = ThreadPoolExecutor(4, thread_name_prefix="kvtier-load-path")
        self._promoter = Promoter(self.cache)
        self._ring: StagingRing | None = None
        self._ring_lock = threading.Lock()
        self._cuda = torch.cuda.Stream() if torch.cuda.is_available() else None
        self._ranged = RangedReads(self._io, c.io_threads, c.min_read_bytes, self.cost, self._promoter,
                                   self._fallback, self._ring_for, self._on_load_stream, self._cuda)
        self._whole = WholeReads(self._io, self._promoter, self._fallback, self._ring_for,
                                 self._on_load_stream, self._cuda)

    # ---- the cost check --------------------------------------------------------------------
    def plan(self, lease: Lease, *, probe: bool = True) -> CostDecision:
        """How many leading blocks of ``lease`` are worth loading; recorded in cache stats.

        With ``probe``, a slower tier the model has never timed gets one header read timed first,
        so even the first decision sees that tier's latency.
        """
        ns = lease.namespace
        if ns is None or not lease.blocks:
            return CostDecision("declined", 0, 0, ns.block_tokens if ns else 0, 0.0, 0.0)
        assert ns.layout is not None  # its blocks were stored in it
        blocks = [(b.tiers[0], b.nbytes) for b in lease.blocks]
        if probe and self.cost.prefill_tokens_per_s is not None:
            self._probe(lease)
        n_layers = ns.layout.num_layers
        groups = max(1, min(n_layers, lease.blocks[0].nbytes // max(1, self.config.min_read_bytes)))
        decision = self.cost.decide(blocks, ns.block_tokens, reads_per_block=1 + groups)
        self.cache.finish_load(LoadResult(decision=decision.verdict, decision_detail={
            **self.cost.snapshot(), "last_decision": decision.to_dict()}))
        return decision

    def _probe(self, lease: Lease) -> None:
        ns = lease.namespace
        assert ns is not None and ns.layout is not None  # plan's caller has blocks
        hsize = header_size(ns.layout.num_layers, ns.codec)
        for b in lease.blocks:
            name = b.tiers[0]
            if name in MEMORY_TIERS or self.cost.has_latency(name):
                continue
            buf = torch.empty(min(hsize, b.nbytes), dtype=torch.uint8)
            start = time.perf_counter()
            try:
                self.cache.tier(name).read_into(b.key, buf, 0)
            except (KVTierError, KeyError, OSError):
                continue
            self.cost.observe_latency(name, time.perf_counter() - start)

    # ---- loading ---------------------------------------------------------------------------
    def load(self, lease: Lease, dest: Sequence[Sequence[torch.Tensor]], *, blocks: int | None = None,
             layerwise: bool = True) -> LoadStream:
        """Start loading the first ``blocks`` (default all) blocks of ``lease`` into ``dest``.

        ``dest`` is KV in the namespace layout covering at least those tokens (e.g.
        ``layout.empty(tokens, device)``). The lease must stay held until the stream is done.
        ``layerwise=False`` is for a caller that waits for the whole prefix (``get``): blocks
        read straight into ``dest`` are then read whole, a read each, not in layer groups.
        """
        ns = lease.namespace
        n = len(lease.blocks) if blocks is None else blocks
        if ns is None:
            stream = LoadStream(1, 0, 1)
            stream._paths_left = 1
            stream._path_done()
            return stream
        if not 0 <= n <= len(lease.blocks):
            raise InvalidRequest(f"blocks must be in 0..{len(lease.blocks)}, got {n}")
        assert ns.layout is not None  # its blocks were stored in it
        bt, n_layers = ns.block_tokens, ns.layout.num_layers
        if len(dest) != n_layers or any(t.shape[0] < n * bt or not t.is_contiguous() for layer in dest for t in layer):
            raise InvalidRequest(f"dest must be {n_layers} layers of contiguous tensors covering {n * bt} tokens")
        stream = LoadStream(n_layers, n, bt, self._cuda)
        if self._cuda is not None:
            self._cuda.wait_stream(torch.cuda.current_stream())  # dest was allocated on the compute stream
        mem: list[Item[MemoryTier]] = []
        io: list[Item[Tier]] = []
        in_memory = kind_check(MemoryTier)
        for i, b in enumerate(lease.blocks[:n]):
            tier = self.cache.tier(b.tiers[0])
            if in_memory(tier):
                mem.append((i, b, tier))
            else:
                io.append((i, b, tier))
        job = LoadJob(stream, dest, ns.codec, bt, n_layers, promote=self.cache.promote_on_get)

        def done() -> None:
            job.finish()
            self.cache.finish_load(job.result)

        stream._on_done = done
        self._paths.submit(self._guard, self._memory_path, job, mem, layerwise)
        self._paths.submit(self._guard, self._io_path, job, io, layerwise)
        return stream

    def _guard(self, path: Callable[..., None], job: LoadJob, items: list[Item[T]], *args: Any) -> None:
        try:
            path(job, items, *args)
        except Exception as e:  # noqa: BLE001  a failed path truncates the prefix, never raises
            log.exception("loader path failed")
            job.stream._truncate(min((i for i, _, _ in items), default=job.stream.planned_blocks), str(e))
        finally:
            job.stream._path_done()

    def _memory_path(self, job: LoadJob, items: list[Item[MemoryTier]], layerwise: bool) -> None:
        """Path 1: copy memory-resident blocks from the tiers' views, layer group by layer
        group (groups of ``min_read_bytes`` of a block, as the I/O path reads them), or each
        block whole where the caller waits for the whole prefix (``layerwise=False``).

        Into host KV (``KVLayout.empty``'s, or a tensor per layer and K/V) a group of the
        ``none`` blocks a host tier holds is one ``copy_runs`` call for all of them
        (``PrefixKV.decode_many``; numpy: a copy per tensor of a block); other blocks are
        decoded one by one (``decode_layer_into`` per layer and tensor where the destination
        is a device's). Why: the per-tensor way costs about 1 ms of Python per 2 MiB block,
        four times its copy, and a call per block still 60 us (``python -m
        kvtier.bench.host_tier``). A host tier's blocks are parsed once: the first one's header,
        the others compared with it at once (``_alike``)."""
        if not items:
            return
        start = time.perf_counter()
        prefix = job.prefix
        ready = []  # decoded one by one
        together: dict[tuple[int, int], tuple[np.ndarray, list[tuple[int, int]]]] = {}  # by arena and step
        if prefix is not None:
            items = self._alike(job, prefix, items, together)
        for i, b, tier in items:
            try:
                view = tier.view(b.key)
                parsed = parse_table(view)  # checked as parse_header does, no records made
                codec, table = parsed[0], parsed[4]
                if len(table) != job.n_layers:
                    raise CorruptBlock(f"block has {len(table)} layers, expected {job.n_layers}")
                step = prefix.strided_step(codec, table) if prefix is not None and view.device.type == "cpu" else 0
                arena, slot = (tier.host_bytes, tier.slot(b.key)) if step else (None, None)
                if slot is not None and table[-1][0] + table[-1][1] > slot[1]:
                    raise CorruptBlock(f"block's layers end past its {slot[1]} bytes")
                if arena is not None and slot is not None:
                    together.setdefault((id(arena), step), (arena, []))[1].append((i, slot[0] + table[0][0]))
                    continue
                header = None if step else header_of(*parsed)
            except (KeyError, CorruptBlock) as e:
                log.warning("block %d in %s unusable (%s); reading it whole", i, tier.name, e)
                self._fallback(job, i, b)
                continue
            ready.append((i, view, header, step, table))
        if ready:
            lengths = [n for _, n, _ in ready[0][4]]
        else:  # blocks copied together (a prefix's none layout), or none left to copy
            lengths = prefix.layer_lengths if together and prefix is not None else []
        groups = layer_groups(lengths, self.config.min_read_bytes if layerwise else sum(lengths))
        landing = sorted([i for i, *_ in ready] + [i for _, rows in together.values() for i, _ in rows])
        with self._on_load_stream():
            for group in groups:
                if job.stream.cancelled:
                    break
                valid = job.stream.valid_blocks
                landed = [i for i in landing if i < valid]
                for (_, step), (arena, rows) in together.items():
                    assert prefix is not None
                    prefix.decode_many(arena, [r for r in rows if r[0] < valid], step, group)
                for i, view, header, step, table in ready:
                    if i >= valid:
                        continue
                    if step:
                        assert prefix is not None
                        prefix.decode_layers(i, view.numpy(), table[0][0], step, group)
                        continue
                    assert header is not None
                    outs = job.outs(i)
                    for layer in group:
                        decode_layer_into(header, layer, view, outs[layer], verify=False)
                job.stream._land(list(group), landed)
        seconds = time.perf_counter() - start
        for name in {tier.name for _, _, tier in items}:
            nbytes = sum(b.nbytes for _, b, t in items if t.name == name)
            self.cost.observe_path(name, nbytes, seconds)
            job.count_reads(name, sum(1 for _, _, t in items if t.name == name), nbytes, seconds)

    @staticmethod
    def _alike(job: LoadJob, prefix: PrefixKV, items: list[Item[MemoryTier]],
               together: dict[tuple[int, int], tuple[np.ndarray, list[tuple[int, int]]]]) -> list[Item[MemoryTier]]:
        """Put into ``together`` the blocks of a host tier whose header is its first block's
        but for the crcs (``block.headers_like``: one check for them all), when that block's
        layers copy strided into ``prefix``; returns the other items, for the one-by-one way."""
        by_tier: dict[int, list[Item[MemoryTier]]] = {}
        for item in items:
            by_tier.setdefault(id(item[2]), []).append(item)
        rest: list[Item[MemoryTier]] = []
        for group in by_tier.values():
            tier = group[0][2]
            arena = tier.host_bytes
            slots = [tier.slot(b.key) for _, b, _ in group]
            if arena is None or len(group) < 2 or slots[0] is None or any(s is None for s in slots):
                rest += group
                continue
            offset, n = slots[0]
            try:
                codec, _, _, _, table = parse_table(arena[offset: offset + n].data)
            except CorruptBlock:
                rest += group
                continue
            end = table[-1][0] + table[-1][1]
            step = prefix.strided_step(codec, table) if len(table) == job.n_layers and end <= n else 0
            if not step:
                rest += group
                continue
            at = np.array([s[0] for s in slots if s is not None], dtype=np.int64)
            sizes = np.array([s[1] for s in slots if s is not None], dtype=np.int64)
            same = headers_like(arena, at, offset) & (sizes >= end)
            rows = together.setdefault((id(arena), step), (arena, []))[1]
            for item, o, ok in zip(group, at.tolist(), same.tolist(), strict=True):
                if ok:
                    rows.append((item[0], o + table[0][0]))
                else:
                    rest.append(item)
        return rest

    def _io_path(self, job: LoadJob, items: list[Item[Tier]], layerwise: bool) -> None:
        """Path 2: ranged tiers (``loader_ranged``) and, alongside, whole-block tiers in
        batches (``loader_whole``)."""
        if not items:
            return
        start = time.perf_counter()
        # tiers that read a block whole, a prefix batch per call (the remote tier), and the rest
        batch = kind_check(RegisteredBatchReads)
        whole = [(i, b, t) for i, b, t in items if batch(t)]
        ranged = [it for it in items if not batch(it[2])]
        with self._promoter.lock:  # placeholders first: promotions go in prefix order across both
            if job.promote:
                job.promos.update({i: Assembly(b.key, None, left=1, created=b.created) for i, b, _ in items})
            job.promo_order = sorted(job.promos)
            job.keep = frozenset(b.key for _, b, _ in items)
        futures = self._whole.submit(job, whole) if whole else []
        try:
            self._ranged.run(job, ranged, start, layerwise=layerwise)
        finally:
            wait_futures(futures)
        if whole:
            seconds = time.perf_counter() - start
            for name in {t.name for _, _, t in whole}:
                mine = [b for _, b, t in whole if t.name == name]
                nbytes = sum(b.nbytes for b in mine)
                self.cost.observe_path(name, nbytes, seconds, len(futures))
                job.count_reads(name, len(mine), nbytes, seconds)

    def _fallback(self, job: LoadJob, i: int, b: LeasedBlock) -> None:
        """Read block ``i`` whole via the manager (verifies, drops corrupt copies); else truncate."""
        with job.stream._lock:
            if i in job.stream._fallen:
                return
            job.stream._fallen.add(i)
        ok = False
        try:
            ok = self.cache.load_block(b.key, job.outs(i))
            if ok and self._cuda is not None:
                torch.cuda.current_stream().synchronize()
        except Exception as e:  # noqa: BLE001
            log.warning("whole-block read of block %d failed: %s", i, e)
        if ok:
            job.stream._land(range(job.n_layers), [i])
        else:
            job.stream._truncate(i, f"block {i} ({b.key.hex()}) has no readable copy")

    # ---- helpers ---------------------------------------------------------------------------
    def _ring_for(self, slot_bytes: int) -> StagingRing:
        with self._ring_lock:
            need = max(slot_bytes, self.config.staging_slot_bytes)
            if self._ring is None or self._ring.slot_bytes < slot_bytes:
                # Loads still running keep the old ring alive through their reference.
                self._ring = StagingRing(self.config.staging_slots, need, pinned=self.config.pinned)
            return self._ring

    @property
    def ring(self) -> StagingRing | None:
        return self._ring

    def _on_load_stream(self) -> contextlib.AbstractContextManager[Any]:
        return torch.cuda.stream(self._cuda) if self._cuda is not None else contextlib.nullcontext()

    def flush(self, timeout: float | None = None) -> None:
        """Wait until the promotions of every load started so far have run."""
        self._promoter.flush(timeout)

    def close(self) -> None:
        self._paths.shutdown(wait=True)
        self._io.shutdown(wait=True)
        self._promoter.close()
        self._whole.close()


__all__ = ["Loader", "LoaderConfig", "LoadSource", "LoadStream", "PrefixTruncated"]
