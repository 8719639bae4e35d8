"""An engine connector's backend calls (``kvtier.integrations.backend``): the namespace registered
again when the backend lost it, and a sidecar that stopped answering costing one timeout per
back-off, not one per call."""

from __future__ import annotations

import socket
import threading

import httpx
import pytest
import torch

from kvtier import CacheConfig, HostTierConfig, TieredCache
from kvtier.client import KVTierClient
from kvtier.integrations.backend import BACKOFF_S, BackendUnavailable, EngineBackend
from kvtier.server.testing import serve_in_thread

PAGE = 4096


def page(seed: int) -> torch.Tensor:
    return torch.full((1, PAGE), seed, dtype=torch.uint8)


@pytest.mark.parametrize("where", ["embedded", "sidecar"])
def test_a_namespace_the_backend_lost_is_registered_again(where):
    """Registered once at start, the namespace was gone for good once a sidecar restarted
    without it or another client dropped it: every store failed, every lookup missed."""
    with TieredCache(CacheConfig(host=HostTierConfig(capacity_bytes="4MiB"))) as cache:
        def run(backend) -> None:
            calls = EngineBackend(backend)
            calls.register("eng", page_bytes=PAGE, fingerprint={"model": "m"})
            assert calls.put_blocks([b"a"], page(1)) == 1
            cache.drop_namespace("eng")  # lost behind the connector's back
            assert calls.put_blocks([b"b"], page(2)) == 1
            assert calls.block_exists([b"a", b"b"]).present == [False, True]
            out = torch.zeros(1, PAGE, dtype=torch.uint8)
            assert calls.get_blocks_into([b"b"], out) == 1 and torch.equal(out, page(2))
            assert calls.drop_namespace() == 1
            with pytest.raises(Exception, match="eng"):  # a drop never registers it again
                calls.drop_namespace()

        if where == "embedded":
            run(cache)
        else:
            with serve_in_thread(cache) as url, KVTierClient(url) as client:
                run(client)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def silent_server():
    """A TCP server that accepts connections and never answers (a paused sidecar); yields its
    URL and the list of connections it accepted."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", accepted
    finally:
        stop.set()
        thread.join(10)
        for conn in accepted:
            conn.close()
        listener.close()


def test_a_sidecar_that_stopped_answering_costs_one_timeout_per_back_off(silent_server):
    """Each call waited for the client's whole timeout, one request after another on vLLM's
    lookup thread: minutes of stalled scheduling. Now a timeout starts a back-off during which
    calls fail at once, with no connection made; the back-off doubles while the sidecar stays
    away."""
    url, accepted = silent_server
    clock = Clock()
    with KVTierClient(url, timeout=0.5) as client:
        calls = EngineBackend(client, clock=clock)
        calls._registration = ("eng", {"page_bytes": PAGE, "fingerprint": {"model": "m"}})
        with pytest.raises(httpx.TimeoutException):
            calls.block_exists([b"a"])
        tried = len(accepted)
        assert tried >= 1
        for _ in range(3):  # within the back-off: at once, nothing sent
            with pytest.raises(BackendUnavailable):
                calls.block_exists([b"a"])
        assert len(accepted) == tried
        clock.now += BACKOFF_S + 0.01  # the back-off is over: the sidecar is tried again
        with pytest.raises(httpx.TimeoutException):
            calls.put_blocks([b"a"], page(1))
        clock.now += BACKOFF_S + 0.01  # now it is twice as long
        with pytest.raises(BackendUnavailable):
            calls.get_blocks_into([b"a"], torch.zeros(1, PAGE, dtype=torch.uint8))
