"""A real Prometheus scrapes a live kvtier serving a workload; every dashboard and rule
expression is evaluated through Prometheus's HTTP API and returns data, and the hit-rate panel
agrees with ``/v1/stats``. kvtier runs with a tenant and a scrape token, as deployed: Prometheus
authenticates with the scrape token (``authorization`` in its scrape config), and the
per-namespace panels have data only because it does. Needs the Debian ``prometheus`` package
(prometheus + promtool)."""

from __future__ import annotations

import subprocess
import warnings

import httpx
import pytest
import torch
import yaml

from kvtier import CacheConfig, KVLayout, TieredCache
from kvtier.bench.render_dashboard import (
    RULES_DIR,
    LocalPrometheus,
    dashboard_queries,
    find_binaries,
    rule_exprs,
    substitute,
)
from kvtier.client import KVTierClient
from kvtier.config import HostTierConfig, RemoteTierConfig, SSDTierConfig
from kvtier.errors import KVTierError
from kvtier.server.testing import serve_in_thread
from kvtier.settings import ServerSettings
from tests.integration.remote_servers import REDIS_SERVER, RedisServer

PROMETHEUS, PROMTOOL = find_binaries()
pytestmark = pytest.mark.skipif(
    not (PROMETHEUS and PROMTOOL),
    reason="prometheus/promtool not on PATH: install the Debian package 'prometheus' "
           "(apt-get install -y prometheus; .ci/run does) to run the dashboard integration test")
BT = 64
LAYOUT = KVLayout(2, ((4, 64), (4, 64)), "float32")  # 4 KiB per token: 256 KiB blocks
WINDOW = "5m"  # $__rate_interval: longer than the whole test, so rates cover the workload
TENANT_TOKEN, SCRAPE_TOKEN = "tenant-token-1", "scrape-token-1"


class ScrapingWithToken(LocalPrometheus):
    """Prometheus whose kvtier job sends the scrape token, as deploy/prometheus/prometheus.yml."""

    def __init__(self, *args, token_file, **kw) -> None:
        super().__init__(*args, **kw)
        self.token_file = token_file

    def config(self) -> dict:
        cfg = super().config()
        for job in cfg["scrape_configs"]:
            job["authorization"] = {"type": "Bearer", "credentials_file": str(self.token_file)}
        return cfg


def promtool(*args: str) -> str:
    r = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"promtool {' '.join(args)}:\n{r.stdout}{r.stderr}"
    return r.stdout


def kv_for(tokens: int):
    return [tuple(torch.randn(tokens, 4, 64) for _ in range(2)) for _ in range(2)]


def workload(c: KVTierClient) -> None:
    """Touches every panel: hits from host and SSD, misses, capacity and API evictions,
    promotions, demotions, reloads, a prefetch and an error answer."""
    a, b, d = (list(range(base, base + 4 * BT)) for base in (0, 100_000, 200_000))
    c.put("m", a, kv_for(len(a)))
    c.put("m", b, kv_for(len(b)))  # host holds 6 blocks: a's demote, SSD keeps them
    c.put("m", d, kv_for(len(d)))
    for _ in range(3):
        assert c.lookup("m", d).tokens == len(d)
    assert c.lookup("m", a + [7] * BT).tokens == len(a)
    kv, n = c.get("m", a)  # reload from SSD, promote into host
    assert n == len(a)
    assert c.lookup("m", list(range(900_000, 900_000 + 2 * BT))).tokens == 0  # a miss
    assert c.prefetch("m", b).wait(30)
    assert c.evict("m", d) >= 1
    with pytest.raises(KVTierError):
        c.evict("no-such-namespace", a)  # answered 404


def signal(expr: str) -> str:
    """The measured side of an alert: the left operand of its threshold comparison
    (through ``and``/``unless`` guards), which must return data even when nothing fires."""
    import promql_parser as promql

    node = promql.parse(expr)
    while isinstance(node, promql.BinaryExpr):
        op = str(node.op)
        if op in ("and", "unless", "or", ">", "<", ">=", "<=", "==", "!="):
            node = node.lhs
        else:
            break
    return str(node)


# Expressions about the shared remote tier have data only when one is configured.
REMOTE_ONLY = ("kvtier_tier_errors_total", "kvtier_tier_breaker_open")


@pytest.fixture
def cache(tmp_path):
    """Host + SSD tiers, and a remote tier on a loopback redis-server where one is installed."""
    cfg = CacheConfig(block_tokens=BT, host=HostTierConfig(capacity_bytes="1536KiB"),
                      ssd=SSDTierConfig(path=str(tmp_path / "ssd"), capacity_bytes="64MiB",
                                        direct_io=False, min_free_bytes=0))
    redis = RedisServer().start() if REDIS_SERVER else None
    if redis:
        cfg.remote = RemoteTierConfig(backend="redis", url=redis.url)
    try:
        with TieredCache(cfg) as c:
            yield c
    finally:
        if redis:
            redis.stop()


