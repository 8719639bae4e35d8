"""The shared-memory data plane against the real sidecar: ``kv_buffer`` puts with no pack copy,
``get`` views that stay valid while held (and after the client closed), regions handed over as
file descriptors on the region socket and kept mapped until their owner goes, a sparse region
costing the server only what a request moves, and bad region requests refused with nothing
stored changed."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

import kvtier.client_shm as client_shm  # where the client looks pack_into up
from kvtier import CacheConfig, KVLayout, TieredCache
from kvtier.client import AsyncKVTierClient, KVTierClient, pack_into, packed_nbytes
from kvtier.config import HostTierConfig
from kvtier.errors import InvalidRequest, LayoutMismatch
from kvtier.server.shm import RegionTable, UnknownRegion
from kvtier.server.testing import serve_in_thread
from kvtier.settings import ServerSettings
from tests.integration.regions import Link, OwnRegion, memfd, socket_path

BT = 16
LAYOUT = KVLayout(3, ((2, 8), (2, 8)), "float16")


def rand_kv(tokens: int, seed: int) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(tokens, *s, generator=g).to(torch.float16) for s in LAYOUT.tensor_shapes)
            for _ in range(LAYOUT.num_layers)]


def fill(buf, kv) -> None:
    for dst, src in zip(buf, kv, strict=True):
        for d, s in zip(dst, src, strict=True):
            d[: s.shape[0]].copy_(s)


def assert_kv_equal(got, want) -> None:
    assert len(got) == len(want)
    for lg, lw in zip(got, want, strict=True):
        for g, w in zip(lg, lw, strict=True):
            assert g.shape == w.shape and torch.equal(g, w)


def ids(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def region_mappings() -> int:
    """Mappings of client regions in this process (the client's and the in-thread server's)."""
    with open("/proc/self/maps") as f:  # a memfd shows as "/memfd:NAME (deleted)"
        return sum(1 for line in f if "/memfd:kvtier-region" in line)


def region_inodes() -> list[int]:
    """The memfd inode of every client-region mapping in this process, once per mapping."""
    with open("/proc/self/maps") as f:
        return [int(line.split()[4]) for line in f if "/memfd:kvtier-region" in line]


def rss_shmem() -> int:
    """Shared memory this process has faulted in (client and in-thread server), in bytes."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("RssShmem:"))
    return kib * 1024


