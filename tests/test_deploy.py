"""deploy/: the dashboard, the rules, docker-compose and Grafana provisioning are consistent.

Every PromQL expression (dashboard targets, variable queries, rules) is parsed by a real parser
(``promql-parser``; also Prometheus's own via ``promtool check rules`` where installed) and may
name only metrics that a live kvtier sidecar exports on ``/metrics`` after a small workload,
with label matchers only on labels those metrics carry.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families

from kvtier import CacheConfig, KVLayout, TieredCache
from kvtier.bench.render_dashboard import (
    DASHBOARD,
    PROMETHEUS_LABELS,
    PROMETHEUS_MADE,
    RULES_DIR,
    dashboard_queries,
    rule_exprs,
    substitute,
    variable_queries,
)
from kvtier.client import KVTierClient
from kvtier.config import HostTierConfig, RemoteTierConfig, SSDTierConfig
from kvtier.errors import KVTierError
from kvtier.server.testing import serve_in_thread
from tests.integration.remote_servers import REDIS_SERVER, RedisServer

try:
    import promql_parser as promql
except ImportError:  # the compose/provisioning tests below still run
    promql = None
needs_parser = pytest.mark.skipif(promql is None, reason="pip install promql-parser (kvtier[test])")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
BT = 64
LAYOUT = KVLayout(2, ((4, 64), (4, 64)), "float32")


# ---- the live metric set -------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, set[str]]:
    """{sample name: label names} from a real sidecar's /metrics after a small workload, so
    labelled families (evictions, prefetches, HTTP statuses) have samples too."""
    tmp = tmp_path_factory.mktemp("deploy")
    cfg = CacheConfig(block_tokens=BT, host=HostTierConfig(capacity_bytes="512KiB"),
                      ssd=SSDTierConfig(path=str(tmp / "ssd"), capacity_bytes="64MiB",
                                        direct_io=False, min_free_bytes=0))
    kv = [tuple(torch.zeros(4 * BT, 4, 64) for _ in range(2)) for _ in range(2)]
    with contextlib.ExitStack() as stack:
        if REDIS_SERVER:  # a remote tier, so its error and breaker families have samples
            redis = RedisServer().start()
            stack.callback(redis.stop)  # registered first: stops after the cache has closed
            cfg.remote = RemoteTierConfig(backend="redis", url=redis.url)
        text = _workload_metrics(stack, cfg, kv)
    out: dict[str, set[str]] = {}
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"),
                "gaugehistogram": ("_bucket", "_gcount", "_gsum"), "gauge": ("",)}
    for fam in text_string_to_metric_families(text):
        for suffix in suffixes.get(fam.type, ("",)):
            out.setdefault(fam.name + suffix, set())
        for s in fam.samples:
            out.setdefault(s.name, set()).update(s.labels)
    assert "kvtier_evictions_total" in out and "reason" in out["kvtier_evictions_total"]
    if REDIS_SERVER:
        assert {"tier", "kind"} <= out["kvtier_tier_errors_total"]
    return out


def _workload_metrics(stack: contextlib.ExitStack, cfg: CacheConfig, kv) -> str:
    cache = stack.enter_context(TieredCache(cfg))
    url = stack.enter_context(serve_in_thread(cache))
    with KVTierClient(url) as c:
        c.register_namespace("m", layout=LAYOUT, block_tokens=BT)
        a, b = list(range(4 * BT)), list(range(10_000, 10_000 + 4 * BT))
        c.put("m", a, kv)
        c.put("m", b, kv)  # the host tier holds 2 blocks: a is evicted from it
        c.lookup("m", a)
        c.prefetch("m", a).wait(10)
        c.evict("m", b)
        with pytest.raises(KVTierError):
            c.evict("absent", a)  # answered 404
        return c.metrics_text()


def recorded() -> set[str]:
    return {name for kind, name, _ in rule_exprs() if kind == "record"}


def all_expressions() -> list[tuple[str, str]]:
    """(where, PromQL as Prometheus would receive it) for every expression in deploy/."""
    out = [(f"panel {q.panel!r} {q.ref}", substitute(q.expr)) for q in dashboard_queries()]
    out += [(f"variable ${name}", substitute(sel)) for name, sel in variable_queries().items()]
    out += [(f"{kind} {name}", expr) for kind, name, expr in rule_exprs()]
    return out


def selectors(expr: str) -> list:
    found = []

    def visit(node):
        if isinstance(node, promql.VectorSelector):
            found.append(node)

    promql.walk(promql.parse(expr), visit)
    return found


# ---- acceptance 1: expressions parse and name only exported metrics -------------------------

def test_dashboard_has_a_panel_for_each_question():
    titles = {q.panel for q in dashboard_queries()}
    for want in ("Hit rate", "Tokens served from cache vs recomputed", "Retention: age of stored blocks",
                 "Reload latency per tier", "Bandwidth per tier", "Tier fill", "Evictions by reason",
                 "Prefetch outcomes", "Errors"):
        assert want in titles
    assert set(variable_queries()) == {"instance", "tier", "namespace"}
    assert {k for k, _, _ in rule_exprs()} == {"record", "alert"}
    alerts = {n for k, n, _ in rule_exprs() if k == "alert"}
    assert {"KVTierDown", "KVTierHitRateCollapsed", "KVTierCorruptBlocks", "KVTierSSDNearlyFull",
            "KVTierReloadSlow"} <= alerts


@needs_parser
@pytest.mark.parametrize(("where", "expr"), all_expressions(), ids=lambda v: str(v)[:60])
def test_expression_parses(where, expr):
    try:
        promql.parse(expr)
    except Exception as e:  # the parser raises ValueError-like errors from Rust
        pytest.fail(f"{where}: {expr!r} does not parse: {e}")


@needs_parser
def test_expressions_name_only_exported_metrics_and_labels(exported):
    known = set(exported) | recorded() | PROMETHEUS_MADE
    problems = []
    for where, expr in all_expressions():
        for sel in selectors(expr):
            if sel.name not in known:
                problems.append(f"{where}: {sel.name!r} is not exported by kvtier")
                continue
            labels = exported.get(sel.name)
            if not labels:  # a recorded series, up, or a family without samples here
                continue
            for m in sel.matchers.matchers:
                if m.name not in labels | PROMETHEUS_LABELS:
                    problems.append(f"{where}: {sel.name} has no label {m.name!r} "
                                    f"(it has {sorted(labels)})")
    assert not problems, "\n".join(problems)


@needs_parser
def test_namespace_filter_applies_exactly_where_the_label_exists(exported):
    """Honest $namespace: applied to every metric that has the label, to none that lacks it."""
    with_ns = {n for n, labels in exported.items() if "namespace" in labels}
    for q in dashboard_queries():
        for sel in selectors(substitute(q.expr)):
            filtered = any(m.name == "namespace" for m in sel.matchers.matchers)
            assert filtered == (sel.name in with_ns), f"{q.panel}: {sel.name}"


@needs_parser
def test_every_kvtier_family_is_on_the_dashboard_or_rules(exported):
    """A metric kvtier exports but nobody charts is a forgotten question."""
    used = {sel.name for _, e in all_expressions() for sel in selectors(e)}
    families = {re.sub(r"_(total|bucket|count|sum|gcount|gsum)$", "", n) for n in used}
    unused = [n for n in exported if n.startswith("kvtier_")
              and re.sub(r"_(total|bucket|count|sum|gcount|gsum|created)$", "", n) not in families]
    # cost decisions come from the in-process loader only; the sidecar never moves them
    assert set(unused) <= {"kvtier_cost_decisions_total", "kvtier_hit_rate_lookups",
                           "kvtier_blocks_written_total", "kvtier_blocks_read_total",
                           "kvtier_blocks_dropped_total", "kvtier_put_tokens_total",
                           "kvtier_lookup_hits_total", "kvtier_reload_seconds_count",
                           "kvtier_reload_seconds_sum", "kvtier_block_age_seconds_gcount",
                           "kvtier_block_age_seconds_gsum",
                           "kvtier_http_request_duration_seconds_sum",
                           "kvtier_gc_pause_seconds_count",
                           "kvtier_gc_frozen_objects"}, unused  # a startup fact: nothing to chart


@pytest.mark.skipif(not shutil.which("promtool"), reason="promtool not installed "
                    "(apt-get install -y prometheus); promql-parser still checked every expression")
def test_prometheus_own_parser_accepts_everything(tmp_path):
    """Each dashboard expression as a recording rule through ``promtool check rules``."""
    dash = [{"record": f"kvtier_dashboard:check_{i}", "expr": substitute(q.expr)}
            for i, q in enumerate(dashboard_queries())]
    f = tmp_path / "dashboard_rules.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": dash}]}))
    for path in (f, *sorted(RULES_DIR.glob("*.yml"))):
        r = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
        assert r.returncode == 0, f"{path.name}: {r.stdout}{r.stderr}"


def test_checked_in_dashboard_is_what_the_generator_writes():
    pytest.importorskip("grafana_foundation_sdk",
                        reason="pip install grafana-foundation-sdk (kvtier[deploy])")
    spec = importlib.util.spec_from_file_location("kvtier_deploy_dashboard", DEPLOY / "dashboard.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.modules.pop(spec.name, None)
    assert mod.OUT == DASHBOARD
    assert DASHBOARD.read_text() == mod.render(), "stale: run python deploy/dashboard.py"


# ---- acceptance 3: compose + provisioning ----------------------------------------------------

def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def host_path(compose_dir: Path, volume: str) -> tuple[Path, str]:
    src, dst = volume.split(":")[:2]
    return (compose_dir / src).resolve(), dst


def mounts(service: dict) -> dict[str, str]:
    """{container path: source} of a service's volumes."""
    return {v.split(":")[1]: v.split(":")[0] for v in service.get("volumes", [])}


