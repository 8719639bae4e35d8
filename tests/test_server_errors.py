"""Bad requests against the real sidecar: each gets the right 4xx and a JSON message naming the
problem, and none of them changes anything (readyz stays OK, stored blocks are unchanged)."""

from __future__ import annotations

import httpx
import msgpack
import numpy as np
import pytest
import torch

from kvtier import CacheConfig, KVLayout, TieredCache
from kvtier.client import MSGPACK, KVTierClient, kv_to_wire
from kvtier.config import HostTierConfig, SSDTierConfig
from kvtier.server.testing import serve_in_thread
from kvtier.settings import ServerSettings
from tests.integration.regions import OwnRegion

A, B = "alpha-token-0001", "beta-token-00002"
BT = 16
LAYOUT = KVLayout(2, ((2, 8), (2, 8)), "float32")
IDS = list(range(64))


def kv(tokens: int, dtype=torch.float32, heads: int = 2):
    g = torch.Generator().manual_seed(7)
    return [tuple(torch.randn(tokens, heads, 8, generator=g).to(dtype) for _ in range(2)) for _ in range(2)]


def mp(obj) -> dict:
    return {"content": msgpack.packb(obj), "headers": {"content-type": MSGPACK}}


def lookup(**over):
    return {"json": {"namespace": "chat", "token_ids": IDS, **over}}


def put_body(tensors, ids=IDS):
    return mp({"namespace": "chat", "token_ids": ids, "kv": kv_to_wire(tensors)})


SMALL = "small-region"  # stands for the id of a 4 KiB region alpha handed over (see ``server``)
UNKNOWN = "0" * 32


def shm_get(region: dict, size: int = 1 << 20, offset: int = 0):
    return {"json": {"namespace": "chat", "token_ids": IDS,
                     "region": {**region, "offset": offset, "size": size}}}


def shm_get_mp(token_ids, region_id: str = UNKNOWN, **over):
    """A shared-memory get as the client sends it: msgpack, token ids packed (``kvtier.server.body``)."""
    return mp({"namespace": "chat", "token_ids": token_ids,
               "region": {"id": region_id, "offset": 0, "size": 1 << 20}, **over})


def packed(ids) -> bytes:
    return np.asarray(ids, dtype="<i8").tobytes()


def shaped_put(*shape: int):
    """A put whose one tensor has ``shape`` and no bytes (its element count is 0)."""
    tensor = {"shape": list(shape), "dtype": "float32", "data": b""}
    return mp({"namespace": "chat", "token_ids": IDS, "kv": [[tensor, tensor]] * 2})


def ids_put(token_ids):
    return mp({"namespace": "chat", "token_ids": token_ids, "kv": kv_to_wire(kv(64))})


def ids_get(token_ids, as_msgpack: bool):
    body = {"namespace": "chat", "token_ids": token_ids}
    return mp(body) if as_msgpack else {"json": body}


bad_len_kv = kv_to_wire(kv(64))
bad_len_kv[0][0]["data"] = bytes(bad_len_kv[0][0]["data"])[:-4]

