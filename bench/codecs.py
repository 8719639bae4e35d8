"""Codec benchmark: ratio, encode/decode GB/s and error of each codec on real model KV.

KV comes from a randomly initialised Llama-architecture decoder (realistic statistics: RoPE'd
keys with per-channel structure, values per token), one 256-token block, all layers.

``--copies`` measures instead the byte copies a reload makes: each of a block's 64 tensors (a
Llama-3-8B block: K and V of 32 layers, 512 KiB each at 256 tokens, 32 KiB at 16) copied out of
the block with torch's ``copy_`` (torch's intra-op threads) and with ``kvtier.bytecopy`` (numpy
memcpy), interleaved copy by copy, while ``--busy`` processes keep cores busy: per-copy and
per-block medians and p99.

    python -m kvtier.bench.codecs [--tokens 256] [--repeats 5]
    python -m kvtier.bench.codecs --copies [--copy-bytes 512KiB] [--rounds 20] [--busy 2]
"""

from __future__ import annotations

import argparse
import functools
import time

import torch

from kvtier.bench.common import median, p99, table, timed
from kvtier.bench.host_tier import busy_cores
from kvtier.block import decode_block_into, encode_block, encode_block_pooled
from kvtier.bytecopy import copy_bytes
from kvtier.codecs import available_codecs, get_codec
from kvtier.config import parse_size


def model_kv(tokens: int) -> list[tuple[torch.Tensor, ...]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvtier.integrations.transformers import dynamic_cache_to_kv

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=8192)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        pkv = model(torch.randint(0, 4096, (1, tokens)), use_cache=True).past_key_values
    return [tuple(t.contiguous().to(torch.bfloat16) for t in layer) for layer in dynamic_cache_to_kv(pkv)]


def run(tokens: int = 256, repeats: int = 5) -> str:
    kv = model_kv(tokens)
    raw = sum(t.numel() * t.element_size() for layer in kv for t in layer)
    rows = []
    for spec in available_codecs():
        codec = get_codec(spec)
        data = encode_block(codec, kv)
        enc = timed(functools.partial(encode_block_pooled, codec, kv), repeats)  # the put path's form
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        outs = [[torch.empty_like(t) for t in layer] for layer in kv]
        dec = timed(functools.partial(decode_block_into, buf, outs), repeats)
        err = max(((a.float() - b.float()).pow(2).mean().sqrt() / a.float().pow(2).mean().sqrt()).item()
                  for la, lb in zip(kv, outs, strict=True) for a, b in zip(la, lb, strict=True))
        rows.append([spec, raw / len(data), raw / median(enc) / 1e9, raw / median(dec) / 1e9, f"{err:.4f}"])
    head = f"codec benchmark: {tokens}-token block, {len(kv)} layers, bf16, {raw / 2**20:.2f} MiB raw; medians of {repeats}"
    return head + "\n" + table(["codec", "ratio", "encode GB/s", "decode GB/s", "rel. RMS error"], rows)


def copies(nbytes: int, rounds: int, busy: int, count: int = 64) -> str:
    """Per-copy and per-block times of ``count`` copies of ``nbytes`` out of one block."""
    def block_and_dest():
        src = torch.randint(0, 256, (count * nbytes,), dtype=torch.uint8)
        return src, [torch.empty(nbytes // 2, dtype=torch.bfloat16) for _ in range(count)]

    ways = {"torch copy_": lambda d, s: d.view(-1).view(torch.uint8).copy_(s, non_blocking=True),
            "kvtier.bytecopy": copy_bytes}
    bufs = {name: block_and_dest() for name in ways}
    per: dict[str, list[float]] = {name: [] for name in ways}
    blocks: dict[str, list[float]] = {name: [] for name in ways}
    spinners = busy_cores(busy)
    try:
        for r in range(rounds + 1):  # round 0 warms up
            totals = dict.fromkeys(ways, 0.0)
            for k in range(count):
                order = list(ways) if k % 2 else list(ways)[::-1]
                for name in order:
                    src, dest = bufs[name]
                    t0 = time.perf_counter()
                    ways[name](dest[k], src[k * nbytes:(k + 1) * nbytes])
                    dt = time.perf_counter() - t0
                    totals[name] += dt
                    if r:
                        per[name].append(dt)
            if r:
                for name in ways:
                    blocks[name].append(totals[name])
    finally:
        for s in spinners:
            s.terminate()
            s.wait()
    rows = [[name, median(per[name]) * 1e6, p99(per[name]) * 1e6, median(blocks[name]) * 1e3,
             p99(blocks[name]) * 1e3] for name in ways]
    head = (f"byte copies: {count} copies of {nbytes / 1024:.0f} KiB per block, torch threads "
            f"{torch.get_num_threads()}, {busy} busy process(es); {rounds} rounds interleaved copy by copy")
    return head + "\n" + table(["path", "per copy median us", "per copy p99 us", "per block median ms",
                                "per block p99 ms"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--copies", action="store_true", help="measure the reload's byte copies instead")
    ap.add_argument("--copy-bytes", default="512KiB")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--busy", type=int, default=0, help="processes to keep cores busy during --copies")
    a = ap.parse_args()
    print(copies(parse_size(a.copy_bytes), a.rounds, a.busy) if a.copies else run(a.tokens, a.repeats))


if __name__ == "__main__":
    main()
