"""Run the real sidecar (uvicorn on a free loopback port) in a thread: for tests and benches."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import uvicorn

from kvtier.manager import TieredCache
from kvtier.server.app import create_app
from kvtier.server.protocol import uvicorn_http
from kvtier.server.unix_socket import http_sockets
from kvtier.settings import ServerSettings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(cache: TieredCache, settings: ServerSettings | None = None,
                    timeout_s: float = 30.0, port: int | None = None) -> Iterator[str]:
    """Yield the base URL of a running server (on ``port``, else a free one; also on the Unix
    socket ``settings.uds`` where set); stop it (gracefully) on exit."""
    settings = settings or ServerSettings()
    settings.host, settings.port = "127.0.0.1", port or free_port()
    config = uvicorn.Config(create_app(cache, settings), host=settings.host, port=settings.port, http=uvicorn_http(),
                            log_level="warning", lifespan="on", access_log=False)
    server = uvicorn.Server(config)
    with http_sockets(config, settings.uds) as sockets:
        thread = threading.Thread(target=server.run, args=(sockets,), name="kvtier-sidecar", daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the sidecar did not start")
            time.sleep(0.01)
        try:
            yield f"http://{settings.host}:{settings.port}"
        finally:
            server.should_exit = True
            thread.join(timeout_s)
