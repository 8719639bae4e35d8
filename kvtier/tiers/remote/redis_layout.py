"""The Redis value layout: a manifest (header + one crc32c per chunk), inline or chunked.

Kept apart from the backend so the reply-streaming reader and the redis-py path share one
definition of what a valid manifest is.
"""

from __future__ import annotations

import struct

from kvtier.errors import CorruptBlock

MAGIC = b"KVRM"
VERSION = 2  # 2: checksums bound to the key (older values fail the check and are replaced)
FLAG_INLINE = 1
HEADER = struct.Struct("<4sBBHQII")  # magic, version, flags, reserved, length, chunk_bytes, nchunks


def parse_header(buf: bytes | bytearray, key: bytes) -> tuple[int, int, int, int]:
    if len(buf) < HEADER.size:
        raise CorruptBlock(f"remote manifest of {key.hex()} is truncated ({len(buf)} bytes)")
    magic, version, flags, _, length, chunk_bytes, nchunks = HEADER.unpack_from(buf)
    if magic != MAGIC or version != VERSION or chunk_bytes == 0:
        raise CorruptBlock(f"remote manifest of {key.hex()} is not a kvtier v{VERSION} manifest")
    return length, chunk_bytes, nchunks, flags


def parse_manifest(manifest: bytes, key: bytes) -> tuple[int, int, int, bool, tuple[int, ...]]:
    length, chunk_bytes, nchunks, flags = parse_header(manifest, key)
    end = HEADER.size + 4 * nchunks
    inline = bool(flags & FLAG_INLINE)
    if len(manifest) < end or (inline and len(manifest) != end + length) or (
        not inline and nchunks != -(-length // chunk_bytes)
    ):
        raise CorruptBlock(f"remote manifest of {key.hex()} is inconsistent with its length")
    return length, chunk_bytes, nchunks, inline, struct.unpack_from(f"<{nchunks}I", manifest, HEADER.size)


def corrupt(key: bytes) -> CorruptBlock:
    return CorruptBlock(f"remote value {key.hex()} failed its crc32c check")