def wait_until(cond, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture(scope="module")
def url():
    cfg = CacheConfig(block_tokens=BT, host=HostTierConfig(capacity_bytes="32MiB"))
    with TieredCache(cfg) as cache, serve_in_thread(cache) as u:
        with KVTierClient(u) as c:
            c.register_namespace("kv", layout=LAYOUT, block_tokens=BT)
        yield u


@pytest.fixture
def client(url):
    with KVTierClient(url, use_shm=True) as c:
        yield c


@pytest.fixture
def no_pack(monkeypatch):
    """Make the client's pack copy fail, so a put that succeeds provably skipped it."""
    calls = []

    def refuse(kv, buf):
        calls.append(1)
        raise AssertionError("pack_into called on the kv_buffer path")

    monkeypatch.setattr(client_shm, "pack_into", refuse)
    return calls


def test_kv_buffer_put_skips_the_pack_copy(client, no_pack):
    buf = client.kv_buffer("kv", 64)
    assert [tuple(t.shape) for t in buf[0]] == [(64, 2, 8), (64, 2, 8)] and buf[0][0].dtype == torch.float16
    want = rand_kv(64, 1)
    fill(buf, want)
    assert client.put("kv", ids(1000, 64), buf) == 64
    got, n = client.get("kv", ids(1000, 64))
    assert n == 64 and not no_pack
    assert_kv_equal(got, want)


def test_kv_buffer_first_rows_and_reuse(client, no_pack):
    buf = client.kv_buffer("kv", 64)
    first = rand_kv(32, 2)
    fill(buf, first)
    assert client.put("kv", ids(2000, 32), [tuple(t[:32] for t in layer) for layer in buf]) == 32
    second = rand_kv(48, 3)
    fill(buf, second)  # refilled right after put returned: the server kept no view of it
    assert client.put("kv", ids(3000, 48), [tuple(t[:48] for t in layer) for layer in buf]) == 48
    assert not no_pack
    got, n = client.get("kv", ids(2000, 32))
    assert n == 32
    assert_kv_equal(got, first)
    got, n = client.get("kv", ids(3000, 48))
    assert n == 48
    assert_kv_equal(got, second)


def test_plain_tensors_still_packed_and_stored(client, monkeypatch):
    calls = []

    def spy(kv, buf):
        calls.append(1)
        return pack_into(kv, buf)

    monkeypatch.setattr(client_shm, "pack_into", spy)
    want = rand_kv(48, 4)
    assert client.put("kv", ids(4000, 48), want) == 48 and calls == [1]
    buf = client.kv_buffer("kv", 48)
    fill(buf, want)
    shifted = [tuple(t[1:] for t in layer) for layer in buf]  # in the region, not at its layout
    assert client.put("kv", ids(4100, 47), shifted) == 32 and calls == [1, 1]
    reordered = [buf[1], buf[0], buf[2]]
    assert client.put("kv", ids(4200, 48), reordered) == 48 and calls == [1, 1, 1]
    got, _ = client.get("kv", ids(4200, 48))
    assert_kv_equal(got, [want[1], want[0], want[2]])
    got, _ = client.get("kv", ids(4100, 47))
    assert_kv_equal(got, [tuple(t[1:33] for t in layer) for layer in want])


def test_get_views_stay_valid_while_held_and_put_back_without_copy(client, no_pack):
    a, b = rand_kv(32, 5), rand_kv(32, 6)
    buf = client.kv_buffer("kv", 32)
    fill(buf, a)
    client.put("kv", ids(5000, 32), buf)
    fill(buf, b)
    client.put("kv", ids(6000, 32), buf)
    got_a, _ = client.get("kv", ids(5000, 32))
    got_b, _ = client.get("kv", ids(6000, 32))  # must not reuse the region got_a views
    assert_kv_equal(got_a, a)
    assert_kv_equal(got_b, b)
    assert client.put("kv", ids(7000, 32), got_a) == 32  # a get's views go back with no copy
    assert not no_pack
    again, _ = client.get("kv", ids(7000, 32))
    assert_kv_equal(again, a)


def test_kv_buffer_bad_arguments(client):
    for bad in (0, -1, True, 2.5):
        with pytest.raises(InvalidRequest, match="positive integer"):
            client.kv_buffer("kv", bad)
    client.register_namespace("fresh")
    with pytest.raises(LayoutMismatch, match="no layout until its first put"):
        client.kv_buffer("fresh", 16)
    buf = client.kv_buffer("fresh", 16, layout=LAYOUT)
    with pytest.raises(LayoutMismatch, match="token_ids has 32"):
        client.put("fresh", ids(0, 32), buf)
    assert client.lookup("fresh", ids(0, 32)).tokens == 0
    fill(buf, rand_kv(16, 7))
    assert client.put("fresh", ids(0, 16), buf) == 16
    assert client.drop_namespace("fresh") == 1


async def test_async_kv_buffer(url, no_pack):
    async with AsyncKVTierClient(url, use_shm=True) as client:
        buf = await client.kv_buffer("kv", 32)
        want = rand_kv(32, 8)
        fill(buf, want)
        assert await client.put("kv", ids(8000, 32), buf) == 32
        got, n = await client.get("kv", ids(8000, 32))
        assert n == 32 and not no_pack
        assert_kv_equal(got, want)


def test_the_server_unmaps_a_region_when_its_owner_closes(url):
    # Counted per region (its memfd's inode): regions of earlier tests' clients may still be
    # on their way out of the in-thread server while this one runs.
    before = set(region_inodes())
    client = KVTierClient(url, use_shm=True)
    buf = client.kv_buffer("kv", 16)
    fill(buf, rand_kv(16, 9))
    client.put("kv", ids(9000, 16), buf)
    mine = [ino for ino in region_inodes() if ino not in before]
    assert len(set(mine)) == 1, mine  # one new region ...
    (ino,) = set(mine)
    assert region_inodes().count(ino) == 2  # ... mapped by the client and by the server (kept)
    client.put("kv", ids(9100, 16), buf)
    assert region_inodes().count(ino) == 2  # reused, not mapped again
    client.close()  # closes the region socket connection: the server drops its mapping
    assert wait_until(lambda: region_inodes().count(ino) == 1), "the server still maps the region"
    assert buf[0][0].shape == (16, 2, 8) and torch.isfinite(buf[0][0].float()).all()  # still ours
    del buf
    assert region_inodes().count(ino) == 0  # the last tensor took the client's mapping with it


def test_a_client_dropped_without_close_leaves_nothing_behind(url):
    import gc

    gc.collect()
    fds, maps = len(os.listdir("/proc/self/fd")), region_mappings()
    client = KVTierClient(url, use_shm=True)
    client.put("kv", ids(9500, 32), rand_kv(32, 16))
    got, n = client.get("kv", ids(9500, 32))
    assert n == 32 and region_mappings() > maps
    del client, got
    gc.collect()
    assert wait_until(lambda: region_mappings() == maps), "a region is still mapped"
    assert wait_until(lambda: len(os.listdir("/proc/self/fd")) <= fds), "a descriptor leaked"


def test_results_outlive_the_client_cleanly(tmp_path):
    """``get`` results held across ``close()`` stay readable, and nothing complains at close,
    at collection or at exit (#16: "Exception ignored in SharedMemory.__del__ ... BufferError")."""
    script = textwrap.dedent('''
        import gc, sys, torch
        from kvtier import CacheConfig, KVLayout, TieredCache
        from kvtier.client import KVTierClient
        from kvtier.config import HostTierConfig
        from kvtier.server.testing import serve_in_thread

        unraisable = []
        sys.unraisablehook = lambda u: unraisable.append(repr(u.exc_value))
        layout = KVLayout(2, ((2, 8), (2, 8)), "float16")
        kv = [tuple(torch.full((32, 2, 8), float(i + j), dtype=torch.float16) for j in range(2))
              for i in range(2)]
        with TieredCache(CacheConfig(block_tokens=16, host=HostTierConfig(capacity_bytes="8MiB"))) as cache, \\
                serve_in_thread(cache) as url:
            client = KVTierClient(url, use_shm=True)
            client.register_namespace("kv", layout=layout, block_tokens=16)
            client.put("kv", list(range(32)), kv)
            got, n = client.get("kv", list(range(32)))
            kept, _ = client.get("kv", list(range(32)))  # held until the interpreter exits
            buf = client.kv_buffer("kv", 16)
            client.close()
            assert n == 32 and all(torch.equal(g, w) for lg, lw in zip(got, kv) for g, w in zip(lg, lw))
            del got, buf
            gc.collect()
        assert not unraisable, unraisable
        sys.unraisablehook = sys.__unraisablehook__  # what happens at exit goes to stderr
        assert torch.equal(kept[1][1], kv[1][1])
        print("clean")
    ''')
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[2], env={**os.environ, "PYTHONWARNINGS": "default"})
    assert r.returncode == 0 and r.stdout.strip() == "clean", r.stdout + r.stderr
    for bad in ("Exception ignored", "BufferError", "leaked", "resource_tracker", "Traceback"):
        assert bad not in r.stderr, r.stderr


