"""GETs received straight into the caller's tensor, on connections redis-py's parser never reads.

Why: redis-py returns a big value through three copies (socket -> chunk -> BytesIO -> bytes)
and kvtier then needs a fourth into the caller's tensor plus a checksum pass; measured, that
made a kvtier reload slower than a bare ``GET``. Here one pipelined write asks for the manifest
and the chunks the span needs, and ``resp.ReplyReader`` receives each payload into the tensor,
checksumming each piece while it is still in cache: one copy, no extra pass, and the 16 MiB
chunks of one value arrive back to back on one connection.

Single-server only (a Cluster needs redirections: the redis-py path serves it). Connections
come from a pool of our own with a plain free list; one whose stream is left at an unknown
position (any error mid-reply) is disconnected, never reused.
"""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
import redis.connection

from kvtier.errors import CorruptBlock, InvalidRequest
from kvtier.tiers.remote.base import check_span, key_bound
from kvtier.tiers.remote.redis_layout import (
    FLAG_INLINE,
    HEADER,
    corrupt,
    parse_header,
    parse_manifest,
)
from kvtier.tiers.remote.resp import LINE_BUFFER, ReplyReader

Outcome = int | Exception | None


class DirectReads:
    """Reads of one Redis server into host tensors. Thread-safe; each call owns a connection."""

    def __init__(self, url: str, connection_kwargs: dict, timeout_s: float) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._kwargs = connection_kwargs
        self._lock = threading.Lock()
        self._pool: redis.ConnectionPool | None = None
        self._free: list[Any] = []  # idle connections (redis-py's; we use their private socket)
        self._local = threading.local()  # per-thread line buffer: nothing allocated per read

    def _checkout(self) -> Any:
        while True:
            with self._lock:
                conn = self._free.pop() if self._free else None
                if self._pool is None:
                    self._pool = redis.ConnectionPool.from_url(self.url, **self._kwargs)
                pool = self._pool
            if conn is None:
                break
            # Idle, a live connection has nothing to read; readable means the server closed it
            # (a restart): drop it rather than fail the next read.
            if not select.select([conn._sock], [], [], 0)[0]:
                return conn
            conn.disconnect()
        conn = pool.make_connection()
        conn.connect()
        return conn

    def _checkin(self, conn: Any) -> None:
        with self._lock:
            if self._pool is not None:
                self._free.append(conn)
                return
        conn.disconnect()

    def get_into(self, mkey: bytes, ckey: Callable[[bytes, int], bytes], key: bytes, out,
                 offset: int, chunk_bytes: int) -> int | None:
        """RemoteBackend.get_into semantics for a host ``out``, under one deadline.

        None: the value was written with another chunk size; the caller takes the general path.
        Connection errors surface as redis-py / builtin exceptions for the caller to translate.
        """
        nbytes = out.numel()
        first, last = offset // chunk_bytes, (offset + max(nbytes, 1) - 1) // chunk_bytes
        names = [mkey]
        if last > 0:
            names += [ckey(key, i) for i in range(first, last + 1)]
        deadline = time.monotonic() + self.timeout_s
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = bytearray(LINE_BUFFER)
        dst = memoryview(out.numpy()).cast("B")
        conn = self._checkout()
        try:
            # redis-py keeps the socket private; only this class ever reads from it.
            sock = conn._sock
            sock.settimeout(max(deadline - time.monotonic(), 1e-3))
            sock.sendall(b"".join(conn.pack_commands([("GET", n) for n in names])))
            reader = ReplyReader(sock, deadline, scratch)
            outcome = read_value(reader, key, dst, offset, first, len(names) - 1, chunk_bytes)
        except BaseException:
            conn.disconnect()  # the stream is at an unknown position: never reuse it
            raise
        self._checkin(conn)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def close(self) -> None:
        with self._lock:
            free, self._free, self._pool = self._free, [], None
        for conn in free:
            conn.disconnect()


def read_value(reader: ReplyReader, key: bytes, dst: memoryview, offset: int, first: int,
               nchunk_replies: int, cb: int) -> Outcome:
    """Consume the replies to GET manifest + ``nchunk_replies`` chunk GETs, filling ``dst``.

    Returns the byte count, None (written with another chunk size), or the KeyError /
    CorruptBlock / InvalidRequest to raise. Every reply is consumed whatever the outcome, so
    the connection stays usable; ``dst`` holds unspecified bytes unless a count is returned.
    """
    nbytes = dst.nbytes
    n = reader.bulk_length()
    if n is None:
        reader.drain(nchunk_replies)
        return KeyError(key)
    head = bytearray(min(n, HEADER.size + 4))
    reader.read_into(memoryview(head))
    try:
        length, chunk_bytes, nchunks, flags = parse_header(head, key)
        inline = bool(flags & FLAG_INLINE)
        if inline and n != HEADER.size + 4 + length:
            raise CorruptBlock(f"remote manifest of {key.hex()} is inconsistent with its length")
        if inline:
            crcs: tuple[int, ...] = (int.from_bytes(head[HEADER.size:], "little"),)
        else:
            rest = bytearray(n - len(head))
            reader.read_into(memoryview(rest))
            head += rest
            crcs = parse_manifest(bytes(head), key)[4]
        check_span(length, offset, nbytes, key)
    except (CorruptBlock, InvalidRequest) as e:
        reader.skip(n - len(head))
        reader.end_of_bulk()
        reader.drain(nchunk_replies)
        return e
    if inline:
        crc = reader.span_into(length, dst, offset)
        reader.end_of_bulk()
        reader.drain(nchunk_replies)
        return nbytes if key_bound(crc, key, length) == crcs[0] else corrupt(key)
    reader.end_of_bulk()
    if chunk_bytes != cb or nchunk_replies == 0:
        reader.drain(nchunk_replies)
        return None
    outcome: Outcome = nbytes
    pos = 0
    for j, i in enumerate(range(first, first + nchunk_replies)):
        m = reader.bulk_length()
        if m is None:  # expired or evicted under the manifest: a miss
            reader.drain(nchunk_replies - j - 1)
            return KeyError(key)
        start = max(offset - i * cb, 0)
        take = max(min(m - start, nbytes - pos), 0)
        crc = reader.span_into(m, dst[pos:pos + take], min(start, m))
        reader.end_of_bulk()
        if m != min(cb, length - i * cb) or key_bound(crc, key, m, i) != crcs[i]:
            outcome = corrupt(key)
        pos += take
    return outcome
