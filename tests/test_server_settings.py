"""kvtier.settings: precedence flags > env > YAML > defaults, sizes, errors, and the doc table."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtier.errors import InvalidRequest
from kvtier.settings import OPTIONS, build_settings, options_markdown

DOC = Path(__file__).resolve().parents[1] / "README.md"


def test_defaults():
    s = build_settings({}, env={})
    assert (s.server.host, s.server.port, s.server.data_dir) == ("127.0.0.1", 8400, "./kvtier-data")
    assert s.cache.ssd.path == str(Path("./kvtier-data") / "ssd") and not s.server.auth_enabled


def test_precedence_flags_over_env_over_yaml(tmp_path):
    cfg = tmp_path / "k.yaml"
    cfg.write_text("server: {port: 9001, max_tokens: 100, tokens: {yaml-token-1: t1}}\n"
                   "cache: {block_tokens: 64, host: {capacity_bytes: 2GiB}, ssd: {segment_bytes: 8MiB}}\n")
    env = {"KVTIER_CONFIG": str(cfg), "KVTIER_PORT": "9002", "KVTIER_HOST_CAPACITY": "512MiB",
           "KVTIER_SSD": "false"}
    s = build_settings({"port": "9003"}, env=env)
    assert s.server.port == 9003 and s.server.max_tokens == 100
    assert s.server.tokens == {"yaml-token-1": "t1"}
    assert s.cache.block_tokens == 64 and s.cache.host.capacity_bytes == 512 * 1024**2
    assert s.cache.ssd.segment_bytes == 8 * 1024**2 and s.cache.ssd.path is None
    assert build_settings({}, env={k: v for k, v in env.items() if k != "KVTIER_PORT"}).server.port == 9001


@pytest.mark.parametrize("flags, env, words", [
    ({"port": "http"}, {}, "--port"),
    ({}, {"KVTIER_HOST_CAPACITY": "4 parsecs"}, "KVTIER_HOST_CAPACITY"),
    ({"tokens": "nobinding"}, {}, "TOKEN=TENANT"),
    ({"tokens": "short=t"}, {}, "at least 8"),
    ({"shm": "maybe"}, {}, "boolean"),
    ({"port": "70000"}, {}, "0..65535"),
    ({"metrics_token": "short"}, {}, "--metrics-token: the metrics token must be at least 8"),
    ({"tokens": "same-token-1=t", "metrics_token": "same-token-1"}, {}, "differ from every tenant"),
])
def test_bad_values_are_named(flags, env, words):
    with pytest.raises(InvalidRequest, match=words):
        build_settings(flags, env=env)


def test_unknown_yaml_key_is_named(tmp_path):
    cfg = tmp_path / "k.yaml"
    cfg.write_text("cache: {ssd: {segmnet_bytes: 1}}\n")
    with pytest.raises(InvalidRequest, match="segmnet_bytes"):
        build_settings({"config": str(cfg)}, env={})


def test_readme_table_matches_options():
    doc = DOC.read_text()
    assert options_markdown() in doc
    assert all(o.env in doc and o.flag in doc for o in OPTIONS)