COMPOSE = load(DEPLOY / "docker-compose.yml")
SERVICES = COMPOSE["services"]


def test_compose_has_the_stack_and_the_shared_profile():
    assert {"kvtier", "prometheus", "grafana"} <= set(SERVICES)
    assert all("profiles" not in SERVICES[s] for s in ("kvtier", "prometheus", "grafana"))
    shared = {n for n, s in SERVICES.items() if "shared" in s.get("profiles", [])}
    assert shared == {"redis", "kvtier-a", "kvtier-b"}
    for n in ("kvtier-a", "kvtier-b"):
        env = SERVICES[n]["environment"]
        assert env["KVTIER_REMOTE_BACKEND"] == "redis"
        assert env["KVTIER_REMOTE_URL"].startswith("redis://redis:")
        assert "redis" in SERVICES[n]["depends_on"]
    assert "ports" not in SERVICES["redis"], "redis has no auth: never publish it"


def test_kvtier_service_builds_the_dockerfile_and_persists_its_data_dir():
    svc = SERVICES["kvtier"]
    build = svc["build"]
    dockerfile = (DEPLOY / build["context"] / build["dockerfile"]).resolve()
    assert dockerfile == DEPLOY / "Dockerfile"
    text = dockerfile.read_text()
    assert re.search(r"^ARG TORCH_VERSION=2\.13\.0$", text, re.M)
    assert "download.pytorch.org/whl/cpu" in text  # CPU by default
    assert re.search(r'^ENTRYPOINT \["kvtier", "serve"\]', text, re.M), "the image runs `kvtier serve`"
    assert 'kvtier = "kvtier.cli:main"' in (ROOT / "pyproject.toml").read_text()
    data_dir = svc["environment"]["KVTIER_DATA_DIR"]
    assert mounts(svc)[data_dir] in COMPOSE["volumes"], "kvtier's data dir must be a named volume"
    prom = SERVICES["prometheus"]
    tsdb = next(a.split("=", 1)[1] for a in prom["command"] if a.startswith("--storage.tsdb.path="))
    assert mounts(prom)[tsdb] in COMPOSE["volumes"]


