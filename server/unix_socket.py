"""Unix sockets the sidecar listens on: the HTTP socket (``--uds``, beside the TCP port) and the
region socket (``--shm-socket``), created alike.

Each is bound under a temporary name in its directory and renamed into place once its mode is
0600: never reachable by other users of the host, not even for an instant. A socket file left by
a server that died (a probe's connect is refused) is replaced; one another server still listens
on, one of another kind or owner, or a path that is not a socket, is refused. On close the file is removed only if it is still the one this server made
(a successor may have replaced it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kvtier.errors import InvalidRequest

log = logging.getLogger(__name__)

MAX_PATH_BYTES = 107  # sun_path holds 108 bytes with its NUL
PROBE_TIMEOUT_S = 5.0  # a listener that does not accept a probe by then is not taken over


def listen_unix(path: Path, kind: int, what: str, flag: str, backlog: int = 64) -> tuple[socket.socket, int]:
    """A socket of ``kind`` listening at ``path`` (mode 0600), and the inode of its file.
    ``what`` and ``flag`` name it in errors ("shared-memory socket", "--shm-socket")."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    remove_stale(path, kind, what)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(3)}")
    if len(os.fsencode(tmp)) > MAX_PATH_BYTES:
        raise InvalidRequest(f"{what} path {str(path)!r} is too long for a Unix socket (about 95 "
                             f"bytes at most): set a shorter {flag}")
    listener = socket.socket(socket.AF_UNIX, kind)
    try:
        listener.bind(str(tmp))
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
        inode = os.lstat(path).st_ino
        listener.listen(backlog)
    except OSError as e:
        listener.close()
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise InvalidRequest(f"cannot listen on {what} {str(path)!r}: {e.strerror}") from None
    return listener, inode


def remove_stale(path: Path, kind: int, what: str) -> None:
    """Remove a socket file nobody listens on (left by a server that died); refuse anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise InvalidRequest(f"{what} path {str(path)!r} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, kind)
    probe.settimeout(PROBE_TIMEOUT_S)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:  # nobody listens: left by a server that died
        path.unlink(missing_ok=True)
        return
    except OSError as e:  # another kind of socket, another user's, a full backlog: not ours to take
        raise InvalidRequest(f"{what} path {str(path)!r} is a socket this server cannot take over "
                             f"({e.strerror or e}): remove it or choose another path") from None
    finally:
        probe.close()
    raise InvalidRequest(f"{what} {str(path)!r} is in use by another server")


def unlink_if_ours(path: str, inode: int) -> None:
    """Remove the socket file at ``path`` if it is still the one with ``inode``."""
    with contextlib.suppress(OSError):
        if os.lstat(path).st_ino == inode:
            os.unlink(path)


@contextlib.contextmanager
def http_sockets(config: Any, uds: str) -> Iterator[list[socket.socket] | None]:
    """What to pass as ``uvicorn.Server.run(sockets=)`` for ``config`` (a ``uvicorn.Config``):
    None without ``uds`` (uvicorn binds its TCP port); else the Unix socket ``uds`` and the TCP
    port, both bound here, since uvicorn serves one or the other by itself. On exit they are
    closed and the socket file removed."""
    if not uds:
        yield None
        return
    path = Path(uds).absolute()
    unix, inode = listen_unix(path, socket.SOCK_STREAM, "HTTP socket", "--uds", config.backlog)
    sockets = [unix]
    try:  # the TCP socket first: uvicorn's startup line reads the first one's port
        sockets.insert(0, config.bind_socket())  # uvicorn logs and exits on a port in use
        log.info("HTTP API also on unix://%s", path)
        yield sockets
    finally:
        for s in sockets:
            s.close()
        unlink_if_ours(str(path), inode)
