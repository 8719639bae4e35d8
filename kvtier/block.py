"""The encoded block format: a small header, a per-layer table, then per-layer payloads.

::

    0   magic  b"KVTB"
    4   u8     format version: 1 compact, 2 aligned for direct I/O
    5   u8     codec spec length c
    6   u16    reserved (0)
    8   u32    layers L
    12  u32    tokens
    16  u32    crc32c of the header, bytes [0, header_bytes), with this field zeroed
    20  c      codec spec (ascii), zero-padded to 8 bytes
    ..  L x (u64 offset, u32 length, u32 crc32c)   offsets from the start of the block
        header_bytes = 20 + pad8(c) + 16 L

**Version 1, compact.** Layer 0's payload starts at ``header_bytes``, each next one where the
previous ends, and the block ends where the last ends: no byte is padding.

**Version 2, aligned for direct I/O.** Layer 0 starts at ``align4k(header_bytes)``, each next
layer at ``align4k(end of the previous payload)``, and the block is ``align4k(end of the last
payload)`` long. So the header region ``[0, layers[0].offset)``, every layer's range ``[offset,
align4k(offset + length))`` and the whole block are runs of whole 4 KiB pages: a whole-block read
and a read of any run of layers (``BlockHeader.span``) can go ``O_DIRECT`` into aligned memory,
given the block itself starts on a 4 KiB boundary of its file.

**Which one.** An encoder writes version 2 when its padding costs at most 1/32 of the payload,
else version 1. For real blocks the padding is the header's page alone: a Llama-3-8B bf16 block
of 256 tokens is 32 layers x 1 MiB (+4 KiB, 0.01%), a 16-token page 32 x 64 KiB (+4 KiB, 0.2%),
both aligned; fp8 at 256 tokens pads every layer to its page (+0.8%, aligned), fp8 at 16 tokens
would pad by 12% (compact), and so would test-sized blocks of a few KiB. Readers never assume
either: offsets come from the table (``BlockHeader.aligned`` says whether ranges are
direct-readable). Version 1 blocks written before version 2 existed read as before.

**Checksums.** The header crc covers bytes ``[0, header_bytes)`` (and through the table every
layer's offset, length and crc); each layer's crc covers exactly its ``length`` payload bytes.
Padding bytes (version 2) are written as zeros and are under no checksum, deliberately: no
decoder ever reads them, so a damaged padding byte can never become wrong KV, and a block rebuilt
from layer ranges needs nothing but its header and its payloads. Every byte a decoder reads is
verified, and one layer of one block can be read and verified on its own (the loader streams
layer by layer).
"""

from __future__ import annotations

import functools
import itertools
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import crc32c
import numpy as np
import torch

from kvtier.bufpool import ALIGN, align_up, block_buffers
from kvtier.bytecopy import address
from kvtier.codecs import Codec, get_codec
from kvtier.errors import CorruptBlock
from kvtier.pieces import Block, BlockPieces

try:  # a put's copy and checksum in one pass (kvtier/_fastcopy.c, optional: see pyproject.toml)
    from kvtier._fastcopy import available as _native
    from kvtier._fastcopy import copy_blocks, copy_layers, crc_parts
except ImportError:
    _native = 0
ONE_PASS_COPY = bool(_native)  # False: numpy copies, then crc32c over what they wrote

MAGIC = b"KVTB"
COMPACT, ALIGNED = 1, 2  # format versions
VERSION = ALIGNED  # the newest version an encoder writes
MAX_PADDING = 1 / 32  # version 2 when its padding is at most this fraction of the payload
_FIXED = struct.Struct("<4sBBHIII")
_ENTRY = struct.Struct("<QII")


