"""Reads for the SSD tier: resolve keys, coalesce adjacent records, read on the I/O pool, verify.

Requests are resolved and their segments pinned by the store, then read without its lock.
Records of one segment lying end to end (gaps up to ``MAX_GAP``: the 4 KiB padding) become one
``preadv`` with a buffer per block and a scratch buffer per gap. Whole-block reads are checked
against the stored crc32c in the pool thread (crc32c releases the GIL), and so is the head of
a read from byte 0 (both checksums are bound to the key: ``index.matches``).
"""

from __future__ import annotations

import errno
import os
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
import torch

from kvtier.errors import CorruptBlock, InvalidRequest, InvalidType, KVTierError
from kvtier.tiers.ssd import directio
from kvtier.tiers.ssd.directio import ALIGN, aligned_empty, is_aligned, read_exact, read_vectored
from kvtier.tiers.ssd.index import Location, matches
from kvtier.tiers.ssd.segments import Segment
from kvtier.tiers.ssd.store import Store

MAX_GAP = 64 * 1024
MAX_RUN = 64 * 1024**2
MAX_IOV = min(512, os.sysconf("SC_IOV_MAX") // 2 if hasattr(os, "sysconf") else 512)

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


def host_array(out: torch.Tensor) -> tuple[np.ndarray, bool]:
    """The numpy view to read into (out's own memory on CPU, else a staging buffer)."""
    if not isinstance(out, torch.Tensor):
        raise InvalidType(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.dtype != torch.uint8 or out.dim() != 1 or not out.is_contiguous():
        raise InvalidRequest(f"out must be a contiguous 1-D uint8 tensor, got {out.dtype} "
                             f"of shape {tuple(out.shape)}")
    if out.device.type == "cpu":
        return out.numpy(), False
    return aligned_empty(out.numel()).numpy(), True


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
        record, and issues one ``preadv`` for an aligned whole-block read. Same checks and
        outcomes as ``read_many``: whole-block reads are verified against the stored crc32c, a
        mismatch or a short read drops the block and raises ``CorruptBlock``. Inline blocks and
        non-CPU destinations take the general path.
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
            dfd = seg.dfd
            if dfd >= 0 and n % ALIGN == 0 and start % ALIGN == 0 and out.data_ptr() % ALIGN == 0:
                got = _preadv_direct(dfd, arr, start)  # the common case: one aligned O_DIRECT preadv
                direct = got > 0
                if got < n:
                    more, _ = read_exact(seg.fd, -1, arr[got:], start + got)
                    got += more
            else:
                got, direct = read_exact(seg.fd, dfd, arr, start)
            if got == n:
                crc_ok = matches(key, loc, arr, offset)
        except OSError as e:
            error = KVTierError(
                f"ssd read of block {key.hex()} from {seg.path.name} failed ({e.strerror or e})")
        finally:
            ok = error is None and got == n and crc_ok
            self.store.finish_read(seg, key, n, direct, ok)
        if ok:
            return n
        if error is not None:
            raise error
        if got < n:
            raise self.store.drop_corrupt(key, loc, "is truncated in its segment")
        raise self.store.drop_corrupt(key, loc, "failed its checksum")

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
                arr, staged = host_array(out)
                if not isinstance(offset, int) or offset < 0:
                    raise InvalidRequest(f"offset must be a non-negative int, got {offset!r}")
            except KVTierError as e:
                results[i] = e
                continue
            prepared.append((i, key, out, arr, staged, offset))
        pins = self.store.pin_many((p[1], p[5]) for p in prepared)
        reads: list[_Read] = []
        for (i, key, out, arr, staged, offset), pin in zip(prepared, pins, strict=True):
            if isinstance(pin, Exception):
                results[i] = pin
                continue
            loc, seg, blob = pin
            n = min(len(arr), loc.length - offset)
            reads.append(_Read(i, key, out, arr, staged, loc, offset, n, seg, blob))
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
            elif r.got < r.n:
                if r.seg is None and r.blob is None and store.location(r.key) is None:
                    results[r.index] = KeyError(r.key)  # deleted while we read
                else:
                    results[r.index] = store.drop_corrupt(r.key, r.loc, "is truncated in its segment")
            elif not r.crc_ok:
                results[r.index] = store.drop_corrupt(r.key, r.loc, "failed its checksum")
            else:
                if r.staged:
                    r.out[:r.n].copy_(torch.from_numpy(r.arr[:r.n]))
                results[r.index] = r.n
                done.append((r.key, r.n, r.direct, r.coalesced))
        if done:
            store.served(done)


def _preadv_direct(dfd: int, arr: np.ndarray, start: int) -> int:
    """One O_DIRECT ``preadv``; 0 on EINVAL (the caller then reads buffered)."""
    try:
        return directio._preadv(dfd, [arr], start)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        return 0


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
            if (last.seg is r.seg and 0 <= r.start - end <= MAX_GAP and len(run) < MAX_IOV
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
            r.got, r.direct = read_exact(seg.fd, seg.dfd, r.arr[:r.n], r.start)
        else:
            _read_coalesced(seg, run)
        for r in run:
            if r.got == r.n:
                r.crc_ok = matches(r.key, r.loc, r.arr[:r.n], r.offset)
    except OSError as e:
        for r in run:
            r.error = KVTierError(
                f"ssd read of block {r.key.hex()} from {seg.path.name} failed ({e.strerror or e})")


def _read_coalesced(seg: Segment, run: list[_Read]) -> None:
    base = run[0].start
    direct = seg.dfd >= 0 and base % ALIGN == 0 and all(
        is_aligned(r.arr) and r.n % ALIGN == 0 for r in run)
    arrays, pos = [], base
    for r in run:
        if r.start > pos:
            gap = r.start - pos
            arrays.append(aligned_empty(gap).numpy() if direct else np.empty(gap, np.uint8))
        arrays.append(r.arr[:r.n])
        pos = r.start + r.n
    try:
        total = read_vectored(seg.dfd if direct else seg.fd, arrays, base)
    except OSError as e:
        if not direct or e.errno != errno.EINVAL:
            raise
        direct = False
        total = read_vectored(seg.fd, arrays, base)
    for r in run:
        r.got = max(0, min(r.n, total - (r.start - base)))
        r.direct = direct
        r.coalesced = True
