"""Block codecs: value codecs (none, fp8, int8) optionally stacked with a lossless compressor."""

from kvtier.codecs import fp8, int8, none, zstd  # noqa: F401  (register the built-ins)
from kvtier.codecs.base import Codec, available_codecs, get_codec, normalize_spec

__all__ = ["Codec", "available_codecs", "get_codec", "normalize_spec"]
