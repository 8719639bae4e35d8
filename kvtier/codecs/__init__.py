"""Block codecs: value codecs (none, fp8, int8) optionally stacked with a lossless compressor."""

from kvtier.codecs.base import Codec, available_codecs, get_codec, normalize_spec

__all__ = ["Codec", "available_codecs", "get_codec", "normalize_spec"]