@pytest.mark.timeout(120)
def test_prometheus_evaluates_every_dashboard_and_rule_expression(cache, tmp_path):
    pytest.importorskip("promql_parser", reason="pip install promql-parser (kvtier[deploy])")
    rules = sorted(RULES_DIR.glob("*.yml"))
    for f in rules:
        promtool("check", "rules", str(f))
    settings = ServerSettings(tokens={TENANT_TOKEN: "team"}, metrics_token=SCRAPE_TOKEN)
    token_file = tmp_path / "scrape-token"
    token_file.write_text(SCRAPE_TOKEN + "\n")
    with serve_in_thread(cache, settings) as url, KVTierClient(url, TENANT_TOKEN) as client:
        client.register_namespace("m", layout=LAYOUT, block_tokens=BT)
        assert httpx.get(url + "/metrics").status_code == 401
        assert httpx.get(url + "/metrics", headers={"authorization": f"Bearer {TENANT_TOKEN}"}).status_code == 403
        prom = ScrapingWithToken([url.removeprefix("http://")], rules, interval="1s", token_file=token_file)
        cfg = tmp_path / "prometheus.yml"
        cfg.write_text(yaml.safe_dump(prom.config()))
        promtool("check", "config", str(cfg))
        with prom:
            def scraped(expr: str, want: float) -> bool:
                r = prom.query(expr)
                return bool(r) and float(r[0]["value"][1]) == want

            # a first scrape before any lookup, so rates start from zero
            prom.wait_for(lambda: scraped("kvtier_lookups_total", 0), 30, "the first scrape")
            workload(client)
            stats = client.stats()
            prom.wait_for(lambda: scraped("kvtier_lookups_total", stats.lookups)
                          and scraped("kvtier_lookup_hit_tokens_total", stats.tokens_hit), 30,
                          "a scrape after the workload")
            exprs = [(f"panel {q.panel!r} {q.ref}", substitute(q.expr, WINDOW))
                     for q in dashboard_queries()]
            for kind, name, expr in rule_exprs():
                exprs.append((f"{kind} {name}", expr if kind == "record" else signal(expr)))
                if kind == "record":
                    exprs.append((f"recorded series {name}", name))
                else:
                    prom.query(expr)  # the full alert expression evaluates (it may be empty)
            if cache.config.remote.backend is None:
                exprs = [(w, e) for w, e in exprs if not any(m in e for m in REMOTE_ONLY)]
                warnings.warn(f"redis-server not installed: {', '.join(REMOTE_ONLY)} "
                              "expressions not evaluated (no remote tier)", stacklevel=1)
            # recording rules run every second: wait until every expression has data
            empty: list[str] = []

            def all_have_data() -> bool:
                empty[:] = [f"{where}: {e}" for where, e in exprs if not prom.query(e)]
                return not empty

            try:
                prom.wait_for(all_have_data, 20, "every expression to return data", poll=0.5)
            except TimeoutError:
                pytest.fail("expressions without data:\n" + "\n".join(empty))

            hit = next(q for q in dashboard_queries() if q.panel == "Hit rate" and q.ref == "A")
            got = float(prom.query(substitute(hit.expr, WINDOW))[0]["value"][1])
            assert 0 < stats.hit_rate_tokens < 1
            assert got == pytest.approx(stats.hit_rate_tokens, abs=0.01)
            life = next(q for q in dashboard_queries() if q.panel == "Token hit rate (lifetime)")
            assert float(prom.query(substitute(life.expr))[0]["value"][1]) == pytest.approx(
                stats.hit_rate_tokens, abs=1e-9)
            per_tier = {r["metric"]["tier"]: float(r["value"][1]) for r in prom.query(
                substitute(next(q for q in dashboard_queries()
                                if q.panel == "Hit rate" and q.ref == "B").expr, WINDOW))}
            ssd = stats.tiers["ssd"]
            assert per_tier["ssd"] == pytest.approx(ssd.hits / (ssd.hits + ssd.misses), abs=0.01)
            if cache.config.remote.backend:
                errs = prom.query(substitute(next(q for q in dashboard_queries()
                                                  if q.panel == "Errors" and q.ref == "C").expr))
                assert {r["metric"]["kind"] for r in errs} == {"errors", "timeouts", "short_circuits"}
            down = prom.query('up{job="kvtier"} == 0')
            assert down == [], "the service-down alert must not fire while kvtier is up"