def test_a_sparse_region_costs_the_server_only_the_transfer(url, client):
    """A 1 GiB sparse region, a 16-token transfer deep inside it: the server faults in that
    window, not the region (it once mapped regions whole with MAP_POPULATE)."""
    want = rand_kv(16, 14)
    nbytes = packed_nbytes(LAYOUT, 16)
    offset = 700 << 20
    before = rss_shmem()
    with OwnRegion(url, 1 << 30) as region:  # handed over: mapped by the server, not faulted in
        region.mm[offset:offset + nbytes] = b"".join(
            t.contiguous().view(torch.uint8).numpy().tobytes() for layer in want for t in layer)
        put = {"namespace": "kv", "token_ids": ids(14_000, 16), "layout": LAYOUT.to_dict(),
               "region": {"id": region.id, "offset": offset, "size": nbytes}}
        assert httpx.put(url + "/v1/kv/shm", json=put).json() == {"tokens": 16}
        get = {"namespace": "kv", "token_ids": ids(14_000, 16),
               "region": {"id": region.id, "offset": 900 << 20, "size": nbytes}}
        assert httpx.post(url + "/v1/kv/shm/get", json=get).json()["tokens"] == 16
        grown = rss_shmem() - before
        assert grown < 32 << 20, f"shared memory faulted in grew by {grown >> 20} MiB for two 16 KiB transfers"
        back = bytes(region.mm[(900 << 20):(900 << 20) + nbytes])
        assert back == bytes(region.mm[offset:offset + nbytes])


