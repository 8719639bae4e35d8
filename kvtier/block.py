"""The encoded block format: a small header, a per-layer table, then per-layer payloads.

::

    0   magic  b"KVTB"
    4   u8     format version (1)
    5   u8     codec spec length c
    6   u16    reserved (0)
    8   u32    layers L
    12  u32    tokens
    16  u32    crc32c of the header with this field zeroed
    20  c      codec spec (ascii), zero-padded to 8 bytes
    ..  L x (u64 offset, u32 length, u32 crc32c)   offsets from the start of the block
    ..  payload of layer 0, layer 1, ...

One layer of one block can be read and verified on its own (the loader streams layer by
layer); every byte of a block is covered by a checksum, so corrupt bytes are detected, never
decoded.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import crc32c
import torch

from kvtier.bufpool import block_buffers
from kvtier.codecs import Codec, get_codec
from kvtier.errors import CorruptBlock

MAGIC = b"KVTB"
VERSION = 1
_FIXED = struct.Struct("<4sBBHIII")
_ENTRY = struct.Struct("<QII")


def checksum(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """crc32c (hardware-accelerated), the one checksum kvtier uses everywhere."""
    return crc32c.crc32c(data, value)


@dataclass(frozen=True, slots=True)
class LayerEntry:
    offset: int
    length: int
    crc: int


@dataclass(frozen=True, slots=True)
class BlockHeader:
    codec: str
    tokens: int
    layers: tuple[LayerEntry, ...]
    header_bytes: int

    @property
    def total_bytes(self) -> int:
        last = self.layers[-1]
        return last.offset + last.length


def header_size(n_layers: int, codec: str) -> int:
    return _FIXED.size + _pad8(len(codec)) + n_layers * _ENTRY.size


def encode_block(codec: Codec, layers: Sequence[Sequence[torch.Tensor]]) -> bytes:
    """Encode one block (every layer's tensors for its tokens) into the block format."""
    payloads = _payload_parts(codec, layers)
    entries = []
    for parts in payloads:
        crc = 0
        for p in parts:
            crc = checksum(p, crc)
        entries.append((sum(len(p) for p in parts), crc))
    head = _header(codec.name, layers[0][0].shape[0], entries)
    return b"".join([head, *(p for parts in payloads for p in parts)])


def encode_block_pooled(codec: Codec, layers: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """``encode_block`` into a recycled uint8 tensor (``kvtier.bufpool``): the put path's form.

    It spares a fresh, page-faulting allocation per block, copies each payload once, and takes
    each layer's checksum from the copy just written (still in cache), not from a second pass
    over the source.
    """
    payloads = _payload_parts(codec, layers)
    hsize = header_size(len(payloads), codec.name)
    out = block_buffers.take(hsize + sum(len(p) for parts in payloads for p in parts))
    mv = memoryview(out.numpy())
    at, entries = hsize, []
    for parts in payloads:
        start = at
        for p in parts:
            mv[at: at + len(p)] = p
            at += len(p)
        entries.append((at - start, checksum(mv[start:at])))
    mv[:hsize] = _header(codec.name, layers[0][0].shape[0], entries)
    return out


def _payload_parts(codec: Codec, layers: Sequence[Sequence[torch.Tensor]]) -> list[list]:
    """Each layer's payload as a list of buffers (``Codec.encode_parts`` where offered)."""
    split = getattr(codec, "encode_parts", None)
    return [split(layer) if split else [codec.encode(layer)] for layer in layers]


def _header(codec: str, tokens: int, entries: Sequence[tuple[int, int]]) -> bytes:
    """The header of a block whose layers have these (length, crc32c), laid out in order."""
    name = codec.encode()
    table = bytearray()
    offset = header_size(len(entries), codec)
    for length, crc in entries:
        table += _ENTRY.pack(offset, length, crc)
        offset += length
    fixed = _FIXED.pack(MAGIC, VERSION, len(name), 0, len(entries), tokens, 0)
    body = name.ljust(_pad8(len(name)), b"\0") + bytes(table)
    crc = checksum(body, checksum(fixed))
    fixed = _FIXED.pack(MAGIC, VERSION, len(name), 0, len(entries), tokens, crc)
    return fixed + body


def parse_header(buf: bytes | bytearray | memoryview | torch.Tensor) -> BlockHeader:
    """Parse and verify a block header. Raises CorruptBlock on any inconsistency."""
    if isinstance(buf, torch.Tensor):
        buf = buf[: min(buf.numel(), 4096)].cpu().numpy().tobytes()
    mv = memoryview(buf)
    if len(mv) < _FIXED.size:
        raise CorruptBlock(f"block of {len(mv)} bytes is shorter than its header")
    magic, version, clen, _, n_layers, tokens, crc = _FIXED.unpack_from(mv)
    if magic != MAGIC:
        raise CorruptBlock(f"bad block magic {bytes(magic)!r}")
    if version != VERSION:
        raise CorruptBlock(f"unknown block format version {version}")
    hsize = _FIXED.size + _pad8(clen) + n_layers * _ENTRY.size
    if len(mv) < hsize or n_layers == 0:
        raise CorruptBlock(f"block header truncated ({len(mv)} < {hsize} bytes)")
    zeroed = _FIXED.pack(magic, version, clen, 0, n_layers, tokens, 0)
    if checksum(mv[_FIXED.size: hsize], checksum(zeroed)) != crc:
        raise CorruptBlock("block header checksum mismatch")
    codec = bytes(mv[_FIXED.size: _FIXED.size + clen]).decode()
    base = _FIXED.size + _pad8(clen)
    layers = tuple(LayerEntry(*_ENTRY.unpack_from(mv, base + i * _ENTRY.size)) for i in range(n_layers))
    return BlockHeader(codec, tokens, layers, hsize)


def decode_layer_into(
    header: BlockHeader, layer: int, data: torch.Tensor, outs: Sequence[torch.Tensor],
    *, verify: bool = True, base: int | None = None,
) -> None:
    """Decode one layer into ``outs``; ``data`` holds the layer's payload at ``entry.offset - base``.

    ``base`` defaults to 0 (``data`` is the whole block). Verifies the layer checksum first
    (CPU data only; device-resident bytes are trusted) and raises CorruptBlock on mismatch.
    """
    entry = header.layers[layer]
    start = entry.offset - (base or 0)
    payload = data[start: start + entry.length]
    if payload.numel() != entry.length:
        raise CorruptBlock(f"layer {layer} payload truncated")
    if verify and payload.device.type == "cpu" and checksum(payload.numpy()) != entry.crc:
        raise CorruptBlock(f"layer {layer} payload checksum mismatch")
    get_codec(header.codec).decode_into(payload, outs)


def decode_block_into(
    data: torch.Tensor, outs: Sequence[Sequence[torch.Tensor]], *, verify: bool = True
) -> BlockHeader:
    """Decode a whole block (1-D uint8 tensor) into per-layer output views."""
    header = parse_header(data)
    if len(header.layers) != len(outs):
        raise CorruptBlock(f"block has {len(header.layers)} layers, expected {len(outs)}")
    if data.numel() < header.total_bytes:
        raise CorruptBlock(f"block truncated: {data.numel()} of {header.total_bytes} bytes")
    for i, layer_outs in enumerate(outs):
        decode_layer_into(header, i, data, layer_outs, verify=verify)
    return header


def _pad8(n: int) -> int:
    return (n + 7) // 8 * 8
