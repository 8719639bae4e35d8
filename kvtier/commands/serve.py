"""``kvtier serve``: run the sidecar (uvicorn + the FastAPI app in ``server/``).

Settings come from flags > ``KVTIER_*`` environment > ``--config`` YAML > defaults (see
``kvtier.settings.OPTIONS``). On SIGTERM/SIGINT uvicorn stops accepting, lets in-flight requests
finish (up to ``--graceful-timeout-s``), and only then is the cache closed: background writes
are flushed and LMDB is closed, so every acknowledged put survives a restart.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from kvtier.errors import KVTierError
from kvtier.settings import CONFIG_OPTION, OPTIONS, Settings, build_settings

log = logging.getLogger("kvtier.serve")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="run the kvtier sidecar (HTTP API + metrics)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    configure(p)
    return p


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument(CONFIG_OPTION.flag, dest="config", default=None, help=CONFIG_OPTION.help)
    for o in OPTIONS:
        p.add_argument(o.flag, dest=o.dest, default=None,
                       help=f"{o.help} [env {o.env}]", metavar=o.dest.upper())


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    try:
        settings = build_settings(vars(args))
    except KVTierError as e:
        log.error("kvtier serve: %s", e)
        return 2
    logging.basicConfig(level=settings.server.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(settings)


def serve(settings: Settings) -> int:
    import uvicorn

    from kvtier.manager import TieredCache
    from server.app import create_app, start_region_socket

    _Server = _server_class()
    srv = settings.server
    if not is_loopback(srv.host) and not srv.auth_enabled:
        log.warning("binding %s (not loopback) without any bearer token: anyone who can reach "
                    "this port can read and write the cache; set --tokens", srv.host)
    Path(srv.data_dir).mkdir(parents=True, exist_ok=True)
    try:
        cache = TieredCache(settings.cache)
    except KVTierError as e:
        log.error("cannot open the cache: %s", e)
        return 2
    app = None
    try:
        app = create_app(cache, srv)
        try:
            start_region_socket(app)  # here, so that a bad --shm-socket is one line, not a traceback
        except KVTierError as e:
            log.error("kvtier serve: %s", e)
            return 2
        config = uvicorn.Config(app, host=srv.host, port=srv.port,
                                log_level=srv.log_level.lower(), access_log=srv.access_log, lifespan="on",
                                timeout_graceful_shutdown=srv.graceful_timeout_s)
        server = _Server(config)
        server.run()  # returns after SIGTERM/SIGINT once in-flight requests are done
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
    parser = argparse.ArgumentParser(prog="kvtier serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
