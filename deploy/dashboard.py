"""Generate the kvtier Grafana dashboard (``deploy/grafana/dashboards/kvtier.json``) from code.

Run ``python deploy/dashboard.py`` after changing a panel and commit the JSON: Grafana
provisioning reads the file, and ``tests/test_deploy.py`` checks it is what this script writes,
that every expression parses, and that it names only metrics a live kvtier exports.

Uses grafana-foundation-sdk (Grafana's maintained dashboards-as-code library; ``kvtier[deploy]``).
The panels are a table of ``PanelSpec`` records, so adding a question is adding one row.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

OUT = Path(__file__).resolve().parent / "grafana" / "dashboards" / "kvtier.json"
UID = "kvtier-overview"
DS = "${datasource}"
RATE = "$__rate_interval"
HTTP_ERR = 'status!~"2.."'
# Metrics that carry a ``namespace`` label; the $namespace variable filters only these.
NAMESPACED: frozenset[str] = frozenset({
    "kvtier_namespace_lookups_total", "kvtier_namespace_lookup_tokens_total",
    "kvtier_namespace_lookup_hit_tokens_total", "kvtier_namespace_put_tokens_total"})
# Metrics that carry a ``tier`` label (the $tier variable filters them).
TIERED = ("kvtier_block_hits_total", "kvtier_block_misses_total", "kvtier_hit_tokens_total",
          "kvtier_read_bytes_total", "kvtier_written_bytes_total", "kvtier_reload_seconds_bucket",
          "kvtier_block_age_seconds_bucket", "kvtier_block_age_seconds_gsum",
          "kvtier_block_age_seconds_gcount", "kvtier_tier_used_bytes",
          "kvtier_tier_capacity_bytes", "kvtier_tier_blocks", "kvtier_evictions_total",
          "kvtier_promotions_total", "kvtier_demotions_total", "kvtier_corrupt_blocks_total",
          "kvtier_put_failures_total", "kvtier_tier_errors_total", "kvtier_tier_breaker_open")


def s(metric: str, extra: str = "") -> str:
    """A selector of ``metric`` filtered by the dashboard's variables (where the label exists)."""
    m = ['instance=~"$instance"']
    if metric in TIERED:
        m.append('tier=~"$tier"')
    if metric in NAMESPACED:
        m.append('namespace=~"$namespace"')
    if extra:
        m.append(extra)
    return f"{metric}{{{', '.join(m)}}}"


def rate(metric: str, extra: str = "") -> str:
    return f"rate({s(metric, extra)}[{RATE}])"


@dataclass(frozen=True, slots=True)
class Target:
    expr: str
    legend: str


@dataclass(frozen=True, slots=True)
class PanelSpec:
    """One panel: what question it answers (``description``) and the PromQL that answers it."""

    title: str
    description: str
    unit: str
    targets: tuple[Target, ...]
    kind: str = "timeseries"  # or "stat"
    width: int = 12
    height: int = 8
    stack: bool = False
    max: float | None = None
    extra: dict = field(default_factory=dict)


def q(metric: str, qt: float, by: str = "tier") -> str:
    return f"histogram_quantile({qt}, sum by ({by}, le) ({rate(metric)}))"


