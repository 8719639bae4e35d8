"""Large answers of the sidecar (a msgpack ``get``'s KV) read straight into pooled memory, and
large request bodies (a msgpack ``put``'s KV) sent as they lie.

Why: httpx receives a body in 64 KiB reads, each through h11's buffer, and ``Response.content``
joins them into fresh memory: a 1 GiB msgpack ``get`` took 8-16 s on the development VM. The
standard library's ``http.client`` reads a body of known length with ``recv_into`` straight into
the caller's buffer (the kernel's copy only), and ``MappedPool`` hands out memory an earlier
answer used and its caller dropped, already faulted in: 0.7 s for the same ``get``. On the way
out, h11 joins every piece of a body into a new ``bytes`` and httpcore re-slices (copies) what
each partial send left over; ``http.client`` hands each piece to ``sendall`` as it is.

Used where httpx would send the request as it is, over plain TCP or the sidecar's Unix socket
(``unix:///path/to/http.sock``, ``kvtier serve --uds``): an ``http://`` or ``unix://`` URL,
httpx's own transport, no proxy for the host. Anything else (a transport passed in, TLS, a
proxy) goes through httpx as before. Failures raise httpx's exceptions (``ConnectError``, ``ReadTimeout``,
``RemoteProtocolError``...), so callers catch one set of errors whichever way the answer came.
"""

from __future__ import annotations

import http.client
import json
import logging
import select
import socket
import threading
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from kvtier.bufpool import MAPPED_BYTES, MappedPool

log = logging.getLogger(__name__)

IDLE_CONNECTIONS = 4  # kept-alive connections kept per client; more concurrent calls open more
RELOAD_POOL_BYTES = 4 * 1024**3  # a client's default: as ``CacheConfig.reload_pool_bytes``
UNIX_SCHEME = "unix://"
UNIX_HOST = "http://localhost"  # the base URL requests over a Unix socket are built for


def split_url(base_url: str) -> tuple[str, str | None]:
    """(the HTTP base URL requests are built for, the Unix socket they go to or None).
    ``unix:///run/kvtier/http.sock`` is the sidecar's ``--uds`` socket: an absolute path."""
    if not base_url.startswith(UNIX_SCHEME):
        return base_url, None
    path = base_url[len(UNIX_SCHEME):]
    if not path.startswith("/"):
        raise ValueError(f"a unix:// sidecar URL names the socket by its absolute path, as "
                         f"unix:///run/kvtier/http.sock; got {base_url!r}")
    return UNIX_HOST, path


@dataclass(slots=True)
class Answer:
    """An HTTP answer as the client's operations read one (``httpx.Response``'s few fields they use)."""

    status_code: int
    content: bytes | memoryview  # the body; one of MAPPED_BYTES or more views pooled memory

    def json(self) -> Any:
        return json.loads(bytes(self.content))

    @property
    def text(self) -> str:
        return bytes(self.content).decode("utf-8", errors="replace")


