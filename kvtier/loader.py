"""The dual-path, layer-wise loader: stream a leased prefix into destination KV, layer by layer.

Path 1 copies blocks resident in a memory tier (host/device) straight from the tier's zero-copy
view into the destination. Path 2 reads blocks from slower tiers (SSD, remote): each block's
header first, then contiguous ranges covering groups of layers, many reads in flight on a thread
pool, each landing in a slot of a bounded staging ring (pinned when CUDA is present) whose
per-layer checksums are verified before decoding into the destination. Both paths run at once,
both in layer order, so layer ``i`` is ready as soon as every block's layer ``i`` has landed —
while later layers are still in flight. On a GPU the copies run on a dedicated stream and each
layer's readiness is a CUDA event the consumer's stream waits on; on CPU it is a thread event.

Tiers that read a block only whole (a remote tier: Mooncake fetches a whole value per call,
and every call is a network round trip) take path 2 a prefix batch at a time instead: one
``read_blocks_into`` per batch of blocks straight into ring slots registered with the tier once
(zero-copy where the engine supports it), every byte verified by the tier, then decoded layer by
layer; a block's layers land together, batches overlap one another.

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
import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch

from kvtier.block import BlockHeader, decode_layer_into, header_size, parse_header
from kvtier.costmodel import MEMORY_TIERS, CostDecision, CostModel
from kvtier.errors import CorruptBlock, InvalidRequest, KVTierError
from kvtier.index import Lease, LeasedBlock
from kvtier.loader_promote import Assembly, Promoter
from kvtier.loadstream import LoadStream, PrefixTruncated
from kvtier.recorder import LoadResult, TierReads
from kvtier.staging import StagingRing, StagingSlot
from kvtier.tiers.base import MemoryTier, RangedBatchReads, RegisteredBatchReads, Tier

log = logging.getLogger(__name__)

T = TypeVar("T", bound=Tier)
# A block a path reads: its index in the lease, the block, the tier it is read from.
Item = tuple[int, LeasedBlock, T]


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
    - ``promote_loaded(key, data, keep=...)``: keep a block's verified bytes, read from a
      slower tier, in the fastest one (never evicting a key in ``keep``).
    - ``promote_on_get``: whether blocks read from slower tiers are promoted.
    - ``finish_load(result)``: told once per load (and per cost decision) what it did.
    """

    @property
    def promote_on_get(self) -> bool: ...

    def tier(self, name: str) -> Tier: ...

    def load_block(self, key: bytes, outs: Sequence[Sequence[torch.Tensor]]) -> bool: ...

    def promote_loaded(self, key: bytes, data: torch.Tensor, *, keep: Collection[bytes] = ()) -> bool: ...

    def finish_load(self, result: LoadResult) -> None: ...