PANELS: tuple[PanelSpec, ...] = (
    PanelSpec("Token hit rate (lifetime)", "Looked-up tokens found in any tier / tokens looked "
              "up, since the sidecar started.", "percentunit",
              (Target(f"avg({s('kvtier_hit_rate_tokens')})", "hit rate"),), kind="stat", width=6,
              height=4, max=1),
    PanelSpec("Instances up", "kvtier sidecars Prometheus scraped successfully.", "none",
              (Target('sum(up{job="kvtier", instance=~"$instance"})', "up"),), kind="stat",
              width=6, height=4),
    PanelSpec("Blocks stored", "Blocks stored now, per tier.", "none",
              (Target(f"sum by (tier) ({s('kvtier_tier_blocks')})", "{{tier}}"),), kind="stat",
              width=6, height=4),
    PanelSpec("Bytes stored", "Bytes of blocks stored now, per tier.", "bytes",
              (Target(f"sum by (tier) ({s('kvtier_tier_used_bytes')})", "{{tier}}"),),
              kind="stat", width=6, height=4),
    PanelSpec("Hit rate", "Token hit rate over the window (all tiers), and per tier the share of "
              "blocks asked of that tier that it held.", "percentunit",
              (Target(f"sum({rate('kvtier_lookup_hit_tokens_total')}) / "
                      f"sum({rate('kvtier_lookup_tokens_total')})", "tokens, all tiers"),
               Target(f"sum by (tier) ({rate('kvtier_block_hits_total')}) / "
                      f"(sum by (tier) ({rate('kvtier_block_hits_total')}) + "
                      f"sum by (tier) ({rate('kvtier_block_misses_total')}))", "blocks, {{tier}}")),
              max=1),
    PanelSpec("Tokens served from cache vs recomputed", "Looked-up tokens per second served from "
              "each tier, and those no tier held (the engine recomputes them).", "short",
              (Target(f"sum by (tier) ({rate('kvtier_hit_tokens_total')})", "cached: {{tier}}"),
               Target(f"sum({rate('kvtier_lookup_tokens_total')}) - "
                      f"sum({rate('kvtier_lookup_hit_tokens_total')})", "recomputed")),
              stack=True),
    PanelSpec("Retention: age of stored blocks", "Median and p90 age of the blocks each tier "
              "holds now (how long a block survives before eviction).", "s",
              (Target(f"histogram_quantile(0.5, sum by (tier, le) "
                      f"({s('kvtier_block_age_seconds_bucket')}))", "p50 {{tier}}"),
               Target(f"histogram_quantile(0.9, sum by (tier, le) "
                      f"({s('kvtier_block_age_seconds_bucket')}))", "p90 {{tier}}"))),
    PanelSpec("Reload latency per tier", "p50 and p99 latency of reading and decoding one block "
              "back from each tier.", "s",
              (Target(q("kvtier_reload_seconds_bucket", 0.5), "p50 {{tier}}"),
               Target(q("kvtier_reload_seconds_bucket", 0.99), "p99 {{tier}}"))),
    PanelSpec("Bandwidth per tier", "Bytes per second read back from and written into each "
              "tier.", "Bps",
              (Target(f"sum by (tier) ({rate('kvtier_read_bytes_total')})", "read {{tier}}"),
               Target(f"sum by (tier) ({rate('kvtier_written_bytes_total')})", "write {{tier}}"))),
    PanelSpec("Tier fill", "Bytes stored / configured capacity, per tier (a warm cache sits near "
              "its eviction watermark).", "percentunit",
              (Target(f"sum by (tier) ({s('kvtier_tier_used_bytes')}) / "
                      f"(sum by (tier) ({s('kvtier_tier_capacity_bytes')}) > 0)", "{{tier}}"),),
              max=1),
    PanelSpec("Evictions by reason", "Blocks per second evicted from each tier, by reason "
              "(capacity, evicted via API, expired TTL, namespace dropped, corrupt, lost...).",
              "short",
              (Target(f"sum by (tier, reason) ({rate('kvtier_evictions_total')})",
                      "{{tier}} {{reason}}"),), stack=True),
    PanelSpec("Promotions and demotions", "Blocks per second copied up into a tier (promotion) "
              "and moved down out of it under pressure (demotion).", "short",
              (Target(f"sum by (tier) ({rate('kvtier_promotions_total')})", "promote into {{tier}}"),
               Target(f"sum by (tier) ({rate('kvtier_demotions_total')})", "demote from {{tier}}"))),
    PanelSpec("Prefetch outcomes", "Finished prefetches per second: done, failed, cancelled, "
              "timeout.", "short",
              (Target(f"sum by (outcome) ({rate('kvtier_prefetches_total')})", "{{outcome}}"),),
              stack=True),
    PanelSpec("Errors", "Blocks that failed their checksum (dropped, never served), writes a tier "
              "refused, failed remote-tier calls (errors, timeouts, short circuits while its "
              "breaker is open), and HTTP requests answered with an error status.", "short",
              (Target(f"sum by (tier) ({rate('kvtier_corrupt_blocks_total')})", "corrupt {{tier}}"),
               Target(f"sum by (tier) ({rate('kvtier_put_failures_total')})",
                      "put failures {{tier}}"),
               Target(f"sum by (tier, kind) ({rate('kvtier_tier_errors_total')})",
                      "{{tier}} {{kind}}"),
               Target(f"sum by (status) ({rate('kvtier_http_request_duration_seconds_count', HTTP_ERR)})",
                      "HTTP {{status}}"))),
    PanelSpec("Request latency p99 by route", "p99 HTTP latency of each API route.", "s",
              (Target(q("kvtier_http_request_duration_seconds_bucket", 0.99, by="route"),
                      "{{route}}"),)),
    PanelSpec("Garbage collector pauses", "p99 time Python's garbage collector held the sidecar "
              "per collection, by generation (2: a full collection, which stalls every request "
              "meanwhile), and seconds paused per second.", "s",
              (Target(q("kvtier_gc_pause_seconds_bucket", 0.99, by="generation"), "p99 gen {{generation}}"),
               Target(f"sum by (generation) ({rate('kvtier_gc_pause_seconds_sum')})",
                      "paused per s, gen {{generation}}"))),
    PanelSpec("Lookups and puts", "Lookups and put calls served per second.", "reqps",
              (Target(f"sum({rate('kvtier_lookups_total')})", "lookups"),
               Target(f"sum({rate('kvtier_puts_total')})", "puts"))),
    PanelSpec("Hit rate by namespace", "Token hit rate over the window of each namespace "
              "(model, tenant): which workloads the cache serves and which it does not.",
              "percentunit",
              (Target(f"sum by (namespace) ({rate('kvtier_namespace_lookup_hit_tokens_total')}) / "
                      f"sum by (namespace) ({rate('kvtier_namespace_lookup_tokens_total')})",
                      "{{namespace}}"),), max=1),
    PanelSpec("Tokens by namespace", "Tokens looked up and tokens stored per second, by "
              "namespace.", "short",
              (Target(f"sum by (namespace) ({rate('kvtier_namespace_lookup_tokens_total')})",
                      "looked up {{namespace}}"),
               Target(f"sum by (namespace) ({rate('kvtier_namespace_put_tokens_total')})",
                      "stored {{namespace}}"))),
)