def test_max_kv_bytes_bounds_what_one_request_can_touch(tmp_path):
    cfg = CacheConfig(block_tokens=BT, host=HostTierConfig(capacity_bytes="8MiB"))
    limit = packed_nbytes(LAYOUT, 32)
    with TieredCache(cfg) as cache, serve_in_thread(cache, ServerSettings(max_kv_bytes=limit)) as u:
        with KVTierClient(u) as c:
            c.register_namespace("kv", layout=LAYOUT, block_tokens=BT)
        before = rss_shmem()
        with OwnRegion(u, 64 << 20) as region:
            for path, body in (("/v1/kv/shm", {"layout": LAYOUT.to_dict()}), ("/v1/kv/shm/get", {})):
                resp = httpx.request("PUT" if path == "/v1/kv/shm" else "POST", u + path, json={
                    "namespace": "kv", "token_ids": ids(0, 48), **body,
                    "region": {"id": region.id, "offset": 0, "size": 48 << 20}})
                assert resp.status_code == 413 and "limit" in resp.json()["message"], resp.text
            assert rss_shmem() - before < 4 << 20  # refused before touching anything
            # at the limit it works
            resp = httpx.post(u + "/v1/kv/shm/get", json={"namespace": "kv", "token_ids": ids(0, 32),
                                                           "region": {"id": region.id, "size": limit}})
            assert resp.status_code == 200 and resp.json()["tokens"] == 0


def raw_put(url: str, region_id: str | None, token_ids: list[int], *, layout=LAYOUT, size: int | None = None,
            offset: int = 0, name: str | None = None, **extra) -> httpx.Response:
    size = packed_nbytes(layout, len(token_ids)) if size is None else size
    region = {"offset": offset, "size": size}
    if region_id is not None:
        region["id"] = region_id
    if name is not None:
        region["name"] = name
    body = {"namespace": "kv", "token_ids": token_ids, "layout": layout.to_dict(), "region": region, **extra}
    return httpx.put(url + "/v1/kv/shm", json=body, timeout=30)


REGION_BYTES = packed_nbytes(LAYOUT, 16)
BAD = [  # (id, put kwargs, status, words the message must contain)
    ("unknown-region", {"region_id": "0" * 32}, 404, "unknown shared-memory region id"),
    ("malformed-id", {"region_id": "../etc/passwd"}, 422, "region.id"),
    ("no-id", {"region_id": None}, 400, "region.id is required"),
    ("by-name", {"region_id": None, "name": "psm_0123abcd"}, 400, "no longer opened by name"),
    ("name-and-id", {"name": "psm_0123abcd"}, 400, "no longer opened by name"),
    ("size-under-need", {"size": 100}, 400, "region.size is 100"),
    ("size-past-region", {"slot_tokens": 32, "size": 1 << 20}, 400, f"has {REGION_BYTES} bytes"),
    ("offset-past-region", {"offset": 4096}, 400, "at offset 4096"),
    ("negative-offset", {"offset": -1}, 422, "offset"),
    ("slot-under-tokens", {"slot_tokens": 8}, 400, "slot_tokens 8 is less than the 16"),
    ("slot-zero", {"slot_tokens": 0}, 422, "slot_tokens"),
    ("slot-string", {"slot_tokens": "16"}, 422, "slot_tokens"),
    ("layout-mismatch", {"layout": KVLayout(3, ((4, 8), (4, 8)), "float16")}, 422, "does not match namespace"),
    ("dtype-mismatch", {"layout": KVLayout(3, ((2, 8), (2, 8)), "float32")}, 422, "does not match namespace"),
]


