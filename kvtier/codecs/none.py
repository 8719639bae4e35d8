"""``none``: the raw bytes, bit-exact."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvtier.codecs.base import as_bytes, register_value_codec


class NoneCodec:
    name = "none"
    lossy = False

    def encode(self, tensors: Sequence[torch.Tensor]) -> bytes:
        return b"".join(as_bytes(t) for t in tensors)

    def encode_parts(self, tensors: Sequence[torch.Tensor]) -> list[memoryview]:
        """The payload as views of the tensors' own bytes: no copy until the block is laid out."""
        return [memoryview(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
                for t in tensors if t.numel()]

    def decode_into(self, data: torch.Tensor, outs: Sequence[torch.Tensor]) -> None:
        offset = 0
        for out in outs:
            n = out.numel() * out.element_size()
            out.view(-1).view(torch.uint8).copy_(data[offset: offset + n], non_blocking=True)
            offset += n


register_value_codec("none", NoneCodec)
