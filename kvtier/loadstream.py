"""Per-layer readiness of one load: what a consumer of ``Loader.load`` waits on.

Layer ``i`` is ready once every valid block's layer ``i`` has landed; a block that could not be
read truncates the prefix before it (``tokens`` only shrinks). On a GPU each layer's readiness is
also a CUDA event recorded on the loader's copy stream, which the consumer's stream waits on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from kvtier.errors import KVTierError

log = logging.getLogger(__name__)


class PrefixTruncated(KVTierError):
    """The stream ended short of the tokens the consumer planned for (a block was unreadable)."""

    def __init__(self, tokens: int, planned: int) -> None:
        super().__init__(f"only {tokens} of {planned} planned prefix tokens could be loaded")
        self.tokens = tokens
        self.planned = planned


class LoadStream:
    """Per-layer readiness of one load. ``wait_layer(i)`` returns once layer ``i`` is usable."""

    def __init__(self, n_layers: int, n_blocks: int, block_tokens: int,
                 cuda_stream: torch.cuda.Stream | None = None) -> None:
        self.n_layers = n_layers
        self.block_tokens = block_tokens
        self.planned_blocks = n_blocks
        self.error: str | None = None
        self.seconds: float | None = None  # wall time from start to the last path finishing
        self._landed = np.zeros((n_layers, n_blocks), dtype=bool)
        self._valid = n_blocks
        self._missing = np.full(n_layers, n_blocks, dtype=np.int64)  # per layer: valid blocks not landed
        self._ready = [threading.Event() for _ in range(n_layers)]
        self._events: list[torch.cuda.Event | None] = [None] * n_layers
        self._cuda = cuda_stream
        self._lock = threading.Lock()
        self._paths_left = 2
        self._done = threading.Event()
        self._cancel = threading.Event()
        self._fallen: set[int] = set()
        self._start = time.perf_counter()
        self._on_done: Callable[[], None] | None = None

    # ---- consumer side ---------------------------------------------------------------------
    @property
    def planned_tokens(self) -> int:
        return self.planned_blocks * self.block_tokens

    @property
    def valid_blocks(self) -> int:
        return self._valid

    @property
    def tokens(self) -> int:
        """Tokens of the prefix that are (or will be) correct; final once ``done``."""
        return self._valid * self.block_tokens

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait_layer(self, layer: int, timeout: float | None = None) -> int:
        """Wait until ``layer`` of every valid block has landed; returns the valid tokens.

        On a GPU the current stream is made to wait on the layer's CUDA event (no host sync).
        Raises TimeoutError if not ready within ``timeout`` seconds.
        """
        if not self._ready[layer].wait(timeout):
            raise TimeoutError(f"layer {layer} not loaded within {timeout} s")
        ev = self._events[layer]
        if ev is not None:
            torch.cuda.current_stream().wait_event(ev)
        return self.tokens

    def layer_event(self, layer: int) -> torch.cuda.Event | None:
        """The CUDA event marking ``layer`` ready (None on CPU or before it is ready)."""
        return self._events[layer]

    def wait_all(self, timeout: float | None = None) -> int:
        """Wait for both paths to finish; returns the final valid tokens."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"load not finished within {timeout} s")
        for i in range(self.n_layers):
            self.wait_layer(i)
        return self.tokens

    def cancel(self) -> None:
        """Stop issuing work; the stream then ends with the contiguous prefix that landed."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    # ---- producer side ---------------------------------------------------------------------
    def complete(self, tokens: int, error: str | None = None) -> None:
        """End a load that read its prefix in one piece: every layer of the first
        ``tokens // block_tokens`` blocks landed, the rest never will (for a one-path loader)."""
        blocks = min(self.planned_blocks, tokens // self.block_tokens)
        if blocks:
            self._land(range(self.n_layers), range(blocks))
        if blocks < self.planned_blocks:
            self._truncate(blocks, error or f"only {blocks} of {self.planned_blocks} blocks were cached")
        with self._lock:
            self._paths_left = 1
        self._path_done()

    def _land(self, layers: Sequence[int], blocks: Sequence[int]) -> None:
        if isinstance(layers, range) and layers.step == 1 and len(blocks) == 1:
            self._land_one(layers.start, layers.stop, blocks[0])
            return
        rows, cols = np.asarray(layers, dtype=np.intp), np.asarray(blocks, dtype=np.intp)
        if not rows.size or not cols.size:
            return
        idx = np.ix_(rows, cols)
        with self._lock:  # a few array operations per call, whatever the layer count
            new = ~self._landed[idx]
            self._landed[idx] = True
            self._missing[rows] -= (new & (cols < self._valid)).sum(axis=1)
            for layer in rows[self._missing[rows] == 0].tolist():
                self._check(layer)

    def _land_one(self, lo: int, hi: int, block: int) -> None:
        """``_land(range(lo, hi), [block])`` with slices: what a path lands per read (a block's
        group of layers), without building index arrays."""
        if lo >= hi:
            return
        with self._lock:
            landed = self._landed[lo:hi, block]
            new = ~landed
            landed[:] = True
            if block < self._valid:
                self._missing[lo:hi] -= new
            for layer in (np.flatnonzero(self._missing[lo:hi] == 0) + lo).tolist():
                self._check(layer)

    def _recount(self) -> None:
        """Recount what each layer misses after ``_valid`` shrank (lock held)."""
        self._missing = (~self._landed[:, : self._valid]).sum(axis=1)

    def _check(self, layer: int) -> None:
        if not self._ready[layer].is_set() and self._missing[layer] == 0:
            if self._cuda is not None:
                ev = torch.cuda.Event()
                ev.record(self._cuda)  # every copy of this layer was enqueued on this stream before
                self._events[layer] = ev
            self._ready[layer].set()

    def _truncate(self, block: int, why: str) -> None:
        with self._lock:
            if block < self._valid:
                self._valid = block
                self.error = why
                self._recount()
                log.warning("load truncated to %d blocks: %s", block, why)
            for layer in range(self.n_layers):
                self._check(layer)

    def _path_done(self) -> None:
        with self._lock:
            self._paths_left -= 1
            if self._paths_left:
                return
            complete = self._landed.all(axis=0)
            first_missing = int(np.argmin(complete)) if not complete.all() else complete.size
            if first_missing < self._valid:
                self._valid = first_missing
                self.error = self.error or "load cancelled"
                self._recount()
            for layer in range(self.n_layers):
                self._check(layer)
            self.seconds = time.perf_counter() - self._start
        # Dropped once called: it holds the load's job, which holds this stream and the
        # destination, and a cycle would keep ``get``'s KV from its pool until a collection.
        on_done, self._on_done = self._on_done, None
        if on_done is not None:
            try:
                on_done()
            except Exception:  # noqa: BLE001  accounting must never fail a load
                log.exception("reporting a finished load failed")
        self._done.set()
