"""Codec benchmark: ratio, encode/decode GB/s and error of each codec on real model KV.

KV comes from a randomly initialised Llama-architecture decoder (realistic statistics: RoPE'd
keys with per-channel structure, values per token), one 256-token block, all layers.

    python -m kvtier.bench.codecs [--tokens 256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import functools

import torch

from kvtier.bench.common import median, table, timed
from kvtier.block import decode_block_into, encode_block
from kvtier.codecs import available_codecs, get_codec


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
        enc = timed(functools.partial(encode_block, codec, kv), repeats)
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        outs = [[torch.empty_like(t) for t in layer] for layer in kv]
        dec = timed(functools.partial(decode_block_into, buf, outs), repeats)
        err = max(((a.float() - b.float()).pow(2).mean().sqrt() / a.float().pow(2).mean().sqrt()).item()
                  for la, lb in zip(kv, outs, strict=True) for a, b in zip(la, lb, strict=True))
        rows.append([spec, raw / len(data), raw / median(enc) / 1e9, raw / median(dec) / 1e9, f"{err:.4f}"])
    head = f"codec benchmark: {tokens}-token block, {len(kv)} layers, bf16, {raw / 2**20:.2f} MiB raw; medians of {repeats}"
    return head + "\n" + table(["codec", "ratio", "encode GB/s", "decode GB/s", "rel. RMS error"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    print(run(a.tokens, a.repeats))


if __name__ == "__main__":
    main()
