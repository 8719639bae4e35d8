"""The region socket: where same-host clients hand their shared memory to the server.

A Unix ``SOCK_SEQPACKET`` socket (message boundaries kept, reliable, local only). Each message is
a msgpack map; the server answers every message with one map, in order:

- ``{"op": "register", "token": <bearer token or null>}`` carrying exactly one file descriptor
  (``SCM_RIGHTS``: a memfd sealed with ``F_SEAL_SHRINK``, open read-write) answers
  ``{"ok": true, "id": <region id>, "size": <bytes>}``. The region belongs to the token's tenant.
- ``{"op": "release", "token": ..., "id": <region id>}`` answers ``{"ok": true}``.
- a failure answers ``{"ok": false, "status": <HTTP status>, "error": <class>, "message": ...}``,
  the same error as HTTP would give (401 for a bad token, 400 for a bad descriptor...).

Closing the connection releases every region registered over it. HTTP requests then name a
region by its id (``kvtier.server.shm``). The socket file is created mode 0600 (by default in a fresh
0700 directory; ``kvtier.server.unix_socket``): the bearer token is what binds a region to a tenant, the mode keeps other users
of the host from even trying.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any

import msgpack

from kvtier.errors import InvalidRequest, InvalidType, KVTierError
from kvtier.server.auth import tenant_of
from kvtier.server.errors import status_of
from kvtier.server.shm import RegionTable
from kvtier.server.unix_socket import listen_unix, unlink_if_ours

log = logging.getLogger(__name__)
MAX_MESSAGE = 4096
MAX_FDS = 4  # more are refused (and closed) rather than silently truncated
MAX_CONNECTIONS = 1024
PROTOCOL = 1


class RegionSocket:
    """Serves the region socket in one thread; ``start()`` binds, ``close()`` unbinds and releases
    every registration made through it."""

    def __init__(self, table: RegionTable, tokens: dict[str, str], path: str | None = None) -> None:
        self.table, self.tokens = table, tokens
        self._want = path
        self._own_dir: Path | None = None
        self.path = ""
        self._inode = -1
        self._listener: socket.socket | None = None
        self._sel = selectors.DefaultSelector()
        self._conns: dict[socket.socket, int] = {}  # connection -> the id its regions are filed under
        self._next_id = 0
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()

    def start(self) -> str:
        """Bind and listen; returns the socket's absolute path."""
        if self._want:
            path = Path(self._want).absolute()
        else:
            self._own_dir = Path(tempfile.mkdtemp(prefix="kvtier-shm-"))  # 0700, unique
            path = self._own_dir / "regions.sock"
        listener, self._inode = listen_unix(path, socket.SOCK_SEQPACKET, "shared-memory socket", "--shm-socket")
        listener.setblocking(False)
        self._listener, self.path = listener, str(path)
        self._sel.register(listener, selectors.EVENT_READ)
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._serve, name="kvtier-shm-socket", daemon=True)
        self._thread.start()
        log.info("shared-memory region socket on %s", self.path)
        return self.path

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join(10)
        for conn in list(self._conns):
            self._drop(conn)
        for s in (self._listener, self._wake_r, self._wake_w):
            if s is not None:
                s.close()
        self._sel.close()
        if self.path:
            unlink_if_ours(self.path, self._inode)
        if self._own_dir is not None:
            with contextlib.suppress(OSError):
                self._own_dir.rmdir()

    # ---- the serving thread --------------------------------------------------------------
    def _serve(self) -> None:
        while not self._closed.is_set():
            for key, _ in self._sel.select():
                if key.fileobj is self._wake_r:
                    return
                try:
                    if key.fileobj is self._listener:
                        self._accept()
                    else:
                        self._receive(key.fileobj)  # type: ignore[arg-type]
                except Exception:  # noqa: BLE001  one bad client never stops the socket
                    log.exception("shared-memory socket: unexpected error")
                    if key.fileobj is not self._listener:
                        self._drop(key.fileobj)  # type: ignore[arg-type]

    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()  # type: ignore[union-attr]
        except (BlockingIOError, InterruptedError):
            return
        if len(self._conns) >= MAX_CONNECTIONS:
            log.warning("shared-memory socket: %d connections open; refusing another", len(self._conns))
            conn.close()
            return
        conn.setblocking(False)
        self._next_id += 1
        self._conns[conn] = self._next_id
        self._sel.register(conn, selectors.EVENT_READ)

    def _receive(self, conn: socket.socket) -> None:
        try:
            data, fds, flags, _ = socket.recv_fds(conn, MAX_MESSAGE, MAX_FDS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        try:
            if not data and not fds:  # the client closed its end
                self._drop(conn)
                return
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                reply = _error(InvalidRequest(f"message over {MAX_MESSAGE} bytes or over "
                                              f"{MAX_FDS} descriptors"))
            else:
                reply = self._handle(self._conns[conn], data, fds)
        finally:
            for fd in fds:  # a registered region keeps its mapping, never the descriptor
                os.close(fd)
        try:
            conn.send(msgpack.packb(reply))
        except OSError:  # it does not read its answers (or went away): forget it
            self._drop(conn)

    def _handle(self, conn: int, data: bytes, fds: list[int]) -> dict[str, Any]:
        try:
            try:
                msg = msgpack.unpackb(data, raw=False)
            except Exception:  # noqa: BLE001  msgpack raises many types for bad input
                raise InvalidRequest("malformed message: expected a msgpack map") from None
            if not isinstance(msg, dict):
                raise InvalidType(f"message must be a map, got {type(msg).__name__}")
            token = msg.get("token")
            if token is not None and not isinstance(token, str):
                raise InvalidType("token must be a string or null")
            tenant = tenant_of(self.tokens, token).tenant
            op = msg.get("op")
            if op == "register":
                if len(fds) != 1:
                    raise InvalidRequest(f"register carries exactly one file descriptor, got {len(fds)}")
                region = self.table.register(tenant, fds[0], conn)
                return {"ok": True, "id": region.id, "size": region.size}
            if op == "release":
                if fds:
                    raise InvalidRequest("release carries no file descriptor")
                self.table.release(tenant, msg.get("id"))
                return {"ok": True}
            raise InvalidRequest(f"unknown op {op!r}: expected 'register' or 'release'")
        except KVTierError as e:
            return _error(e)

    def _drop(self, conn: socket.socket) -> None:
        conn_id = self._conns.pop(conn, None)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(conn)
        conn.close()
        if conn_id is not None:
            self.table.release_connection(conn_id)


def _error(e: KVTierError) -> dict[str, Any]:
    return {"ok": False, "status": status_of(e), "error": type(e).__name__, "message": str(e)}
