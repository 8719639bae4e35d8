"""``none``: the raw bytes, bit-exact."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvtier.bytecopy import byte_view, copy_bytes
from kvtier.codecs.base import as_bytes, register_value_codec
from kvtier.errors import CorruptBlock


class NoneCodec:
    name = "none"
    lossy = False

    def encode(self, tensors: Sequence[torch.Tensor]) -> bytes:
        return b"".join(as_bytes(t) for t in tensors)

    def encode_parts(self, tensors: Sequence[torch.Tensor]) -> list[memoryview]:
        """The payload as views of the tensors' own bytes: no copy until the block is laid out."""
        return [byte_view(t.contiguous().cpu()).numpy().data for t in tensors if t.numel()]

    def decode_into(self, data: torch.Tensor, outs: Sequence[torch.Tensor]) -> None:
        """One copy per output tensor: a numpy memcpy on the CPU (independent of torch's thread
        pool, ``kvtier.bytecopy``), ``copy_(non_blocking=True)`` into device memory."""
        sizes = [out.numel() * out.element_size() for out in outs]
        if sum(sizes) != data.numel():
            raise CorruptBlock(f"payload of {data.numel()} bytes for outputs of {sum(sizes)}")
        offset = 0
        for out, n in zip(outs, sizes, strict=True):
            copy_bytes(out, data[offset: offset + n])
            offset += n


register_value_codec("none", NoneCodec)
