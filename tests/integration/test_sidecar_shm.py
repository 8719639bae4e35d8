"""The shared-memory data plane against the real sidecar: ``kv_buffer`` puts with no pack copy,
``get`` views that stay valid while held, the server's cached mappings (dropped once a region is
unlinked, re-mapped when a name is re-created), and bad region requests refused with nothing
stored changed."""

from __future__ import annotations

import contextlib
import time
from multiprocessing import shared_memory

import httpx
import pytest
import torch

import kvtier.client as kclient
from kvtier import CacheConfig, KVLayout, TieredCache
from kvtier.client import AsyncKVTierClient, KVTierClient, pack_into, packed_nbytes
from kvtier.config import HostTierConfig
from kvtier.errors import InvalidRequest, LayoutMismatch
from server.shm import RegionCache
from server.testing import serve_in_thread

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


def shm_mappings(name: str) -> int:
    """How many mappings of region ``name`` this process has (client and in-thread server)."""
    with open("/proc/self/maps") as f:  # an unlinked region shows as "/dev/shm/NAME (deleted)"
        return sum(1 for line in f if line.rstrip().removesuffix(" (deleted)").endswith("/dev/shm/" + name))


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

    monkeypatch.setattr(kclient, "pack_into", refuse)
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

    monkeypatch.setattr(kclient, "pack_into", spy)
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


def test_server_drops_mapping_once_region_unlinked(url):
    client = KVTierClient(url, use_shm=True)
    buf = client.kv_buffer("kv", 16)
    fill(buf, rand_kv(16, 9))
    client.put("kv", ids(9000, 16), buf)
    name = client._ops._shm.find_loan(buf).shm.name
    assert shm_mappings(name) == 2  # the client's and the server's (kept between requests)
    client.put("kv", ids(9100, 16), buf)
    assert shm_mappings(name) == 2  # reused, not mapped again
    del buf
    client.close()  # unlinks the region
    assert wait_until(lambda: shm_mappings(name) == 0), "the server still maps an unlinked region"


def raw_put(url: str, name: str, token_ids: list[int], *, layout=LAYOUT, size: int | None = None,
            offset: int = 0, **extra) -> httpx.Response:
    size = packed_nbytes(layout, len(token_ids)) if size is None else size
    body = {"namespace": "kv", "token_ids": token_ids, "layout": layout.to_dict(),
            "region": {"name": name, "offset": offset, "size": size}, **extra}
    return httpx.put(url + "/v1/kv/shm", json=body, timeout=30)


def make_region(name: str, kv) -> shared_memory.SharedMemory:
    nbytes = packed_nbytes(LAYOUT, kv[0][0].shape[0])
    shm = shared_memory.SharedMemory(name=name, create=True, size=nbytes)
    pack_into(kv, shm.buf[:nbytes])
    return shm


def test_recreated_region_name_is_mapped_afresh(url, client):
    name = f"kvtier-test-recreate-{time.monotonic_ns()}"
    first, second = rand_kv(16, 10), rand_kv(32, 11)
    shm = make_region(name, first)
    try:
        assert raw_put(url, name, ids(10_000, 16)).json() == {"tokens": 16}
    finally:
        shm.close()
        shm.unlink()
    shm = make_region(name, second)  # same name, new object, new size
    try:
        assert raw_put(url, name, ids(11_000, 32)).json() == {"tokens": 32}
    finally:
        shm.close()
        shm.unlink()
    got, _ = client.get("kv", ids(10_000, 16))
    assert_kv_equal(got, first)
    got, _ = client.get("kv", ids(11_000, 32))
    assert_kv_equal(got, second)


BAD = [  # (id, put kwargs, status, words the message must contain)
    ("unknown-region", {"name": "kvtier-test-no-such-region"}, 404, "does not exist"),
    ("bad-name", {"name": "../etc/passwd"}, 400, "shared-memory name"),
    ("size-under-need", {"size": 100}, 400, "region.size is 100"),
    ("size-past-region", {"size": 1 << 20}, 400, "has "),
    ("offset-past-region", {"offset": 64}, 400, "at offset 64"),
    ("negative-offset", {"offset": -1}, 422, "offset"),
    ("slot-under-tokens", {"slot_tokens": 8}, 400, "slot_tokens 8 is less than the 16"),
    ("slot-past-region", {"slot_tokens": 64, "size": 1 << 20}, 400, "has "),
    ("slot-zero", {"slot_tokens": 0}, 422, "slot_tokens"),
    ("slot-string", {"slot_tokens": "16"}, 422, "slot_tokens"),
    ("layout-mismatch", {"layout": KVLayout(3, ((4, 8), (4, 8)), "float16")}, 422, "does not match namespace"),
    ("dtype-mismatch", {"layout": KVLayout(3, ((2, 8), (2, 8)), "float32")}, 422, "does not match namespace"),
]


def test_bad_region_requests_refused_and_change_nothing(url, client):
    kept = rand_kv(32, 12)
    assert client.put("kv", ids(12_000, 32), kept) == 32
    before = client.stats()
    name = f"kvtier-test-bad-{time.monotonic_ns()}"
    shm = make_region(name, rand_kv(16, 13))
    try:
        for case_id, over, status, words in BAD:
            over = {"name": name, **over}
            resp = raw_put(url, over.pop("name"), ids(13_000, 16), **over)
            assert resp.status_code == status, (case_id, resp.text)
            body = resp.json()
            assert body["status"] == status and words in body["message"], (case_id, body)
    finally:
        shm.close()
        shm.unlink()
    after = client.stats()
    assert (after.puts, after.tokens_put) == (before.puts, before.tokens_put)
    assert client.lookup("kv", ids(13_000, 16)).tokens == 0
    got, n = client.get("kv", ids(12_000, 32))
    assert n == 32
    assert_kv_equal(got, kept)
    assert httpx.get(url + "/readyz").json() == {"status": "ok"}


def test_region_cache_bounds_and_never_unmaps_under_a_user():
    regions = RegionCache(max_regions=2, sweep_s=0.05)
    shms = [shared_memory.SharedMemory(create=True, size=4096) for _ in range(3)]
    try:
        shms[0].buf[:4] = b"abcd"
        with regions.open(shms[0].name, 0, 4, 1 << 20) as view:
            for s in shms[1:]:
                with regions.open(s.name, 0, 16, 1 << 20):
                    pass
            assert len(regions) == 2  # the first was dropped from the table...
            assert bytes(view) == b"abcd"  # ...but not unmapped under its user
        assert shm_mappings(shms[0].name) == 1  # only the creator's mapping is left
        shms[1].unlink()
        assert wait_until(lambda: len(regions) == 1 and shm_mappings(shms[1].name) == 1)
    finally:
        regions.close()
        for s in shms:
            s.close()
            with contextlib.suppress(FileNotFoundError):
                s.unlink()
    assert len(regions) == 0