class UnixConnection(http.client.HTTPConnection):
    """``http.client`` over a Unix stream socket (the sidecar's ``--uds``)."""

    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class DirectAnswers:
    """Sends a request over a kept-alive ``http.client`` connection and reads its answer with
    ``recv_into`` into pooled memory. Thread-safe: a call takes an idle connection or opens one.

    A kept-alive connection the server closed while idle (uvicorn closes them after 5 s) is
    dropped when next taken. One it closes just then fails the request before any answer
    arrives; a request that may be sent twice (``resend``: reads, and puts, which store the same
    bytes under the same keys again) is sent again once, on a fresh connection; others (a
    prefetch) raise."""

    def __init__(self, host: str, port: int, timeout: float, pool_bytes: int, *, uds: str | None = None) -> None:
        self.host, self.port, self.timeout, self.uds = host, port, timeout, uds
        self.pool = MappedPool(pool_bytes)
        self.calls = 0  # answers read this way (tests and benchmarks count them)
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def for_client(cls, base_url: str, transport: object, timeout: float, pool_bytes: int) -> DirectAnswers | None:
        """The reader for a client of ``base_url``, or None where httpx must send the requests
        itself (a transport passed in, TLS, a proxy set for the host)."""
        if transport is None and base_url.startswith(UNIX_SCHEME):
            return cls("localhost", 0, timeout, pool_bytes, uds=split_url(base_url)[1])
        url = httpx.URL(base_url)
        if transport is not None or url.scheme != "http" or not url.host:
            return None
        proxies = urllib.request.getproxies()
        if ("http" in proxies or "all" in proxies) and not urllib.request.proxy_bypass(url.host):
            return None
        return cls(url.host, url.port or 80, timeout, pool_bytes)

    def fetch(self, request: httpx.Request, pieces: Iterable[bytes | memoryview] | None = None, *,
              resend: bool = False, stop: threading.Event | None = None) -> Answer:
        """Send ``request`` (built by the client's ``httpx.Client``: its URL, headers and body;
        or, given ``pieces``, the body in those, its length in the request's headers) and read
        the whole answer. ``resend``: the request may be sent twice (see the class). ``stop``
        set: no further piece is sent (the request fails, the server stores nothing)."""
        headers = {**request.headers, "accept-encoding": "identity"}  # the body as it lies
        body: Any = request.read() if pieces is None else pieces if stop is None else _Stoppable(pieces, stop)
        target = request.url.raw_path.decode("ascii")
        conn, reused = self._take()
        try:
            try:
                resp = _exchange(conn, request.method, target, body, headers)
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                if not reused or not resend:
                    raise
                conn.close()  # the server had closed it while idle, so nothing was answered: once more
                conn = self._connection()
                resp = _exchange(conn, request.method, target, body, headers)
            answer = self._read(resp, request)
        except BaseException as e:
            conn.close()
            err = _as_httpx(e, request)
            if err is e:
                raise
            raise err from e
        if resp.will_close:
            conn.close()
        else:
            self._give(conn)
        self.calls += 1
        return answer

    def _read(self, resp: http.client.HTTPResponse, request: httpx.Request) -> Answer:
        encoding = resp.getheader("content-encoding", "identity").lower()
        if encoding != "identity":
            raise httpx.DecodingError(f"the sidecar answered with content-encoding {encoding!r}", request=request)
        n = resp.length
        if n is None or n < MAPPED_BYTES:  # no length (chunked) or small: read as bytes
            return Answer(resp.status, resp.read())
        buf = memoryview(self.pool.take(n).data)  # the tensors viewing it keep the mapping from the pool
        got = 0
        while got < n:  # one readinto normally fills it: recv_into until the length is read
            k = resp.readinto(buf[got:])
            if not k:
                raise httpx.RemoteProtocolError(f"the sidecar closed the connection after {got} of the "
                                                f"{n} bytes of its answer", request=request)
            got += k
        return Answer(resp.status, buf)

    def _take(self) -> tuple[http.client.HTTPConnection, bool]:
        """An idle connection the server has not closed, else a new one. An idle connection
        with something to read has been closed by the server (or is out of step): dropped
        before it carries a request, so only a close racing this check costs a resend."""
        while True:
            with self._lock:
                if self._closed:
                    raise RuntimeError("the client is closed")
                if not self._idle:
                    return self._connection(), False
                conn = self._idle.pop()
            if conn.sock is not None and not select.select([conn.sock], [], [], 0)[0]:
                return conn, True
            conn.close()

    def _connection(self) -> http.client.HTTPConnection:
        if self.uds is not None:
            return UnixConnection(self.uds, self.timeout)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def _give(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < IDLE_CONNECTIONS:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        """Close the idle connections and let the idle memory go (answers still held stay valid)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        self.pool.clear()


class Abandoned(Exception):
    """The caller gave up on a request whose body was still being sent (``fetch``'s ``stop``)."""


class _Stoppable:
    """``pieces`` (iterable again, for a resend), ending in ``Abandoned`` once ``stop`` is set."""

    def __init__(self, pieces: Iterable[bytes | memoryview], stop: threading.Event) -> None:
        self.pieces, self.stop = pieces, stop

    def __iter__(self) -> Iterator[bytes | memoryview]:
        for piece in self.pieces:
            if self.stop.is_set():
                raise Abandoned("the request was cancelled while its body was being sent")
            yield piece


def _exchange(conn: http.client.HTTPConnection, method: str, target: str, body: Any,
              headers: dict[str, str]) -> http.client.HTTPResponse:
    """Send the request and take its answer's head. A server may answer before it read the
    whole body (a 413 for a body over its limit) and close: that answer is the answer."""
    try:
        conn.request(method, target, body=body, headers=headers)
    except (BrokenPipeError, ConnectionResetError) as e:
        try:
            return conn.getresponse()
        except (http.client.HTTPException, OSError):
            raise e from None
    return conn.getresponse()


def _as_httpx(e: BaseException, request: httpx.Request) -> BaseException:
    """``e`` as the httpx exception httpx would have raised for the same failure."""
    if isinstance(e, httpx.HTTPError):
        return e
    if isinstance(e, ConnectionRefusedError | socket.gaierror):
        return httpx.ConnectError(str(e), request=request)
    if isinstance(e, TimeoutError):
        return httpx.ReadTimeout(str(e) or "timed out", request=request)
    if isinstance(e, http.client.HTTPException):  # RemoteDisconnected, IncompleteRead, a bad status line
        return httpx.RemoteProtocolError(f"{type(e).__name__}: {e}", request=request)
    if isinstance(e, OSError):
        return httpx.ReadError(f"{type(e).__name__}: {e}", request=request)
    return e