def test_bad_region_requests_refused_and_change_nothing(url, client):
    kept = rand_kv(32, 12)
    assert client.put("kv", ids(12_000, 32), kept) == 32
    before = client.stats()
    with OwnRegion(url, REGION_BYTES) as region:
        pack_into(rand_kv(16, 13), memoryview(region.mm))
        for case_id, over, status, words in BAD:
            over = {"region_id": region.id, **over}
            resp = raw_put(url, over.pop("region_id"), ids(13_000, 16), **over)
            assert resp.status_code == status, (case_id, resp.text)
            body = resp.json()
            assert body["status"] == status and words in body["message"], (case_id, body)
        assert raw_put(url, region.id, ids(13_500, 16)).json() == {"tokens": 16}  # the region is fine
    after = client.stats()
    assert (after.puts, after.tokens_put) == (before.puts + 1, before.tokens_put + 16)
    assert client.lookup("kv", ids(13_000, 16)).tokens == 0
    got, n = client.get("kv", ids(12_000, 32))
    assert n == 32
    assert_kv_equal(got, kept)
    assert httpx.get(url + "/readyz").json()["status"] == "ok"


def test_region_socket_refuses_what_could_hurt_the_server(url, tmp_path):
    """Only a sealed, read-write memfd is taken: a plain file, a pipe, an unsealed memfd (a
    shrink would SIGBUS the server) or a read-only one are refused, each descriptor closed."""
    plain = tmp_path / "plain"
    plain.write_bytes(b"\0" * 4096)
    unsealed = memfd(4096, seals=0)
    sealed = memfd(4096)
    read_only = os.open(f"/proc/self/fd/{sealed}", os.O_RDONLY)
    pipe_r, pipe_w = os.pipe()
    plain_fd = os.open(plain, os.O_RDWR)
    fds_before = len(os.listdir("/proc/self/fd"))
    try:
        with Link(socket_path(url)) as link:
            for fds, words in (((plain_fd,), "memfd"), ((pipe_r,), "memfd"), ((unsealed,), "F_SEAL_SHRINK"),
                               ((read_only,), "reading and writing"), ((), "exactly one"),
                               ((sealed, sealed), "exactly one")):
                reply = link.ask({"op": "register", "token": None}, fds)
                assert reply["ok"] is False and reply["status"] == 400 and words in reply["message"], reply
            for msg, words in ((b"\xc1", "malformed"), ({"op": "steal"}, "unknown op"),
                               ({"op": "release", "id": "0" * 32}, "unknown shared-memory region")):
                reply = link.ask(msg)
                assert reply["ok"] is False and words in reply["message"], reply
            assert link.ask({"op": "register"}, (sealed,))["ok"]  # and a good one still works
        assert wait_until(lambda: len(os.listdir("/proc/self/fd")) <= fds_before)  # none kept
    finally:
        for fd in (unsealed, sealed, read_only, pipe_r, pipe_w, plain_fd):
            os.close(fd)


def test_a_client_survives_a_server_restart(tmp_path):
    """Registrations die with the server; the client learns the new socket and hands its
    regions over again by itself."""
    want = rand_kv(32, 15)
    cfg = CacheConfig(block_tokens=BT, host=HostTierConfig(capacity_bytes="8MiB"))
    with TieredCache(cfg) as cache:
        with serve_in_thread(cache) as u:
            port = int(u.rsplit(":", 1)[1])
            client = KVTierClient(u, use_shm=True)
            client.register_namespace("kv", layout=LAYOUT, block_tokens=BT)
            buf = client.kv_buffer("kv", 32)
            fill(buf, want)
            assert client.put("kv", ids(15_000, 32), buf) == 32
        with serve_in_thread(cache, port=port) as u2:
            assert u2 == u
            assert client.put("kv", ids(15_100, 32), buf) == 32  # the same region, handed over again
            got, n = client.get("kv", ids(15_100, 32))
            assert n == 32
            assert_kv_equal(got, want)
            client.close()


