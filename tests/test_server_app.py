"""server.app: OpenAPI schema, health, route-template latency metric (in-process ASGI)."""

from __future__ import annotations

import torch
from fastapi.testclient import TestClient

from kvtier import CacheConfig, TieredCache
from server.app import create_app


def test_openapi_lists_every_endpoint_and_binary_bodies():
    with TieredCache(CacheConfig(block_tokens=16)) as cache:
        schema = TestClient(create_app(cache)).get("/openapi.json").json()
    paths = schema["paths"]
    for p in ("/v1/namespaces", "/v1/namespaces/{name}", "/v1/lookup", "/v1/prefetch",
              "/v1/prefetch/{prefetch_id}", "/v1/kv", "/v1/kv/get", "/v1/kv/shm", "/v1/kv/shm/get",
              "/v1/stats", "/metrics", "/healthz", "/readyz"):
        assert p in paths, p
    assert "application/msgpack" in paths["/v1/kv"]["put"]["requestBody"]["content"]
    assert "application/msgpack" in paths["/v1/kv/get"]["post"]["responses"]["200"]["content"]
    assert set(paths["/v1/kv"]) == {"put", "delete"}
    assert paths["/v1/lookup"]["post"]["responses"]["404"]
    for path, method in (("/v1/kv/shm", "put"), ("/v1/kv/shm/get", "post")):
        content = paths[path][method]["requestBody"]["content"]
        assert set(content) == {"application/json", "application/msgpack"}
        props = content["application/msgpack"]["schema"]["properties"]
        assert {"namespace", "token_ids", "region"} <= set(props)
        assert props["region"]["properties"]["name"]["type"] == "string"  # nested models inlined
        assert "$defs" not in str(content)
        listed = content["application/json"]["schema"]["properties"]["token_ids"]
        assert props["token_ids"]["oneOf"][0] == listed and listed["type"] == "array"
        assert props["token_ids"]["oneOf"][1]["format"] == "binary"  # packed int64 ids


def test_health_stats_and_latency_by_route_template():
    with TieredCache(CacheConfig(block_tokens=16)) as cache:
        client = TestClient(create_app(cache))
        assert client.get("/healthz").json()["status"] == "ok"
        assert client.get("/readyz").json() == {"status": "ok"}
        cache.put("n", list(range(32)), [(torch.zeros(32, 1, 4),)])
        client.get("/v1/prefetch/abc")
        assert client.get("/v1/stats").json()["tiers"]["host"]["blocks"] == 2
        text = client.get("/metrics").text
    assert 'route="/v1/prefetch/{prefetch_id}"' in text and 'status="404"' in text
    assert "abc" not in text
    assert 'kvtier_tier_blocks{tier="host"} 2.0' in text


def test_stats_show_a_tenant_only_its_own_namespaces():
    from kvtier.settings import ServerSettings

    settings = ServerSettings(tokens={"alpha-token-1": "alpha", "beta-token-22": "beta"})
    kv = [(torch.zeros(32, 1, 4),)]
    with TieredCache(CacheConfig(block_tokens=16)) as cache:
        client = TestClient(create_app(cache, settings))
        alpha = {"Authorization": "Bearer alpha-token-1"}
        beta = {"Authorization": "Bearer beta-token-22"}
        cache.put("alpha/chat", list(range(32)), kv)  # as the server stores alpha's "chat"
        cache.put("beta/code", list(range(32)), kv)
        cache.lookup("alpha/chat", list(range(32)))
        seen_alpha = client.get("/v1/stats", headers=alpha).json()["namespaces"]
        seen_beta = client.get("/v1/stats", headers=beta).json()["namespaces"]
        text = client.get("/metrics").text
    assert set(seen_alpha) == {"chat"} and seen_alpha["chat"]["tokens_hit"] == 32
    assert set(seen_beta) == {"code"} and seen_beta["code"]["lookups"] == 0
    # The operator's /metrics names both, tenant-qualified.
    assert 'namespace="alpha/chat"' in text and 'namespace="beta/code"' in text