def _variables() -> list:
    from grafana_foundation_sdk.builders import dashboard as d
    from grafana_foundation_sdk.models import dashboard as dm

    ds = dm.DataSourceRef(type_val="prometheus", uid=DS)

    def query_var(name: str, label: str, query: str, description: str):
        return (d.QueryVariable(name).label(label).description(description).datasource(ds)
                .query({"query": query, "refId": f"var-{name}"}).multi(True).include_all(True)
                .all_value(".*").refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
                .sort(dm.VariableSort.ALPHABETICAL_ASC)
                .current(dm.VariableOption(selected=True, text="All", value="$__all")))

    return [
        d.DatasourceVariable("datasource").label("Data source").type("prometheus"),
        query_var("instance", "Instance", "label_values(kvtier_lookups_total, instance)",
                  "kvtier sidecars (Prometheus instance label)."),
        query_var("tier", "Tier", 'label_values(kvtier_tier_capacity_bytes{instance=~"$instance"}, tier)',
                  "Tiers to show: device, host, ssd, remote."),
        query_var("namespace", "Namespace",
                  "label_values(kvtier_namespace_lookups_total{instance=~\"$instance\"}, namespace)",
                  "Namespaces to show in the per-namespace panels (tenant/name when auth is on)."),
    ]


def _panel(spec: PanelSpec, pid: int, x: int, y: int):
    from grafana_foundation_sdk.builders import common as cb
    from grafana_foundation_sdk.builders import prometheus, stat, timeseries
    from grafana_foundation_sdk.models import common as cm
    from grafana_foundation_sdk.models import dashboard as dm

    p = stat.Panel() if spec.kind == "stat" else timeseries.Panel()
    p = (p.id(pid).title(spec.title).description(spec.description).unit(spec.unit)
         .datasource(dm.DataSourceRef(type_val="prometheus", uid=DS))
         .grid_pos(dm.GridPos(h=spec.height, w=spec.width, x=x, y=y)))
    for i, t in enumerate(spec.targets):
        p = p.with_target(prometheus.Dataquery().expr(t.expr).legend_format(t.legend)
                          .ref_id(chr(ord("A") + i)))
    if spec.max is not None:
        p = p.min(0).max(spec.max)
    if spec.kind == "timeseries":
        p = (p.fill_opacity(10).line_width(1).show_points(cm.VisibilityMode.NEVER)
             .legend(cb.VizLegendOptions().display_mode(cm.LegendDisplayMode.LIST)
                     .placement(cm.LegendPlacement.BOTTOM).show_legend(True)))
        if spec.stack:
            p = p.stacking(cb.StackingConfig().mode(cm.StackingMode.NORMAL))
    else:
        p = p.reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]))
    return p


def build() -> dict:
    """The dashboard as a JSON-able dict."""
    from grafana_foundation_sdk.builders import dashboard as d
    from grafana_foundation_sdk.cog.encoder import JSONEncoder

    dash = (d.Dashboard("kvtier").uid(UID).tags(["kvtier", "kv-cache"]).refresh("30s")
            .time("now-1h", "now").timezone("browser")
            .description("kvtier tiered KV cache: hit rate, retention, reload latency, "
                         "bandwidth, fill, evictions, prefetches, errors."))
    for v in _variables():
        dash = dash.with_variable(v)
    x = y = row_h = 0
    for pid, spec in enumerate(PANELS, start=1):
        if x + spec.width > 24:
            x, y, row_h = 0, y + row_h, 0
        dash = dash.with_panel(_panel(spec, pid, x, y))
        x, row_h = x + spec.width, max(row_h, spec.height)
    return json.loads(json.dumps(dash.build(), cls=JSONEncoder))


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="exit 1 if the checked-in JSON differs from what would be written")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        same = args.out.exists() and args.out.read_text() == text
        if not same:
            sys.stderr.write(f"{args.out} is stale: run python deploy/dashboard.py\n")
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
