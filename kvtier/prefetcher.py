"""The prefetcher: promote a prefix toward a faster tier in the background, before the request
that needs it arrives (handles, policies and the budget: ``kvtier.prefetch``)."""

from __future__ import annotations

import logging
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from kvtier.keys import TokenIds, as_token_array
from kvtier.lookups import Lookups
from kvtier.prefetch import TERMINAL, PrefetchBudget, PrefetchHandle, PrefetchTimeout, check_policy
from kvtier.recorder import StatsRecorder
from kvtier.reload import Reloads

log = logging.getLogger(__name__)

MAX_PREFETCH_HANDLES = 10_000  # finished handles kept for status queries


class Prefetcher:
    """Runs prefetches on two worker threads; thread-safe."""

    def __init__(self, lookups: Lookups, reloads: Reloads, recorder: StatsRecorder,
                 budget_share: float) -> None:
        self.lookups = lookups
        self.reloads = reloads
        self.recorder = recorder
        self.placement = lookups.placement
        self.budget_share = budget_share
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="kvtier-prefetch")
        self._handles: OrderedDict[str, PrefetchHandle] = OrderedDict()  # newest last, bounded
        self._budgets: dict[int, PrefetchBudget] = {}  # tier index -> budget

    def start(self, namespace: str, token_ids: TokenIds, to: str, *,
              policy: str, timeout_s: float | None) -> PrefetchHandle:
        """See ``TieredCache.prefetch``."""
        check_policy(policy)
        target = self.placement.tier_index(to)
        tokens = as_token_array(token_ids)
        handle = PrefetchHandle(namespace, to, len(tokens), policy)
        with self.placement.lock:
            self._handles[handle.id] = handle
            while len(self._handles) > MAX_PREFETCH_HANDLES:  # forget the oldest finished ones
                oldest = next(iter(self._handles.values()))
                if oldest.state not in TERMINAL:
                    break
                self._handles.popitem(last=False)
        self._pool.submit(self._run, handle, namespace, tokens, target)
        if policy == "wait_complete":
            handle.wait()
        elif policy == "timeout":
            wait_s = PrefetchTimeout().seconds(len(tokens)) if timeout_s is None else timeout_s
            if not handle.wait(wait_s):
                self._finish(handle, "timeout", f"timed out after {wait_s:.3f} s")
        return handle

    def status(self, prefetch_id: str) -> PrefetchHandle:
        return self._handles[prefetch_id]

    def budget(self, to: str) -> PrefetchBudget:
        """The budget of prefetched bytes held in tier ``to`` (stale holdings pruned first)."""
        p = self.placement
        t = p.tier_index(to)
        with p.lock:
            budget = self._budgets.get(t)
            if budget is None:
                budget = self._budgets[t] = PrefetchBudget(self.budget_share)
            for key, (_, hits) in budget.held().items():
                e = p.index.get(key)
                if e is None or t not in e.tiers or e.hits > hits:  # gone, or a reader used it
                    budget.release(key)
        return budget

    def _run(self, handle: PrefetchHandle, namespace: str, token_ids: np.ndarray, target: int) -> None:
        if not handle.start():
            return
        tier = self.placement.tiers[target]
        budget = self.budget(tier.name)
        ns, entries, _ = self.lookups.walk(namespace, token_ids, pin=True)
        try:
            for e in entries:
                if handle.cancelled:
                    return self._finish(handle, "cancelled")
                if target not in e.tiers:
                    if not budget.reserve(e.key, e.nbytes, tier.capacity_bytes, e.hits):
                        handle.stopped_by = "budget"
                        break
                    if not self.reloads.promote(e, None, target):
                        budget.release(e.key)
                        break
                handle.advance(e.tokens)
            self._finish(handle, "done")
        except Exception as e:  # noqa: BLE001  a failed prefetch is reported, never raised
            log.exception("prefetch %s failed", handle.id)
            self._finish(handle, "failed", str(e))
        finally:
            self.placement.release(entries)

    def _finish(self, handle: PrefetchHandle, state: str, error: str | None = None) -> None:
        if handle.finish(state, error):
            self.recorder.prefetch_finished(state)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