# (id, token, method, path, request kwargs, status, words the message must contain)
CASES = [
    ("malformed-json", A, "POST", "/v1/lookup",
     {"content": b'{"namespace": "chat", ', "headers": {"content-type": "application/json"}}, 400, "malformed JSON"),
    ("token-not-int", A, "POST", "/v1/lookup", lookup(token_ids=[1, "2", 3]), 422, "token_ids.1"),
    ("token-float", A, "POST", "/v1/lookup", lookup(token_ids=[1.5]), 422, "token_ids.0"),
    ("token-negative", A, "POST", "/v1/lookup", lookup(token_ids=[3, -1]), 422, "token_ids.1"),
    ("tokens-not-list", A, "POST", "/v1/lookup", lookup(token_ids="0123"), 422, "token_ids"),
    ("missing-namespace", A, "POST", "/v1/lookup", {"json": {"token_ids": IDS}}, 422, "namespace"),
    ("unknown-field", A, "POST", "/v1/lookup", lookup(tokens=[1]), 422, "tokens"),
    ("tokens-over-limit", A, "POST", "/v1/lookup", lookup(token_ids=list(range(5000))), 413, "limit is 4096"),
    ("body-over-limit", A, "POST", "/v1/lookup", lookup(token_ids=[7] * 40000), 413, "exceeds the limit"),
    ("unknown-namespace", A, "DELETE", "/v1/kv", lookup(namespace="nope"), 404, "nope"),
    ("bad-namespace-name", A, "POST", "/v1/lookup", lookup(namespace="a b"), 400, "invalid namespace name"),
    ("negative-block-tokens", A, "POST", "/v1/namespaces", {"json": {"name": "x", "block_tokens": -16}},
     422, "block_tokens"),
    ("absurd-block-tokens", A, "POST", "/v1/namespaces", {"json": {"name": "x", "block_tokens": 10**12}},
     422, "block_tokens"),
    ("zero-layout-dim", A, "POST", "/v1/namespaces",
     {"json": {"name": "x", "layout": {"num_layers": 2, "tensor_shapes": [[0, 8]], "dtype": "float32"}}},
     422, "tensor_shapes"),
    ("unknown-dtype", A, "POST", "/v1/namespaces",
     {"json": {"name": "x", "layout": {"num_layers": 2, "tensor_shapes": [[2, 8]], "dtype": "float99"}}},
     422, "float99"),
    ("negative-ttl", A, "POST", "/v1/namespaces", {"json": {"name": "x", "ttl_s": -5}}, 422, "ttl_s"),
    ("conflicting-register", A, "POST", "/v1/namespaces", {"json": {"name": "chat", "block_tokens": 32}},
     400, "already exists"),
    ("kv-shape-mismatch", A, "PUT", "/v1/kv", put_body(kv(64, heads=3)), 422, "shape"),
    ("kv-dtype-mismatch", A, "PUT", "/v1/kv", put_body(kv(64, torch.float16)), 422, "float16"),
    ("kv-tokens-mismatch", A, "PUT", "/v1/kv", put_body(kv(48)), 422, "48 tokens"),
    ("kv-data-length", A, "PUT", "/v1/kv",
     mp({"namespace": "chat", "token_ids": IDS, "kv": bad_len_kv}), 422, "needs 4096 bytes"),
    ("kv-malformed-msgpack", A, "PUT", "/v1/kv",
     {"content": b"\xc1\xc1garbage", "headers": {"content-type": MSGPACK}}, 400, "msgpack"),
    ("kv-json-body", A, "PUT", "/v1/kv", {"json": {"namespace": "chat"}}, 415, "application/msgpack"),
    ("kv-missing-field", A, "PUT", "/v1/kv", mp({"namespace": "chat", "token_ids": IDS}), 400, "'kv'"),
    ("missing-token", None, "GET", "/v1/namespaces", {}, 401, "missing bearer token"),
    ("wrong-token", "not-a-real-token", "GET", "/v1/namespaces", {}, 401, "unknown bearer token"),
    ("malformed-auth", "", "GET", "/v1/namespaces", {"headers": {"authorization": "Basic abc"}}, 401, "Bearer"),
    ("other-tenant-namespace", B, "POST", "/v1/lookup", lookup(namespace="alpha/chat"), 403, "alpha"),
    ("other-tenant-drop", B, "DELETE", "/v1/namespaces/alpha%2Fchat", {}, 403, "belongs to tenant"),
    ("unknown-prefetch", A, "GET", "/v1/prefetch/deadbeef", {}, 404, "deadbeef"),
    ("unknown-tier", A, "POST", "/v1/prefetch", lookup(to="gpu9"), 400, "gpu9"),
    ("shm-by-name", A, "POST", "/v1/kv/shm/get", shm_get({"name": "kvtier-region"}), 400,
     "no longer opened by name"),
    ("shm-path-name", A, "POST", "/v1/kv/shm/get", shm_get({"name": "../../etc/passwd"}), 400,
     "no longer opened by name"),
    ("bad-shm-id", A, "POST", "/v1/kv/shm/get", shm_get({"id": "../../etc/passwd"}), 422, "region.id"),
    ("missing-shm", A, "POST", "/v1/kv/shm/get", shm_get({"id": UNKNOWN}), 404,
     "unknown shared-memory region id"),
    ("shm-too-small", A, "POST", "/v1/kv/shm/get", shm_get({"id": SMALL}), 400, "has 4096 bytes"),
    ("shm-negative-offset", A, "POST", "/v1/kv/shm/get", shm_get({"id": SMALL}, offset=-1), 422, "offset"),
    ("shm-size-short", A, "PUT", "/v1/kv/shm",
     {"json": {"namespace": "chat", "token_ids": IDS, "layout": LAYOUT.to_dict(),
               "region": {"id": SMALL, "size": 100}}}, 400, "region.size is 100"),
    ("shm-packed-ids-ragged", A, "POST", "/v1/kv/shm/get", shm_get_mp(packed(IDS)[:-3]), 400,
     "multiple of 8 bytes"),
    ("shm-packed-ids-empty", A, "POST", "/v1/kv/shm/get", shm_get_mp(b""), 400, "non-empty"),
    ("shm-packed-ids-negative", A, "POST", "/v1/kv/shm/get", shm_get_mp(packed([5, -2])), 422,
     "got -2"),
    ("shm-msgpack-unknown-field", A, "POST", "/v1/kv/shm/get", shm_get_mp(packed(IDS), slot=3), 422,
     "slot"),
    ("shm-msgpack-malformed", A, "POST", "/v1/kv/shm/get",
     {"content": b"\xc1\xc1", "headers": {"content-type": MSGPACK}}, 400, "malformed msgpack"),
    ("shm-msgpack-packed-ok-but-missing-region", A, "POST", "/v1/kv/shm/get",
     shm_get_mp(packed(IDS)), 404, "unknown shared-memory region id"),
    ("lookup-packed-ragged", A, "POST", "/v1/lookup",
     mp({"namespace": "chat", "token_ids": packed(IDS)[:-1]}), 400, "multiple of 8 bytes"),
    # Inputs that once escaped as unhandled 500s (overflow in torch, ragged or huge ids).
    ("kv-shape-2**63", A, "PUT", "/v1/kv", shaped_put(0, 2**63), 422, "too large"),
    ("kv-shape-2**64-1", A, "PUT", "/v1/kv", shaped_put(0, 2**64 - 1), 422, "too large"),
    ("kv-shape-2**40-squared", A, "PUT", "/v1/kv", shaped_put(0, 2**40, 2**40), 422, "too large"),
    ("put-ids-nested-tail", A, "PUT", "/v1/kv", ids_put([1, [2]]), 422, "token_ids.1"),
    ("put-ids-ragged", A, "PUT", "/v1/kv", ids_put([[1, 2], [3]]), 422, "token_ids.0"),
    ("get-ids-nested-json", A, "POST", "/v1/kv/get", ids_get([1, [2]], False), 422, "token_ids.1"),
    ("get-ids-ragged-json", A, "POST", "/v1/kv/get", ids_get([[1, 2], [3]], False), 422, "token_ids.0"),
    ("get-ids-nested-msgpack", A, "POST", "/v1/kv/get", ids_get([1, [2]], True), 422, "token_ids.1"),
    ("get-ids-ragged-msgpack", A, "POST", "/v1/kv/get", ids_get([[1, 2], [3]], True), 422,
     "token_ids.0"),
    ("get-id-2**64", A, "POST", "/v1/kv/get", ids_get([2**64], False), 422, "got 18446744073709551616"),
    ("get-id-2**63-msgpack", A, "POST", "/v1/kv/get", ids_get([2**63], True), 422,
     "[0, 2**62], got 9223372036854775808"),
    ("put-listed-id-over-2**62", A, "PUT", "/v1/kv", ids_put([2**62 + 1] + IDS[1:]), 422,
     "[0, 2**62], got 4611686018427387905"),
    ("put-ids-bool", A, "PUT", "/v1/kv", ids_put([True] + IDS[1:]), 422, "token_ids.0"),
    ("shm-json-malformed", A, "PUT", "/v1/kv/shm",
     {"content": b'{"namespace": ', "headers": {"content-type": "application/json"}}, 400, "malformed JSON"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = CacheConfig(block_tokens=BT, host=HostTierConfig(capacity_bytes="4MiB"),
                      ssd=SSDTierConfig(path=str(tmp_path_factory.mktemp("d") / "ssd"), direct_io=False,
                                        capacity_bytes="64MiB", min_free_bytes=0))
    settings = ServerSettings(tokens={A: "alpha", B: "beta"}, max_tokens=4096, max_body_bytes=64 * 1024)
    with TieredCache(cfg) as cache, serve_in_thread(cache, settings) as url, KVTierClient(url, A) as client, \
            OwnRegion(url, 4096, A) as small:
        client.register_namespace("chat", layout=LAYOUT, block_tokens=BT)
        assert client.put("chat", IDS, kv(64)) == 64
        yield url, client, small.id


def request_of(case, small_id: str) -> tuple[str, str, dict]:
    """Method, path and httpx kwargs of ``case``, with alpha's small region's real id filled in."""
    _, token, method, path, kwargs, _, _ = case
    kwargs = {**kwargs, "headers": {**kwargs.get("headers", {}),
                                    **({"authorization": f"Bearer {token}"} if token else {})}}
    region = kwargs.get("json", {}).get("region") if isinstance(kwargs.get("json"), dict) else None
    if region and region.get("id") == SMALL:
        kwargs["json"] = {**kwargs["json"], "region": {**region, "id": small_id}}
    return method, path, kwargs


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_request_is_refused_and_named(server, case):
    url, _, small_id = server
    *_, status, words = case
    method, path, kwargs = request_of(case, small_id)
    resp = httpx.request(method, url + path, **kwargs, timeout=30)
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["status"] == status and body["error"] and words in body["message"], body


def test_packed_listed_and_json_token_ids_answer_alike(server):
    url, _, _ = server
    auth = {"authorization": f"Bearer {A}"}
    ids = IDS + [999]  # 64 cached tokens and one more
    bodies = [{"json": {"namespace": "chat", "token_ids": ids}},
              mp({"namespace": "chat", "token_ids": ids}),
              mp({"namespace": "chat", "token_ids": packed(ids)})]
    answers = []
    for kw in bodies:
        resp = httpx.post(url + "/v1/lookup", **{**kw, "headers": {**kw.get("headers", {}), **auth}})
        assert resp.status_code == 200, resp.text
        answers.append(resp.json())
    assert answers[0]["tokens"] == 64 and answers[1] == answers[0] and answers[2] == answers[0]


def test_nothing_changed_after_bad_requests(server):
    url, client, small_id = server
    for case in CASES:  # run them all again, then check the stored state
        method, path, kwargs = request_of(case, small_id)
        assert httpx.request(method, url + path, **kwargs).status_code == case[5], case[0]
    assert httpx.get(url + "/readyz").json()["status"] == "ok"
    assert len(CASES) >= 15
    got, n = client.get("chat", IDS)
    assert n == 64
    for layer_got, layer_want in zip(got, kv(64), strict=True):
        for g, w in zip(layer_got, layer_want, strict=True):
            assert torch.equal(g, w)
    assert [ns.name for ns in client.namespaces()] == ["chat"]
    assert client.get_namespace("chat").block_tokens == BT
    assert client.lookup("chat", IDS).tokens == 64


def test_405_names_every_allowed_method(server):
    url, _, _ = server
    auth = {"authorization": f"Bearer {A}"}
    for method, path, allow in (("GET", "/v1/kv", "DELETE, PUT"), ("DELETE", "/v1/kv/get", "POST"),
                                ("POST", "/healthz", "GET")):
        resp = httpx.request(method, url + path, headers=auth)
        assert resp.status_code == 405, resp.text
        assert resp.headers["allow"] == allow and resp.json()["status"] == 405


def raw_exchange(sock, path: str) -> tuple[int, bytes]:
    """One GET on an open keep-alive socket; the status and the body."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {A}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection"
        body += chunk
    return int(head.split()[1]), body


def test_an_unexpected_exception_is_a_json_500_and_keeps_the_connection(server, monkeypatch, caplog):
    import json
    import socket

    from kvtier.manager import TieredCache

    url, _, _ = server
    host, port = url.removeprefix("http://").split(":")

    def broken(self):
        raise RuntimeError("a bug deep in the cache")

    monkeypatch.setattr(TieredCache, "stats", broken)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        status, body = raw_exchange(sock, "/v1/stats")
        assert status == 500
        answer = json.loads(body)
        assert answer == {"error": "InternalError", "status": 500,
                          "message": answer["message"]} and "RuntimeError" in answer["message"]
        assert "a bug deep" not in answer["message"]  # details stay in the log
        monkeypatch.undo()
        status, body = raw_exchange(sock, "/healthz")  # same connection, still open
        assert status == 200 and json.loads(body)["status"] == "ok"
    logged = [r for r in caplog.records if r.exc_info and isinstance(r.exc_info[1], RuntimeError)]
    assert logged and "/v1/stats" in logged[0].getMessage()
