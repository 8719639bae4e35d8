"""``+zstd``: lossless zstandard on top of any value codec.

Compressor contexts are not thread-safe, so each thread keeps its own.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
import zstandard

from kvtier.codecs.base import Codec, register_byte_codec


class ZstdCodec:
    lossy: bool

    def __init__(self, inner: Codec, level: int = 3) -> None:
        self.inner = inner
        self.name = f"{inner.name}+zstd"
        self.lossy = inner.lossy
        self._level = level
        self._local = threading.local()

    def _ctx(self) -> tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor]:
        ctx = getattr(self._local, "ctx", None)
        if ctx is None:
            ctx = self._local.ctx = (zstandard.ZstdCompressor(level=self._level),
                                     zstandard.ZstdDecompressor())
        return ctx

    def encode(self, tensors: Sequence[torch.Tensor]) -> bytes:
        return self._ctx()[0].compress(self.inner.encode(tensors))

    def decode_into(self, data: torch.Tensor, outs: Sequence[torch.Tensor]) -> None:
        raw = self._ctx()[1].decompress(data.cpu().numpy().tobytes())
        self.inner.decode_into(torch.frombuffer(bytearray(raw), dtype=torch.uint8), outs)


register_byte_codec("zstd", ZstdCodec)
