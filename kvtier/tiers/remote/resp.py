"""Read Redis GET replies straight into the caller's buffer, verifying crc32c as bytes arrive.

Why: redis-py parses a bulk reply through three copies (socket -> chunk -> BytesIO -> bytes), and
kvtier then needs a fourth (into the caller's tensor) plus a pass for the checksum. Here the
header line goes through a small buffer and the payload is ``recv_into`` the destination, with
the crc32c of each piece computed while it is still in cache: one copy, no extra pass.

``ReplyReader`` speaks just enough RESP2/RESP3 for GET replies (bulk string, nil, error). Every
read is bounded by one deadline for the whole call. Any error leaves the stream at an unknown
position: the caller must drop the connection.
"""

from __future__ import annotations

import time

from kvtier.block import checksum

LINE_BUFFER = 64 * 1024


class ReplyError(Exception):
    """The server answered a command with an error reply (``-ERR ...``, ``-MOVED ...``)."""


class ProtocolError(Exception):
    """The byte stream is not a reply this reader understands; the connection is unusable."""


class ReplyReader:
    """Replies read from one connected socket until ``deadline`` (``time.monotonic()``)."""

    def __init__(self, sock, deadline: float, scratch: bytearray | None = None) -> None:
        self._sock = sock
        self._deadline = deadline
        self._buf = scratch if scratch is not None else bytearray(LINE_BUFFER)
        self._view = memoryview(self._buf)
        self._start = self._end = 0

    def _recv_into(self, view: memoryview) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("redis reply not complete before the call's deadline")
        self._sock.settimeout(left)
        n = self._sock.recv_into(view)
        if n == 0:
            raise ConnectionError("redis closed the connection mid-reply")
        return n

    def _line(self) -> bytes:
        while True:
            i = self._buf.find(b"\r\n", self._start, self._end)
            if i >= 0:
                line = bytes(self._view[self._start:i])
                self._start = i + 2
                return line
            if self._start:  # keep the partial line, make room behind it
                n = self._end - self._start
                self._view[:n] = self._view[self._start:self._end]
                self._start, self._end = 0, n
            if self._end == len(self._buf):
                raise ProtocolError(f"reply line longer than {len(self._buf)} bytes")
            self._end += self._recv_into(self._view[self._end:])

    def bulk_length(self) -> int | None:
        """The next reply's bulk length, None for nil; ReplyError for an error reply."""
        line = self._line()
        kind = line[:1]
        if kind == b"$":
            n = int(line[1:])
            return None if n < 0 else n
        if kind == b"_":
            return None
        if kind == b"-":
            raise ReplyError(line[1:].decode(errors="replace"))
        raise ProtocolError(f"expected a bulk reply to GET, got {line[:40]!r}")

    def read_into(self, dst: memoryview, crc: int = 0) -> int:
        """Fill ``dst`` (a flat byte view) from the stream; returns the running crc32c."""
        n = dst.nbytes
        got = min(self._end - self._start, n)
        if got:
            dst[:got] = self._view[self._start:self._start + got]
            crc = checksum(dst[:got], crc)
            self._start += got
        while got < n:
            k = self._recv_into(dst[got:])
            crc = checksum(dst[got:got + k], crc)
            got += k
        return crc

    def skip(self, n: int, crc: int = 0) -> int:
        """Consume ``n`` payload bytes nobody asked for (still checksummed); returns the crc."""
        while n > 0:
            if self._start == self._end:
                self._start = 0
                self._end = self._recv_into(self._view)
            k = min(n, self._end - self._start)
            crc = checksum(self._view[self._start:self._start + k], crc)
            self._start += k
            n -= k
        return crc

    def span_into(self, length: int, out: memoryview, lo: int, crc: int = 0) -> int:
        """Consume a ``length``-byte payload; its bytes ``[lo, lo + out.nbytes)`` land in ``out``.

        Returns the crc32c of the whole payload (every byte is verified, wanted or not).
        """
        hi = lo + out.nbytes
        crc = self.skip(lo, crc)
        crc = self.read_into(out, crc)
        return self.skip(length - hi, crc)

    def end_of_bulk(self) -> None:
        """Consume the CRLF that closes a bulk payload."""
        tail = bytearray(2)
        self.read_into(memoryview(tail))
        if tail != b"\r\n":
            raise ProtocolError(f"bulk reply not terminated by CRLF: {bytes(tail)!r}")

    def drain(self, replies: int) -> None:
        """Consume ``replies`` more GET replies whole (their contents are not wanted)."""
        for _ in range(replies):
            n = self.bulk_length()
            if n is not None:
                self.skip(n)
                self.end_of_bulk()
