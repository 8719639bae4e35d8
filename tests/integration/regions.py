"""Raw shared-memory regions for tests: memfds handed to a sidecar over its region socket the
way ``kvtier.shm_pool`` does it, but with every step under the test's control (so tests can
also send what a well-behaved client never would)."""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import socket

import httpx
import msgpack

SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def memfd(size: int, *, seals: int = SEALS) -> int:
    fd = os.memfd_create("kvtier-test-region", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def socket_path(url: str, token: str | None = None) -> str:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    resp = httpx.get(url + "/v1/kv/shm/socket", headers=headers)
    assert resp.status_code == 200, resp.text
    return resp.json()["path"]


class Link:
    """One connection to the region socket."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(30)
        self.sock.connect(path)

    def ask(self, msg: dict | bytes, fds: tuple[int, ...] = ()) -> dict:
        data = msg if isinstance(msg, bytes) else msgpack.packb(msg)
        socket.send_fds(self.sock, [data], list(fds))
        return msgpack.unpackb(self.sock.recv(4096))

    def register(self, fd: int, token: str | None = None) -> str:
        reply = self.ask({"op": "register", "token": token}, (fd,))
        assert reply["ok"], reply
        return reply["id"]

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Link:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OwnRegion(contextlib.AbstractContextManager):
    """A region this test created, mapped here and handed to the server: ``.mm``, ``.id``."""

    def __init__(self, url: str, size: int, token: str | None = None) -> None:
        self.fd = memfd(size)
        self.mm = mmap.mmap(self.fd, size)
        self.link = Link(socket_path(url, token))
        self.id = self.link.register(self.fd, token)

    def __exit__(self, *exc: object) -> None:
        self.link.close()
        self.mm.close()
        os.close(self.fd)
