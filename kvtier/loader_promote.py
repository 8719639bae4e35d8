"""Promotion of the blocks a load read from a slower tier, from the bytes it already read.

Path 2 of the loader gathers each block's verified ranges (or its whole verified bytes) into an
``Assembly``; once a block is whole it is handed to the cache's ``promote_loaded`` on one
background thread, in prefix order, so a tier too small for the prefix keeps its head, never a
scattered subset. The first promotion refused stops the load's later ones (they would only evict
the earlier ones).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import Protocol

import torch

from kvtier.bytecopy import copy_bytes

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Assembly:
    """A block's verified bytes gathered from path 2's ranges, promoted once all have landed."""

    key: bytes
    data: torch.Tensor | None  # None until a whole-read block lands
    left: int = 0  # ranges still to land
    created: float = 0.0  # the leased entry's (``promote_loaded`` promotes only that entry)


class PromotedLoad(Protocol):
    """The per-load state a ``Promoter`` works on (the loader's job)."""

    promos: dict[int, Assembly]
    promo_order: list[int]
    promo_next: int
    promo_failed: bool
    keep: frozenset[bytes]


class PromotesLoaded(Protocol):
    def promote_loaded(self, key: bytes, data: torch.Tensor, *, keep: Collection[bytes] = (),
                       created: float = 0.0) -> bool: ...


class Promoter:
    """Gathers and submits a loader's promotions. ``lock`` guards every job's promotion state."""

    def __init__(self, cache: PromotesLoaded) -> None:
        self.cache = cache
        self.lock = threading.RLock()  # a done future runs its callback in the submitter
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kvtier-load-promote")
        self._pending: set[Future] = set()

    def gather_whole(self, job: PromotedLoad, i: int, out: torch.Tensor) -> None:
        """Keep block ``i``'s whole verified bytes (``out`` goes back to the ring: copied)."""
        a = job.promos.get(i)
        if a is None:
            return
        a.data = torch.empty_like(out)
        copy_bytes(a.data, out)
        with self.lock:
            a.left = 0
            self.submit_promotions(job)

    def gather(self, job: PromotedLoad, i: int, buf: torch.Tensor, lo: int, hi: int) -> None:
        """Keep a verified range of block ``i``; promote once the block is whole."""
        a = job.promos.get(i)
        if a is None:
            return
        assert a.data is not None  # allocated when the block's header was read
        copy_bytes(a.data[lo:hi], buf)
        self.filled(job, i)

    def filled(self, job: PromotedLoad, i: int) -> None:
        """One more verified range of block ``i`` is in its assembly (the caller copied it);
        promote once the block is whole."""
        with self.lock:
            a = job.promos.get(i)
            if a is None:
                return
            a.left -= 1
            if not a.left:
                self.submit_promotions(job)

    def abandon(self, job: PromotedLoad, i: int) -> None:
        """Block ``i`` will not be promoted by this load."""
        with self.lock:
            if job.promos.pop(i, None) is not None:
                self.submit_promotions(job)

    def submit_promotions(self, job: PromotedLoad) -> None:
        """Promote whole blocks in prefix order (lock held)."""
        while job.promo_next < len(job.promo_order):
            i = job.promo_order[job.promo_next]
            a = job.promos.get(i)
            if a is not None and a.left:
                return  # block i is still landing
            job.promo_next += 1
            if a is not None:
                del job.promos[i]
                fut = self._pool.submit(self._promote, job, a)
                self._pending.add(fut)
                fut.add_done_callback(self._done)

    def _promote(self, job: PromotedLoad, a: Assembly) -> None:
        if job.promo_failed:
            return  # the tier had no room for an earlier block: later ones would only evict it
        assert a.data is not None  # submitted once whole
        try:
            ok = self.cache.promote_loaded(a.key, a.data, keep=job.keep, created=a.created)
        except Exception:  # noqa: BLE001  a failed promotion costs a later slow read, nothing more
            log.exception("promoting block %s failed", a.key.hex())
            ok = False
        job.promo_failed = not ok

    def _done(self, fut: Future) -> None:
        with self.lock:
            self._pending.discard(fut)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every promotion submitted so far has run."""
        with self.lock:
            pending = list(self._pending)
        wait_futures(pending, timeout)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