def checksum(data: bytes | bytearray | memoryview | np.ndarray, value: int = 0) -> int:
    """crc32c (hardware-accelerated), the one checksum kvtier uses everywhere.

    The GIL is released only for ``_GIL_FREE_BYTES`` or more. Why: a 32 KiB page takes about
    2 us; giving the GIL up for that (the library's default from 32 KiB) makes the thread
    queue to get it back behind the others, and a reload's reader threads checksum a block in
    64 such pages, so each stalled before its next read went out."""
    if isinstance(data, np.ndarray):
        data = data.data
    n = data.nbytes if isinstance(data, memoryview) else len(data)
    return crc32c.crc32c(data, value, 1 if n >= _GIL_FREE_BYTES else 0)


_GIL_FREE_BYTES = 256 << 10


def checksum_parts(parts: Sequence[bytes | bytearray | memoryview | np.ndarray], value: int = 0) -> int:
    """``checksum`` of ``parts`` laid end to end, continuing from ``value``. Why: a block read
    straight into a prefix's tensors is 65 pieces (a header page and 64 tensors' rows), and a
    Python call per piece cost more than its checksum; ``kvtier._fastcopy.crc_parts`` checks
    them all in one call, the GIL released once (where it is built; else one call a piece)."""
    if ONE_PASS_COPY:
        return crc_parts(parts, value)
    for part in parts:
        value = checksum(part, value)
    return value


_POLY = 0x82F63B78  # crc32c (Castagnoli), reflected


