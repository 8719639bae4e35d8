"""Hypothesis over the sidecar's own OpenAPI schema, against the real server on loopback: every
operation, every declared body content type (JSON and msgpack, token ids listed or packed),
values from the schema and values that break it (wrong types, huge and negative integers,
nested lists, NaN). No answer may be >= 500; every error is the JSON error body; the keep-alive
connection survives every answer. Bounded: a fixed example budget per operation, derandomized,
no example database."""

from __future__ import annotations

import json
import math
from typing import Any
from urllib.parse import quote

import httpx
import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier import CacheConfig, KVLayout, TieredCache
from kvtier.client import MSGPACK, KVTierClient, kv_to_wire
from kvtier.config import HostTierConfig, SSDTierConfig
from kvtier.server.app import create_app
from kvtier.server.testing import serve_in_thread
from kvtier.settings import ServerSettings
from tests.integration.regions import OwnRegion

TOKEN = "fuzz-token-0001"
BT = 16
LAYOUT = KVLayout(2, ((2, 4),), "float32")
EXAMPLES = 40  # per operation and declared content type (10 for an undeclared one): ~1,100 requests
NASTY_INTS = [-(2**64), -(2**63) - 1, -(2**63), -1, 0, 2**31, 2**53 + 1, 2**62, 2**62 + 1,
              2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30]


def operations() -> list[tuple[str, str, str | None]]:
    """(method, path, body content type) for every operation the schema declares; operations
    with a body also get one content type they do not declare."""
    with TieredCache(CacheConfig(host=HostTierConfig(capacity_bytes="1MiB"))) as cache:
        schema = create_app(cache).openapi()
    out = []
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            content = list(op.get("requestBody", {}).get("content", {}))
            out += [(method.upper(), path, ct) for ct in content] or [(method.upper(), path, None)]
            if content:
                out.append((method.upper(), path, "text/plain"))
    return out


OPERATIONS = operations()


def nasty(binary: bool) -> st.SearchStrategy:
    """Values no schema allows where they are put: every JSON type, extreme numbers, nesting."""
    leaves = st.one_of(st.none(), st.booleans(), st.sampled_from(NASTY_INTS), st.integers(),
                       st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
                       *([st.binary(max_size=24)] if binary else []))
    return st.recursive(leaves, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), kids, max_size=3)),
                        max_leaves=8)


class Schema:
    """Strategies for the values a JSON schema describes (``$ref`` resolved against the
    document), with known-good values mixed in where field names say what they are, and, when
    ``mutate``, values that break the schema mixed in at every node."""

    def __init__(self, doc: dict, binary: bool, mutate: bool, known: dict[str, list[Any]]) -> None:
        self.doc, self.binary, self.mutate, self.known = doc, binary, mutate, known

    def of(self, schema: dict, name: str | None = None) -> st.SearchStrategy:
        valid = self._valid(schema, name)
        if name in self.known:
            valid = st.one_of(st.sampled_from(self.known[name]), valid)
        return st.one_of(valid, nasty(self.binary)) if self.mutate else valid

    def _valid(self, schema: dict, name: str | None) -> st.SearchStrategy:
        if "$ref" in schema:
            return self._valid(self._resolve(schema["$ref"]), name)
        for key in ("anyOf", "oneOf"):
            if key in schema:
                return st.one_of([self.of(s, name) for s in schema[key]])
        if "enum" in schema:
            return st.sampled_from(schema["enum"])
        kind = schema.get("type")
        if kind == "object" or "properties" in schema:
            props = schema.get("properties", {})
            required = set(schema.get("required", ()))
            return st.fixed_dictionaries(
                {k: self.of(v, k) for k, v in props.items() if k in required},
                optional={k: self.of(v, k) for k, v in props.items() if k not in required})
        if kind == "array":
            return st.lists(self.of(schema.get("items", {})), min_size=schema.get("minItems", 0),
                            max_size=min(schema.get("maxItems", 6), 6))
        if kind == "integer":
            lo, hi = (None if v is None else int(v) for v in (schema.get("minimum"), schema.get("maximum")))
            edges = [v for v in NASTY_INTS + [lo, hi] if v is not None
                     and (lo is None or v >= lo) and (hi is None or v <= hi)]
            return st.one_of(st.integers(lo, hi if hi is not None else (lo or 0) + 4096),
                             st.sampled_from(edges))
        if kind == "number":
            return st.floats(schema.get("minimum"), schema.get("maximum"), allow_nan=False)
        if kind == "string":
            if schema.get("format") == "binary":
                return st.binary(max_size=64) if self.binary else st.text(max_size=16)
            if "pattern" in schema:
                return st.from_regex(schema["pattern"], fullmatch=True)
            return st.text(min_size=schema.get("minLength", 0), max_size=24)
        if kind == "boolean":
            return st.booleans()
        if kind == "null":
            return st.none()
        return nasty(self.binary)

    def _resolve(self, ref: str) -> dict:
        node: Any = self.doc
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
        return node