class Loader:
    """Loads leased prefixes along two concurrent paths; owns the staging ring and cost model."""

    def __init__(self, cache: LoadSource, config: LoaderConfig | None = None,
                 cost: CostModel | None = None) -> None:
        self.cache = cache
        self.config = config or LoaderConfig()
        self.cost = cost or CostModel(io_parallelism=self.config.io_threads)
        self._io = ThreadPoolExecutor(self.config.io_threads, thread_name_prefix="kvtier-load-io")
        self._paths = ThreadPoolExecutor(4, thread_name_prefix="kvtier-load-path")
        self._promoter = Promoter(self.cache)
        self._promo_lock = self._promoter.lock
        self._ring: StagingRing | None = None
        self._ring_lock = threading.Lock()
        self._registered: list[tuple[RegisteredBatchReads, StagingRing]] = []  # registered once
        self._cuda = torch.cuda.Stream() if torch.cuda.is_available() else None

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
    def load(self, lease: Lease, dest: Sequence[Sequence[torch.Tensor]], *, blocks: int | None = None) -> LoadStream:
        """Start loading the first ``blocks`` (default all) blocks of ``lease`` into ``dest``.

        ``dest`` is KV in the namespace layout covering at least those tokens (e.g.
        ``layout.empty(tokens, device)``). The lease must stay held until the stream is done.
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
        for i, b in enumerate(lease.blocks[:n]):
            tier = self.cache.tier(b.tiers[0])
            if isinstance(tier, MemoryTier):
                mem.append((i, b, tier))
            else:
                io.append((i, b, tier))
        job = _Job(stream, dest, ns.codec, bt, n_layers, promote=self.cache.promote_on_get)
        stream._on_done = lambda: self.cache.finish_load(job.result)
        self._paths.submit(self._guard, self._memory_path, job, mem)
        self._paths.submit(self._guard, self._io_path, job, io)
        return stream

    def _guard(self, path: Callable[[_Job, list[Item[T]]], None], job: _Job, items: list[Item[T]]) -> None:
        try:
            path(job, items)
        except Exception as e:  # noqa: BLE001  a failed path truncates the prefix, never raises
            log.exception("loader path failed")
            job.stream._truncate(min((i for i, _, _ in items), default=job.stream.planned_blocks), str(e))
        finally:
            job.stream._path_done()

    def _memory_path(self, job: _Job, items: list[Item[MemoryTier]]) -> None:
        """Path 1: copy memory-resident blocks layer by layer from the tiers' views."""
        if not items:
            return
        start = time.perf_counter()
        ready = []
        for i, b, tier in items:
            try:
                view = tier.view(b.key)
                header = _checked_header(view, job.n_layers)
            except (KeyError, CorruptBlock) as e:
                log.warning("block %d in %s unusable (%s); reading it whole", i, tier.name, e)
                self._fallback(job, i, b)
                continue
            ready.append((i, view, header))
        with self._on_load_stream():
            for layer in range(job.n_layers):
                if job.stream.cancelled:
                    break
                landed = [i for i, view, header in ready if i < job.stream.valid_blocks]
                for i, view, header in ready:
                    if i < job.stream.valid_blocks:
                        decode_layer_into(header, layer, view, job.outs(i)[layer], verify=False)
                job.stream._land([layer], landed)
        seconds = time.perf_counter() - start
        for name in {tier.name for _, _, tier in items}:
            nbytes = sum(b.nbytes for _, b, t in items if t.name == name)
            self.cost.observe_path(name, nbytes, seconds)
            self._count_reads(job, name, sum(1 for _, _, t in items if t.name == name), nbytes, seconds)

    def _io_path(self, job: _Job, items: list[Item[Tier]]) -> None:
        """Path 2: headers, then layer-group ranges through the staging ring, many in flight;
        blocks of whole-read tiers in batches (``_whole_reads``), alongside."""
        if not items:
            return
        start = time.perf_counter()
        # tiers that read a block whole, a prefix batch per call (the remote tier), and the rest
        whole = [(i, b, t) for i, b, t in items if isinstance(t, RegisteredBatchReads)]
        ranged = [it for it in items if not isinstance(it[2], RegisteredBatchReads)]
        with self._promo_lock:  # placeholders first: promotions go in prefix order across both
            if job.promote:
                job.promos.update({i: Assembly(b.key, None, left=1) for i, b, _ in items})
            job.promo_order = sorted(job.promos)
            job.keep = frozenset(b.key for _, b, _ in items)
        futures = self._whole_reads(job, whole) if whole else []
        try:
            self._ranged_reads(job, ranged, start)
        finally:
            wait_futures(futures)
        if whole:
            self._observe(job, whole, time.perf_counter() - start, len(futures))

    def _ranged_reads(self, job: _Job, items: list[Item[Tier]], start: float) -> None:
        if not items:
            return
        hsize = header_size(job.n_layers, job.codec)
        stride = (hsize + 63) // 64 * 64
        scratch = torch.empty(stride * len(items), dtype=torch.uint8)
        requests = [(b.key, scratch[j * stride: j * stride + min(hsize, b.nbytes)], 0)
                    for j, (_, b, _) in enumerate(items)]
        results = self._read_many(items, requests)
        header_s = time.perf_counter() - start
        for name in {t.name for _, _, t in items}:
            # One batched call overlaps its reads inside the tier; otherwise io_threads at a time.
            rounds = 1 if isinstance(items[0][2], RangedBatchReads) else math.ceil(len(items) / self.config.io_threads)
            self.cost.observe_latency(name, header_s / rounds)
        headers: list[tuple[int, LeasedBlock, Tier, BlockHeader]] = []
        for (i, b, tier), (_, buf, _), res in zip(items, requests, results, strict=True):
            try:
                if isinstance(res, BaseException):
                    raise res
                headers.append((i, b, tier, h := _checked_header(buf[:res], job.n_layers)))
                a = job.promos.get(i)
                if a is not None and h.total_bytes == b.nbytes:
                    a.data = torch.zeros(b.nbytes, dtype=torch.uint8)  # padding stays zero
                    a.data[:h.header_bytes].copy_(buf[:h.header_bytes])
                elif a is not None:
                    self._promoter.abandon(job, i)  # ranges would not rebuild it whole: not promoted
            except (KeyError, KVTierError, OSError) as e:
                log.warning("header of block %d in %s unreadable (%s); reading it whole", i, tier.name, e)
                self._promoter.abandon(job, i)
                self._fallback(job, i, b)
        if not headers:
            return
        groups = _layer_groups([e.length for e in headers[0][3].layers], self.config.min_read_bytes)
        with self._promo_lock:
            for i, _, _, _ in headers:
                if i in job.promos:
                    job.promos[i].left = len(groups)
        widest = max(h.span(g)[1] - h.span(g)[0] for _, _, _, h in headers for g in groups)
        ring = self._ring_for(widest)
        futures: list[Future] = []
        reads = 0
        for g in groups:
            for i, b, tier, h in headers:
                if job.stream.cancelled or i >= job.stream.valid_blocks:
                    continue
                slot = ring.acquire()  # back-pressure: at most ring.slots ranges staged at once
                futures.append(self._io.submit(self._read_group, job, ring, slot, i, b, tier, h, g))
                reads += 1
        wait_futures(futures)
        self._observe(job, [(i, b, t) for i, b, t, _ in headers], time.perf_counter() - start,
                      reads + len(items))

    def _observe(self, job: _Job, items: Sequence[Item[Any]], seconds: float, reads: int) -> None:
        for name in {t.name for _, _, t in items}:
            nbytes = sum(b.nbytes for _, b, t in items if t.name == name)
            self.cost.observe_path(name, nbytes, seconds, reads)
            self._count_reads(job, name, sum(1 for _, _, t in items if t.name == name), nbytes, seconds)

    def _read_group(self, job: _Job, ring: StagingRing, slot: StagingSlot, i: int, b: LeasedBlock, tier: Tier,
                    h: BlockHeader, g: range) -> None:
        try:
            if job.stream.cancelled or i >= job.stream.valid_blocks:
                return
            lo, hi = h.span(g)
            buf = slot.tensor[: hi - lo]
            got = tier.read_into(b.key, buf, lo)
            if got != hi - lo:
                raise CorruptBlock(f"short read: {got} of {hi - lo} bytes")
            with self._on_load_stream():
                for layer in g:
                    decode_layer_into(h, layer, buf, job.outs(i)[layer], verify=True, base=lo)
                if self._cuda is not None:
                    self._cuda.synchronize()  # the slot is reused once its copies are done
            job.stream._land(list(g), [i])
            self._promoter.gather(job, i, buf, lo, hi)
        except (KeyError, KVTierError, OSError) as e:
            log.warning("layers %s of block %d in %s unreadable (%s); reading it whole", list(g), i, tier.name, e)
            self._promoter.abandon(job, i)  # the whole-block read promotes it, if it can
            self._fallback(job, i, b)
        finally:
            ring.release(slot)

    def _whole_reads(self, job: _Job, items: list[Item[RegisteredBatchReads]]) -> list[Future]:
        """Submit whole-block reads of ``items`` in batches of up to half the ring's slots (two
        batches in flight: one decodes while the next transfers), or one block per task where
        the tier has no batched read; the futures of the tasks."""
        items = self._known_sizes(job, items)
        if not items:
            return []
        ring = self._ring_for(max(b.nbytes for _, b, _ in items))
        by_tier: dict[int, list[Item[RegisteredBatchReads]]] = {}
        for it in items:
            by_tier.setdefault(id(it[2]), []).append(it)
        futures: list[Future] = []
        for group in by_tier.values():
            tier = group[0][2]
            self._register(tier, ring)
            # A tier that reads block by block gets one block per task, io_threads in flight.
            per = max(1, ring.slots // 2) if tier.batched_reads else 1
            for k in range(0, len(group), per):
                if job.stream.cancelled:
                    break
                batch = group[k:k + per]
                slots = [ring.acquire() for _ in batch]  # back-pressure: at most the ring's slots
                futures.append(self._io.submit(self._read_whole, job, ring, slots, batch, tier))
        return futures

    def _known_sizes(self, job: _Job, items: list[Item[RegisteredBatchReads]]) -> list[Item[RegisteredBatchReads]]:
        """``items`` with every block's size known: blocks found by a remote existence query have
        none yet, so ask the tier for those at once (in parallel) and remember the answer, as
        ``TieredCache.load_block`` does; a block without one is read whole through the manager."""
        unknown = [it for it in items if not it[1].nbytes]
        sizes = list(self._io.map(lambda it: _size_or_none(it[2], it[1].key), unknown))
        lost = set()
        for (i, b, _), n in zip(unknown, sizes, strict=True):
            if n:
                b.nbytes = n
                job.result.sizes[b.key] = n
            else:
                lost.add(i)
                self._promoter.abandon(job, i)
                self._fallback(job, i, b)
        return [it for it in items if it[0] not in lost]

    def _read_whole(self, job: _Job, ring: StagingRing, slots: list[StagingSlot], batch: list[Item[RegisteredBatchReads]],
                    tier: RegisteredBatchReads) -> None:
        """One ``read_blocks_into`` for ``batch``, then decode each verified block into dest."""
        live = [(slot, i, b) for slot, (i, b, _) in zip(slots, batch, strict=True)
                if not job.stream.cancelled and i < job.stream.valid_blocks]
        outs = [slot.tensor[:b.nbytes] for slot, _, b in live]
        try:
            got = tier.read_blocks_into([b.key for _, _, b in live], outs) if live else []
        except Exception as e:  # noqa: BLE001  read_blocks_into never raises per block; be safe
            got = [e] * len(live)
        try:
            for (_, i, b), out, res in zip(live, outs, got, strict=True):
                try:
                    if isinstance(res, BaseException):
                        raise res
                    if res != b.nbytes:
                        raise CorruptBlock(f"short read: {res} of {b.nbytes} bytes")
                    h = _checked_header(out, job.n_layers)
                    with self._on_load_stream():
                        for layer in range(job.n_layers):  # the tier verified every byte
                            decode_layer_into(h, layer, out, job.outs(i)[layer], verify=False)
                        if self._cuda is not None:
                            self._cuda.synchronize()  # the slot is reused once its copies are done
                except (KeyError, KVTierError, OSError) as e:
                    log.warning("block %d in %s unreadable (%s); reading it whole", i, tier.name, e)
                    self._promoter.abandon(job, i)
                    self._fallback(job, i, b)
                    continue
                job.stream._land(range(job.n_layers), [i])
                self._promoter.gather_whole(job, i, out)
        finally:
            for slot in slots:  # a slot a timed-out read may still write into waits for it
                tier.when_settled(slot.tensor, functools.partial(ring.release, slot))

    def _register(self, tier: RegisteredBatchReads, ring: StagingRing) -> None:
        """Register ``ring`` with ``tier`` once (remote engines then read straight into it).
        A ring replaced by a larger one stays registered, and alive, until ``close``."""
        with self._ring_lock:
            if any(t is tier and r is ring for t, r in self._registered):
                return
            self._registered.append((tier, ring))
        tier.register(ring.buffer)

    def _fallback(self, job: _Job, i: int, b: LeasedBlock) -> None:
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
    def _read_many(self, items: list[Item[Tier]], requests: list[tuple[bytes, torch.Tensor, int]]) -> list[int | Exception]:
        by_tier: dict[str, list[int]] = {}
        for j, (_, _, tier) in enumerate(items):
            by_tier.setdefault(tier.name, []).append(j)
        results: list[int | Exception] = [0] * len(requests)
        for name, idx in by_tier.items():
            tier = self.cache.tier(name)
            if isinstance(tier, RangedBatchReads):
                for j, res in zip(idx, tier.read_many_into([requests[j] for j in idx]), strict=True):
                    results[j] = res
            else:
                futs = {j: self._io.submit(_read_or_error, tier, *requests[j]) for j in idx}
                for j, f in futs.items():
                    results[j] = f.result()
        return results

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

    @staticmethod
    def _count_reads(job: _Job, tier: str, blocks: int, nbytes: int, seconds: float) -> None:
        with job.stream._lock:
            r = job.result.reads.setdefault(tier, TierReads())
            r.blocks += blocks
            r.nbytes += nbytes
            r.seconds += seconds

    def flush(self, timeout: float | None = None) -> None:
        """Wait until the promotions of every load started so far have run."""
        self._promoter.flush(timeout)

    def close(self) -> None:
        self._paths.shutdown(wait=True)
        self._io.shutdown(wait=True)
        self._promoter.close()
        for tier, ring in self._registered:
            tier.unregister(ring.buffer)
        self._registered.clear()


@dataclass(slots=True)
class _Job:
    stream: LoadStream
    dest: Sequence[Sequence[torch.Tensor]]
    codec: str
    block_tokens: int
    n_layers: int
    promos: dict[int, Assembly] = field(default_factory=dict)  # blocks path 2 will promote
    promo_order: list[int] = field(default_factory=list)
    promo_next: int = 0
    promo_failed: bool = False
    keep: frozenset[bytes] = frozenset()  # this load's blocks: its promotions never evict them
    promote: bool = False  # the cache promotes blocks read from slower tiers
    result: LoadResult = field(default_factory=LoadResult)  # reported once the load is done

    def outs(self, i: int) -> list[list[torch.Tensor]]:
        bt = self.block_tokens
        return [[t[i * bt:(i + 1) * bt] for t in layer] for layer in self.dest]


def _checked_header(buf: torch.Tensor, n_layers: int) -> BlockHeader:
    header = parse_header(buf)
    if len(header.layers) != n_layers:
        raise CorruptBlock(f"block has {len(header.layers)} layers, expected {n_layers}")
    return header


def _layer_groups(lengths: list[int], min_read: int) -> list[range]:
    """Consecutive layers grouped so each group's bytes reach ``min_read`` (the last may not)."""
    groups, start, acc = [], 0, 0
    for i, n in enumerate(lengths):
        acc += n
        if acc >= min_read:
            groups.append(range(start, i + 1))
            start, acc = i + 1, 0
    if start < len(lengths):
        groups.append(range(start, len(lengths)))
    return groups


def _reads_whole(tier: Tier) -> bool:
    """True for tiers that read a block whole, a prefix batch per call (the remote tier)."""
    return isinstance(tier, RegisteredBatchReads)


def _size_or_none(tier: Tier, key: bytes) -> int | None:
    try:
        return tier.size(key)
    except (KeyError, KVTierError, OSError):
        return None


def _read_or_error(tier: Tier, key: bytes, out: torch.Tensor, offset: int) -> int | Exception:
    try:
        return tier.read_into(key, out, offset)
    except (KeyError, KVTierError, OSError) as e:
        return e


__all__ = ["Loader", "LoaderConfig", "LoadStream", "PrefixTruncated"]
