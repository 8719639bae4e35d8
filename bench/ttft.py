"""Time to first token with a transformers decoder: recompute vs host hit vs SSD hit (serial / pipelined).

For each prompt length: a full recompute; a hit served from host memory (pipelined loader); a hit
on SSD loaded serially (``TieredCache.get``, then the forward pass); a hit on SSD with the
pipelined dual-path loader. The overlap of the pipelined SSD hit is reported against the load
alone and the compute alone, measured in the same run:
``efficiency = (load + compute - pipelined) / min(load, compute)``.

    python -m kvtier.bench.ttft --prompts 2048 8192 16384 --runs 3

Medians of ``--runs`` runs; a Markdown table on stdout and a PNG in bench/out/.

``--turns N`` runs an agentic session instead: a ``--prompts[0]``-token context that grows by
``--turn-tokens`` each turn, every turn prefilled through the cost model from the host tier and
saved back, and timed against a full recompute of the same context. Reported: the cached/recompute
TTFT ratio per turn (median, p99, worst), the least share of a turn's context reloaded, and the
cost model's decisions.

    python -m kvtier.bench.ttft --turns 20 --prompts 8192 --turn-tokens 200
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kvtier import CacheConfig, HostTierConfig, TieredCache
from kvtier.bench.common import p99, table
from kvtier.config import SSDTierConfig, parse_size
from kvtier.integrations.transformers import kv_to_dynamic_cache, loader_for, prefill, save_kv
from kvtier.keys import TokenIds
from kvtier.manager import KVOut

log = logging.getLogger("kvtier.bench.ttft")
BLOCK = 256
SUFFIX = 64  # uncached tokens at the end of each prompt (the new user turn)


def make_model(hidden: int, layers: int, heads: int, kv_heads: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=32768)
    return LlamaForCausalLM(cfg).eval()


def med(fn, runs: int) -> float:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def _hit(cache: TieredCache, ids: TokenIds) -> tuple[KVOut, int]:
    """The cached prefix of ``ids``, which must be cached."""
    kv, n = cache.get("b", ids)
    assert kv is not None, "the prefix was stored just before"
    return kv, n


def bench_prompt(model, n: int, runs: int, root: Path) -> dict:
    prompt = torch.randint(0, 32000, (n,), generator=torch.Generator().manual_seed(n))
    prefix = prompt[: n - SUFFIX]
    ids = prompt.unsqueeze(0)
    kv_bytes = 0
    res: dict = {"tokens": n}
    with torch.no_grad():
        res["recompute"] = med(lambda: model(ids, use_cache=True, logits_to_keep=1), runs)
        out = model(prefix.unsqueeze(0), use_cache=True)
    host_cfg = CacheConfig(block_tokens=BLOCK, host=HostTierConfig(capacity_bytes=parse_size("2GiB")))
    with TieredCache(host_cfg) as cache:
        save_kv(cache, "b", prefix, out.past_key_values)
        res["host_hit"] = med(lambda: prefill(model, cache, "b", prompt, cost_check=False, logits_to_keep=1), runs)
    ssd_cfg = CacheConfig(block_tokens=BLOCK, host=HostTierConfig(capacity_bytes=0), promote_on_get=False,
                          ssd=SSDTierConfig(path=str(root / f"ssd{n}"), capacity_bytes=parse_size("8GiB"), min_free_bytes=0,
                                            durability="none"))
    with TieredCache(ssd_cfg) as cache, torch.no_grad():
        save_kv(cache, "b", prefix, out.past_key_values)
        cache.flush()
        hit = cache.lookup("b", prompt[:-1])
        kv_bytes = sum(t.numel() * t.element_size() for layer in _hit(cache, prefix)[0] for t in layer)

        def serial():
            kv, m = _hit(cache, prompt[:-1])
            model(ids[:, m:], past_key_values=kv_to_dynamic_cache(kv), use_cache=True, logits_to_keep=1)

        res["ssd_serial"] = med(serial, runs)
        res["ssd_pipelined"] = med(lambda: prefill(model, cache, "b", prompt, cost_check=False, logits_to_keep=1), runs)
        loader = loader_for(cache)

        def load_only():
            lease = cache.acquire("b", prompt[:-1])
            try:
                ns = lease.namespace
                assert ns is not None and ns.layout is not None
                loader.load(lease, ns.layout.empty(lease.tokens)).wait_all()
            finally:
                cache.release(lease)

        kv, m = _hit(cache, prompt[:-1])
        res["load"] = med(load_only, runs)
        res["compute"] = med(lambda: model(ids[:, m:], past_key_values=kv_to_dynamic_cache(kv), use_cache=True, logits_to_keep=1), runs)
        res["hit_tokens"] = hit.tokens
    load, compute, piped = res["load"], res["compute"], res["ssd_pipelined"]
    res["overlap_efficiency"] = (load + compute - piped) / min(load, compute)
    res["pipelined_over_max"] = piped / max(load, compute)
    res["kv_mib"] = kv_bytes / 2**20
    return res


def bench_turns(model, context: int, turns: int, turn_tokens: int) -> dict:
    """One agentic session of ``turns`` turns after a first, uncached one (see the module docstring)."""
    gen = torch.Generator().manual_seed(context)
    ids = torch.randint(0, 32000, (context - turn_tokens,), generator=gen)
    ratios, reused = [], []
    cfg = CacheConfig(block_tokens=BLOCK, host=HostTierConfig(capacity_bytes=parse_size("4GiB")))
    with TieredCache(cfg) as cache, torch.no_grad():
        for turn in range(turns + 1):
            ids = torch.cat([ids, torch.randint(0, 32000, (turn_tokens,), generator=gen)])
            res = prefill(model, cache, "agent", ids, logits_to_keep=1)
            if turn:
                t0 = time.perf_counter()
                model(ids.unsqueeze(0), use_cache=True, logits_to_keep=1)
                ratios.append(res.seconds / (time.perf_counter() - t0))
                reused.append(res.cached_tokens / (len(ids) - 1))
                log.info("turn %d: %d tokens, %.0f%% reloaded, cached/recompute %.3f",
                         turn, len(ids), 100 * reused[-1], ratios[-1])
            save_kv(cache, "agent", ids, res.past_key_values)
        decisions = dict(cache.stats().cost_decisions)
    return {"turns": turns, "first_tokens": context, "last_tokens": len(ids),
            "ratio_median": statistics.median(ratios), "ratio_p99": p99(ratios), "ratio_worst": max(ratios),
            "least_reloaded": min(reused), "decisions": decisions}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, nargs="+", default=[2048, 8192, 16384])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--out", default=str(Path(__file__).parent / "out"))
    p.add_argument("--data-dir", default=None, help="where the SSD tier lives (default: a temp dir)")
    p.add_argument("--turns", type=int, default=0,
                   help="run an agentic session of this many turns instead (context: the first --prompts)")
    p.add_argument("--turn-tokens", type=int, default=200, help="tokens each turn appends (with --turns)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = make_model(args.hidden, args.layers, args.heads, args.kv_heads)
    if args.turns > 0:
        r = bench_turns(model, args.prompts[0], args.turns, args.turn_tokens)
        print(f"model: hidden {args.hidden}, {args.layers} layers, {args.heads} heads / {args.kv_heads} KV heads; "
              f"{r['turns']} turns of {args.turn_tokens} tokens, {r['first_tokens']} -> {r['last_tokens']} tokens; "
              f"cost model decisions {r['decisions']}")
        cols = ["ratio_median", "ratio_p99", "ratio_worst", "least_reloaded"]
        print(table(["TTFT cached/recompute, median", "p99", "worst", "least share reloaded"],
                    [[round(r[c], 3) for c in cols]]))
        return
    rows = []
    with tempfile.TemporaryDirectory(dir=args.data_dir) as tmp:
        for n in args.prompts:
            r = bench_prompt(model, n, args.runs, Path(tmp))
            log.info("%s", r)
            rows.append(r)
    cols = ["tokens", "kv_mib", "recompute", "host_hit", "ssd_serial", "ssd_pipelined", "load", "compute",
            "pipelined_over_max", "overlap_efficiency"]
    print(f"model: hidden {args.hidden}, {args.layers} layers, {args.heads} heads / {args.kv_heads} KV heads, "
          f"float32, block {BLOCK} tokens, {SUFFIX} uncached tokens; medians of {args.runs} runs (seconds)")
    print(table(cols, [[r[c] for c in cols] for r in rows]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    modes = ["recompute", "host_hit", "ssd_serial", "ssd_pipelined"]
    width = 0.2
    for j, mode in enumerate(modes):
        ax.bar([i + j * width for i in range(len(rows))], [r[mode] for r in rows], width, label=mode)
    ax.set_xticks([i + 1.5 * width for i in range(len(rows))], [f"{r['tokens']} tok" for r in rows])
    ax.set_ylabel("time to first token (s)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("kvtier TTFT (median)")
    fig.tight_layout()
    fig.savefig(out / "ttft.png", dpi=120)
    log.info("wrote %s", out / "ttft.png")


if __name__ == "__main__":
    main()
