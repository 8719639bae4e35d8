"""server.app: OpenAPI schema, health, route-template latency metric (in-process ASGI)."""

from __future__ import annotations

import torch
from fastapi.testclient import TestClient

from kvtier import CacheConfig, TieredCache
from kvtier.server.app import create_app


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
        region = props["region"]["properties"]
        assert region["id"]["anyOf"][0]["pattern"] == "^[0-9a-f]{32}$"  # nested models inlined
        assert region["name"]["deprecated"] is True
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


def _two_tenant_cache(cache):
    kv = [(torch.zeros(32, 1, 4),)]
    cache.put("alpha/chat", list(range(32)), kv)  # as the server stores alpha's "chat"
    cache.put("beta/code", list(range(32)), kv)
    cache.lookup("alpha/chat", list(range(32)))


ALPHA = {"Authorization": "Bearer alpha-token-1"}
BETA = {"Authorization": "Bearer beta-token-22"}
TENANTS = {"alpha-token-1": "alpha", "beta-token-22": "beta"}


def test_stats_show_a_tenant_only_its_own_namespaces():
    from kvtier.settings import ServerSettings

    with TieredCache(CacheConfig(block_tokens=16)) as cache:
        client = TestClient(create_app(cache, ServerSettings(tokens=TENANTS)))
        _two_tenant_cache(cache)
        seen_alpha = client.get("/v1/stats", headers=ALPHA).json()["namespaces"]
        seen_beta = client.get("/v1/stats", headers=BETA).json()["namespaces"]
    assert set(seen_alpha) == {"chat"} and seen_alpha["chat"]["tokens_hit"] == 32
    assert set(seen_beta) == {"code"} and seen_beta["code"]["lookups"] == 0


def test_metrics_never_show_namespace_names_without_the_scrape_token():
    """With tenants and no scrape token, /metrics is open but names no namespace; with a
    scrape token it needs that token (a tenant's is 403) and then names every namespace."""
    from kvtier.settings import ServerSettings

    with TieredCache(CacheConfig(block_tokens=16)) as cache:
        _two_tenant_cache(cache)
        open_app = TestClient(create_app(cache, ServerSettings(tokens=TENANTS)))
        for headers in ({}, ALPHA, {"Authorization": "Bearer nonsense-token"}):
            resp = open_app.get("/metrics", headers=headers)
            assert resp.status_code == 200
            assert "alpha" not in resp.text and "beta" not in resp.text and "namespace=" not in resp.text
            assert 'kvtier_tier_blocks{tier="host"} 4.0' in resp.text  # the rest is all there
        assert 'route="/metrics"' in open_app.get("/metrics").text  # latency of earlier scrapes

        scrape = {"Authorization": "Bearer scrape-token-333"}
        guarded = TestClient(create_app(cache, ServerSettings(tokens=TENANTS, metrics_token="scrape-token-333")))
        for headers, status in (({}, 401), (ALPHA, 403), ({"Authorization": "Bearer nonsense-token"}, 401)):
            resp = guarded.get("/metrics", headers=headers)
            assert resp.status_code == status and resp.json()["status"] == status
            assert "alpha/chat" not in resp.text
        text = guarded.get("/metrics", headers=scrape).text
        assert 'namespace="alpha/chat"' in text and 'namespace="beta/code"' in text

        single = TestClient(create_app(cache, ServerSettings(metrics_token="scrape-token-333")))
        assert single.get("/metrics").status_code == 401  # the token guards it with auth off too
        assert 'namespace="beta/code"' in single.get("/metrics", headers=scrape).text
        assert 'namespace="beta/code"' in TestClient(create_app(cache)).get("/metrics").text
