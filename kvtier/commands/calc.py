"""kvtier calc: KV bytes per token, for N tokens, and tokens that fit in each tier.

examples:
  kvtier calc --preset Llama-3-8B --tokens 128k --host 64GiB --ssd 2TiB
  kvtier calc --preset DeepSeek-V4-Pro --preset GLM-5 --preset Qwen3-235B-A22B \\
      --tokens 1M --kv-dtype fp8 --indexer-dtype bf16
  kvtier calc --config path/to/config.json --json

Sizes print in GiB (2^30 bytes) and GB (10^9 bytes), each labelled. Tier fits divide capacity by
the marginal bytes per token (DeepSeek-V4's per-sequence sliding window is not included).
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from kvtier.calc import (
    ATTENTION_LABELS,
    DTYPE_BITS,
    LAYOUTS,
    PRESETS,
    KVSize,
    Precision,
    kv_size,
    load_hf_config,
    preset,
)
from kvtier.commands import HelpFormatter
from kvtier.config import format_size, parse_size
from kvtier.errors import InvalidRequest

TIERS = ("device", "host", "ssd", "remote")
_TOKENS_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*$")
_TOKEN_UNITS = {"": 1, "k": 1_000, "m": 1_000_000, "g": 1_000_000_000}


def parse_tokens(value: str) -> int:
    """``1000000``, ``1,000,000``, ``128k``, ``1M`` (decimal units) -> an int; else InvalidRequest."""
    m = _TOKENS_RE.match(value.replace(",", "").replace("_", ""))
    if not m:
        raise InvalidRequest(f"malformed token count {value!r}: expected e.g. 4096, 128k or 1M")
    n = float(m.group(1)) * _TOKEN_UNITS[m.group(2).lower()]
    if n != int(n):
        raise InvalidRequest(f"token count {value!r} is not a whole number of tokens")
    return int(n)


def _arg(fn):
    """Wrap a kvtier parser so argparse reports its message as one usage error."""
    def parse(value: str):
        try:
            return fn(value)
        except InvalidRequest as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = fn.__name__
    return parse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("calc", help="KV-cache size calculator", description=__doc__,
                              formatter_class=HelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", action="append", metavar="NAME",
                     help="a built-in model (repeat to compare); see --list")
    src.add_argument("--config", metavar="PATH", help="a Hugging Face config.json file")
    src.add_argument("--list", action="store_true", help="list the presets and their sources")
    p.add_argument("--tokens", type=_arg(parse_tokens), default="1M", metavar="N",
                   help="sequence length; k and M are decimal (1M = 1,000,000)")
    dtypes = sorted(DTYPE_BITS)
    p.add_argument("--kv-dtype", default="bf16", choices=dtypes, help="KV storage dtype")
    p.add_argument("--indexer-dtype", default="bf16", choices=dtypes,
                   help="sparse-attention indexer key dtype")
    p.add_argument("--rope-dtype", default=None, choices=dtypes,
                   help="dtype of the RoPE dims of MLA/V4 entries (unset: --kv-dtype)")
    p.add_argument("--layout", default="latent", choices=LAYOUTS,
                   help="MLA: the cached latent (latent) or transformers' per-head K/V (hf-expanded)")
    for tier in TIERS:
        p.add_argument(f"--{tier}", type=_arg(parse_size), metavar="SIZE",
                       help=f"{tier} tier capacity, e.g. 64GiB")
    p.add_argument("--block-tokens", type=int, default=256, metavar="N", help="tokens per kvtier block")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    if args.list:
        for spec in PRESETS:
            sys.stdout.write(f"{spec.name:<18} {spec.family:<12} {spec.source}\n")
        return 0
    if args.block_tokens <= 0:
        raise InvalidRequest(f"--block-tokens must be > 0, got {args.block_tokens}")
    specs = [load_hf_config(args.config)] if args.config else [preset(n) for n in args.preset or ()]
    if not specs:
        raise InvalidRequest("give --preset NAME, --config PATH or --list")
    precision = Precision(kv=args.kv_dtype, indexer=args.indexer_dtype, rope=args.rope_dtype)
    tiers = {t: getattr(args, t) for t in TIERS if getattr(args, t) is not None}
    sizes = [kv_size(s, args.tokens, precision, args.layout) for s in specs]
    if args.json:
        out = [_as_json(k, s.source, tiers, args.block_tokens) for k, s in zip(sizes, specs, strict=True)]
        json.dump(out if len(out) > 1 else out[0], sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(_table(sizes, tiers, args.block_tokens))
    return 0


def _as_json(k: KVSize, source: str, tiers: dict[str, int], block_tokens: int) -> dict:
    d = k.to_dict()
    d["source"] = source
    d["block_tokens"] = block_tokens
    d["block_bytes"] = round(k.bytes_per_token * block_tokens)
    d["tiers"] = {t: {"capacity_bytes": c, "tokens": k.tokens_fit(c),
                      "blocks": k.tokens_fit(c) // block_tokens} for t, c in tiers.items()}
    return d


def _table(sizes: list[KVSize], tiers: dict[str, int], block_tokens: int) -> str:
    p = sizes[0].precision
    n = sizes[0].tokens
    lines = [f"KV cache for {n:,} token{'' if n == 1 else 's'} (KV {p.kv}, indexer {p.indexer}, "
             f"RoPE dims {p.rope or p.kv}; layout {sizes[0].layout}; "
             f"GiB = 2^30 bytes, GB = 10^9 bytes)"]
    head = ["model", "attention", "bytes/token", "total GiB", "total GB",
            f"{block_tokens}-token block"]
    head += [f"{t} {format_size(c)}: tokens" for t, c in tiers.items()]
    rows = [head]
    for k in sizes:
        row = [k.model, ATTENTION_LABELS[k.attention], f"{k.bytes_per_token:,.1f}", f"{k.total_bytes / 2**30:,.3f}",
               f"{k.total_bytes / 1e9:,.3f}", f"{k.bytes_per_token * block_tokens / 2**20:,.2f} MiB"]
        row += [f"{k.tokens_fit(c):,}" for c in tiers.values()]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip())
    if any(k.window_bytes for k in sizes):
        lines.append("total includes the per-sequence sliding window; bytes/token and tier fits "
                     "do not")
    return "\n".join(lines) + "\n"
