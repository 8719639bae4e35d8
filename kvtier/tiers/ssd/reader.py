"""Reads for the SSD tier: resolve keys, coalesce adjacent records, read on the I/O pool, verify.

Requests are resolved and their segments pinned by the store, then read without its lock.
A read goes O_DIRECT whenever its destination is congruent to its file offset modulo 4 KiB
(``directio.DirectRead``: 4 KiB-aligned memory for a whole block or a 4 KiB-aligned range; a
partial first or last page through a bounce page), else through the page cache; the counters
say which (``direct_reads`` only when every byte came O_DIRECT). Non-CPU destinations read
into a staging buffer allocated congruent. ``read_scatter`` reads one range of a block into
several host buffers laid end to end (one ``preadv``; O_DIRECT when each is whole aligned pages):
the loader lands a block's layers straight in the destination's tensors that way. Records of one segment lying end to end (gaps up to
``MAX_GAP``: the 4 KiB padding) become one ``preadv`` with a buffer per block and a discard
buffer per gap. Whole-block reads are checked against the stored crc32c in the pool thread
(crc32c releases the GIL), and so is the head of a read from byte 0 (both checksums are bound
to the key: ``index.matches``); other ranges are verified by the caller (per-layer crc).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
import torch

from kvtier.block import checksum, checksum_parts
from kvtier.errors import CorruptBlock, InvalidRequest, InvalidType, KVTierError
from kvtier.tiers.ssd import directio
from kvtier.tiers.ssd.directio import (
    ALIGN,
    DirectRead,
    aligned_empty,
    bounce_pages,
    congruent,
    read_vectored,
    whole_pages,
)
from kvtier.tiers.ssd.index import HEAD_BYTES, Location, matches
from kvtier.tiers.ssd.segments import Segment
from kvtier.tiers.ssd.store import Store

MAX_GAP = 64 * 1024
MAX_RUN = 64 * 1024**2
# reads per coalesced preadv: each takes up to 4 buffers (gap, first page, bulk, last page)
MAX_READS = min(256, (os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024) // 4)
_discard: np.ndarray | None = None  # where the bytes of gaps between coalesced records go

ReadRequest = tuple[bytes, torch.Tensor, int]  # (key, out, offset)


@dataclass(slots=True, eq=False)
class _Read:
    index: int
    key: bytes
    out: torch.Tensor
    arr: np.ndarray  # where the bytes land: out's memory, or a staging buffer
    staged: bool
    loc: Location
    offset: int
    n: int
    seg: Segment | None
    blob: bytes | None = None  # inline payload not yet committed
    got: int = 0
    direct: bool = False
    coalesced: bool = False
    crc_ok: bool = True
    error: Exception | None = None

    @property
    def start(self) -> int:
        return self.loc.offset + self.offset


def check_out(out: torch.Tensor) -> None:
    """Raise unless ``out`` is a destination ``read_into`` takes."""
    if not isinstance(out, torch.Tensor):
        raise InvalidType(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.dtype != torch.uint8 or out.dim() != 1 or not out.is_contiguous():
        raise InvalidRequest(f"out must be a contiguous 1-D uint8 tensor, got {out.dtype} "
                             f"of shape {tuple(out.shape)}")


def landing(out: torch.Tensor, n: int, file_offset: int) -> tuple[np.ndarray, bool]:
    """Where ``n`` bytes from ``file_offset`` land: ``out``'s own memory on CPU, else a staging
    buffer congruent to the offset (so it reads O_DIRECT); and whether it is staged."""
    if out.device.type == "cpu":
        return out.numpy(), False
    return aligned_empty(n, phase=file_offset % ALIGN).numpy(), True


class Reader:
    """``read_into`` and ``read_many_into`` of the tier, over a store and an I/O pool."""

    def __init__(self, store: Store, pool: Executor) -> None:
        self.store = store
        self.pool = pool

    def read_one(self, key: bytes, out: torch.Tensor, offset: int = 0) -> int:
        """One ``read_into`` of a segment-stored block into CPU memory, with the least machinery.

        Why a separate path: at thousands of small reads a second from many threads on a small
        machine, every object, call and lock round per read is CPU the disk is waiting for. This
        path takes the store's lock twice (resolve and pin; unpin and count), allocates no
        record, and issues one ``preadv`` (O_DIRECT when ``out`` is congruent to the range).
        Same checks and outcomes as ``read_many``: whole-block reads are verified against the
        stored crc32c, a mismatch or a short read drops the block and raises ``CorruptBlock``.
        Inline blocks and non-CPU destinations take the general path.
        """
        if type(out) is not torch.Tensor or out.dtype is not torch.uint8 or out.dim() != 1 \
                or not out.is_contiguous() or not out.is_cpu:
            return self._general_one(key, out, offset)
        if not isinstance(offset, int) or offset < 0:
            raise InvalidRequest(f"offset must be a non-negative int, got {offset!r}")
        loc, seg, _ = self.store.pin(key, offset)
        if seg is None:
            return self._general_one(key, out, offset)
        arr = out.numpy()
        n = min(len(arr), loc.length - offset)
        if n != len(arr):
            arr = arr[:n]
        start = loc.offset + offset
        got, direct, crc_ok, error = 0, False, True, None
        try:
            got, direct = read_range(seg, arr, start)
            if got == n:
                crc_ok = matches(key, loc, arr, offset)
        except OSError as e:
            error = read_error(key, seg, e)
        finally:
            ok = error is None and got == n and crc_ok
            self.store.finish_read(seg, key, n, direct, ok)
        if ok:
            return n
        raise error or self._bad_bytes(key, loc, got, n)

    def read_scatter(self, key: bytes, offset: int, arrays: Sequence[np.ndarray]) -> int:
        """Read the block's bytes from ``offset`` into ``arrays`` (1-D uint8, filled in order as
        if laid end to end) with one ``preadv``; returns the bytes read (short only past the
        block's end). O_DIRECT when the range starts on a page of the file and every array is
        whole 4 KiB pages of aligned memory, else through the page cache. Checked as
        ``read_one`` checks: a whole-block read against the block's crc32c, a read from byte 0
        against its head's (bound to the key); other ranges are the caller's to verify (the
        block format's per-layer crc). Raises KeyError, CorruptBlock (the block is dropped) or
        KVTierError (I/O).
        """
        total = sum(map(len, arrays))
        if not isinstance(offset, int) or offset < 0:
            raise InvalidRequest(f"offset must be a non-negative int, got {offset!r}")
        loc, seg, _ = self.store.pin(key, offset)
        if seg is None:  # an inline block (small): through one buffer
            buf = torch.empty(total, dtype=torch.uint8)
            got = self._general_one(key, buf, offset)
            _scatter(buf.numpy()[:got], arrays)
            return got
        n = min(total, loc.length - offset)
        iov = arrays if n == total else _first(arrays, n)  # a whole block: no slicing per page
        start = loc.offset + offset
        direct = seg.dfd >= 0 and start % ALIGN == 0 and n % ALIGN == 0 and whole_pages(iov)
        got, crc_ok, error = 0, True, None
        try:
            try:
                got = read_vectored(seg.dfd if direct else seg.fd, iov, start)
            except OSError as e:
                if not direct or e.errno != errno.EINVAL:
                    raise
                direct = False
                got = read_vectored(seg.fd, iov, start)
            if got == n and offset == 0 and n:
                crc_ok = _matches_scattered(key, loc, iov, n)
        except OSError as e:
            error = read_error(key, seg, e)
        finally:
            ok = error is None and got == n and crc_ok
            self.store.finish_read(seg, key, n, direct, ok)
        if ok:
            return n
        raise error or self._bad_bytes(key, loc, got, n)

    def _bad_bytes(self, key: bytes, loc: Location, got: int, n: int) -> CorruptBlock:
        """Drop a block whose read came back short or failed its checksum; the error to raise."""
        return self.store.drop_corrupt(key, loc, "is truncated in its segment" if got < n else "failed its checksum")

    def _general_one(self, key: bytes, out: torch.Tensor, offset: int) -> int:
        res = self.read_many([(key, out, offset)], use_pool=False)[0]
        if isinstance(res, BaseException):
            raise res
        return res

    def read_many(self, requests: list[ReadRequest], use_pool: bool = True
                  ) -> list[int | Exception]:
        """Many ``read_into`` calls with reads in flight on the pool (see the module docstring);
        per request the byte count or the exception ``read_into`` would raise."""
        results: list[int | Exception] = [0] * len(requests)
        prepared = []
        for i, (key, out, offset) in enumerate(requests):
            try:
                check_out(out)
                if not isinstance(offset, int) or offset < 0:
                    raise InvalidRequest(f"offset must be a non-negative int, got {offset!r}")
            except KVTierError as e:
                results[i] = e
                continue
            prepared.append((i, key, out, offset))
        pins = self.store.pin_many((p[1], p[3]) for p in prepared)
        reads: list[_Read] = []
        try:
            for (i, key, out, offset), pin in zip(prepared, pins, strict=True):
                if isinstance(pin, Exception):
                    results[i] = pin
                    continue
                loc, seg, blob = pin
                n = min(out.numel(), loc.length - offset)
                arr, staged = landing(out, n, loc.offset + offset)
                reads.append(_Read(i, key, out, arr, staged, loc, offset, n, seg, blob))
        except BaseException:
            self.store.unpin(p[1] for p in pins if not isinstance(p, Exception))
            raise
        try:
            for r in reads:
                if r.seg is None:
                    self._read_inline(r)
            runs = plan_runs([r for r in reads if r.seg is not None])
            if use_pool and len(runs) > 1:
                # The calling thread reads the last run itself: one handoff fewer, one more in flight.
                futures = [self.pool.submit(_read_run, run) for run in runs[:-1]]
                try:
                    _read_run(runs[-1])
                finally:  # segments stay pinned until every pool read has finished
                    for f in futures:
                        f.result()
            else:
                for run in runs:
                    _read_run(run)
        finally:
            self.store.unpin(r.seg for r in reads)
        self._finish(reads, results)
        return results

    def _read_inline(self, r: _Read) -> None:
        if r.blob is not None:
            r.arr[:r.n] = np.frombuffer(r.blob, dtype=np.uint8, count=r.n, offset=r.offset)
            r.got = r.n
        else:
            try:
                got = self.store.read_inline(r.key, r.loc, r.arr[:r.n], r.offset)
            except CorruptBlock as e:  # index damage found on read: a counted miss, never raised
                r.error = e
                return
            r.got = got if got >= 0 else 0
        if r.got == r.n:
            r.crc_ok = matches(r.key, r.loc, r.arr[:r.n], r.offset)

    def _finish(self, reads: list[_Read], results: list[int | Exception]) -> None:
        done = []
        store = self.store
        for r in reads:
            if r.error is not None:
                results[r.index] = r.error
            elif r.got < r.n and r.seg is None and r.blob is None and store.location(r.key) is None:
                results[r.index] = KeyError(r.key)  # deleted while we read
            elif r.got < r.n or not r.crc_ok:
                results[r.index] = self._bad_bytes(r.key, r.loc, r.got, r.n)
            else:
                if r.staged:
                    r.out[:r.n].copy_(torch.from_numpy(r.arr[:r.n]))
                results[r.index] = r.n
                done.append((r.key, r.n, r.direct, r.coalesced))
        if done:
            store.served(done)


def read_range(seg: Segment, arr: np.ndarray, start: int) -> tuple[int, bool]:
    """Read ``len(arr)`` bytes of ``seg`` from ``start`` into ``arr``: O_DIRECT when ``arr`` is
    congruent to ``start``, else (or on EINVAL) buffered. Returns (bytes filled — short only at
    the end of the file —, whether every byte came O_DIRECT)."""
    n = len(arr)
    filled = 0
    if n and seg.dfd >= 0 and congruent(arr, start):
        plan = DirectRead(arr, start, bounce_pages(2))
        try:
            filled = plan.finish(read_vectored(seg.dfd, plan.iov, plan.lo))
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
        if filled == n:
            return n, True
    return filled + _buffered(seg.fd, arr[filled:], start + filled), False


def read_error(key: bytes, seg: Segment, e: OSError) -> KVTierError:
    """An I/O error reading ``key`` from ``seg``, as callers see it (the block is kept)."""
    return KVTierError(f"ssd read of block {key.hex()} from {seg.path.name} failed ({e.strerror or e})")


def _matches_scattered(key: bytes, loc: Location, arrays: Sequence[np.ndarray], n: int) -> bool:
    """``matches`` for bytes ``[0, n)`` of a block read into ``arrays`` (holding exactly those)."""
    if n == loc.length:  # whole: the crc over every buffer, in order
        return checksum_parts(arrays, checksum(key) if loc.bound else 0) == loc.crc
    k = min(n, HEAD_BYTES)
    head = arrays[0][:n] if len(arrays[0]) >= k else _gather(arrays, k)
    return matches(key, loc, head, 0)


def _first(arrays: Sequence[np.ndarray], n: int) -> list[np.ndarray]:
    """The first ``n`` bytes of ``arrays`` as arrays in order."""
    out, left = [], n
    for a in arrays:
        if left <= 0:
            break
        out.append(a[:left])
        left -= len(a)
    return out


def _gather(arrays: Sequence[np.ndarray], n: int) -> np.ndarray:
    """The first ``n`` bytes of ``arrays`` laid end to end, as one (small) array."""
    return np.concatenate([a[:n] for a in arrays])[:n]


def _scatter(src: np.ndarray, arrays: Sequence[np.ndarray]) -> None:
    at = 0
    for a in arrays:
        k = min(len(a), len(src) - at)
        if k <= 0:
            break
        a[:k] = src[at:at + k]
        at += k


def _buffered(fd: int, arr: np.ndarray, start: int) -> int:
    done, n = 0, len(arr)
    while done < n:
        got = directio._preadv(fd, [arr[done:]], start + done)
        if got == 0:
            break
        done += got
    return done


def plan_runs(reads: list[_Read]) -> list[list[_Read]]:
    """Group reads into runs of one segment whose file ranges lie end to end."""
    if len(reads) <= 1:
        return [reads] if reads else []
    runs: list[list[_Read]] = []
    for r in sorted(reads, key=lambda r: (_seg(r).id, r.start)):
        run = runs[-1] if runs else None
        if run is not None:
            last = run[-1]
            end = last.start + last.n
            if (last.seg is r.seg and 0 <= r.start - end <= MAX_GAP and len(run) < MAX_READS
                    and r.start + r.n - run[0].start <= MAX_RUN):
                run.append(r)
                continue
        runs.append([r])
    return runs


def _seg(r: _Read) -> Segment:
    assert r.seg is not None, "inline reads are not planned into runs"
    return r.seg


def _read_run(run: list[_Read]) -> None:
    seg = _seg(run[0])
    try:
        if len(run) == 1:
            r = run[0]
            r.got, r.direct = read_range(seg, r.arr[:r.n], r.start)
        else:
            _read_coalesced(seg, run)
        for r in run:
            if r.got == r.n:
                r.crc_ok = matches(r.key, r.loc, r.arr[:r.n], r.offset)
    except OSError as e:
        for r in run:
            r.error = read_error(r.key, seg, e)


def _read_coalesced(seg: Segment, run: list[_Read]) -> None:
    """One ``preadv`` for the run: O_DIRECT when every read can go direct and no two share a
    page, else (or on EINVAL) through the page cache."""
    for r in run:
        r.coalesced = True
    if seg.dfd >= 0 and all(congruent(r.arr, r.start) for r in run):
        bounce = bounce_pages(2 * len(run))
        plans = [DirectRead(r.arr[:r.n], r.start, bounce) for r in run]
        if all(b.lo >= a.hi for a, b in zip(plans, plans[1:], strict=False)):
            iov, pos = [], plans[0].lo
            for p in plans:
                if p.lo > pos:
                    iov.append(_gap(p.lo - pos))
                iov.extend(p.iov)
                pos = p.hi
            try:
                total = read_vectored(seg.dfd, iov, plans[0].lo)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
            else:
                for r, p in zip(run, plans, strict=True):
                    r.got = p.finish(total - (p.lo - plans[0].lo))
                    r.direct = r.got == r.n
                return
    base = run[0].start
    arrays, pos = [], base
    for r in run:
        if r.start > pos:
            arrays.append(_gap(r.start - pos))
        arrays.append(r.arr[:r.n])
        pos = r.start + r.n
    total = read_vectored(seg.fd, arrays, base)
    for r in run:
        r.got = max(0, min(r.n, total - (r.start - base)))
        r.direct = False


def _gap(n: int) -> np.ndarray:
    """``n`` bytes of a shared, aligned buffer for the bytes between coalesced records (what
    lands there is never read, so every gap of every thread may share it)."""
    global _discard
    if _discard is None:
        _discard = aligned_empty(MAX_GAP + ALIGN).numpy()
    return _discard[:n]