def test_prometheus_scrapes_the_kvtier_service_by_name_and_port():
    prom_svc = SERVICES["prometheus"]
    cfg_src = mounts(prom_svc)["/etc/prometheus/prometheus.yml"]
    cfg = load((DEPLOY / cfg_src).resolve())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    kv = SERVICES["kvtier"]
    port = int(kv["environment"]["KVTIER_PORT"])
    assert jobs["kvtier"]["static_configs"][0]["targets"] == [f"kvtier:{port}"]
    assert any(p.endswith(f":{port}") for p in kv["ports"])  # the container port it listens on
    sd = jobs["kvtier-shared"]["dns_sd_configs"][0]
    assert set(sd["names"]) == {"kvtier-a", "kvtier-b"}
    assert sd["port"] == int(SERVICES["kvtier-a"]["environment"]["KVTIER_PORT"])
    # rule_files point at the mounted rules directory, which holds our rules
    rules_dst = next(d for d, s in mounts(prom_svc).items() if s.rstrip("/").endswith("rules"))
    assert cfg["rule_files"] == [f"{rules_dst}/*.yml"]
    assert (DEPLOY / mounts(prom_svc)[rules_dst] / "kvtier.yml").exists()


def test_prometheus_scrapes_with_the_metrics_token_kvtier_is_given(tmp_path):
    """Every kvtier job sends the scrape token from the compose secret that carries the same
    variable every kvtier service reads as KVTIER_METRICS_TOKEN (/metrics needs it)."""
    prom_svc = SERVICES["prometheus"]
    cfg = load((DEPLOY / mounts(prom_svc)["/etc/prometheus/prometheus.yml"]).resolve())
    kvtier_jobs = [j for j in cfg["scrape_configs"] if j["job_name"].startswith("kvtier")]
    assert len(kvtier_jobs) == 2
    for job in kvtier_jobs:
        auth = job["authorization"]
        assert auth["type"] == "Bearer"
        secret = auth["credentials_file"].removeprefix("/run/secrets/")
        assert secret in prom_svc["secrets"]
        assert COMPOSE["secrets"][secret] == {"environment": "KVTIER_METRICS_TOKEN"}
    for name in ("kvtier", "kvtier-a", "kvtier-b"):
        value = SERVICES[name]["environment"]["KVTIER_METRICS_TOKEN"]
        assert re.fullmatch(r"\$\{KVTIER_METRICS_TOKEN:\?[^}]+\}", value), name
    if shutil.which("promtool"):  # it insists the credentials file exists: point it at one
        token = tmp_path / "token"
        token.write_text("scrape-token-1\n")
        for job in kvtier_jobs:
            job["authorization"]["credentials_file"] = str(token)
        cfg["rule_files"] = []
        f = tmp_path / "prometheus.yml"
        f.write_text(yaml.safe_dump(cfg))
        r = subprocess.run(["promtool", "check", "config", str(f)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


def test_grafana_provisioning_points_at_files_that_exist():
    g = SERVICES["grafana"]
    m = mounts(g)
    prov = (DEPLOY / m["/etc/grafana/provisioning"]).resolve()
    ds = load(prov / "datasources" / "prometheus.yml")["datasources"]
    assert len(ds) == 1 and ds[0]["type"] == "prometheus" and ds[0]["isDefault"]
    host, port = ds[0]["url"].removeprefix("http://").split(":")
    assert host in SERVICES and host == "prometheus" and port == "9090"
    providers = load(prov / "dashboards" / "kvtier.yml")["providers"]
    dash_dst = providers[0]["options"]["path"]
    dash_src = (DEPLOY / m[dash_dst]).resolve()
    assert (dash_src / DASHBOARD.name).resolve() == DASHBOARD and DASHBOARD.exists()
    home = g["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dash_dst}/{DASHBOARD.name}"


def test_no_secrets_and_loopback_binds():
    pw = SERVICES["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    assert re.fullmatch(r"\$\{GRAFANA_ADMIN_PASSWORD:\?[^}]+\}", pw), "password must come from env"
    for name, svc in SERVICES.items():
        for key, value in (svc.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|TOKEN|KEY", key):
                assert re.fullmatch(r"\$\{\w+:[-?][^}]*\}", str(value)), f"{name}: {key} is set in the file"
    for name, svc in SERVICES.items():
        for p in svc.get("ports", []):
            assert re.fullmatch(r"\$\{\w+_BIND:-127\.0\.0\.1\}:\d+:\d+", p), f"{name}: {p}"


@pytest.mark.skipif(shutil.which("docker") is None or subprocess.run(
    ["docker", "compose", "version"], capture_output=True).returncode != 0,
    reason="docker compose not installed: structure checked above without it")
def test_docker_compose_config_is_valid():
    env = {"GRAFANA_ADMIN_PASSWORD": "x", "KVTIER_METRICS_TOKEN": "scrape-token-1",
           "PATH": "/usr/bin:/bin:/usr/local/bin"}
    for profile in ([], ["--profile", "shared"]):
        r = subprocess.run(["docker", "compose", *profile, "config", "--quiet"], cwd=DEPLOY,
                           env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


def test_gpu_override_only_changes_the_kvtier_build_and_devices():
    gpu = load(DEPLOY / "docker-compose.gpu.yml")["services"]
    assert set(gpu) == {"kvtier"}
    args = gpu["kvtier"]["build"]["args"]
    assert "whl/cu" in args["TORCH_INDEX_URL"] and args["BASE"].startswith("nvidia/cuda:")
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert all(re.search(rf"^ARG {a}=", dockerfile, re.M) for a in args)
    dev = gpu["kvtier"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
    assert gpu["kvtier"]["environment"]["KVTIER_DEVICE_CAPACITY"].startswith("${")
