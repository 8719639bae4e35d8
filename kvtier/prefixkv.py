"""A prefix's KV cut into blocks, with the byte geometry worked out once per put or reload.

Moving one block between the block format and a prefix's tensors is, per layer and tensor, a
slice and a copy: 64 of them for a Llama-3-8B block. Done with torch views per block that is
tens of microseconds of Python per tensor, more than the copy itself for 2 MiB blocks (a
16-token page: 32 KiB per tensor). ``PrefixKV`` takes the tensors' numpy views once; then:

- ``decode(i, data)`` of a ``none`` block into a host prefix whose tensors share one allocation
  at a regular stride (``KVLayout.empty`` allocates them so) is one ``copy_runs`` call for the
  whole block (``kvtier._fastcopy``: a run per layer and tensor, streaming stores), or one
  strided numpy copy per tensor of a layer where that is not built; other codecs, device
  destinations and scattered tensors take ``decode_block_into`` on ``views(i)``;
- ``prepare(i, codec)`` hands a ``none`` block's parts to the encoder as row ``i`` of per-tensor
  ``[blocks, bytes]`` numpy views made once, without touching torch, and the encoder copies
  them into place with one call per block.

No copy goes through torch's thread pool (``kvtier.bytecopy``); what is verified and how
corrupt bytes are refused is exactly ``kvtier.block``'s.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch

from kvtier.block import (
    PreparedBlock,
    checksum,
    decode_block_into,
    layout,
    parse_table,
    prepare_block,
)
from kvtier.bytecopy import copy_runs
from kvtier.codecs import Codec
from kvtier.errors import CorruptBlock


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
    def _spans(self) -> list[np.ndarray]:
        """For ``copy_runs``: per tensor of a layer, the bytes its strided view spans."""
        assert self._strided is not None
        return [np.lib.stride_tricks.as_strided(v, ((v.shape[0] - 1) * v.strides[0] + v.shape[1],), (1,))
                for v in self._strided]

    def _plan(self, first: int, step: int, lo: int, hi: int) -> np.ndarray:
        """``copy_runs`` rows, [layers, tensors, 4], copying layers ``lo:hi`` of a block laid out
        at ``first``/``step`` into block 0 of the tensors (made once per layout and group)."""
        key = (first, step, lo, hi)
        plan = self._plans.get(key)
        if plan is None:
            assert self._strided is not None
            plan = np.zeros((hi - lo, len(self._sizes), 4), np.int64)
            at = first + np.arange(lo, hi, dtype=np.int64) * step
            for j, (view, n) in enumerate(zip(self._strided, self._sizes, strict=True)):
                plan[:, j, 0], plan[:, j, 3] = j, n
                plan[:, j, 1] = np.arange(lo, hi, dtype=np.int64) * view.strides[0]
                plan[:, j, 2] = at
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
        if codec.name != "none" or self._blocked is None:
            return prepare_block(codec, self.views(i))
        self._check(i)
        version, offsets, total = self._none
        return PreparedBlock("none", version, self.block_tokens, total, offsets, self._lengths,
                             self._blocked, row=i)

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
            for n, (offset, length, crc) in enumerate(table):
                if offset + length > arr.size or checksum(arr[offset: offset + length]) != crc:
                    raise CorruptBlock(f"layer {n} payload checksum mismatch")
        self.decode_layers(i, arr, table[0][0], step, range(len(table)))

    def strided_step(self, codec: str, table: Sequence[tuple[int, int, int]]) -> int:
        """For ``decode_layers``: the regular distance between the layers of a block with this
        codec and (offset, length, crc) table (``parse_table``, or a ``BlockHeader``'s
        ``layers``); 0 where that copy does not apply (see ``decode``)."""
        return self._step(codec, table)

    def decode_layers(self, i: int, arr: np.ndarray, first: int, step: int, layers: range) -> None:
        """Copy ``layers`` of a ``none`` block into block ``i``, unverified: one ``copy_runs``
        call for all of them (numpy: one strided copy per tensor of a layer). ``arr`` is the
        block's bytes, layer 0 at ``first`` and each next one ``step`` further
        (``strided_step``). A loader landing layers in groups calls this per group. Raises
        CorruptBlock if ``arr`` is too short."""
        self._check(i)
        count = len(self.kv)
        if arr.size < first + (count - 1) * step + self._layer_bytes:
            raise CorruptBlock(f"block truncated: {arr.size} bytes")
        lo, hi = layers.start, layers.stop
        if copy_runs is not None:
            runs = self._plan(first, step, lo, hi).copy()
            runs[:, :, 1] += i * self._block_bytes  # destination: block i of each tensor
            copy_runs(self._spans, arr, runs)
            return
        if first + count * step <= arr.size:  # the usual case: a plain reshape, no as_strided
            src = arr[first: first + count * step].reshape(count, step)
        else:
            src = np.lib.stride_tricks.as_strided(arr[first:], (count, self._layer_bytes), (step, 1))
        at = 0
        assert self._strided is not None  # a step is only found for a strided prefix
        for view, n in zip(self._strided, self._sizes, strict=True):
            np.copyto(view[lo:hi, i * n:(i + 1) * n], src[lo:hi, at:at + n])
            at += n

    def _check(self, i: int) -> None:
        if not 0 <= i < self.blocks:
            raise IndexError(f"block {i} of a prefix of {self.blocks} blocks")

    def _step(self, codec: str, table: Sequence[tuple[int, int, int]]) -> int:
        """The regular distance between the layers' payloads when one strided copy per tensor
        of a layer decodes the block exactly (codec ``none``, every layer the size this prefix
        expects, at one stride, into a strided host destination); else 0."""
        length = self._layer_bytes
        if self._strided is None or codec != "none" or len(table) != len(self.kv):
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