def _multmodp(a: int, b: int) -> int:
    """a * b modulo the crc polynomial (both reflected): zlib's ``multmodp``."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


_X2N = [1 << 30]  # x^(2^k) modulo the polynomial, k = 0..31
for _ in range(31):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))


@functools.lru_cache(maxsize=64)
def _shift(nbytes: int) -> int:
    """x^(8 nbytes) modulo the polynomial: appending ``nbytes`` zero bytes (a page size: few)."""
    p, k, n = 1 << 31, 3, nbytes
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return p


def checksum_combine(crc1: int, crc2: int, len2: int) -> int:
    """``checksum(a + b)`` from ``checksum(a)``, ``checksum(b)`` and ``len(b)``, without reading
    either (zlib's ``crc32_combine``). Why: pieces checksummed already need not be read again
    (an SSD record of an engine page, from its layer checksum), pieces checksummed on several
    cores at once still compare with one stored crc (a remote value's chunks), and a crc is
    bound to its key (``remote.base.key_bound``)."""
    return _multmodp(_shift(len2), crc1) ^ crc2


class LayerEntry(NamedTuple):  # a tuple: decoding a block parses one per layer, fast
    offset: int
    length: int
    crc: int


@dataclass(frozen=True, slots=True)
class BlockHeader:
    codec: str
    tokens: int
    layers: tuple[LayerEntry, ...]
    header_bytes: int  # the checksummed header; layer 0 starts at or after it
    version: int = COMPACT

    @property
    def aligned(self) -> bool:
        """Whether every layer range and the block's length are whole 4 KiB pages (version 2)."""
        return self.version == ALIGNED

    @property
    def total_bytes(self) -> int:
        """The block's length: where its last payload ends, padded to a page when aligned."""
        last = self.layers[-1]
        end = last.offset + last.length
        return align_up(end) if self.aligned else end

    def span(self, layers: range) -> tuple[int, int]:
        """Byte range ``[lo, hi)`` to read for a run of consecutive layers: their payloads, and
        for an aligned block their padding, so both ends are 4 KiB multiples (``O_DIRECT``)."""
        first, last = self.layers[layers.start], self.layers[layers.stop - 1]
        end = last.offset + last.length
        return first.offset, align_up(end) if self.aligned else end


def header_size(n_layers: int, codec: str) -> int:
    """Bytes of the checksummed header: enough to read to parse a block's header."""
    return _FIXED.size + _pad8(len(codec)) + n_layers * _ENTRY.size


def layout(codec: str, lengths: Sequence[int]) -> tuple[int, list[int], int]:
    """(version, payload offsets, block length) of a block whose layers encode to ``lengths``."""
    hsize = header_size(len(lengths), codec)
    payload = sum(lengths)
    padding = align_up(hsize) - hsize + sum(align_up(n) - n for n in lengths)
    aligned = padding <= payload * MAX_PADDING
    offsets, at = [], hsize
    for n in lengths:
        at = align_up(at) if aligned else at
        offsets.append(at)
        at += n
    return (ALIGNED, offsets, align_up(at)) if aligned else (COMPACT, offsets, at)


def encode_block(codec: Codec, layers: Sequence[Sequence[torch.Tensor]]) -> bytes:
    """Encode one block (every layer's tensors for its tokens) into the block format."""
    return encode_block_pooled(codec, layers).numpy().tobytes()


def encode_block_pooled(codec: Codec, layers: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """Encode one block into a recycled uint8 tensor (``kvtier.bufpool``): the put path's form.

    The tensor starts on a 4 KiB boundary (a version 2 block can be written ``O_DIRECT`` from
    it as is), and spares a fresh, page-faulting allocation per block. To encode straight into
    memory the caller owns (a tier's slot), use ``prepare_block``.
    """
    return prepare_block(codec, layers).pooled()


def encode_block_for_put(codec: Codec, layers: Sequence[Sequence[torch.Tensor]], *, pieces: bool
                         ) -> Block:
    """Encode one block for a put: with ``pieces`` (its tier writes them gathered), as pieces
    over the caller's own memory where the layout allows (``PreparedBlock.as_pieces``: no
    copy); else into a recycled buffer."""
    return prepare_block(codec, layers).for_put(pieces=pieces)


@dataclass(frozen=True, slots=True)
class PreparedBlock:
    """A block whose layers are encoded and laid out, not yet written: ``nbytes`` is known
    before any memory is, so it can be written straight into a tier's slot (one copy)."""

    codec: str
    version: int
    tokens: int
    nbytes: int
    offsets: Sequence[int]
    lengths: Sequence[int]
    # Each layer's parts (1-D uint8), in order; or, with ``row`` >= 0, 2-D ``[blocks, bytes]``
    # uint8 arrays whose row ``row`` is the part (``PrefixKV``: no view made per block).
    payloads: Sequence[Sequence[np.ndarray]]
    row: int = -1

    def parts(self) -> Sequence[Sequence[np.ndarray]]:
        """Each layer's parts as 1-D uint8 arrays."""
        if self.row < 0:
            return self.payloads
        return [[p[self.row] for p in layer] for layer in self.payloads]

    def as_pieces(self) -> BlockPieces | None:
        """The block as its header page followed by the payloads' own memory (``kvtier.pieces``),
        where that memory is already the block's layout: version 2, each layer one payload of
        whole 4 KiB pages on a 4 KiB boundary (codec ``none`` over engine pages), so no padding
        lies between them. None otherwise (the caller copies: ``write_into``)."""
        if self.version != ALIGNED:
            return None
        payloads: list[np.ndarray] = []
        for parts in self.parts():
            if len(parts) != 1 or parts[0].nbytes % ALIGN or address(parts[0]) % ALIGN:
                return None
            payloads.append(parts[0])
        head = block_buffers.take(self.offsets[0]).numpy()
        entries = [(o, n, checksum(p)) for o, n, p in zip(self.offsets, self.lengths, payloads, strict=True)]
        header = _header(self.codec, self.version, self.tokens, entries)
        head[:len(header)] = np.frombuffer(header, dtype=np.uint8)
        head[len(header):] = 0
        return BlockPieces((head, *payloads), self.nbytes, (None, *(crc for _, _, crc in entries)))

    def for_put(self, *, pieces: bool) -> Block:
        """The block as a put hands it to a tier: with ``pieces`` (the tier writes them
        gathered), ``as_pieces`` where the layout allows (no copy); else ``pooled``."""
        gathered = self.as_pieces() if pieces else None
        return gathered if gathered is not None else self.pooled()

    def pooled(self) -> torch.Tensor:
        """The block written into a recycled, 4 KiB-aligned buffer (``encode_block_pooled``)."""
        out = block_buffers.take(self.nbytes)
        self.write_into(out)
        return out

    def write_into(self, out: torch.Tensor) -> None:
        """Write the block into ``out`` (host memory, exactly ``nbytes`` uint8, any contents).

        Each layer is copied and checksummed in one pass over its bytes, the whole block in one
        call (``copy_layers``, C; ``ONE_PASS_COPY``). Without it: copied with numpy (no torch
        thread pool), a run of adjacent layers of up to ``_RUN_BYTES`` per call, and each run's layers
        checksummed right after its copy, while still in cache (checksumming a large block
        after all of it was copied reads it from memory a second time, while a call per small
        layer costs more in calls than it saves: ``python -m kvtier.bench.host_tier``).
        Padding is zeroed, never left with stale bytes of a recycled buffer.
        """
        arr = self._host_bytes(out)
        if ONE_PASS_COPY:
            end = self._zero_gaps(arr)
            crcs = copy_layers(arr, self.offsets, self.payloads, self.row)
            self._finish(arr, end, list(zip(self.offsets, self.lengths, crcs, strict=True)))
            return
        end = header_size(len(self.lengths), self.codec)
        entries: list[tuple[int, int, int]] = []
        run: list[np.ndarray] = []
        run_layers: list[tuple[int, int]] = []

        def flush() -> None:
            if run_layers:
                _concat(run, arr, run_layers[0][0], end)
                entries.extend((o, n, checksum(arr[o:o + n])) for o, n in run_layers)
                run.clear()
                run_layers.clear()

        for parts, start, n in zip(self.parts(), self.offsets, self.lengths, strict=True):
            if start != end or (run_layers and end - run_layers[0][0] + n > _RUN_BYTES):
                flush()
                arr[end:start] = 0
            run += parts
            run_layers.append((start, n))
            end = start + n
        flush()
        self._finish(arr, end, entries)

    def _host_bytes(self, out: torch.Tensor) -> np.ndarray:
        """``out`` as numpy, checked to be what ``write_into`` writes into."""
        if out.device.type != "cpu" or out.dtype != torch.uint8 or out.numel() != self.nbytes:
            raise ValueError(f"a block of {self.nbytes} bytes goes into {self.nbytes} host uint8, "
                             f"got {out.numel()} {out.dtype} on {out.device}")
        return out.numpy()

    def _zero_gaps(self, arr: np.ndarray) -> int:
        """Zero the padding before each payload (after the header, between layers); returns
        where the last payload ends."""
        gaps, end = self._gaps()
        for lo, hi in gaps:
            arr[lo:hi] = 0
        return end

    def _gaps(self) -> tuple[list[tuple[int, int]], int]:
        """The padding before each payload (ranges), and where the last payload ends."""
        gaps, end = [], header_size(len(self.lengths), self.codec)
        for start, n in zip(self.offsets, self.lengths, strict=True):
            if start != end:
                gaps.append((end, start))
            end = start + n
        return gaps, end

    def _finish(self, arr: np.ndarray, end: int, entries: list[tuple[int, int, int]]) -> None:
        """Zero the padding after the last payload (from ``end``) and write the header."""
        arr[end:] = 0
        head = _header(self.codec, self.version, self.tokens, entries)
        arr[:len(head)] = np.frombuffer(head, dtype=np.uint8)


_RUN_BYTES = 512 << 10  # half this machine's L2: a run is still in cache when checksummed


def write_blocks(blocks: Sequence[PreparedBlock], outs: Sequence[torch.Tensor]) -> None:
    """``blocks[w].write_into(outs[w])`` for every w: the same bytes. Consecutive blocks of one
    prefix (``PrefixKV.prepare``: rows of the same tensors) are copied in one call (``copy_blocks``),
    which reads each tensor's rows for all of them as one stream. A block at a time, each of a
    2 MiB block's 64 pieces of 32 KiB is a new read stream for the prefetcher: a put of 2 MiB
    blocks ran 1.22-1.32x faster in windows of 16 (``python -m kvtier.bench.host_tier``, the
    "one block per copy" row)."""
    if len(blocks) != len(outs):
        raise ValueError(f"{len(blocks)} blocks for {len(outs)} destinations")
    start = 0
    while start < len(blocks):  # runs of blocks that are rows of the same arrays, together
        first, end = blocks[start], start + 1
        if ONE_PASS_COPY and first.row >= 0:
            while end < len(blocks) and (b := blocks[end]).row >= 0 and b.payloads is first.payloads \
                    and b.offsets is first.offsets and b.nbytes == first.nbytes:
                end += 1
        if end - start == 1:
            first.write_into(outs[start])
        else:
            run = blocks[start:end]
            arrs = [b._host_bytes(out) for b, out in zip(run, outs[start:end], strict=True)]
            gaps, stop = first._gaps()  # the run's blocks share their layout
            for arr in arrs:
                for lo, hi in gaps:
                    arr[lo:hi] = 0
            crcs = copy_blocks(arrs, first.offsets, first.payloads, [b.row for b in run])
            for arr, head in zip(arrs, _headers(first, crcs), strict=True):
                arr[stop:] = 0
                arr[:head.size] = head
        start = end


def _headers(block: PreparedBlock, crcs: Sequence[Sequence[int]]) -> np.ndarray:
    """The headers (``_header``'s bytes, one row each) of blocks laid out as ``block`` whose
    layers have these crc32c: the table filled in by numpy, one checksum call per header. Why:
    ``_header`` per block (a pack of 96 values, two checksums) was 17 us of a 2 MiB block's
    ~60 us of Python in a put."""
    entries = [(o, n, 0) for o, n in zip(block.offsets, block.lengths, strict=True)]
    template = np.frombuffer(_header(block.codec, block.version, block.tokens, entries), np.uint8)
    fixed, at = _FIXED.size, _FIXED.size + _pad8(len(block.codec.encode()))
    heads = np.tile(template, (len(crcs), 1))
    table = heads[:, at:].view("<u4").reshape(len(crcs), len(entries), _ENTRY.size // 4)
    table[:, :, 3] = crcs  # (offset: 2 words, length, crc) per layer
    base = _header_seed(block.version, len(block.codec.encode()), len(entries), block.tokens)
    for row in heads:
        row[fixed - 4: fixed] = np.frombuffer(struct.pack("<I", checksum(row[fixed:], base)), np.uint8)
    return heads


def _concat(parts: list[np.ndarray], arr: np.ndarray, start: int, end: int) -> None:
    if len(parts) == 1:
        np.copyto(arr[start:end], parts[0])
    elif parts:
        np.concatenate(parts, out=arr[start:end])


def prepare_block(codec: Codec, layers: Sequence[Sequence[torch.Tensor]]) -> PreparedBlock:
    """Encode one block's layers (``Codec.encode_parts``: views of the tensors for ``none``)
    and lay them out; ``write_into`` then writes the block wherever the caller wants it."""
    payloads = _payload_parts(codec, layers)
    lengths = [sum(p.nbytes for p in parts) for parts in payloads]
    version, offsets, total = layout(codec.name, lengths)
    return PreparedBlock(codec.name, version, layers[0][0].shape[0], total, offsets, lengths, payloads)


def _payload_parts(codec: Codec, layers: Sequence[Sequence[torch.Tensor]]) -> list[list[np.ndarray]]:
    """Each layer's payload as 1-D uint8 arrays (``Codec.encode_parts`` where offered)."""
    split = getattr(codec, "encode_parts", None)
    return [[np.frombuffer(p, dtype=np.uint8) for p in (split(layer) if split else [codec.encode(layer)])]
            for layer in layers]


def _header_seed(version: int, name_bytes: int, n_layers: int, tokens: int) -> int:
    """The crc32c a header's checksum starts from: its fixed part with the checksum zeroed (the
    checksum then runs over the codec name and the table)."""
    return checksum(_FIXED.pack(MAGIC, version, name_bytes, 0, n_layers, tokens, 0))


def _header(codec: str, version: int, tokens: int, entries: Sequence[tuple[int, int, int]]) -> bytes:
    """The header of a block whose layers are at these (offset, length, crc32c)."""
    name = codec.encode()
    table = _table(len(entries)).pack(*itertools.chain.from_iterable(entries))
    body = name.ljust(_pad8(len(name)), b"\0") + table
    crc = checksum(body, _header_seed(version, len(name), len(entries), tokens))
    return _FIXED.pack(MAGIC, version, len(name), 0, len(entries), tokens, crc) + body


@functools.cache
def _table(n_layers: int) -> struct.Struct:
    """A header's table of ``n_layers`` entries, packed in one call (a put writes one per block)."""
    return struct.Struct("<" + "QII" * n_layers)


def parse_header(buf: bytes | bytearray | memoryview | torch.Tensor) -> BlockHeader:
    """Parse and verify a block header (version 1 or 2). Raises CorruptBlock on any
    inconsistency. ``buf`` holds the block from byte 0, at least ``header_bytes`` of it."""
    return header_of(*parse_table(buf))


def header_of(codec: str, version: int, tokens: int, hsize: int, table: Sequence[tuple]) -> BlockHeader:
    """The ``BlockHeader`` of a ``parse_table`` result (already checked: nothing parsed again)."""
    return BlockHeader(codec, tokens, tuple(map(LayerEntry._make, table)), hsize, version)


def parse_table(buf: bytes | bytearray | memoryview | torch.Tensor) -> tuple[str, int, int, int, list[tuple]]:
    """``parse_header``'s checks without building records, for per-block hot paths:
    (codec, version, tokens, header_bytes, [(offset, length, crc) per layer])."""
    mv = _head_bytes(buf)
    if len(mv) < _FIXED.size:
        raise CorruptBlock(f"block of {len(mv)} bytes is shorter than its header")
    magic, version, clen, _, n_layers, tokens, crc = _FIXED.unpack_from(mv)
    if magic != MAGIC:
        raise CorruptBlock(f"bad block magic {bytes(magic)!r}")
    if version not in (COMPACT, ALIGNED):
        raise CorruptBlock(f"unknown block format version {version} (this kvtier reads 1 and 2)")
    hsize = _FIXED.size + _pad8(clen) + n_layers * _ENTRY.size
    if len(mv) < hsize or n_layers == 0:
        raise CorruptBlock(f"block header truncated ({len(mv)} < {hsize} bytes)")
    if checksum(mv[_FIXED.size: hsize], _header_seed(version, clen, n_layers, tokens)) != crc:
        raise CorruptBlock("block header checksum mismatch")
    codec = bytes(mv[_FIXED.size: _FIXED.size + clen]).decode()
    table = list(_ENTRY.iter_unpack(mv[_FIXED.size + _pad8(clen): hsize]))
    end, align = hsize, ALIGN if version == ALIGNED else 1
    for i, (offset, length, _) in enumerate(table):  # only an encoder's bug fails this
        if offset < end or offset % align:
            raise CorruptBlock(f"layer {i} at offset {offset} overlaps what precedes it "
                               f"or is misaligned (version {version})")
        end = offset + length
    return codec, version, tokens, hsize, table


def _crc_bytes(codec: str, n_layers: int, hsize: int) -> np.ndarray:
    """Which bytes of a header may differ between blocks of one layout: the crcs (the
    header's own and each layer's)."""
    free = np.zeros(hsize, dtype=bool)
    free[_FIXED.size - 4: _FIXED.size] = True
    at = _FIXED.size + _pad8(len(codec.encode()))
    free[at:].reshape(n_layers, _ENTRY.size)[:, _ENTRY.size - 4:] = True
    return free


class HeaderTemplate:
    """A parsed block header, to recognize blocks of the same layout by their bytes (all but
    the crcs equal) without parsing each header again (~15 us of Python for 32 layers: a
    reload of small blocks spends as much on it as on the copy). For blocks a tier verified
    whole (``Tier.read_into`` of the whole block): their layers' crcs are not needed then."""

    def __init__(self, arr: np.ndarray) -> None:
        codec, version, tokens, hsize, table = parse_table(arr.data)
        self.header = header_of(codec, version, tokens, hsize, table)
        self._shared = ~_crc_bytes(codec, len(table), hsize)
        self._bytes = arr[:hsize][self._shared].copy()

    def matches(self, arr: np.ndarray) -> bool:
        """Whether the block at the start of ``arr`` has this header but for its crcs."""
        n = self.header.header_bytes
        return arr.size >= n and bool(np.array_equal(arr[:n][self._shared], self._bytes))


def headers_like(arr: np.ndarray, starts: np.ndarray, model: int) -> np.ndarray:
    """Which of the blocks at ``starts`` of ``arr`` (a memory tier's bytes) carry the header of
    the block at ``model`` but for their layers' crc32c: every other header byte the same and
    their own header checksum right (``parse_table``'s check); the model's header is checked
    here too. One gather of all the headers and a checksum call each, not a ``parse_table``
    per block (~15 us of Python: half of a reload of 128 KiB blocks). False where a header
    does not fit in ``arr``."""
    codec, version, tokens, hsize, table = parse_table(arr[model:].data)
    starts = np.asarray(starts, dtype=np.int64)
    ok = (starts >= 0) & (starts + hsize <= arr.size)
    heads = arr[np.where(ok, starts, model)[:, None] + np.arange(hsize, dtype=np.int64)]
    free = _crc_bytes(codec, len(table), hsize)
    ok &= (heads[:, ~free] == arr[model: model + hsize][~free]).all(axis=1)
    base = _header_seed(version, len(codec.encode()), len(table), tokens)
    stored = heads[:, _FIXED.size - 4: _FIXED.size].copy().view("<u4")[:, 0]
    for r in np.flatnonzero(ok):
        ok[r] = checksum(heads[r, _FIXED.size:], base) == stored[r]
    return ok


def _head_bytes(buf: bytes | bytearray | memoryview | torch.Tensor) -> memoryview:
    """The block's leading bytes as host memory, without copying host tensors."""
    if not isinstance(buf, torch.Tensor):
        return memoryview(buf).cast("B")
    if buf.device.type == "cpu":
        return buf.reshape(-1).numpy().data
    fixed = buf[: _FIXED.size].cpu().numpy().data
    if len(fixed) < _FIXED.size:
        return fixed
    _, _, clen, _, n_layers, _, _ = _FIXED.unpack_from(fixed)
    return buf[: _FIXED.size + _pad8(clen) + n_layers * _ENTRY.size].cpu().numpy().data


def verify_layers(table: Sequence[tuple[int, int, int]], layers: Iterable[int], arr: np.ndarray, base: int = 0) -> None:
    """Check the payload crc32c of ``layers`` of a block whose (offset, length, crc) ``table``
    is given (``parse_table``'s, or a ``BlockHeader``'s ``layers``); ``arr`` (host bytes) holds
    the block from byte ``base``. Raises CorruptBlock on the first layer that is short or wrong."""
    for layer in layers:
        offset, length, crc = table[layer][:3]
        start = offset - base
        if start < 0 or start + length > arr.size or checksum(arr[start: start + length]) != crc:
            raise CorruptBlock(f"layer {layer} payload checksum mismatch")


def decode_layer_into(
    header: BlockHeader, layer: int, data: torch.Tensor, outs: Sequence[torch.Tensor],
    *, verify: bool = True, base: int | None = None,
) -> None:
    """Decode one layer into ``outs``; ``data`` holds the layer's payload at ``entry.offset - base``.

    ``base`` defaults to 0 (``data`` is the whole block); for a range read from
    ``header.span(...)``, ``base`` is its ``lo``. Verifies the layer checksum first (CPU data
    only; device-resident bytes are trusted) and raises CorruptBlock on mismatch.
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
    """Decode a whole block (1-D uint8 tensor) into per-layer output views, copying each
    tensor's bytes once (codec ``none``) and reading nothing but the verified payloads."""
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