def test_region_table_never_unmaps_under_a_user_and_hides_other_tenants():
    table = RegionTable()
    fds = [memfd(4 << 20) for _ in range(2)]
    try:
        a = table.register("alpha", fds[0], conn=1)
        b = table.register("beta", fds[1], conn=2)
        with pytest.raises(UnknownRegion), table.open("alpha", b.id, 0, 16, 1 << 20):
            pass
        with pytest.raises(UnknownRegion):
            table.release("alpha", b.id)
        with table.open("alpha", a.id, 0, 4, 1 << 20) as view:
            view[:4] = b"abcd"
            assert table.release_connection(1) == 1
            assert len(table) == 1 and bytes(view) == b"abcd"  # gone from the table, still mapped
            with pytest.raises(UnknownRegion), table.open("alpha", a.id, 0, 4, 1 << 20):
                pass
        assert a.mm.closed and not b.mm.closed  # unmapped by its last user
        assert len(b.populated) == 0  # nothing of beta's region was ever faulted in
        table.close()
        assert len(table) == 0 and b.mm.closed
    finally:
        for fd in fds:
            os.close(fd)


@contextlib.contextmanager
def held_first(held: str, cached: list) -> Iterator[tuple[str, threading.Event, threading.Event, threading.Event]]:
    """A sidecar whose first ``held`` call (``put`` or ``get_into``) waits until ``go`` is set;
    ``cached`` is put into namespace "kv" at ids 16_000.. first. Yields (url, entered, go,
    finished)."""
    cfg = CacheConfig(block_tokens=BT, host=HostTierConfig(capacity_bytes="8MiB"))
    entered, go, finished = threading.Event(), threading.Event(), threading.Event()
    with TieredCache(cfg) as cache:
        cache.register_namespace("kv", layout=LAYOUT, block_tokens=BT)
        cache.put("kv", ids(16_000, 64), cached)
        real = getattr(cache, held)
        calls = []

        def held_once(*args, **kwargs):
            calls.append(1)
            if len(calls) > 1:
                return real(*args, **kwargs)
            entered.set()
            assert go.wait(120)
            try:
                return real(*args, **kwargs)
            finally:
                finished.set()

        setattr(cache, held, held_once)
        try:
            with serve_in_thread(cache) as u:
                yield u, entered, go, finished
        finally:
            go.set()


@pytest.mark.parametrize("slow", ["put", "put_kv_buffer", "get_into"])
def test_a_region_whose_request_went_unanswered_is_never_lent_again(slow):
    """The client gives up on a request (its timeout) while the server still reads or writes
    the region it named. Were that region back in the pool, the next request would use it: the
    abandoned put would store the next put's KV under its own token ids, or the abandoned get
    would decode over the KV a later get handed the caller: wrong KV, silently."""
    first, second = rand_kv(64, 16), rand_kv(64, 17)
    held = "get_into" if slow == "get_into" else "put"
    with held_first(held, first) as (u, entered, go, finished), KVTierClient(u, use_shm=True, timeout=5) as client:
        with pytest.raises(httpx.TimeoutException):
            if slow == "put":
                client.put("kv", ids(17_000, 64), first)
            elif slow == "put_kv_buffer":
                buf = client.kv_buffer("kv", 64)
                fill(buf, first)
                client.put("kv", ids(17_000, 64), buf)
            else:
                client.get("kv", ids(16_000, 64))
        assert entered.is_set()
        if slow == "put_kv_buffer":
            del buf  # the caller lets the buffer go: its region must not come back to the pool
            gc.collect()
        assert client.put("kv", ids(18_000, 64), second) == 64
        got, n = client.get("kv", ids(18_000, 64))  # views of a region, held
        go.set()  # the abandoned request now reads (or writes) the region it named
        assert finished.wait(60)
        assert n == 64
        assert_kv_equal(got, second)
        if slow != "get_into":
            got, n = client.get("kv", ids(17_000, 64))
            assert n == 64
            assert_kv_equal(got, first)


