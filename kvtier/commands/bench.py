"""``kvtier bench``: benchmarks as sub-commands (``trace`` and ``io``); see ``DESCRIPTION``.

Building the parsers imports only ``kvtier.bench.params`` (no torch); a benchmark imports the rest when
it runs. Bad arguments print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, TextIO

from kvtier.commands import HelpFormatter
from kvtier.config import format_size, parse_size
from kvtier.errors import InvalidRequest, KVTierError

if TYPE_CHECKING:
    from kvtier.bench.trace import ReplayResult


DESCRIPTION = """\
Benchmarks of kvtier's own code on this machine.

  trace  replay a generated or JSONL agentic trace against the cache and report hit rates per
         tier, bytes moved, evictions, retention and prefill time saved; --sweep replays it at
         several capacities and plots hit rate against capacity
  io     fio-style reload benchmark of one tier (host, ssd or remote); --compare-fio runs fio
         with the same job on the same directory

examples:
  kvtier bench trace --model Llama-3-8B --host 8GiB --ssd 256GiB
  kvtier bench io --tier ssd --rw randread --bs 2MiB --iodepth 4 --compare-fio
"""

Configure = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]


@dataclass(frozen=True, slots=True)
class SubCommand:
    help: str
    configure: Configure
    run: Run


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="benchmarks: trace replay and tier I/O",
                              description=DESCRIPTION, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="bench_command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, sc in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=sc.help, description=sc.help, formatter_class=HelpFormatter,
                            prog=f"kvtier bench {name}")
        sc.configure(sp)
        sp.set_defaults(bench_run=sc.run)
    return p


def run(args: argparse.Namespace) -> int:
    return args.bench_run(args)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m kvtier.commands.bench trace ...``) until ``kvtier.cli`` exists."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    parser = argparse.ArgumentParser(prog="kvtier")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return run(args)


# ---- kvtier bench trace ---------------------------------------------------------------------
def configure_trace(p: argparse.ArgumentParser) -> None:
    from kvtier.bench.params import TraceParams

    d = TraceParams()
    g = p.add_argument_group("trace (generated unless --trace is given)")
    g.add_argument("--trace", metavar="FILE", help="replay this JSONL trace (format: docs/bench-trace.md)")
    g.add_argument("--save-trace", metavar="FILE", help="also write the replayed trace as JSONL here")
    g.add_argument("--sessions", metavar="N", type=int, default=d.sessions, help="sessions in the trace")
    g.add_argument("--system-prompts", metavar="N", type=int, default=d.system_prompts,
                   help="distinct system prompts shared across sessions")
    g.add_argument("--system-tokens", metavar="N", type=int, default=d.system_tokens, help="tokens per system prompt")
    g.add_argument("--user-tokens", metavar="N", type=int, default=d.user_tokens,
                   help="user text and tool results per turn, mean")
    g.add_argument("--assistant-tokens", metavar="N", type=int, default=d.assistant_tokens,
                   help="generated tokens per turn, mean")
    g.add_argument("--turns", metavar="N", type=float, default=d.mean_turns, help="mean turns per session")
    g.add_argument("--max-turns", metavar="N", type=int, default=d.max_turns, help="most turns of one session")
    g.add_argument("--zipf", metavar="ALPHA", type=float, default=d.zipf_alpha, help="session popularity exponent")
    g.add_argument("--think-time", metavar="SECONDS", type=float, default=d.think_time_s, help="mean seconds between turns")
    g.add_argument("--arrival-rate", metavar="RATE", type=float, default=d.arrival_rate, help="new sessions per second")
    g.add_argument("--seed", metavar="N", type=int, default=d.seed, help="random seed of the generated trace")
    c = p.add_argument_group("cache")
    c.add_argument("--model", metavar="NAME", default="Llama-3-8B", help="kvtier calc preset whose KV size sets block bytes")
    c.add_argument("--kv-dtype", metavar="DTYPE", default="bf16", help="KV dtype of the model preset (bf16, fp8, fp4...)")
    c.add_argument("--bytes-per-token", metavar="N", type=int, help="KV bytes per token (overrides --model)")
    c.add_argument("--block-tokens", metavar="N", type=int, default=256, help="tokens per block")
    c.add_argument("--host", metavar="SIZE", default="8GiB", help="host DRAM capacity (real bytes)")
    c.add_argument("--ssd", metavar="SIZE", default="0", help="SSD capacity (real bytes); 0 disables the SSD tier")
    c.add_argument("--sweep", metavar="SPEC", help="capacity what-if, e.g. host=1GiB..64GiB,ssd=64GiB..1TiB")
    c.add_argument("--sweep-points", metavar="N", type=int, help="points per swept tier (unset: one per doubling)")
    c.add_argument("--out", metavar="DIR", default="kvtier-bench-out", help="directory for plots and sweep.json")
    r = p.add_argument_group("report")
    r.add_argument("--prefill-rate", metavar="TOKENS_PER_S", type=float, default=10_000.0,
                   help="prefill tokens/s used for time saved")
    r.add_argument("--measure-prefill", action="store_true",
                   help="measure the prefill rate of a small transformers model on this machine")
    r.add_argument("--json", action="store_true", help="print the report as JSON")


def run_trace(args: argparse.Namespace) -> int:
    try:
        return _run_trace(args)
    except (KVTierError, OSError) as e:
        print(f"kvtier bench trace: error: {e}", file=sys.stderr)
        return 2


def _run_trace(args: argparse.Namespace) -> int:
    from kvtier.bench import trace as tr

    bpt, model = _bytes_per_token(args)
    if args.block_tokens < 1:
        raise InvalidRequest(f"--block-tokens must be >= 1, got {args.block_tokens}")
    if not args.prefill_rate > 0:
        raise InvalidRequest(f"--prefill-rate must be > 0 tokens/s, got {args.prefill_rate}")
    caps = {"host": parse_size(args.host), "ssd": parse_size(args.ssd)}
    sweep = parse_sweep(args.sweep, args.sweep_points) if args.sweep else None
    if args.trace:
        requests, source = tr.read_jsonl(args.trace), args.trace
    else:
        params = tr.TraceParams(args.sessions, args.system_prompts, args.system_tokens, args.user_tokens,
                                args.assistant_tokens, args.turns, args.max_turns, args.zipf,
                                args.think_time, args.arrival_rate, args.seed)
        requests, source = tr.generate(params), f"generated (seed {args.seed})"
    if args.save_trace:
        tr.write_jsonl(requests, args.save_trace)
    rate = tr.measure_prefill_rate() if args.measure_prefill else args.prefill_rate
    head = (f"trace: {source}, {len(requests)} requests, {len({r.session for r in requests})} sessions, "
            f"{sum(r.prompt_tokens for r in requests):,} prompt tokens over {requests[-1].t:.0f} s\n"
            f"model: {model}, {bpt:,.0f} B/token, {args.block_tokens}-token blocks of "
            f"{format_size(bpt * args.block_tokens)}; prefill {rate:,.0f} tokens/s"
            f"{' (measured here, small model)' if args.measure_prefill else ''}")
    if sweep is None:
        plan = tr.TierPlan(args.block_tokens, bpt, {k: v for k, v in caps.items() if v})
        res = tr.replay(requests, plan, progress=ProgressLine("replay"))
        if args.json:
            print(json.dumps({**res.to_dict(), "ttft": res.ttft(rate), "model": model}, indent=2))
        else:
            print(head + "\n\n" + format_report(res, rate))
        return 0
    return _run_sweep(args, tr, requests, bpt, caps, sweep, rate, head)


def _bytes_per_token(args: argparse.Namespace) -> tuple[float, str]:
    from kvtier.calc import PRESETS, Precision, kv_size, preset

    if args.bytes_per_token is not None:
        if args.bytes_per_token < 1:
            raise InvalidRequest(f"--bytes-per-token must be >= 1, got {args.bytes_per_token}")
        return args.bytes_per_token, "custom"
    try:
        spec = preset(args.model)
    except InvalidRequest:  # calc's message suggests calc's --config, a flag bench trace lacks
        raise InvalidRequest(
            f"--model: unknown preset {args.model!r}: expected one of "
            f"{', '.join(s.name for s in PRESETS)}; for another model give --bytes-per-token "
            "(kvtier calc --config config.json prints it)") from None
    return kv_size(spec, 0, Precision(kv=args.kv_dtype)).bytes_per_token, f"{spec.name} ({args.kv_dtype} KV)"


def parse_sweep(spec: str, points: int | None) -> dict[str, list[int]]:
    """``host=1GiB..64GiB,ssd=256GiB`` -> capacities per tier (geometric steps)."""
    from kvtier.bench.trace import default_points, geometric

    if points is not None and points < 1:
        raise InvalidRequest(f"--sweep-points must be >= 1, got {points}")
    out: dict[str, list[int]] = {}
    for part in spec.split(","):
        tier, eq, rng = part.partition("=")
        tier = tier.strip()
        if not eq or tier not in ("host", "ssd") or tier in out:
            raise InvalidRequest(f"malformed --sweep item {part!r}: expected host=LO..HI or ssd=LO..HI, once each")
        lo_s, dots, hi_s = rng.partition("..")
        lo = parse_size(lo_s)
        hi = parse_size(hi_s) if dots else lo
        if not 0 < lo <= hi:
            raise InvalidRequest(f"malformed --sweep range {rng!r}: expected 0 < LO <= HI")
        out[tier] = geometric(lo, hi, points or default_points(lo, hi))
    return out


def _run_sweep(args: argparse.Namespace, tr: ModuleType, requests: list, bpt: float,
               caps: dict[str, int], sweep: dict[str, list[int]], rate: float, head: str) -> int:
    from kvtier.bench.common import table
    from kvtier.bench.plots import hit_rate_vs_capacity

    axes = list(sweep)
    x_tier, series_tier = axes[0], axes[1] if len(axes) > 1 else None
    grid = [(x, s) for s in (sweep[series_tier] if series_tier else [None]) for x in sweep[x_tier]]
    progress = ProgressLine("sweep")
    rows, results = [], []
    series: dict[str, list[tuple[int, float]]] = {}
    for i, (x, s) in enumerate(grid):
        point = {**caps, x_tier: x}
        if series_tier is not None and s is not None:
            point[series_tier] = s
        plan = tr.TierPlan(args.block_tokens, bpt, {k: v for k, v in point.items() if v})
        res = tr.replay(requests, plan, progress=lambda d, n, i=i: progress(i * n + d, len(grid) * n))
        label = f"{series_tier} {format_size(s)}" if series_tier and s is not None else _fixed_label(point, x_tier)
        series.setdefault(label, []).append((x, res.hit_rate_tokens))
        ttft = res.ttft(rate)
        results.append({"capacities": point, **res.to_dict(), "ttft": ttft})
        rows.append([*(format_size(point[t]) for t in axes), plan.blocks(x_tier),
                     f"{100 * res.hit_rate_lookups:.1f}%", f"{100 * res.hit_rate_tokens:.1f}%",
                     f"{ttft['saved_s']:.1f}"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = hit_rate_vs_capacity(out / f"hit_rate_vs_{x_tier}.png", series, xlabel=f"{x_tier} capacity",
                               title=f"token hit rate vs {x_tier} capacity ({len(requests)} requests)")
    (out / "sweep.json").write_text(json.dumps({"results": results}, indent=2))
    if args.json:
        print(json.dumps({"plot": str(png), "results": results}, indent=2))
    else:
        print(head + "\n\n" + table([*axes, f"{x_tier} blocks", "hit % lookups", "hit % tokens",
                                     "prefill saved s"], rows) + f"\n\nplot: {png}")
    return 0


def _fixed_label(point: dict[str, int], x_tier: str) -> str:
    rest = [f"{t} {format_size(v)}" for t, v in point.items() if t != x_tier and v]
    return ", ".join(rest) or f"{x_tier} only"


def format_report(res: ReplayResult, rate: float) -> str:
    from kvtier.bench.common import table

    def age(d: dict) -> str:
        return "/".join("-" if d[k] is None else f"{d[k]:.0f}" for k in ("p50", "p90", "p99"))

    rows = [[t.name, format_size(t.capacity_bytes), t.capacity_blocks,
             f"{100 * t.hit_lookups / max(1, res.requests):.1f}%",
             f"{100 * t.hit_tokens / max(1, res.prompt_tokens):.1f}%", t.hit_blocks,
             format_size(t.bytes_written), format_size(t.bytes_reloaded), t.evicted_blocks,
             t.demotions, t.promotions, age(t.hit_age_s), age(t.resident_age_s)]
            for t in res.tiers.values()]
    tt = res.ttft(rate)
    return "\n".join([
        f"hit rate: {100 * res.hit_rate_lookups:.1f}% of lookups, {100 * res.hit_rate_tokens:.1f}% "
        f"of prompt tokens; {res.dropped_blocks} blocks dropped from the last tier",
        "",
        table(["tier", "capacity", "blocks", "hit % lookups", "hit % tokens", "hit blocks", "written", "reloaded",
               "evicted", "demoted", "promoted", "age at hit s p50/p90/p99",
               "resident age s p50/p90/p99"], rows),
        "",
        f"prefill at {rate:,.0f} tokens/s: recompute everything {tt['recompute_s']:.1f} s, saved "
        f"{tt['saved_s']:.1f} s; mean TTFT {tt['mean_ttft_recompute_s']:.3f} s -> "
        f"{tt['mean_ttft_cached_s']:.3f} s per request (reload time not counted)",
        f"replay: {res.wall_s:.2f} s wall (TieredCache, tiny layout at the same block counts)",
    ])


class ProgressLine:
    """A throttled progress line on stderr (rewritten in place on a terminal)."""

    def __init__(self, label: str, interval_s: float = 0.5, stream: TextIO | None = None) -> None:
        self.label, self.interval_s = label, interval_s
        self.stream = stream or sys.stderr
        self.start = self.last = time.monotonic()
        self.tty = self.stream.isatty()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self.last < self.interval_s:
            return
        self.last = now
        start, end = ("\r", "\n" if done >= total else "") if self.tty else ("", "\n")
        self.stream.write(f"{start}{self.label}: {done}/{total} requests "
                          f"({100 * done / max(1, total):.0f}%) {now - self.start:.1f} s{end}")
        self.stream.flush()


# ---- kvtier bench io ------------------------------------------------------------------------
def configure_io(p: argparse.ArgumentParser) -> None:
    from kvtier.bench.params import ENGINES, RW, TIERS

    g = p.add_argument_group("job (fio's names)")
    g.add_argument("--rw", default="randread", metavar="PATTERN", help=f"I/O pattern: {', '.join(RW)}")
    g.add_argument("--bs", metavar="SIZE", default="2MiB", help="block size")
    g.add_argument("--iodepth", metavar="N", type=int, default=1, help="requests in flight per job")
    g.add_argument("--numjobs", metavar="N", type=int, default=1, help="concurrent jobs")
    g.add_argument("--size", metavar="SIZE", default="1GiB", help="data set size")
    g.add_argument("--runtime", metavar="SECONDS", type=float, default=5.0,
                   help="seconds per run, time based; 0: read --size once")
    g.add_argument("--rwmixread", metavar="PERCENT", type=int, default=50, help="randrw: percent reads")
    g.add_argument("--direct", type=int, choices=(0, 1), default=1,
                   help="1: O_DIRECT reads in kvtier, --direct=1 --ioengine=libaio in fio")
    g.add_argument("--directory", metavar="DIR", help="where the data sets live (default: the temp directory)")
    g.add_argument("--filename", metavar="FILE", help="fio's data file (default: DIRECTORY/kvtier-bench-io/fio-data.bin)")
    t = p.add_argument_group("kvtier")
    t.add_argument("--tier", default="ssd", metavar="TIER", help=f"tier to benchmark: {', '.join(TIERS)}")
    t.add_argument("--path", metavar="raw|get|get_into|loader|sidecar",
                   help="get: TieredCache.get of the whole data set (the default for ssd reads, "
                        "codec none); get_into: TieredCache.get_into it, into a tensor per layer "
                        "and K/V; loader: Loader.load of it; sidecar: a shared-memory get "
                        "from the sidecar; raw: the tier's read_into")
    t.add_argument("--codec", metavar="CODEC", default="none", help="store blocks encoded with this codec; reads decode")
    t.add_argument("--engine", default="sync", metavar="|".join(ENGINES),
                   help="sync: read_into on iodepth threads; batch: read_many_into batches of iodepth")
    t.add_argument("--durability", default="batch", choices=("sync", "batch", "none"),
                   help="ssd durability for writes")
    t.add_argument("--buffers", metavar="N", type=int, default=1,
                   help="destination buffers each request in flight cycles through (1: one "
                        "reused, as fio; 0: 16 across the jobs, as the loader's staging ring)")
    t.add_argument("--remote-url", metavar="URL", help="remote tier URL (redis://HOST:PORT/DB, ...)")
    t.add_argument("--remote-backend", default="redis", choices=("redis", "redis-cluster", "mooncake"),
                   help="remote tier engine")
    t.add_argument("--seed", metavar="N", type=int, default=0, help="random seed of keys and payloads")
    r = p.add_argument_group("report")
    r.add_argument("--repeat", metavar="N", type=int, default=1, help="runs; medians are reported")
    r.add_argument("--compare-fio", action="store_true", help="also run fio with the same parameters")
    r.add_argument("--fio-verify", action="store_true",
                   help="with --compare-fio: also run fio checking a crc32c of every block it reads, "
                        "the like-for-like reference (kvtier verifies every read; plain fio does not)")
    r.add_argument("--output-format", default="normal", choices=("normal", "json"), help="report format")
    r.add_argument("--plot", metavar="DIR", help="write a latency CDF PNG here")


def run_io(args: argparse.Namespace) -> int:
    try:
        return _run_io(args)
    except (KVTierError, ValueError, OSError) as e:
        print(f"kvtier bench io: error: {e}", file=sys.stderr)
        return 2


def _run_io(args: argparse.Namespace) -> int:
    from kvtier.bench import fio
    from kvtier.bench.common import drop_page_cache
    from kvtier.bench.fio import compare_table, format_job, median_job
    from kvtier.bench.io import IOParams, run
    from kvtier.bench.io_job import default_path
    from kvtier.bench.io_paths import kept_open

    if args.repeat < 1:
        raise InvalidRequest(f"--repeat must be >= 1, got {args.repeat}")
    p = IOParams(rw=args.rw, bs=parse_size(args.bs), iodepth=args.iodepth, numjobs=args.numjobs,
                 size=parse_size(args.size), runtime=args.runtime, tier=args.tier, codec=args.codec,
                 direct=bool(args.direct), directory=args.directory, engine=args.engine,
                 rwmixread=args.rwmixread, durability=args.durability, remote_url=args.remote_url,
                 remote_backend=args.remote_backend, seed=args.seed, buffers=args.buffers,
                 path=args.path or default_path(args.tier, args.rw, args.codec, parse_size(args.bs))).check()
    if args.fio_verify and not args.compare_fio:
        raise InvalidRequest("--fio-verify needs --compare-fio")
    if args.compare_fio:  # fails early: no fio, not the ssd tier, or a job fio cannot verify
        fio.command(p, fio.data_file(p, args.filename), verify=args.fio_verify)
    progress = _StatusLine()
    kv_jobs, fio_jobs, vfy_jobs, results = [], [], [], []
    cmd: list[str] = []  # fio's command lines, once run
    vcmd: list[str] = []
    with kept_open():  # a path's cache stays open from run to run, as an application's does
        for i in range(args.repeat):
            progress.prefix = f"run {i + 1}/{args.repeat}: " if args.repeat > 1 else ""
            drop_page_cache()  # every run starts cold (where this process may drop it)
            res = run(p, progress)
            results.append(res)
            kv_jobs.append(res.to_fio_job())
            if args.compare_fio:
                progress(f"fio {p.rw} bs={format_size(p.bs)} qd={p.iodepth} ({p.runtime:g} s)")
                drop_page_cache()
                job, cmd = fio.run(p, args.filename)
                fio_jobs.append(job)
            if args.fio_verify:
                progress(f"fio verifying crc32c {p.rw} bs={format_size(p.bs)} qd={p.iodepth}")
                drop_page_cache()
                job, vcmd = fio.run(p, args.filename, verify=True)
                vfy_jobs.append(job)
    progress.done()
    kv = median_job(kv_jobs)
    doc = results[0].to_json()
    doc["jobs"] = [kv]
    doc["kvtier"]["runs"] = kv_jobs
    if args.plot:
        from kvtier.bench.plots import latency_cdf

        lat = {f"kvtier {p.tier}": [x / 1e9 for r in results for x in
                                     (r.read.clat_ns if r.read.ios else r.write.clat_ns)]}
        doc["plot"] = str(latency_cdf(Path(args.plot) / f"latency_cdf_{p.tier}_{p.rw}_{p.bs}_qd{p.iodepth}.png",
                                      lat, title=f"{p.rw} {format_size(p.bs)} QD{p.iodepth}: completion latency"))
    text = format_job(kv, f"kvtier: (tier={p.tier}) rw={p.rw}, bs={format_size(p.bs)}, iodepth={p.iodepth}, "
                          f"numjobs={p.numjobs}, size={format_size(p.size)}, direct={int(p.direct)}, "
                          f"codec={p.codec}, path={p.path}, engine={p.engine}, buffers={p.ring_sets()}"
                          + (f" — median of {args.repeat} runs" if args.repeat > 1 else ""))
    if args.compare_fio:
        f = median_job(fio_jobs)
        table, ratio = compare_table(kv, f)
        doc["fio"] = {"version": fio.version(), "command": " ".join(cmd), "jobs": [f], "runs": fio_jobs}
        doc["ratio"] = ratio
        text += "\n\n" + format_job(f, f"fio: {' '.join(cmd[1:])}") + "\n\n" + table
    if args.fio_verify:
        v = median_job(vfy_jobs)
        vtable, vratio = compare_table(kv, v)
        doc["fio_verify"] = {"command": " ".join(vcmd), "jobs": [v], "runs": vfy_jobs, "ratio": vratio}
        text += ("\n\n" + format_job(v, f"fio verifying: {' '.join(vcmd[1:])}") + "\n\n"
                 + vtable.replace("kvtier vs fio", "kvtier vs fio verifying crc32c", 1))
    print(json.dumps(doc, indent=2) if args.output_format == "json" else text)
    return 0


class _StatusLine:
    """A throttled progress line on stderr (rewritten in place on a terminal)."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s, self.last, self.prefix = interval_s, 0.0, ""
        self.tty = sys.stderr.isatty()
        self.shown = False

    def __call__(self, msg: str) -> None:
        now = time.monotonic()
        if now - self.last < self.interval_s:
            return
        self.last = now
        sys.stderr.write(("\r\033[K" if self.tty else "") + self.prefix + msg + ("" if self.tty else "\n"))
        sys.stderr.flush()
        self.shown = True

    def done(self) -> None:
        if self.tty and self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()


SUBCOMMANDS: dict[str, SubCommand] = {
    "trace": SubCommand("replay an agentic trace against a tier configuration", configure_trace, run_trace),
    "io": SubCommand("fio-style reload benchmark of one tier (optionally next to fio)", configure_io, run_io),
}


if __name__ == "__main__":
    sys.exit(main())
