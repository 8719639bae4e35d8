"""See the kvtier dashboard without Grafana: query a Prometheus for every panel's expressions
over a time range and render them as one PNG (matplotlib), laid out like the Grafana grid.

    python -m kvtier.bench.render_dashboard --prometheus http://127.0.0.1:9090 --last 1h -o dash.png
    python -m kvtier.bench.render_dashboard --demo 150 -o docs/img/dashboard.png

``--demo`` starts everything itself on loopback: a real kvtier sidecar (host + SSD tiers in a
temp dir), a real Prometheus (Debian ``prometheus`` package) scraping it every second with the
rules of ``deploy/prometheus/rules``, and a chat-like workload (shared system prompts, a burst
of new prompts that evicts them, a return to the old ones that reloads them from SSD); then it
renders the run. The helpers here (``dashboard_queries``, ``substitute``, ``LocalPrometheus``)
are also what ``tests/integration/test_prometheus.py`` uses.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import random
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import httpx
import yaml

log = logging.getLogger("kvtier.bench.render_dashboard")
ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "kvtier.json"
RULES_DIR = ROOT / "deploy" / "prometheus" / "rules"
ALL = ".*"  # what Grafana sends for a multi-value variable set to "All" (its allValue)
# Names Prometheus itself attaches to every target: not kvtier's, but fair to query.
PROMETHEUS_MADE = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})
PROMETHEUS_LABELS = frozenset({"instance", "job"})


@dataclass(frozen=True, slots=True)
class Query:
    """One target of one panel, as the dashboard JSON has it."""

    panel: str
    ref: str
    expr: str
    legend: str
    kind: str  # panel type: timeseries, stat
    unit: str
    grid: tuple[int, int, int, int]  # x, y, w, h in Grafana grid units


def dashboard_queries(path: Path = DASHBOARD) -> list[Query]:
    dash = json.loads(Path(path).read_text())
    out = []
    for p in dash["panels"]:
        g = p["gridPos"]
        unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        for t in p.get("targets", []):
            out.append(Query(p["title"], t["refId"], t["expr"], t.get("legendFormat", ""),
                             p["type"], unit, (g["x"], g["y"], g["w"], g["h"])))
    return out


def variable_queries(path: Path = DASHBOARD) -> dict[str, str]:
    """{variable: the PromQL selector inside its ``label_values(selector, label)`` query}."""
    out = {}
    for v in json.loads(Path(path).read_text())["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", q)
            if not m:
                raise ValueError(f"variable {v['name']!r}: unexpected query {q!r}")
            out[v["name"]] = m.group(1)
    return out


def rule_exprs(rules_dir: Path = RULES_DIR) -> list[tuple[str, str, str]]:
    """``(kind, name, expr)`` for every rule: kind is ``record`` or ``alert``."""
    out = []
    for f in sorted(Path(rules_dir).glob("*.yml")):
        for group in yaml.safe_load(f.read_text())["groups"]:
            for r in group["rules"]:
                kind = "record" if "record" in r else "alert"
                out.append((kind, r[kind], r["expr"]))
    return out


def substitute(expr: str, rate_interval: str = "5m", variables: dict[str, str] | None = None) -> str:
    """The expression Grafana would send: ``$__rate_interval`` and ``$var``/``${var}`` filled in
    (variables default to All, i.e. ``.*``)."""
    values = {"__rate_interval": rate_interval, "instance": ALL, "tier": ALL, "namespace": ALL,
              **(variables or {})}

    def fill(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise KeyError(f"no value for dashboard variable ${name} in {expr!r}")
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", fill, expr)


def find_binaries() -> tuple[str | None, str | None]:
    return shutil.which("prometheus"), shutil.which("promtool")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalPrometheus:
    """A real Prometheus on a free loopback port with its own config and temp storage."""

    def __init__(self, targets: list[str], rule_files: list[Path] | None = None,
                 interval: str = "1s", binary: str | None = None) -> None:
        found = binary or find_binaries()[0]
        if not found:
            raise FileNotFoundError("prometheus not found on PATH (apt-get install -y prometheus)")
        self.binary = found
        self.targets, self.rule_files, self.interval = targets, rule_files or [], interval
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._dir = Path(tempfile.mkdtemp(prefix="kvtier-prom-"))
        self._proc: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None  # prometheus's output, once started
        self.http = httpx.Client(base_url=self.url, timeout=10.0)

    def config(self) -> dict:
        return {"global": {"scrape_interval": self.interval, "evaluation_interval": self.interval},
                "rule_files": [str(p) for p in self.rule_files],
                "scrape_configs": [{"job_name": "kvtier", "static_configs": [{"targets": self.targets}]}]}

    def start(self, timeout: float = 30.0) -> LocalPrometheus:
        cfg = self._dir / "prometheus.yml"
        cfg.write_text(yaml.safe_dump(self.config()))
        self._log = open(self._dir / "prometheus.log", "wb")  # noqa: SIM115 (closed in stop)
        self._proc = subprocess.Popen(
            [self.binary, f"--config.file={cfg}", f"--storage.tsdb.path={self._dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1d"],
            stdout=self._log, stderr=subprocess.STDOUT)
        self.wait_for(self._ready, timeout, "Prometheus to become ready")
        return self

    def _ready(self) -> bool:
        if self._proc is not None and self._proc.poll() is not None:
            raise RuntimeError(f"prometheus exited with {self._proc.returncode}: {self.log_tail()}")
        try:
            return self.http.get("/-/ready").status_code == 200
        except httpx.HTTPError:
            return False

    def log_tail(self, n: int = 2000) -> str:
        p = self._dir / "prometheus.log"
        return p.read_text(errors="replace")[-n:] if p.exists() else ""

    @staticmethod
    def wait_for(cond, timeout: float, what: str, poll: float = 0.1) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(poll)

    def _api(self, path: str, params: dict) -> Any:
        r = self.http.get(path, params=params)
        body = r.json()
        if body.get("status") != "success":
            raise ValueError(f"Prometheus rejected {params.get('query')!r}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """Instant vector result: ``[{metric: {...}, value: [t, "v"]}]``."""
        data = self._api("/api/v1/query", {"query": expr, **({"time": at} if at else {})})
        return data["result"] if data["resultType"] == "vector" else [{"metric": {}, "value": data["result"]}]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        return self._api("/api/v1/query_range",
                         {"query": expr, "start": start, "end": end, "step": step})["result"]

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        self.http.close()
        if self._log is not None:
            self._log.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> LocalPrometheus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RemoteProm(LocalPrometheus):
    """An existing Prometheus, queried only."""

    def __init__(self, url: str) -> None:  # noqa: D107 (no process of ours)
        self.url, self._proc, self._log = url.rstrip("/"), None, None
        self._dir = Path(tempfile.mkdtemp(prefix="kvtier-prom-"))
        self.http = httpx.Client(base_url=self.url, timeout=30.0)


# ---- rendering -----------------------------------------------------------------------------

def _legend(fmt: str, labels: dict) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt) or str(labels)


def _fmt(v: float, unit: str) -> str:
    if math.isnan(v):
        return "-"
    if unit == "percentunit":
        return f"{100 * v:.1f}%"
    if unit in ("bytes", "Bps"):
        for suffix, n in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
            if abs(v) >= n:
                return f"{v / n:.1f} {suffix}" + ("/s" if unit == "Bps" else "")
        return f"{v:.0f} B" + ("/s" if unit == "Bps" else "")
    if unit == "s":
        return f"{v * 1e3:.2f} ms" if v < 1 else f"{v:.1f} s"
    if v == int(v) and abs(v) < 1e9:
        return f"{int(v):,}"
    return f"{v:.3g}"


def render(prom: LocalPrometheus, queries: list[Query], start: float, end: float, step: float,
           rate_interval: str, out: Path, title: str = "kvtier") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    panels: dict[str, list[Query]] = {}
    for q in queries:
        panels.setdefault(q.panel, []).append(q)
    rows = max(q.grid[1] + q.grid[3] for q in queries)
    fig = plt.figure(figsize=(16, rows * 0.36), dpi=72)
    gs = fig.add_gridspec(rows, 24, hspace=0.0, wspace=2.2, left=0.05, right=0.98, top=0.96,
                          bottom=0.02)
    tfmt = "%H:%M:%S" if end - start < 900 else "%H:%M"
    fig.suptitle(f"{title} — {time.strftime('%Y-%m-%d %H:%M', time.localtime(start))} "
                 f"+{(end - start) / 60:.0f} min", fontsize=13)
    for name, qs in panels.items():
        x, y, w, h = qs[0].grid
        # the first grid row holds the title, the last the time axis labels
        ax = fig.add_subplot(gs[y + 1:y + h - (1 if qs[0].kind != "stat" else 0), x:x + w])
        ax.set_title(name, fontsize=10, loc="left")
        unit = qs[0].unit
        if qs[0].kind == "stat":
            series = [(_legend(q.legend, r["metric"]), float(r["value"][1]))
                      for q in qs for r in prom.query(substitute(q.expr, rate_interval), at=end)]
            many = len(series) > 1
            text = "\n".join(f"{lbl}: {_fmt(v, unit)}" if many else _fmt(v, unit)
                              for lbl, v in sorted(series)) or "no data"
            ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=12 if many else 22,
                    linespacing=1.3, transform=ax.transAxes, color="#1f5f99")
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        n = 0
        for q in qs:
            for r in prom.query_range(substitute(q.expr, rate_interval), start, end, step):
                ts = [datetime.fromtimestamp(float(t)) for t, _ in r["values"]]
                vs = [float(v) for _, v in r["values"]]
                # matplotlib converts datetimes itself; its stubs do not say so
                ax.plot(ts, vs, lw=1.2, label=_legend(q.legend, r["metric"]))  # type: ignore[arg-type]
                n += 1
        if not n:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.xaxis.set_major_formatter(mdates.DateFormatter(tfmt))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p, u=unit: _fmt(v, u)))
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if n:
            ax.legend(fontsize=7, ncol=3, loc="best", framealpha=0.8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


# ---- the demo workload ---------------------------------------------------------------------

BT = 64


def demo_workload(url: str, seconds: float, seed: int = 0, outage=None) -> None:
    """Chat-like traffic: shared system prompts + short unique turns, in three phases; with
    ``outage=(pause, resume)`` the remote engine hangs from 80% to 88% of the run."""
    import torch

    from kvtier import KVLayout
    from kvtier.client import KVTierClient
    from kvtier.errors import KVTierError

    layout = KVLayout(2, ((4, 64), (4, 64)), "float32")  # 4 KiB/token: 256 KiB blocks
    rng = random.Random(seed)
    kv_src = [tuple(torch.randn(BT * 16, 4, 64) for _ in range(2)) for _ in range(2)]

    def prompts(base: int, n: int) -> list[list[int]]:
        return [list(range(base + i * 10_000, base + i * 10_000 + rng.randint(4, 10) * BT))
                for i in range(n)]

    old, burst, code = prompts(0, 12), prompts(10_000_000, 40), prompts(20_000_000, 3)
    t0, i = time.monotonic(), 0
    with KVTierClient(url) as c:
        c.register_namespace("chat", layout=layout, block_tokens=BT)
        c.register_namespace("code", layout=layout, block_tokens=BT)
        paused = False
        while (el := time.monotonic() - t0) < seconds:
            phase = el / seconds
            if outage and paused != (0.8 < phase < 0.88):
                paused = not paused
                (outage[0] if paused else outage[1])()
            pool = burst if 0.45 < phase < 0.7 else old
            # A second namespace with little reuse (short fresh prompts on 3 shared prefixes).
            ns, p = ("code", rng.choice(code)[:BT * 2]) if rng.random() < 0.25 else ("chat", rng.choice(pool))
            toks = p + [rng.randrange(1 << 20) for _ in range(rng.randint(1, 2) * BT)]
            hit = c.lookup(ns, toks)
            if hit.tokens and rng.random() < 0.5:
                c.get(ns, toks[:hit.tokens])  # reload the cached prefix
            if hit.tokens < len(toks):
                n = len(toks) // BT * BT
                c.put(ns, toks[:n], [tuple(t[:n] for t in layer) for layer in kv_src])
            if i % 15 == 0:
                c.prefetch("chat", rng.choice(old)).wait(5)
            if i % 60 == 30:
                c.evict("chat", rng.choice(pool))
            if i % 40 == 20:
                with contextlib.suppress(KVTierError):
                    c.lookup("no-such-namespace", toks)  # a client bug: answered 404
            i += 1
            time.sleep(0.02)  # pace to ~30 requests/s so the 2-core box stays responsive


@contextlib.contextmanager
def demo_stack(tmp: Path, interval: str = "1s", remote: bool = True
               ) -> Iterator[tuple[str, LocalPrometheus, Any]]:
    """Sidecar (+ a loopback redis-server remote tier when installed) and Prometheus;
    yields (sidecar URL, Prometheus, the RedisServer or None)."""
    from kvtier import CacheConfig, TieredCache
    from kvtier.config import HostTierConfig, RemoteTierConfig, SSDTierConfig, parse_size
    from kvtier.server.testing import serve_in_thread
    from tests.integration.remote_servers import REDIS_SERVER, RedisServer

    cfg = CacheConfig(block_tokens=BT, host=HostTierConfig(capacity_bytes=parse_size("8MiB")),
                      ssd=SSDTierConfig(path=str(tmp / "ssd"), capacity_bytes=parse_size("48MiB"),
                                        direct_io=False, min_free_bytes=0))
    with contextlib.ExitStack() as stack:
        redis = None
        if remote and REDIS_SERVER:
            redis = RedisServer().start()
            stack.callback(redis.stop)
            cfg.remote = RemoteTierConfig(backend="redis", url=redis.url, timeout_s=0.25)
        cache = stack.enter_context(TieredCache(cfg))
        url = stack.enter_context(serve_in_thread(cache))
        rules = sorted(RULES_DIR.glob("*.yml"))
        prom = stack.enter_context(LocalPrometheus([url.removeprefix("http://")], rules, interval))
        yield url, prom, redis


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prometheus", help="URL of an existing Prometheus to query")
    ap.add_argument("--last", default="1h", help="time range ending now (e.g. 30m, 1h, 6h)")
    ap.add_argument("--demo", type=float, metavar="SECONDS",
                    help="run a local kvtier + Prometheus + workload for SECONDS, render that")
    ap.add_argument("--no-remote", action="store_true",
                    help="demo without the loopback redis-server remote tier")
    ap.add_argument("--rate-interval", default=None,
                    help="what $__rate_interval becomes (default: 4 x step, at least 15s)")
    ap.add_argument("-o", "--out", type=Path, default=Path("dashboard.png"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    queries = dashboard_queries()
    if args.demo:
        with tempfile.TemporaryDirectory(prefix="kvtier-demo-") as tmp, \
                demo_stack(Path(tmp), remote=not args.no_remote) as (url, prom, redis):
            start = time.time()
            log.info("workload for %.0f s against %s, Prometheus at %s", args.demo, url, prom.url)
            demo_workload(url, args.demo, outage=(redis.pause, redis.resume) if redis else None)
            end = time.time() + 2
            prom.wait_for(lambda: time.time() > end, 10, "the last scrapes")
            render(prom, queries, start, end, 2.0, args.rate_interval or "10s", args.out)
    else:
        if not args.prometheus:
            ap.error("give --prometheus URL or --demo SECONDS")
        mult = {"m": 60, "h": 3600, "d": 86400}
        span = float(args.last[:-1]) * mult[args.last[-1]]
        end = time.time()
        step = max(15.0, span / 300)
        prom = RemoteProm(args.prometheus)
        try:
            render(prom, queries, end - span, end, step,
                   args.rate_interval or f"{int(max(4 * step, 60))}s", args.out)
        finally:
            prom.stop()
    log.info("wrote %s (%d KiB)", args.out, args.out.stat().st_size // 1024)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
