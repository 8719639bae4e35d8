"""A prefix's KV cut into blocks, with the byte geometry worked out once per put or reload.

Moving one block between the block format and a prefix's tensors is, per layer and tensor, a
slice and a copy: 64 of them for a Llama-3-8B block. Done with torch views per block that is
tens of microseconds of Python per tensor, more than the copy itself for 2 MiB blocks (a
16-token page: 32 KiB per tensor). ``PrefixKV`` takes the tensors' numpy views once; then:

- ``decode(i, data)`` of a ``none`` block into host KV is one ``copy_runs`` call for the whole
  block (``kvtier._fastcopy``: a run per layer and tensor, streaming stores): into tensors that
  share one allocation at a regular stride (``KVLayout.empty`` allocates them so) or into a
  tensor per layer and K/V, each its own allocation (a model's own cache). Where the C module is
  not built, one strided numpy copy per tensor of a layer (a copy per tensor for the latter).
  ``decode_many`` lands many blocks lying in one array (a host tier's memory) in one call.
  Other codecs and device destinations take ``decode_block_into`` on ``views(i)``;
- ``prepare(i, codec)`` hands a ``none`` block's parts to the encoder as row ``i`` of per-tensor
  ``[blocks, bytes]`` numpy views made once, without touching torch, and the encoder copies
  them into place with one call per block.

No copy goes through torch's thread pool (``kvtier.bytecopy``); what is verified and how
corrupt bytes are refused is exactly ``kvtier.block``'s.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence

import numpy as np
import torch

from kvtier.block import (
    PreparedBlock,
    decode_block_into,
    layout,
    parse_table,
    prepare_block,
    verify_layers,
)
from kvtier.bufpool import block_buffers
from kvtier.bytecopy import ELEMENT_INTS, copy_runs, host_elements
from kvtier.codecs import Codec
from kvtier.errors import CorruptBlock

GATHER_BYTES = 16 << 20  # KV a put of non-contiguous host tensors makes contiguous at a time (pooled)


class PrefixKV:
    """``kv`` (layers of contiguous tensors, token axis first) in blocks of ``block_tokens``."""

    def __init__(self, kv: Sequence[Sequence[torch.Tensor]], block_tokens: int) -> None:
        self.kv = kv
        self.block_tokens = block_tokens
        self.blocks = kv[0][0].shape[0] // block_tokens
        self._host = all(t.device.type == "cpu" and t.is_contiguous() for layer in kv for t in layer)
        # Bytes per token of each tensor of a layer, and of a whole layer.
        self._row = [t[0].numel() * t.element_size() if t.shape[0] else 0 for t in kv[0]]
        self._sizes = [block_tokens * r for r in self._row]  # bytes of a block of each tensor
        self._block_bytes = np.array(self._sizes, np.int64)
        self._plans: dict[tuple[int, int, int, int], np.ndarray] = {}
        self._layer_bytes = sum(self._sizes)
        self._lengths = [self._layer_bytes] * len(kv)
        self._none = layout("none", self._lengths)  # every none block's layout
        # Host tensors not all contiguous (a model's cache seen token-first: transposed views):
        # a put gathers GATHER_BYTES of them at a time into contiguous memory (``_gathered``).
        self._gather = not self._host and all(
            t.device.type == "cpu" and t.element_size() in ELEMENT_INTS for layer in kv for t in layer)
        self._chunks: dict[int, list[list[np.ndarray]]] = {}
        self._chunks_lock = threading.Lock()

    @property
    def layer_lengths(self) -> list[int]:
        """Each layer's payload bytes in a ``none`` block of this prefix."""
        return self._lengths

    # Made on first use: each takes ~0.3 ms for a 32-layer prefix, and a put that finds all its
    # blocks stored, or a load of device KV, needs neither.
    @functools.cached_property
    def _blocked(self) -> list[list[np.ndarray]] | None:
        """Per tensor with bytes: its blocks' bytes as a ``[blocks, bytes]`` numpy view (host
        tensors only). A prepared block is these and its row (``PreparedBlock.row``): making 64
        views per block cost more Python than a 2 MiB block's header and placement together."""
        if not self._host:
            return None
        return [[_bytes(t)[: self.blocks * n].reshape(self.blocks, n)
                 for t, n in zip(layer, self._sizes, strict=True) if n] for layer in self.kv]

    @functools.cached_property
    def _strided(self) -> list[np.ndarray] | None:
        """Per tensor of a layer: a ``[layers, tokens * row]`` view over all layers (see
        ``_strided_views``; host tensors only)."""
        return _strided_views(self.kv) if self._host else None

    @functools.cached_property
    def _targets(self) -> tuple[list[np.ndarray], np.ndarray, np.ndarray] | None:
        """For ``decode_layers`` (host tensors only): the byte spans a reload writes, and per
        layer and tensor of a layer the span it lies in and block 0's offset there. A strided
        prefix is one span per tensor of a layer (its rows a stride apart); scattered tensors
        (one allocation each, as a model's own cache) a span per tensor. None where the layers'
        tensors differ in size (the general decoder then says what is wrong)."""
        if not self._host:
            return None
        count, width = len(self.kv), len(self._sizes)
        rows = self.blocks * self.block_tokens
        if any(len(layer) != width or any(t.shape[0] < rows or t[0].numel() * t.element_size() != r
                                          for t, r in zip(layer, self._row, strict=True))
               for layer in self.kv if rows):
            return None
        index = np.zeros((count, width), np.int64)
        base = np.zeros((count, width), np.int64)
        if self._strided is not None:
            spans = [np.lib.stride_tricks.as_strided(v, ((v.shape[0] - 1) * v.strides[0] + v.shape[1],), (1,))
                     for v in self._strided]
            index[:] = np.arange(width, dtype=np.int64)
            base[:] = np.outer(np.arange(count, dtype=np.int64), [v.strides[0] for v in self._strided])
        else:
            spans = [_bytes(t) for layer in self.kv for t in layer]
            index[:] = np.arange(count * width, dtype=np.int64).reshape(count, width)
        return spans, index, base

    def _plan(self, first: int, step: int, lo: int, hi: int) -> np.ndarray:
        """``copy_runs`` rows, [layers, tensors, 4], copying layers ``lo:hi`` of a block laid out
        at ``first``/``step`` into block 0 of the tensors (made once per layout and group)."""
        key = (first, step, lo, hi)
        plan = self._plans.get(key)
        if plan is None:
            assert self._targets is not None  # a step is only found where there are targets
            _, index, base = self._targets
            plan = np.zeros((hi - lo, len(self._sizes), 4), np.int64)
            at = first + np.arange(lo, hi, dtype=np.int64) * step
            for j, n in enumerate(self._sizes):
                plan[:, j, 0], plan[:, j, 1], plan[:, j, 2], plan[:, j, 3] = index[lo:hi, j], base[lo:hi, j], at, n
                at = at + n
            self._plans[key] = plan
        return plan

    def views(self, i: int) -> list[list[torch.Tensor]]:
        """Block ``i``'s tensor views."""
        self._check(i)
        a, b = i * self.block_tokens, (i + 1) * self.block_tokens
        return [[t[a:b] for t in layer] for layer in self.kv]

    def prepare(self, i: int, codec: Codec) -> PreparedBlock:
        """Block ``i`` encoded and laid out (``kvtier.block.prepare_block``)."""
        if codec.name != "none" or (self._blocked is None and not self._gather):
            return prepare_block(codec, self.views(i))
        self._check(i)
        payloads, row = (self._blocked, i) if self._blocked is not None else self._gathered(i)
        version, offsets, total = self._none
        return PreparedBlock("none", version, self.block_tokens, total, offsets, self._lengths,
                             payloads, row=row)

    def _gathered(self, i: int) -> tuple[list[list[np.ndarray]], int]:
        """Block ``i`` of host tensors that are not contiguous, as ``_blocked`` would hold it:
        the blocks around it (``GATHER_BYTES`` of KV) copied by numpy into one recycled buffer
        (``block_buffers``), the last two such chunks kept. Why: a block at a time, each of its
        64 tensor slices went through torch views and a ``contiguous`` copy: a put of a
        transformers DynamicCache (``save_kv``) ran at a seventh of a contiguous put's speed.
        A chunk's buffer goes back to the pool once no prepared block of it is held."""
        per = max(1, GATHER_BYTES // (self._layer_bytes * len(self.kv) or 1))
        c = i // per
        with self._chunks_lock:
            chunk = self._chunks.get(c)
            if chunk is None:
                chunk = self._chunks[c] = self._gather_chunk(c * per, min(self.blocks, (c + 1) * per))
                while len(self._chunks) > 2:
                    del self._chunks[next(iter(self._chunks))]
        return chunk, i - c * per

    def _gather_chunk(self, lo: int, hi: int) -> list[list[np.ndarray]]:
        """Blocks ``lo:hi``, per tensor with bytes a contiguous ``[blocks, bytes]`` array."""
        count, bt = hi - lo, self.block_tokens
        buf = block_buffers.take(count * self._layer_bytes * len(self.kv)).numpy()
        out, at = [], 0
        for layer in self.kv:
            parts = []
            for t, n in zip(layer, self._sizes, strict=True):
                if not n:
                    continue
                src = host_elements(t[lo * bt: hi * bt])
                dst = buf[at: at + count * n]
                np.copyto(dst.view(src.dtype).reshape(src.shape), src)
                parts.append(dst.reshape(count, n))
                at += count * n
            out.append(parts)
        return out

    def decode(self, i: int, data: torch.Tensor, *, verify: bool = True) -> None:
        """Decode the block ``data`` (1-D uint8) into block ``i``: the fastest exact way the
        destination allows. Raises CorruptBlock like ``decode_block_into``."""
        self._check(i)
        if data.device.type != "cpu":
            decode_block_into(data, self.views(i), verify=verify)
            return
        arr = data.numpy()
        codec, _, _, _, table = parse_table(arr.data)
        step = self._step(codec, table)
        if not step:
            decode_block_into(data, self.views(i), verify=verify)
            return
        if verify:
            verify_layers(table, range(len(table)), arr)
        self.decode_layers(i, arr, table[0][0], step, range(len(table)))

    def strided_step(self, codec: str, table: Sequence[tuple[int, int, int]]) -> int:
        """For ``decode_layers``: the regular distance between the layers of a block with this
        codec and (offset, length, crc) table (``parse_table``, or a ``BlockHeader``'s
        ``layers``); 0 where that copy does not apply (see ``decode``)."""
        return self._step(codec, table)

    def decode_layers(self, i: int, arr: np.ndarray, first: int, step: int, layers: range) -> None:
        """Copy ``layers`` of a ``none`` block into block ``i``, unverified: one ``copy_runs``
        call for all of them (numpy: one copy per tensor of a layer, strided where the prefix
        is). ``arr`` holds the block's bytes with layer 0 at ``first`` and each next one ``step``
        further (``strided_step``); ``arr`` may be a range of the block holding just ``layers``
        (``first`` then negative past layer 0). A loader landing layers in groups calls this per
        group. Raises CorruptBlock if ``arr`` does not hold them."""
        self._check(i)
        lo, hi = layers.start, layers.stop
        if not 0 <= lo < hi <= len(self.kv):
            raise IndexError(f"layers {lo}..{hi} of a prefix of {len(self.kv)} layers")
        if first + lo * step < 0 or arr.size < first + (hi - 1) * step + self._layer_bytes:
            raise CorruptBlock(f"block truncated: {arr.size} bytes hold no layers {lo}..{hi - 1}")
        if copy_runs is not None:
            runs = self._plan(first, step, lo, hi).copy()
            runs[:, :, 1] += i * self._block_bytes  # destination: block i of each tensor
            assert self._targets is not None
            copy_runs(self._targets[0], arr, runs)
            return
        start, count = first + lo * step, hi - lo
        if start + count * step <= arr.size:  # the usual case: a plain reshape, no as_strided
            src = arr[start: start + count * step].reshape(count, step)
        else:
            src = np.lib.stride_tricks.as_strided(arr[start:], (count, self._layer_bytes), (step, 1))
        if self._strided is None:  # scattered tensors: a copy per tensor
            assert self._targets is not None
            spans, index, base = self._targets
            for k, layer in enumerate(layers):
                at = 0
                for j, n in enumerate(self._sizes):
                    to = int(base[layer, j]) + i * n
                    np.copyto(spans[index[layer, j]][to:to + n], src[k, at:at + n])
                    at += n
            return
        at = 0
        for view, n in zip(self._strided, self._sizes, strict=True):
            np.copyto(view[lo:hi, i * n:(i + 1) * n], src[:, at:at + n])
            at += n

    def decode_many(self, arr: np.ndarray, blocks: Sequence[tuple[int, int]], step: int, layers: range) -> None:
        """``decode_layers`` for many ``none`` blocks that lie in one array (a memory tier's
        ``host_bytes``): block ``i``'s layer 0 at ``arr[first]`` for each ``(i, first)``, all
        with the same ``step``. One ``copy_runs`` call for them all. Why: a call per block of
        a host prefix cost ~60 us of Python per 2 MiB block, a third of its copy. Unverified,
        as ``decode_layers``; raises CorruptBlock (nothing copied) if a block is out of ``arr``."""
        if not blocks:
            return
        count = len(self.kv)
        if not 0 <= layers.start < layers.stop <= count:
            raise IndexError(f"layers {layers.start}..{layers.stop} of a prefix of {count} layers")
        for i, first in blocks:
            self._check(i)
            if first < 0 or arr.size < first + (count - 1) * step + self._layer_bytes:
                raise CorruptBlock(f"block {i} at {first} is out of its tier's memory")
        if copy_runs is None:
            for i, first in blocks:
                self.decode_layers(i, arr, first, step, layers)
            return
        assert self._targets is not None  # a step is only found where there are targets
        rows = np.array(blocks, dtype=np.int64)
        runs = np.repeat(self._plan(0, step, layers.start, layers.stop)[None], len(blocks), axis=0)
        runs[..., 1] += (rows[:, :1] * self._block_bytes)[:, None, :]  # block i of each tensor
        runs[..., 2] += rows[:, 1, None, None]
        copy_runs(self._targets[0], arr, runs.reshape(-1, 4))

    def _check(self, i: int) -> None:
        if not 0 <= i < self.blocks:
            raise IndexError(f"block {i} of a prefix of {self.blocks} blocks")

    def _step(self, codec: str, table: Sequence[tuple[int, int, int]]) -> int:
        """The regular distance between the layers' payloads when one strided copy per tensor
        of a layer decodes the block exactly (codec ``none``, every layer the size this prefix
        expects, at one stride, into a strided host destination); else 0."""
        length = self._layer_bytes
        if self._targets is None or codec != "none" or len(table) != len(self.kv):
            return 0
        step = table[1][0] - table[0][0] if len(table) > 1 else length
        at = table[0][0]
        for offset, n, _ in table:
            if n != length or offset != at:
                return 0
            at += step
        return step if step >= length else 0


def _bytes(t: torch.Tensor) -> np.ndarray:
    return t.detach().reshape(-1).view(torch.uint8).numpy()


def _strided_views(kv: Sequence[Sequence[torch.Tensor]]) -> list[np.ndarray] | None:
    """Per tensor of a layer, one ``[layers, tokens * row]`` numpy view across all layers, when
    every layer's tensor lies in one allocation at a regular stride; else None."""
    layers, views = len(kv), []
    for j in range(len(kv[0])):
        ts = [layer[j] for layer in kv]
        nbytes = ts[0].numel() * ts[0].element_size()
        base = ts[0].untyped_storage()
        if any(t.numel() * t.element_size() != nbytes or t.untyped_storage().data_ptr() != base.data_ptr()
               for t in ts) or not nbytes:
            return None
        ptrs = [t.data_ptr() for t in ts]
        stride = ptrs[1] - ptrs[0] if layers > 1 else nbytes
        if stride < nbytes or any(b - a != stride for a, b in zip(ptrs[:-1], ptrs[1:], strict=True)):
            return None
        whole = torch.empty(0, dtype=torch.uint8).set_(base, 0, (base.nbytes(),), (1,)).numpy()
        start = ptrs[0] - base.data_ptr()
        if start + (layers - 1) * stride + nbytes > whole.nbytes:
            return None
        views.append(np.lib.stride_tricks.as_strided(whole[start:], (layers, nbytes), (stride, 1)))
    return views
