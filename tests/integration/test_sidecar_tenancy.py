"""Two tenants on one real sidecar, one attacking the other on every data-plane route (msgpack
and shared memory): alpha can neither read, write, evict nor observe beta's data or namespace
names, and the shared-memory poisoning sequence (alpha writes into beta's region or live get
view, so beta's prompt would map to alpha's KV) fails with 403/404 while beta's entry stays
beta's."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import msgpack
import numpy as np
import pytest
import torch

from kvtier import CacheConfig, KVLayout, TieredCache
from kvtier.client import MSGPACK, KVTierClient, kv_to_wire, packed_nbytes
from kvtier.config import HostTierConfig, SSDTierConfig
from kvtier.server.testing import serve_in_thread
from kvtier.settings import ServerSettings
from tests.integration.regions import Link, OwnRegion, socket_path

ALPHA, BETA = "alpha-token-0001", "beta-token-00002"
BT = 16
LAYOUT = KVLayout(2, ((2, 8), (2, 8)), "float32")
PROMPT = list(range(5000, 5064))  # the same prompt in both tenants


def kv(value: float, tokens: int = len(PROMPT)):
    return [tuple(torch.full((tokens, 2, 8), value + i) for i in range(2)) for _ in range(LAYOUT.num_layers)]


def equal(got, want) -> bool:
    return got is not None and all(torch.equal(g, w) for lg, lw in zip(got, want, strict=True)
                                   for g, w in zip(lg, lw, strict=True))


@pytest.fixture
def two_tenants(tmp_path):
    cfg = CacheConfig(block_tokens=BT, host=HostTierConfig(capacity_bytes="4MiB"),
                      ssd=SSDTierConfig(path=str(tmp_path / "ssd"), capacity_bytes="64MiB",
                                        direct_io=False, min_free_bytes=0))
    settings = ServerSettings(tokens={ALPHA: "alpha", BETA: "beta"})
    with TieredCache(cfg) as cache, serve_in_thread(cache, settings) as url, \
            KVTierClient(url, ALPHA, use_shm=True) as alpha, KVTierClient(url, BETA, use_shm=True) as beta:
        for c in (alpha, beta):
            c.register_namespace("chat", layout=LAYOUT, block_tokens=BT)
        beta.register_namespace("secret-project-x", layout=LAYOUT, block_tokens=BT)
        assert beta.put("chat", PROMPT, kv(2.0)) == len(PROMPT)
        assert beta.put("secret-project-x", PROMPT, kv(3.0)) == len(PROMPT)
        assert alpha.put("chat", PROMPT, kv(1.0)) == len(PROMPT)  # alpha's own KV for the prompt
        yield url, alpha, beta


def as_alpha(url: str, method: str, path: str, **kw) -> httpx.Response:
    headers = {"authorization": f"Bearer {ALPHA}", **kw.pop("headers", {})}
    return httpx.request(method, url + path, headers=headers, timeout=30, **kw)


def beta_is_intact(beta: KVTierClient) -> None:
    for ns, value in (("chat", 2.0), ("secret-project-x", 3.0)):
        assert beta.lookup(ns, PROMPT).tokens == len(PROMPT)
        got, n = beta.get(ns, PROMPT)
        assert n == len(PROMPT) and equal(got, kv(value)), f"beta's {ns} changed"
    assert sorted(ns.name for ns in beta.namespaces()) == ["chat", "secret-project-x"]


def test_msgpack_and_control_routes_never_reach_the_other_tenant(two_tenants):
    url, alpha, beta = two_tenants
    packed = np.asarray(PROMPT, "<i8").tobytes()
    attacks = [
        ("POST", "/v1/lookup", {"json": {"namespace": "beta/chat", "token_ids": PROMPT}}),
        ("POST", "/v1/kv/get", {"json": {"namespace": "beta/chat", "token_ids": PROMPT}}),
        ("POST", "/v1/kv/get", {"content": msgpack.packb({"namespace": "beta/chat", "token_ids": packed}),
                                "headers": {"content-type": MSGPACK}}),
        ("PUT", "/v1/kv", {"content": msgpack.packb({"namespace": "beta/chat", "token_ids": PROMPT,
                                                     "kv": kv_to_wire(kv(9.0))}),
                           "headers": {"content-type": MSGPACK}}),
        ("DELETE", "/v1/kv", {"json": {"namespace": "beta/chat", "token_ids": PROMPT}}),
        ("POST", "/v1/prefetch", {"json": {"namespace": "beta/chat", "token_ids": PROMPT}}),
        ("GET", "/v1/namespaces/beta/chat", {}),
        ("DELETE", "/v1/namespaces/beta/secret-project-x", {}),
        ("POST", "/v1/namespaces", {"json": {"name": "beta/chat", "block_tokens": 32}}),
    ]
    for method, path, kw in attacks:
        resp = as_alpha(url, method, path, **kw)
        assert resp.status_code == 403, (method, path, resp.text)
        assert resp.json()["error"] == "Forbidden"
    pf = beta.prefetch("chat", PROMPT)
    for method in ("GET", "DELETE"):
        assert as_alpha(url, method, f"/v1/prefetch/{pf.id}").status_code == 404
    # Alpha's own namespace of the same name holds alpha's KV, never beta's.
    got, n = alpha.get("chat", PROMPT)
    assert n == len(PROMPT) and equal(got, kv(1.0))
    # Nothing alpha can read names beta's namespaces.
    seen = [as_alpha(url, "GET", p).text for p in ("/v1/namespaces", "/v1/stats", "/metrics")]
    for text in seen:
        assert "secret-project-x" not in text and "beta/" not in text, text[:500]
    assert [ns.name for ns in alpha.namespaces()] == ["chat"]
    beta_is_intact(beta)


def beta_region_of(beta: KVTierClient, views) -> str:
    """The id of the region beta's ``views`` lie in (what a leak would hand alpha)."""
    loan = beta._ops._shm.find_loan(views)
    assert loan is not None and loan.region.id
    return loan.region.id


