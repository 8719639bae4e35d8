"""Host tier benchmark: put and get GB/s against a plain torch copy of the same bytes.

Both sides copy the same block between the same kinds of buffers in the same run; the ratio is
what the host tier's bookkeeping costs (target: get >= 70% of the plain copy).

    python -m kvtier.bench.host_tier [--block 2MiB] [--blocks 64] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os

import torch

from kvtier.bench.common import median, p99, table, timed
from kvtier.config import HostTierConfig, parse_size
from kvtier.tiers.base import BlockMeta
from kvtier.tiers.memory import make_host_tier

META = BlockMeta("bench", None, 256, "none", 0.0)


def interleaved(fns, repeats: int) -> list[list[float]]:
    """Time each function once per pass, round-robin, so machine noise hits all alike."""
    for fn in fns:
        fn()  # warm-up: fault the pages in
    out: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            out[i] += timed(fn, 1, warmup=0)
    return out


def run(block: int, blocks: int, repeats: int) -> str:
    tier = make_host_tier(HostTierConfig(capacity_bytes=block * blocks * 2, page_bytes=max(block, 4 << 20)))
    src = [torch.frombuffer(bytearray(os.urandom(block)), dtype=torch.uint8) for _ in range(blocks)]
    dst = torch.empty(block, dtype=torch.uint8)
    plain_store = torch.empty(block * blocks, dtype=torch.uint8)
    keys = [i.to_bytes(16, "little") for i in range(blocks)]

    def put_all():
        for k in keys:
            tier.delete(k)
        for k, s in zip(keys, src, strict=True):
            tier.put(k, s, META)

    def get_all():
        for k in keys:
            tier.read_into(k, dst)

    def plain_put():
        for i, s in enumerate(src):
            plain_store[i * block:(i + 1) * block].copy_(s)

    def plain_get():
        for i in range(blocks):
            dst.copy_(plain_store[i * block:(i + 1) * block])

    store_np, dst_np = plain_store.numpy(), dst.numpy()

    def memcpy_put():
        for i, s in enumerate(src):
            store_np[i * block:(i + 1) * block] = s.numpy()

    def memcpy_get():
        for i in range(blocks):
            dst_np[:] = store_np[i * block:(i + 1) * block]

    total = block * blocks
    rows, ratios = [], {}
    for name, fns in (("put", (put_all, plain_put, memcpy_put)), ("get", (get_all, plain_get, memcpy_get))):
        t, b, m = interleaved(fns, repeats)
        best = min(median(b), median(m))
        ratios[name] = best / median(t)
        rows.append([name, total / median(t) / 1e9, total / p99(t) / 1e9, total / median(b) / 1e9,
                     total / median(m) / 1e9, f"{ratios[name]:.0%}"])
    head = (f"host tier: {blocks} blocks of {block / 2**20:.2f} MiB, pinned={tier.pinned}; "
            f"medians (and p99) of {repeats} interleaved passes")
    return head + "\n" + table(["op", "kvtier GB/s", "kvtier GB/s @p99", "torch copy_ GB/s", "numpy memcpy GB/s",
                        "kvtier / best plain"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block", default="2MiB")
    ap.add_argument("--blocks", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    print(run(parse_size(a.block), a.blocks, a.repeats))


if __name__ == "__main__":
    main()
