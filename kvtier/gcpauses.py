"""Python's garbage collector in a long-running process: its pauses counted, the startup heap
frozen.

Why: a full (generation 2) collection walks every object the collector tracks, holding the GIL
throughout. The sidecar's imports (torch, FastAPI, pydantic) leave about 200,000 of them, so
each full collection stalled the event loop, and the request that set it off, for ~90 ms on the
development VM; a put of 2,048 engine pages of 128 KiB set one off every few calls (a quarter
of that put's time). ``freeze_startup_heap`` moves what exists once the server has started into
the collector's permanent generation (``gc.freeze``, as vLLM's engine does once it has
started), so a full collection walks only what was allocated since (~1 ms). Frozen objects are
still freed when their last reference goes; only a reference cycle among them would stay.

``GCPauses`` times every collection (``gc.callbacks``) by generation, so ``/metrics`` shows
what the collector costs (``kvtier_gc_pause_seconds``) instead of leaving it as unexplained
latency.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable

from kvtier.stats import Histogram

# Upper bounds (seconds) of the pause histogram's buckets: a young collection takes tens of
# microseconds, a full one over a large heap up to seconds.
PAUSE_BUCKETS = (1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
GENERATIONS = 3


def freeze_startup_heap() -> int:
    """Collect once, then move every object now tracked into the permanent generation; returns
    how many are frozen (``gc.get_freeze_count``). Call it once startup is done (imports, the
    cache opened, the app built), before serving."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class GCPauses:
    """Times each collection from its ``start`` to its ``stop`` callback.

    The callbacks run inside the collector, in whichever thread set it off, with the GIL held
    and no other collection running: they only update plain numbers here (no lock to take, so a
    collection that starts while another thread holds one cannot deadlock on it). A scrape reads
    them without a lock too, so it may see one collection's count without its seconds."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.generations = [Histogram(PAUSE_BUCKETS) for _ in range(GENERATIONS)]
        self._started = 0.0

    def callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = self.clock()
        else:
            self.generations[min(int(info["generation"]), GENERATIONS - 1)].observe(self.clock() - self._started)


_lock = threading.Lock()
_installed: GCPauses | None = None


def gc_pauses() -> GCPauses:
    """This process's pause counter, installed in ``gc.callbacks`` on first use (once)."""
    global _installed
    with _lock:
        if _installed is None:
            _installed = GCPauses()
            gc.callbacks.append(_installed.callback)
        return _installed