def encode(body: Any, content_type: str) -> bytes:
    if content_type == MSGPACK:
        try:
            return msgpack.packb(body)
        except (OverflowError, TypeError, ValueError):  # an int msgpack cannot carry: send it as JSON
            return json.dumps(body, default=repr).encode()
    if content_type == "application/json":
        return json.dumps(body, default=repr).encode()  # NaN and Infinity included, as Python writes them
    return repr(body).encode()


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    cfg = CacheConfig(block_tokens=BT, host=HostTierConfig(capacity_bytes="2MiB"),
                      ssd=SSDTierConfig(path=str(tmp_path_factory.mktemp("fuzz") / "ssd"),
                                        capacity_bytes="32MiB", direct_io=False, min_free_bytes=0))
    server = ServerSettings(tokens={TOKEN: "t"}, max_tokens=512, max_body_bytes=256 * 1024,
                            max_kv_bytes=1 << 20)
    with TieredCache(cfg) as cache, serve_in_thread(cache, server) as url, KVTierClient(url, TOKEN) as c, \
            OwnRegion(url, 1 << 20, TOKEN) as region:
        c.register_namespace("fz", layout=LAYOUT, block_tokens=BT)
        kv = [(torch.ones(64, 2, 4),) for _ in range(2)]
        assert c.put("fz", list(range(64)), kv) == 64
        schema = httpx.get(url + "/openapi.json").json()
        pf = c.prefetch("fz", list(range(64)))
        known = {
            "namespace": ["fz", "t/fz", "other/fz", "missing"],
            "name": ["fz", "fz2", "t/fz2", "other/x", "a b", ""],
            "token_ids": [list(range(16)), list(range(64)), np.arange(32, dtype="<i8").tobytes(), [5] * 600],
            "layout": [LAYOUT.to_dict()],
            "id": [region.id, "0" * 32],
            "prefetch_id": [pf.id, "0" * 32],
            "kv": [kv_to_wire(kv)],
            "to": ["host", "ssd", "device"],
        }
        with httpx.Client(base_url=url, timeout=60) as http:
            yield http, schema, known


@pytest.mark.timeout(240)
@pytest.mark.parametrize("method, path, content_type", OPERATIONS,
                         ids=[f"{m} {p} {c or ''}".strip() for m, p, c in OPERATIONS])
def test_no_request_gets_a_5xx(sidecar, method, path, content_type):
    http, doc, known = sidecar
    op = doc["paths"][path][method.lower()]

    declared = content_type is None or content_type in op["requestBody"]["content"]

    @settings(max_examples=EXAMPLES if declared else 10, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        mutate = data.draw(st.booleans(), label="mutate")
        schema = Schema(doc, content_type == MSGPACK, mutate, known)
        url_path, query = path, {}
        for p in op.get("parameters", []):
            value = data.draw(schema.of(p["schema"], p["name"]), label=p["name"])
            if p["in"] == "path":
                text = value if isinstance(value, str) else json.dumps(value, default=repr)
                url_path = url_path.replace("{" + p["name"] + "}", quote(text, safe="/"))
            elif value is not None and not (isinstance(value, float) and not math.isfinite(value)):
                query[p["name"]] = value if isinstance(value, (int, float, str)) else json.dumps(value, default=repr)
        headers = {"authorization": data.draw(st.sampled_from(
            [f"Bearer {TOKEN}"] * 6 + ["Bearer nope-nope-nope", "Basic x", ""]), label="auth")}
        content = None
        if content_type is not None:
            body_schema = op["requestBody"]["content"].get(content_type) or next(iter(op["requestBody"]["content"].values()))
            content = encode(data.draw(schema.of(body_schema["schema"]), label="body"), content_type)
            headers["content-type"] = content_type
        resp = http.request(method, url_path, params=query, content=content, headers=headers)
        where = f"{method} {url_path} {query} {content_type}: {content[:300] if content else None!r}"
        assert resp.status_code < 500, f"{resp.status_code} {resp.text[:500]} for {where}"
        if resp.status_code >= 400:
            assert resp.headers["content-type"] == "application/json", where
            body = resp.json()
            assert set(body) == {"error", "message", "status"} and body["status"] == resp.status_code, where
        if resp.status_code == 405:
            assert resp.headers["allow"], where

    run()