def test_the_shared_memory_poisoning_sequence_fails(two_tenants):
    url, alpha, beta = two_tenants
    held, n = beta.get("chat", PROMPT)  # beta's live get view
    assert n == len(PROMPT) and equal(held, kv(2.0))
    region_id = beta_region_of(beta, held)
    nbytes = packed_nbytes(LAYOUT, len(PROMPT))
    region = {"id": region_id, "offset": 0, "size": nbytes}
    # 1. alpha decodes its KV for the prompt into beta's view: unknown id (as if it did not exist).
    resp = as_alpha(url, "POST", "/v1/kv/shm/get", json={"namespace": "chat", "token_ids": PROMPT,
                                                         "region": region})
    assert resp.status_code == 404 and resp.json()["error"] == "UnknownRegion", resp.text
    assert equal(held, kv(2.0)), "alpha wrote into beta's get view"
    # 2. alpha stores what lies in beta's region under its own prompt (reading beta's KV).
    resp = as_alpha(url, "PUT", "/v1/kv/shm", json={"namespace": "chat", "token_ids": list(range(64)),
                                                    "layout": LAYOUT.to_dict(), "region": region})
    assert resp.status_code == 404, resp.text
    assert alpha.lookup("chat", list(range(64))).tokens == 0
    # 3. beta puts its view back under another prompt: it must be beta's KV that is stored.
    assert beta.put("chat", PROMPT[:32] + [1] * 32, held) == 32  # 2 blocks were stored already
    got, _ = beta.get("chat", PROMPT[:32] + [1] * 32)
    assert equal(got, kv(2.0))
    # 4. alpha releases beta's region on the socket, and names regions the old way.
    with Link(socket_path(url, ALPHA)) as link:
        reply = link.ask({"op": "release", "token": ALPHA, "id": region_id})
        assert reply["ok"] is False and reply["status"] == 404
        assert link.ask({"op": "release", "token": None, "id": region_id})["status"] == 401
    secret = Path("/dev/shm") / f"kvtier-test-secret-{os.getpid()}"
    secret.write_bytes(b"s3cret" * 1000)
    secret.chmod(0o600)
    try:
        for name in (secret.name, "/" + secret.name):
            resp = as_alpha(url, "POST", "/v1/kv/shm/get", json={
                "namespace": "chat", "token_ids": PROMPT, "region": {"name": name, "size": nbytes}})
            assert resp.status_code == 400 and "no longer opened by name" in resp.json()["message"]
        assert secret.read_bytes() == b"s3cret" * 1000
    finally:
        secret.unlink()
    # beta's region still works for beta, and beta's entries are beta's.
    assert beta.put("chat", PROMPT[:48] + [2] * 16, held) == 16
    beta_is_intact(beta)


def test_a_tenant_uses_only_regions_it_handed_over(two_tenants):
    """With its own region alpha gets its own KV; beta's id is unknown to alpha whichever token
    registered it, and alpha's region is unknown to beta."""
    url, alpha, beta = two_tenants
    nbytes = packed_nbytes(LAYOUT, len(PROMPT))
    with OwnRegion(url, nbytes, ALPHA) as mine, OwnRegion(url, nbytes, BETA) as theirs:
        resp = as_alpha(url, "POST", "/v1/kv/shm/get", json={
            "namespace": "chat", "token_ids": PROMPT, "region": {"id": mine.id, "size": nbytes}})
        assert resp.json()["tokens"] == len(PROMPT)
        back = torch.frombuffer(bytearray(mine.mm[:nbytes]), dtype=torch.float32)
        assert back[:8].tolist() == [1.0] * 8  # alpha's KV
        theirs.mm[:nbytes] = b"\x7f" * nbytes
        resp = as_alpha(url, "POST", "/v1/kv/shm/get", json={
            "namespace": "chat", "token_ids": PROMPT, "region": {"id": theirs.id, "size": nbytes}})
        assert resp.status_code == 404
        assert bytes(theirs.mm[:nbytes]) == b"\x7f" * nbytes
        resp = httpx.post(url + "/v1/kv/shm/get", headers={"authorization": f"Bearer {BETA}"}, json={
            "namespace": "chat", "token_ids": PROMPT, "region": {"id": mine.id, "size": nbytes}})
        assert resp.status_code == 404
    beta_is_intact(beta)
