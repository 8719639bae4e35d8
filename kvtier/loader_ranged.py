"""Path 2 of the loader for tiers read by byte ranges (the SSD tier): every read verified, and
O_DIRECT into aligned memory — the destination itself where it can be.

Blocks are read in layer groups (consecutive layers of at least ``min_read_bytes``), group 0 of
every block first, so layer ``i`` is ready as soon as every block's layer ``i`` landed. Per
block, one of two ways:

- **Straight into the destination** (``DestPages``): codec ``none``, a host destination whose
  per-block tensor slices are whole 4 KiB pages at aligned addresses (``KVLayout.empty``
  allocates so whenever a block's tensors are page multiples: Llama-3-8B bf16 from 16 tokens a
  block), a block of exactly the size a ``none`` block of this layout has in format 2, and a
  tier with ``ScatterReads``. The layout of such a block is known before it is read, so each
  group is one scatter read from the file into the destination's tensors (group 0 with the
  header page in front): O_DIRECT, no staging, no copy. Before a layer is marked ready, the
  header is checked (its crc, the tier's check of a read from byte 0, its table equal to the
  expected one) and the layer's crc32c computed over the destination's bytes — unless the read
  was the whole block (``get``), which the tier checked against the block's crc32c: every byte
  is checksummed once. A block that
  fails is read whole again through the fallback once none of its reads is in flight, so no
  late read can overwrite what the fallback wrote.
- **Through the staging ring** (other codecs, device destinations, unaligned tensors, format 1
  blocks): every header first (one batched read into page-aligned memory), then ranges into
  ring slots placed congruent to their file offset (so O_DIRECT even for a format 1 range),
  each layer verified in the slot and decoded into the destination: one copy, the codec's.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import operator
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kvtier.block import (
    ALIGNED,
    BlockHeader,
    HeaderTemplate,
    checksum_parts,
    decode_layer_into,
    header_size,
    layout,
    parse_table,
    verify_layers,
)
from kvtier.bufpool import ALIGN, align_up, aligned_empty
from kvtier.bytecopy import copy_bytes
from kvtier.costmodel import CostModel
from kvtier.errors import CorruptBlock, KVTierError
from kvtier.index import LeasedBlock
from kvtier.loader_job import Fallback, Item, LoadJob, checked_header, layer_groups
from kvtier.loader_promote import Promoter
from kvtier.readers import shared_readers
from kvtier.staging import StagingRing, StagingSlot
from kvtier.tiers.base import RangedBatchReads, ScatterReads, Tier, kind_check

log = logging.getLogger(__name__)

Read = tuple[bytes, torch.Tensor, int]
# A read through the staging ring: the block's index, its tier's name, and the read (given a slot).
SlotRead = tuple[int, str, Callable[[StagingSlot], None]]


class DestPages:
    """A host destination as numpy views, where a ``none`` block's layers can be read straight
    in (see the module docstring); ``of`` says None where they cannot."""

    __slots__ = ("sizes", "layer_bytes", "offsets", "total", "table", "_rows")

    def __init__(self, flat: list[list[np.ndarray]], sizes: list[int], layer_bytes: int,
                 offsets: list[int], total: int) -> None:
        self.sizes, self.layer_bytes = sizes, layer_bytes
        self.offsets, self.total = offsets, total  # where each layer is in the block; its length
        self.table = [(o, layer_bytes) for o in offsets]  # (offset, length) per layer, as stored
        # Per layer, its tensors' bytes as ``[blocks, bytes]`` views: block i's arrays are row i
        # of each (one C-level map per read, not a slice per tensor made in Python).
        self._rows = [[f[: len(f) // n * n].reshape(-1, n) for f, n in zip(layer, sizes, strict=True)]
                      for layer in flat]

    @classmethod
    def of(cls, dest: Sequence[Sequence[torch.Tensor]], block_tokens: int, codec: str) -> DestPages | None:
        if codec != "none" or not dest:
            return None
        sizes = [block_tokens * t.stride(0) * t.element_size() if t.dim() else 0 for t in dest[0]]
        for layer in dest:
            if len(layer) != len(sizes):
                return None
            for t, n in zip(layer, sizes, strict=True):
                if (t.device.type != "cpu" or t.dim() == 0 or block_tokens * t.stride(0) * t.element_size() != n
                        or not n or n % ALIGN or t.data_ptr() % ALIGN):
                    return None
        layer_bytes = sum(sizes)
        version, offsets, total = layout("none", [layer_bytes] * len(dest))
        if version != ALIGNED:
            return None
        flat = [[t.detach().reshape(-1).view(torch.uint8).numpy() for t in layer] for layer in dest]
        return cls(flat, sizes, layer_bytes, offsets, total)

    def arrays(self, i: int, layers: range) -> list[np.ndarray]:
        """Block ``i``'s bytes of ``layers`` in the destination, in block order."""
        row = operator.itemgetter(i)
        return list(map(row, itertools.chain.from_iterable(self._rows[layers.start:layers.stop])))

    def span(self, layers: range) -> tuple[int, int]:
        return self.offsets[layers.start], self.offsets[layers.stop - 1] + self.layer_bytes


