"""Value codecs that store float32 scales and quantized values: the one loop fp8 and int8 share.

Layout per tensor (every tensor of the layer in turn): ``scales | values``, the scales float32
in ``scale_shape`` and the values ``[tokens, groups, last]`` in ``qdtype`` (tensors viewed as
``[tokens, groups, last]`` by ``group_view``). A subclass says how scales are taken and how
values are quantized; encoding and decoding walk the layout here.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import prod

import torch

from kvtier.bytecopy import byte_view
from kvtier.codecs.base import group_view, take


class QuantizedCodec:
    """Base of a scale-and-quantize codec; subclasses set ``name``, ``qdtype`` and the hooks."""

    name: str
    qdtype: torch.dtype
    lossy = True

    def scales(self, x: torch.Tensor) -> torch.Tensor:
        """float32 scales of ``x`` (``[tokens, groups, last]`` float32), in ``scale_shape``."""
        raise NotImplementedError

    def scale_shape(self, tokens: int, groups: int) -> tuple[int, ...]:
        raise NotImplementedError

    def quantize(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``x`` divided by its broadcast scales, in ``qdtype``."""
        raise NotImplementedError

    @staticmethod
    def broadcast(scale: torch.Tensor) -> torch.Tensor:
        """Scales shaped to multiply ``[tokens, groups, last]``."""
        return scale[None, :, None] if scale.dim() == 1 else scale[:, :, None]

    def encode_parts(self, tensors: Sequence[torch.Tensor]) -> list[memoryview]:
        parts: list[memoryview] = []
        for t in tensors:
            x = group_view(t.detach().float())
            scale = self.scales(x)
            q = self.quantize(x, self.broadcast(scale))
            parts += [byte_view(v.contiguous().cpu()).numpy().data for v in (scale, q)]
        return parts

    def encode(self, tensors: Sequence[torch.Tensor]) -> bytes:
        return b"".join(self.encode_parts(tensors))

    def decode_into(self, data: torch.Tensor, outs: Sequence[torch.Tensor]) -> None:
        offset = 0
        for out in outs:
            g = group_view(out)
            tokens, groups, _ = g.shape
            shape = self.scale_shape(tokens, groups)
            scale = take(data, offset, prod(shape), torch.float32).reshape(shape).to(out.device)
            offset += prod(shape) * 4
            q = take(data, offset, g.numel(), self.qdtype).reshape(g.shape).to(out.device)
            offset += g.numel() * self.qdtype.itemsize
            g.copy_(q.float() * self.broadcast(scale))
