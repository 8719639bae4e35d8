"""``kvtier serve``: run the sidecar (uvicorn + the FastAPI app in ``server/``).

Every setting is parsed and checked (``kvtier.settings.build_settings``) before anything is
allocated, so bad input is one ``kvtier serve: error: ...`` line from ``kvtier.cli``. On
SIGTERM/SIGINT uvicorn stops accepting, lets in-flight requests finish, and only then is the
cache closed: background writes are flushed and LMDB is closed.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import sys
from collections.abc import Iterator

from kvtier.commands import HelpFormatter
from kvtier.settings import CONFIG_OPTION, OPTIONS, Settings, build_settings, default_text

DESCRIPTION = """\
Run the kvtier sidecar: an HTTP API over a tiered KV cache (host DRAM, then SSD, then an
optional shared remote tier), with Prometheus metrics at /metrics.

Settings are taken from, highest first: these flags, KVTIER_* environment variables, the
YAML file named by --config, then the defaults shown. Sizes take units: 512MB, 4GiB, 1.5TiB.

On SIGTERM or SIGINT the server stops accepting connections, lets requests in flight finish
(up to --graceful-timeout-s), then flushes background writes and closes the cache: every put
that was answered survives a restart.

example:
  kvtier serve --host-capacity 8GiB --ssd-capacity 200GiB --data-dir /var/lib/kvtier
"""

log = logging.getLogger("kvtier.serve")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="run the kvtier sidecar (HTTP API and metrics)",
                              description=DESCRIPTION, formatter_class=HelpFormatter)
    configure(p)
    return p


def configure(p: argparse.ArgumentParser) -> None:
    """One flag per setting; argparse's defaults stay None (unset) so env and YAML can apply,
    and the help shows each setting's real default and its environment variable."""
    for o in (CONFIG_OPTION, *OPTIONS):
        default = default_text(o)
        shown = f"default: {default}; env {o.env}" if default else f"env {o.env}"
        p.add_argument(o.flag, dest=o.dest, default=None, metavar=o.metavar,
                       help=f"{o.help} ({shown})".replace("%", "%%"))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT. Bad settings raise InvalidRequest before anything starts."""
    settings = build_settings(vars(args))
    logging.basicConfig(level=settings.server.log_level.upper(), force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(settings)


def serve(settings: Settings) -> int:
    import uvicorn

    from kvtier.block import ONE_PASS_COPY
    from kvtier.bytecopy import copy_runs
    from kvtier.gcpauses import freeze_startup_heap
    from kvtier.manager import TieredCache
    from kvtier.server.app import create_app, start_region_socket
    from kvtier.server.protocol import uvicorn_http
    from kvtier.server.unix_socket import http_sockets

    _Server = _server_class()
    srv = settings.server
    if not is_loopback(srv.host) and not srv.auth_enabled:
        log.warning("binding %s (not loopback) without any bearer token: anyone who can reach "
                    "this port can read and write the cache; set --tokens", srv.host)
    cache = TieredCache(settings.cache)  # a bad data directory raises DataDirError: one line
    if copy_runs is None:
        log.info("kvtier._fastcopy is not built (no C compiler at install): puts copy and "
                 "checksum each block in two passes, reloads copy with numpy (both 1.3-1.6x slower)")
    elif not ONE_PASS_COPY:
        log.info("puts copy and checksum each block in two passes (about 1.3x slower): this CPU "
                 "lacks AVX2 + VPCLMULQDQ")
    app = None
    try:
        app = create_app(cache, srv)
        start_region_socket(app)  # here, so that a bad --shm-socket is one line, not a traceback
        config = uvicorn.Config(app, host=srv.host, port=srv.port, http=uvicorn_http(),
                                log_level=srv.log_level.lower(), access_log=srv.access_log, lifespan="on",
                                # uvicorn says int, waits with asyncio.wait_for: seconds as a float work
                                timeout_graceful_shutdown=srv.graceful_timeout_s)  # type: ignore[arg-type]
        server = _Server(config)
        with http_sockets(config, srv.uds) as sockets:  # a bad --uds is one line too
            frozen = freeze_startup_heap()  # startup is done: full collections skip what it left
            log.debug("froze %d startup objects for the garbage collector", frozen)
            server.run(sockets=sockets)  # returns after SIGTERM/SIGINT once in-flight requests are done
        return 0 if server.started else 1
    finally:
        if app is not None and app.state.shm_socket is not None:  # lifespan did not get to it
            app.state.shm_socket.close()
        log.info("closing the cache (flushing background writes)")
        cache.close()
        log.info("cache closed")


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises a caught SIGTERM/SIGINT after shutdown, which would kill the
        process before the cache is closed; swallow it so ``serve`` closes the cache first."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            with super().capture_signals():
                try:
                    yield
                finally:
                    caught = getattr(self, "_captured_signals", None)
                    if caught:
                        log.info("stopping on signal %s", ", ".join(map(str, caught)))
                        caught.clear()

    return Server


def main(argv: list[str] | None = None) -> int:
    """``python -m kvtier.commands.serve ARGS`` is ``kvtier serve ARGS``."""
    from kvtier.cli import main as cli_main

    return cli_main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