@dataclass(slots=True, eq=False)
class _Direct:
    """A block read straight into the destination; its group reads share this."""

    i: int
    b: LeasedBlock
    tier: ScatterReads
    head: np.ndarray  # its header page(s) land here
    left: int  # group reads not finished
    crcs: list[int] | None = None  # its layers' crc32c, from its header once checked
    failed: str | None = None
    # Set once group 0 checked the header; None where the block is one group (a ``get``): no
    # other read waits, and making an Event per block cost more than its checksum's call.
    checked: threading.Event | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Call:
    """``fn(*args)`` for a worker thread that lets go of ``args`` before it returns. Why: the
    worker keeps its task until it takes the next one, and a read's arguments view the
    destination (``DestPages``), which must be free to go back to ``get``'s pool as soon as
    the load is done and the caller drops it."""

    __slots__ = ("fn", "args")

    def __init__(self, fn: Callable[..., None], *args: Any) -> None:
        self.fn: Callable[..., None] | None = fn
        self.args: tuple[Any, ...] = args

    def __call__(self) -> None:
        fn, args = self.fn, self.args
        self.fn, self.args = None, ()
        assert fn is not None  # called once
        fn(*args)


class RangedReads:
    """Path 2 for ranged tiers; one per loader (its pools and ring are the loader's)."""

    def __init__(self, io: Executor, io_threads: int, min_read_bytes: int, cost: CostModel,
                 promoter: Promoter, fallback: Fallback, ring_for: Callable[[int], StagingRing],
                 on_stream: Callable[[], contextlib.AbstractContextManager[Any]],
                 cuda: torch.cuda.Stream | None) -> None:
        self._io, self._io_threads, self._min_read = io, io_threads, min_read_bytes
        self._cost, self._promoter, self._fallback = cost, promoter, fallback
        self._ring_for, self._on_stream, self._cuda = ring_for, on_stream, cuda

    def run(self, job: LoadJob, items: list[Item[Tier]], start: float, *, layerwise: bool = True) -> None:
        """Read ``items`` into ``job.dest``; returns when every read is done. ``layerwise``:
        groups of ``min_read_bytes`` (layer ``i`` ready early); else whole blocks where they go
        straight into the destination (fewer, larger reads: a ``get`` waits for all anyway)."""
        if not items:
            return
        pages = DestPages.of(job.dest, job.block_tokens, job.codec)
        direct: list[Item[Any]] = []
        staged: list[Item[Tier]] = []
        scatter = kind_check(ScatterReads)
        for it in items:
            ok = pages is not None and scatter(it[2]) and it[1].nbytes == pages.total
            (direct if ok else staged).append(it)
        futures: list[Future] = []
        reads = 0
        if direct:
            assert pages is not None
            min_read = self._min_read if layerwise else pages.total  # else: one group, the block
            groups = layer_groups([pages.layer_bytes] * job.n_layers, min_read)
            futures = self._submit_direct(job, pages, direct, groups)
            reads += len(futures)
        try:
            small = not layerwise and staged and max(b.nbytes for _, b, _ in staged) <= self._min_read
            reads += self._staged_whole(job, staged) if small else self._staged(job, staged, start)
        finally:
            wait_futures(futures)
        seconds = time.perf_counter() - start
        for name in {t.name for _, _, t in items}:
            mine = [b for _, b, t in items if t.name == name]
            nbytes = sum(b.nbytes for b in mine)
            self._cost.observe_path(name, nbytes, seconds, reads)
            job.count_reads(name, len(mine), nbytes, seconds)

    # ---- straight into the destination ------------------------------------------------------
    def _submit_direct(self, job: LoadJob, pages: DestPages, items: list[Item[Any]],
                       groups: list[range]) -> list[Future]:
        head = pages.offsets[0]
        heads = aligned_empty(head * len(items)).numpy()
        blocks = [_Direct(i, b, tier, heads[k * head:(k + 1) * head], len(groups),
                          checked=threading.Event() if len(groups) > 1 else None)
                  for k, (i, b, tier) in enumerate(items)]
        return [self._io.submit(_Call(self._read_direct, job, pages, blk, g, len(groups)))
                for g in groups for blk in blocks]

    def _read_direct(self, job: LoadJob, pages: DestPages, blk: _Direct, g: range, n_groups: int) -> None:
        first = g.start == 0
        try:
            if blk.failed is not None or job.stream.cancelled or blk.i >= job.stream.valid_blocks:
                return
            lo, hi = pages.span(g)
            arrays = pages.arrays(blk.i, g)
            got = blk.tier.read_scatter_into(blk.b.key, 0 if first else lo, [blk.head, *arrays] if first else arrays)
            if got != hi - (0 if first else lo):
                raise CorruptBlock(f"short read: {got} of {hi - lo} bytes")
            if first:
                blk.crcs = self._expected(job, pages, blk, n_groups)
                if blk.checked is not None:
                    blk.checked.set()
            else:
                assert blk.checked is not None  # more than one group
                blk.checked.wait()  # group 0's read was submitted first: it is running or done
            crcs = blk.crcs
            if crcs is None:
                return  # group 0 failed: the block is read whole once its reads are done
            per = len(pages.sizes)
            # A whole block read from byte 0 was checked by the tier against the block's crc32c
            # (``ScatterReads``): its layers are not checksummed a second time.
            whole = first and got == blk.b.nbytes
            for k, layer in enumerate(() if whole else g):
                if checksum_parts(arrays[k * per:(k + 1) * per]) != crcs[layer]:
                    raise CorruptBlock(f"layer {layer} payload checksum mismatch")
            a = job.promos.get(blk.i)
            if a is not None and a.data is not None:
                data = a.data.numpy()
                for k, arr in enumerate(arrays):
                    at = pages.offsets[g.start + k // per] + sum(pages.sizes[:k % per])
                    data[at:at + len(arr)] = arr
                self._promoter.filled(job, blk.i)
            job.stream._land(g, [blk.i])
        except (KeyError, KVTierError, OSError) as e:
            job.note_failure(blk.b.tiers[0], e)
            with blk.lock:
                blk.failed = blk.failed or str(e)
        finally:
            if first and blk.checked is not None:
                blk.checked.set()
            with blk.lock:
                blk.left -= 1
                last, failed = blk.left == 0, blk.failed
            if last and failed is not None:
                log.warning("block %d in %s unreadable (%s); reading it whole", blk.i, blk.b.tiers[0], failed)
                self._promoter.abandon(job, blk.i)
                self._fallback(job, blk.i, blk.b)

    def _expected(self, job: LoadJob, pages: DestPages, blk: _Direct, n_groups: int) -> list[int]:
        """The block's layer crcs, from its header checked (``parse_table``: its own crc, its
        table) to lay out the block as ``pages`` expects (a ``none`` block of format 2 of the
        destination's geometry: then its length is ``pages.total``, which only such blocks were
        read this way for); prepares its promotion (the header now, each group's layers as they
        are verified)."""
        codec, version, _, header_bytes, table = parse_table(blk.head.data)
        if len(table) != job.n_layers:
            raise CorruptBlock(f"block has {len(table)} layers, expected {job.n_layers}")
        if codec != "none" or version != ALIGNED or blk.b.nbytes != pages.total or [
                e[:2] for e in table] != pages.table:
            raise CorruptBlock("block layout is not the one its size implies")
        a = job.promos.get(blk.i)
        if a is not None:
            data = torch.zeros(blk.b.nbytes, dtype=torch.uint8)  # padding stays zero
            data.numpy()[:header_bytes] = blk.head[:header_bytes]
            with self._promoter.lock:
                a.data, a.left = data, n_groups
        return [e[2] for e in table]

    # ---- through the staging ring -----------------------------------------------------------
    def _staged(self, job: LoadJob, items: list[Item[Tier]], start: float) -> int:
        """Headers, then layer-group ranges through the ring; returns the reads made."""
        if not items:
            return 0
        stride = align_up(header_size(job.n_layers, job.codec))
        scratch = aligned_empty(stride * len(items))  # page-aligned: header reads go O_DIRECT
        requests = [(b.key, scratch[j * stride: j * stride + min(stride, b.nbytes)], 0)
                    for j, (_, b, _) in enumerate(items)]
        results = self._read_many(items, requests)
        header_s = time.perf_counter() - start
        for name in {t.name for _, _, t in items}:
            # One batched call overlaps its reads inside the tier; otherwise io_threads at a time.
            rounds = 1 if isinstance(items[0][2], RangedBatchReads) else math.ceil(len(items) / self._io_threads)
            self._cost.observe_latency(name, header_s / rounds)
        headers: list[tuple[int, LeasedBlock, Tier, BlockHeader]] = []
        for (i, b, tier), (_, buf, _), res in zip(items, requests, results, strict=True):
            try:
                if isinstance(res, BaseException):
                    raise res
                headers.append((i, b, tier, h := checked_header(buf[:res], job.n_layers)))
                a = job.promos.get(i)
                if a is not None and h.total_bytes == b.nbytes:
                    a.data = torch.zeros(b.nbytes, dtype=torch.uint8)  # padding stays zero
                    copy_bytes(a.data[:h.header_bytes], buf[:h.header_bytes])
                elif a is not None:
                    self._promoter.abandon(job, i)  # ranges would not rebuild it whole: not promoted
            except (KeyError, KVTierError, OSError) as e:
                job.note_failure(tier.name, e)
                log.warning("header of block %d in %s unreadable (%s); reading it whole", i, tier.name, e)
                self._promoter.abandon(job, i)
                self._fallback(job, i, b)
        if not headers:
            return len(items)
        groups = layer_groups([e.length for e in headers[0][3].layers], self._min_read)
        with self._promoter.lock:
            for i, _, _, _ in headers:
                if i in job.promos:
                    job.promos[i].left = len(groups)
        # A slot holds a range at its offset's place in a page, so every read is congruent.
        widest = max(hi - lo + lo % ALIGN for _, _, _, h in headers for lo, hi in map(h.span, groups))
        ring = self._ring_for(widest)
        # Group-major: every block's first layers land before any block's next ones.
        reads = [(i, tier.name, functools.partial(self._read_group, job, i, b, tier, h, g))
                 for g in groups for i, b, tier, h in headers]
        return len(items) + self._through_ring(job, ring, reads)

    def _through_ring(self, job: LoadJob, ring: StagingRing, reads: Sequence[SlotRead]) -> int:
        """Make ``reads`` with ``io_threads`` readers (``shared_readers``), each through one ring
        slot; returns the reads made."""
        n = min(self._io_threads, ring.slots, len(reads))
        return sum(shared_readers(self._io, n, reads, lambda todo: self._slot_reader(job, ring, todo)))

    def _slot_reader(self, job: LoadJob, ring: StagingRing, todo: Iterator[SlotRead]) -> int:
        """One reader: holds one slot (back-pressure: at most ``ring.slots`` reads staged at
        once) and makes each read of ``todo`` the stream still wants. An error no tier should
        raise ends the prefix at its block (logged); the readers go on. Returns the reads made."""
        made = 0
        slot = ring.acquire()
        try:
            for i, tier, read in todo:
                if job.stream.cancelled or i >= job.stream.valid_blocks:
                    continue
                made += 1
                try:
                    read(slot)
                except Exception as e:  # noqa: BLE001  a bug, not bad bytes: the prefix ends here
                    log.exception("reading block %d from %s failed", i, tier)
                    job.stream._truncate(i, f"block {i}: {e}")
        finally:
            ring.release(slot)
        return made

    def _read_group(self, job: LoadJob, i: int, b: LeasedBlock, tier: Tier, h: BlockHeader, g: range,
                    slot: StagingSlot) -> None:
        try:
            lo, hi = h.span(g)
            pad = lo % ALIGN
            buf = slot.tensor[pad: pad + hi - lo]
            got = tier.read_into(b.key, buf, lo)
            if got != hi - lo:
                raise CorruptBlock(f"short read: {got} of {hi - lo} bytes")
            self._decode(job, i, h, buf, lo, g)
            job.stream._land(g, [i])
            self._promoter.gather(job, i, buf, lo, hi)
        except (KeyError, KVTierError, OSError) as e:
            self._unreadable(job, i, b, tier, e, f"layers {list(g)} of block {i}")

    def _unreadable(self, job: LoadJob, i: int, b: LeasedBlock, tier: Tier, e: BaseException, what: str) -> None:
        """A read of block ``i`` failed: counted, and the block read whole through the cache
        (which promotes it, if it can; this load will not)."""
        job.note_failure(tier.name, e)
        log.warning("%s in %s unreadable (%s); reading it whole", what, tier.name, e)
        self._promoter.abandon(job, i)
        self._fallback(job, i, b)

    def _decode(self, job: LoadJob, i: int, h: BlockHeader, buf: torch.Tensor, lo: int, g: range,
                verify: bool = True) -> None:
        """Verify layers ``g`` of block ``i`` staged in ``buf`` (its bytes from ``lo``; not
        with ``verify`` off: the tier verified the whole block) and decode them into the
        destination."""
        prefix = job.prefix
        step = prefix.strided_step(h.codec, h.layers) if prefix is not None and buf.is_cpu else 0
        if step:  # host KV: the group's layers verified, then one copy call (PrefixKV)
            assert prefix is not None
            arr = buf.numpy()
            if verify:
                verify_layers(h.layers, g, arr, lo)
            prefix.decode_layers(i, arr, h.layers[0].offset - lo, step, g)
            return
        views = job.outs(i)
        with self._on_stream():
            for layer in g:
                decode_layer_into(h, layer, buf, views[layer], verify=verify, base=lo)
            if self._cuda is not None:
                self._cuda.synchronize()  # the slot is reused once its copies are done

    # ---- small blocks a get waits for: one read each ----------------------------------------
    def _staged_whole(self, job: LoadJob, items: list[Item[Tier]]) -> int:
        """Blocks of at most ``min_read_bytes`` that the caller waits for whole (``get``): one
        read each, header and layers together, where ``_staged`` reads the header first and
        then the layers (two reads a block: 128 KiB blocks reloaded at 0.22x fio's random reads
        of the same size). Returns the reads made."""
        ring = self._ring_for(max(b.nbytes for _, b, _ in items))
        reads = [(i, tier.name, functools.partial(self._read_whole, job, i, b, tier)) for i, b, tier in items]
        return self._through_ring(job, ring, reads)

    def _read_whole(self, job: LoadJob, i: int, b: LeasedBlock, tier: Tier, slot: StagingSlot) -> None:
        try:
            buf = slot.tensor[:b.nbytes]
            got = tier.read_into(b.key, buf)  # a whole block: the tier verified every byte
            if got != b.nbytes:
                raise CorruptBlock(f"short read: {got} of {b.nbytes} bytes")
            arr, t = buf.numpy(), job.template
            if t is not None and t.matches(arr):
                h = t.header  # the same layout: its layers where the template's are
            else:
                h = checked_header(buf, job.n_layers)
                if t is None:
                    job.template = HeaderTemplate(arr)
            if h.total_bytes != b.nbytes:
                raise CorruptBlock(f"block header says {h.total_bytes} bytes, the tier holds {b.nbytes}")
            g = range(job.n_layers)
            self._decode(job, i, h, buf, 0, g, verify=False)
            job.stream._land(g, [i])
            self._promoter.gather_whole(job, i, buf)
        except (KeyError, KVTierError, OSError) as e:
            self._unreadable(job, i, b, tier, e, f"block {i}")

    def _read_many(self, items: list[Item[Tier]], requests: list[Read]) -> list[int | Exception]:
        by_tier: dict[str, list[int]] = {}
        for j, (_, _, tier) in enumerate(items):
            by_tier.setdefault(tier.name, []).append(j)
        results: list[int | Exception] = [0] * len(requests)
        for idx in by_tier.values():
            tier = items[idx[0]][2]
            if isinstance(tier, RangedBatchReads):
                for j, res in zip(idx, tier.read_many_into([requests[j] for j in idx]), strict=True):
                    results[j] = res
            else:
                futs = {j: self._io.submit(_read_or_error, tier, *requests[j]) for j in idx}
                for j, f in futs.items():
                    results[j] = f.result()
        return results


def _read_or_error(tier: Tier, key: bytes, out: torch.Tensor, offset: int) -> int | Exception:
    try:
        return tier.read_into(key, out, offset)
    except (KeyError, KVTierError, OSError) as e:
        return e