async def test_a_cancelled_async_put_never_lends_its_region_again():
    """The same for ``AsyncKVTierClient``: a put cancelled (``asyncio.wait_for``) while the
    server still reads its region."""
    first, second = rand_kv(64, 18), rand_kv(64, 19)
    with held_first("put", first) as (u, entered, go, finished):
        async with AsyncKVTierClient(u, use_shm=True) as client:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(client.put("kv", ids(17_000, 64), first), 5)
            assert entered.is_set()
            assert await client.put("kv", ids(18_000, 64), second) == 64
            go.set()
            assert await asyncio.to_thread(finished.wait, 60)
            for start, want in ((17_000, first), (18_000, second)):
                got, n = await client.get("kv", ids(start, 64))
                assert n == 64
                assert_kv_equal(got, want)


def test_a_late_answer_on_the_region_socket_is_never_taken_for_the_next_one(monkeypatch):
    """The region socket answers every message in order. A client that gave up waiting for
    one answer (a server stalled past its timeout) and then sent the next message would read
    the late answer as the new one's: a region filed under another region's id, so a put
    would store what lies in that other region. Here the release the client sends for a region
    whose put went unanswered is answered only after the client gave up; the next put needs a
    fresh region registered, and must store and return exactly its own KV."""
    first, second = rand_kv(64, 20), rand_kv(64, 21)
    release_entered, release_go = threading.Event(), threading.Event()
    real_release = RegionTable.release

    def held_release(self, tenant, region_id):
        release_entered.set()
        assert release_go.wait(120)
        return real_release(self, tenant, region_id)

    monkeypatch.setattr(RegionTable, "release", held_release)
    with held_first("put", first) as (u, entered, go, finished), KVTierClient(u, use_shm=True, timeout=5) as client:
        with pytest.raises(httpx.TimeoutException):
            client.put("kv", ids(17_000, 64), first)  # unanswered: its region is discarded
        assert release_entered.wait(60)  # the server holds the release's answer back
        go.set()
        assert finished.wait(60)
        release_go.set()  # the answer arrives late, after the client moved on
        assert client.put("kv", ids(18_000, 64), second) == 64  # a new region, registered
        got, n = client.get("kv", ids(18_000, 64))
        assert n == 64
        assert_kv_equal(got, second)


class CollectingList(list):
    """A list whose iteration first runs a garbage collection: Python collects at whatever
    allocation crosses its threshold, so a collection can run at any point of the pool's code."""

    def __iter__(self):
        gc.collect()
        return super().__iter__()


def test_a_collection_inside_the_pool_never_hangs_the_client_on_its_own_views(url):
    """``get`` views freed by a garbage collection (they sat in a reference cycle) return their
    region through a finalizer, which runs on whatever thread the collection happens on: here,
    inside the pool's own locked choice of a region for the next ``get``. A finalizer that took
    the pool's lock there hung that thread for good."""
    client = KVTierClient(url, use_shm=True)
    kv = rand_kv(64, 22)
    assert client.put("kv-gc", ids(19_000, 64), kv) == 64
    got, n = client.get("kv-gc", ids(19_000, 64))
    cycle: list = [got]
    cycle.append(cycle)
    del got, cycle  # only a collection frees the views now
    pool = client._ops._shm
    pool._free = CollectingList(pool._free)
    answer: list = []
    worker = threading.Thread(target=lambda: answer.append(client.get("kv-gc", ids(19_000, 64))), daemon=True)
    worker.start()
    worker.join(60)
    if worker.is_alive():  # hung holding the pool's lock: closing the client would hang too
        pytest.fail("the client hung: a finalizer waited for the lock its own thread held")
    got, n = answer[0]
    assert n == 64
    assert_kv_equal(got, kv)
    answer.clear()
    del got
    gc.collect()
    client.close()


async def test_a_get_of_less_than_one_block_is_a_miss_never_an_error(url, client):
    """Fewer token ids than a block can hit nothing: a miss, as in-process and over msgpack.
    The shared-memory route answered 500 (its window was empty) for every such get."""
    def lookups() -> int:
        s = client.stats().namespaces.get("kv")
        return s.lookups if s is not None else 0

    before = lookups()
    for n in (1, BT - 1):
        assert client.get("kv", ids(30_000, n)) == (None, 0)
    async with AsyncKVTierClient(url, use_shm=True) as aclient:
        assert await aclient.get("kv", ids(30_000, BT - 1)) == (None, 0)
    assert lookups() == before + 3  # each counted as a lookup, as in-process
