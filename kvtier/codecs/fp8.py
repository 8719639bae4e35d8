"""``fp8``: float8 e4m3 values with one float32 scale per (block, layer, head).

Per-head scales keep an outlier head from crushing the others' precision; e4m3's 3 mantissa
bits bound the relative error of each value by 2**-4 (RMS error on Gaussian-like KV is ~2-3%).
Layout per tensor: ``scales[groups] float32 | values[tokens, groups, last] e4m3``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvtier.codecs.base import as_bytes, group_view, register_value_codec, take

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


class FP8Codec:
    name = "fp8"
    lossy = True

    def encode(self, tensors: Sequence[torch.Tensor]) -> bytes:
        parts: list[bytes] = []
        for t in tensors:
            x = group_view(t.detach().float())
            scale = x.abs().amax(dim=(0, 2)).clamp_min(1e-12) / FP8_MAX
            q = (x / scale[None, :, None]).to(FP8)
            parts += [as_bytes(scale), as_bytes(q)]
        return b"".join(parts)

    def decode_into(self, data: torch.Tensor, outs: Sequence[torch.Tensor]) -> None:
        offset = 0
        for out in outs:
            g = group_view(out)
            groups = g.shape[1]
            scale = take(data, offset, groups, torch.float32).to(out.device)
            offset += groups * 4
            n = g.numel()
            q = take(data, offset, n, FP8).reshape(g.shape).to(out.device)
            offset += n
            g.copy_(q.float() * scale[None, :, None])


register_value_codec("fp8", FP8Codec)
