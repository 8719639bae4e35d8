"""``fp8``: float8 e4m3 values with one float32 scale per (block, layer, head).

Per-head scales keep an outlier head from crushing the others' precision; e4m3's 3 mantissa
bits bound the relative error of each value by 2**-4 (RMS error on Gaussian-like KV is ~2-3%).
Layout per tensor: ``scales[groups] float32 | values[tokens, groups, last] e4m3``.
"""

from __future__ import annotations

import torch

from kvtier.codecs.base import register_value_codec
from kvtier.codecs.quantized import QuantizedCodec

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


class FP8Codec(QuantizedCodec):
    name = "fp8"
    qdtype = FP8

    def scales(self, x: torch.Tensor) -> torch.Tensor:
        return x.abs().amax(dim=(0, 2)).clamp_min(1e-12) / FP8_MAX

    def scale_shape(self, tokens: int, groups: int) -> tuple[int, ...]:
        return (groups,)

    def quantize(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return (x / scale).to(FP8)


register_value_codec("fp8", FP8Codec)
