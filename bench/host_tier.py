"""Host tier benchmark: the tier + codec paths of a put and a reload against a plain memcpy.

Llama-3-8B-shaped KV (32 layers, K and V ``[tokens, 8, 128]`` bf16: 2 MiB blocks are 16-token
pages, 32 MiB blocks 256 tokens), codec ``none``, a prefix of ``--prefix`` bytes per pass. The
source is one tensor per layer and K/V, as a model hands them over; the destination is
pre-allocated by ``KVLayout.empty``, as a reload allocates it.

- put: ``PrefixKV.prepare(i)`` written straight into the block's host slot
  (``MemoryTier.put_with``): each layer copied and checksummed in one pass (``kvtier._fastcopy``);
- put in two passes: the same with ``kvtier.block.ONE_PASS_COPY`` off (a numpy copy, then
  crc32c over it: what a put does where ``kvtier._fastcopy`` is not built);
- put via a pooled buffer: ``encode_block_pooled`` then ``MemoryTier.put`` (two copies, what the
  manager did before ``put_with``);
- get: ``PrefixKV.decode(i, tier.view(key))``, verify off (memory tiers hold bytes verified on
  their way in), and on; and verify off with numpy's strided copies (``kvtier._fastcopy`` not
  built: its ``copy_runs`` streams its stores past the cache);
- get per tensor: ``decode_block_into(tier.view(key), views)`` (one memmove per tensor);
- get with torch ``copy_``: the same per-tensor copies through torch (kvtier's decode before);
- plain gather: the block's bytes copied out of the same per-layer tensors into pre-allocated
  memory (one ``np.concatenate`` of its 64 slices, no checksum): what the source's layout alone
  costs a put;
- plain: one numpy memcpy per block of the same number of bytes between pre-allocated buffers
  (the reference: "a plain copy"); beside it the same memcpy with streaming stores
  (``copy_runs``), the machine's limit for a copy;
- the calls a user makes, per round on the whole prefix: ``TieredCache.put`` into a host-only
  cache (fresh token ids, evicted after) and ``TieredCache.get_into`` the destination, each
  also without ``kvtier._fastcopy``, and ``get_into`` KV that is a tensor per layer and K/V, each
  its own allocation (a model's own cache), against one memcpy of the whole prefix's bytes (and one
  with streaming stores); the put of ``[tokens, heads, dim]`` views of ``[heads, tokens, dim]``
  tensors (what ``save_kv`` hands over from a transformers DynamicCache); and the put with one
  block per copy (``kvtier.writes``'
  ``SLOTS_WINDOW_BYTES`` at 1: a new read stream per tensor and block, placed one by one);
  and the same bytes as engine pages of the block's size (what the vLLM and SGLang connectors
  store): ``TieredCache.put_blocks`` of fresh keys (evicted after) and ``get_blocks_into`` a
  pre-allocated ``[pages, page_bytes]`` tensor.

Paths are interleaved block by block (in each round, every path moves block i before any moves
block i+1) so machine noise hits all alike; GB/s and its ratio to plain are medians over rounds
of the round's total, beside the median and p99 of per-block times. The calls on the whole
prefix run one after another in each round; their ratio is the median over rounds of the
round's ratio to that round's memcpy (paired, as ``io_compare``'s). ``--busy N`` keeps N cores
busy with spinning processes for the run, as on a serving host (acceptance: get >= 0.8x plain,
put >= 0.7x).

    python -m kvtier.bench.host_tier [--block 2MiB] [--prefix 256MiB] [--rounds 7] [--busy 1]
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

import kvtier.block as block_mod
import kvtier.prefixkv as prefixkv_mod
import kvtier.writes as writes_mod
from kvtier.bench.common import median, p99, table
from kvtier.block import decode_block_into, encode_block_pooled, parse_header
from kvtier.bytecopy import copy_bytes
from kvtier.codecs import get_codec
from kvtier.config import CacheConfig, HostTierConfig, parse_size
from kvtier.layout import KVLayout
from kvtier.manager import TieredCache
from kvtier.prefixkv import PrefixKV
from kvtier.tiers.base import BlockMeta
from kvtier.tiers.memory import make_host_tier

META = BlockMeta("bench", None, 256, "none", 0.0)
LAYERS, HEADS, DIM = 32, 8, 128  # Llama-3-8B: 128 KiB of bf16 KV per token
TOKEN_BYTES = LAYERS * 2 * HEADS * DIM * 2


def busy_cores(n: int) -> list[subprocess.Popen]:
    """``n`` processes spinning on a core each (the caller terminates them)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


class Path:
    """One path: per-round seconds (the sum of its blocks' times) and per-block seconds."""

    def __init__(self, name: str, block: Callable[[int], object]):
        self.name, self.block = name, block
        self.rounds: list[float] = []
        self.blocks: list[float] = []


def interleaved(paths: list[Path], n: int, rounds: int, setup: Callable[[], object]) -> None:
    """``rounds`` rounds; in each, step by step, every path moves one block: a preemption or a
    noisy neighbour hits all paths alike instead of one whole pass. At each step the paths move
    blocks far apart (path k block ``i + k n / paths``), so none finds another's bytes in cache."""
    for r in range(rounds + 1):  # round 0 warms up: faults every page in
        setup()
        totals = [0.0] * len(paths)
        for i in range(n):
            for k, p in enumerate(paths):
                b = (i + k * n // len(paths)) % n
                t0 = time.perf_counter()
                p.block(b)
                dt = time.perf_counter() - t0
                totals[k] += dt
                if r:
                    p.blocks.append(dt)
        if r:
            for p, t in zip(paths, totals, strict=True):
                p.rounds.append(t)


@contextlib.contextmanager
def numpy_only() -> Iterator[None]:
    """Puts and reloads with numpy's copies meanwhile (a put in two passes, a copy then crc32c;
    a reload's strided copies with cached stores): what they do where ``kvtier._fastcopy`` is
    not built, measured in the same run as with it."""
    one_pass, block_mod.ONE_PASS_COPY = block_mod.ONE_PASS_COPY, False
    runs, prefixkv_mod.copy_runs = prefixkv_mod.copy_runs, None
    try:
        yield
    finally:
        block_mod.ONE_PASS_COPY, prefixkv_mod.copy_runs = one_pass, runs


def streamed_copy(dst: np.ndarray, src: np.ndarray) -> None:
    """A memcpy with streaming stores (``kvtier.bytecopy.copy_bytes``, streamed where
    ``kvtier._fastcopy`` is built): the machine's own limit for a copy, beside numpy's plain one."""
    copy_bytes(torch.from_numpy(dst), torch.from_numpy(src))


def run(block: int, prefix: int, rounds: int, busy: int) -> str:
    bt = max(1, block // TOKEN_BYTES)
    n = max(1, prefix // (bt * TOKEN_BYTES))
    g = torch.Generator().manual_seed(0)
    src = [tuple(torch.randn(n * bt, HEADS, DIM, generator=g).to(torch.bfloat16) for _ in range(2))
           for _ in range(LAYERS)]
    dest = KVLayout(LAYERS, ((HEADS, DIM), (HEADS, DIM)), "bfloat16").empty(n * bt)
    codec = get_codec("none")
    source, target = PrefixKV(src, bt), PrefixKV(dest, bt)
    nbytes = source.prepare(0, codec).nbytes
    kv_bytes = bt * TOKEN_BYTES
    tier = make_host_tier(HostTierConfig(capacity_bytes=3 * n * nbytes + (64 << 20)))
    keys = [i.to_bytes(16, "little") for i in range(n)]
    pooled_keys = [(n + i).to_bytes(16, "little") for i in range(n)]
    two_pass_keys = [(2 * n + i).to_bytes(16, "little") for i in range(n)]
    store = np.empty(n * kv_bytes, np.uint8)
    src_plain = np.frombuffer(np.random.default_rng(0).bytes(n * kv_bytes), np.uint8).copy()
    dst_plain = np.empty(n * kv_bytes, np.uint8)

    def clear():
        for k in keys + pooled_keys + two_pass_keys:
            tier.delete(k)

    def put(i, keys=keys):
        b = source.prepare(i, codec)
        tier.put_with(keys[i], b.nbytes, b.write_into, META)

    def put_two_passes(i):
        with numpy_only():
            put(i, two_pass_keys)

    def put_pooled(i):
        tier.put(pooled_keys[i], encode_block_pooled(codec, source.views(i)), META)

    def get(i, verify=False):
        target.decode(i, tier.view(keys[i]), verify=verify)

    def get_numpy(i):
        with numpy_only():
            get(i)

    def get_per_tensor(i):
        decode_block_into(tier.view(keys[i]), target.views(i), verify=False)

    def get_torch(i):
        data = tier.view(keys[i])
        h = parse_header(data)
        for e, outs in zip(h.layers, target.views(i), strict=True):
            at = e.offset
            for out in outs:
                k = out.numel() * out.element_size()
                out.view(-1).view(torch.uint8).copy_(data[at: at + k], non_blocking=True)
                at += k

    flat_src = [t.reshape(-1).view(torch.uint8).numpy() for layer in src for t in layer]
    gathered = np.empty(n * kv_bytes, np.uint8)
    per_tensor = kv_bytes // len(flat_src)

    def plain_gather(i):
        np.concatenate([f[i * per_tensor:(i + 1) * per_tensor] for f in flat_src],
                       out=gathered[i * kv_bytes:(i + 1) * kv_bytes])

    def plain_put(i):
        np.copyto(store[i * kv_bytes:(i + 1) * kv_bytes], src_plain[i * kv_bytes:(i + 1) * kv_bytes])

    def plain_get(i):
        np.copyto(dst_plain[i * kv_bytes:(i + 1) * kv_bytes], store[i * kv_bytes:(i + 1) * kv_bytes])

    def streamed_put(i):
        streamed_copy(store[i * kv_bytes:(i + 1) * kv_bytes], src_plain[i * kv_bytes:(i + 1) * kv_bytes])

    def streamed_get(i):
        streamed_copy(dst_plain[i * kv_bytes:(i + 1) * kv_bytes], store[i * kv_bytes:(i + 1) * kv_bytes])

    puts = [Path("put: PrefixKV.prepare + put_with", put),
            Path("put: the same, numpy's two passes (a copy, then crc32c)", put_two_passes),
            Path("put: encode_block_pooled + put", put_pooled),
            Path("plain gather of the same tensors (put)", plain_gather),
            Path("memcpy with streaming stores (put)", streamed_put),
            Path("plain memcpy (put)", plain_put)]
    gets = [Path("get: PrefixKV.decode(view), verify off", get),
            Path("get: PrefixKV.decode(view), verify on", lambda i: get(i, True)),
            Path("get: the same, numpy's copies (verify off)", get_numpy),
            Path("get: decode_block_into, a memmove per tensor", get_per_tensor),
            Path("get: torch copy_ per tensor (before)", get_torch),
            Path("memcpy with streaming stores (get)", streamed_get),
            Path("plain memcpy (get)", plain_get)]
    assert target._strided is not None  # KVLayout.empty: the strided reload applies
    cache = TieredCache(CacheConfig(block_tokens=bt, host=HostTierConfig(capacity_bytes=4 * n * nbytes + (64 << 20))))
    fresh = iter(range(1, 1 << 30))

    def fresh_put(put: Callable[[list], object], evict: Callable[[list], object],
                  ids_from: Callable[[int], list]) -> float:
        """Seconds ``put`` takes for ids never stored before (evicted, untimed, after)."""
        ids = ids_from(next(fresh) * 10**7)
        t0 = time.perf_counter()
        put(ids)
        dt = time.perf_counter() - t0
        evict(ids)
        return dt

    def cache_put():
        return fresh_put(lambda ids: cache.put("bench", ids, src), lambda ids: cache.evict("bench", ids),
                         lambda base: list(range(base, base + n * bt)))

    def cache_put_two_passes():
        with numpy_only():
            return cache_put()

    heads_first = [tuple(t.transpose(0, 1).contiguous() for t in layer) for layer in src]
    transposed = [tuple(t.transpose(0, 1) for t in layer) for layer in heads_first]  # as save_kv hands them

    def cache_put_transposed():
        return fresh_put(lambda ids: cache.put("bench", ids, transposed), lambda ids: cache.evict("bench", ids),
                         lambda base: list(range(base, base + n * bt)))

    def cache_put_one_by_one():
        window, writes_mod.SLOTS_WINDOW_BYTES = writes_mod.SLOTS_WINDOW_BYTES, 1
        try:
            return cache_put()
        finally:
            writes_mod.SLOTS_WINDOW_BYTES = window

    def cache_get_into():
        return _timed(lambda: cache.get_into("bench", prefix_ids, dest))

    def cache_get_into_numpy():
        with numpy_only():
            return cache_get_into()

    apart = [tuple(torch.empty_like(t) for t in layer) for layer in src]  # a tensor each, as a model's cache

    def cache_get_into_apart():
        return _timed(lambda: cache.get_into("bench", prefix_ids, apart))

    pages = torch.from_numpy(src_plain).view(n, kv_bytes)  # engine pages of the block's size
    page_out = torch.from_numpy(dst_plain).view(n, kv_bytes)
    cache.register_block_namespace("pages", page_bytes=kv_bytes, fingerprint={"bench": "host_tier"})
    page_keys = [i.to_bytes(8, "big") for i in range(n)]

    def cache_put_blocks():
        return fresh_put(lambda keys: cache.put_blocks("pages", keys, pages),
                         lambda keys: cache.evict_blocks("pages", keys),
                         lambda base: [(base + i).to_bytes(8, "big") for i in range(n)])

    def cache_get_blocks_into():
        t0 = time.perf_counter()
        got = cache.get_blocks_into("pages", page_keys, page_out)
        dt = time.perf_counter() - t0
        assert got == n, got
        return dt

    prefix_ids = list(range(n * bt))
    whole = {"TieredCache.put of the prefix": cache_put,
             "TieredCache.put, numpy's two passes": cache_put_two_passes,
             "TieredCache.put, one block per copy": cache_put_one_by_one,
             "TieredCache.put of transposed views (save_kv's)": cache_put_transposed,
             "TieredCache.get_into the prefix": cache_get_into,
             "TieredCache.get_into, numpy's copies": cache_get_into_numpy,
             "TieredCache.get_into a tensor per layer and K/V": cache_get_into_apart,
             "TieredCache.put_blocks, engine pages of the block's size": cache_put_blocks,
             "TieredCache.get_blocks_into the same pages": cache_get_blocks_into,
             "memcpy of the prefix with streaming stores": lambda: _timed(lambda: streamed_copy(dst_plain, src_plain)),
             "plain memcpy of the prefix": lambda: _timed(lambda: np.copyto(dst_plain, src_plain))}
    spinners = busy_cores(busy)
    try:
        interleaved(puts, n, rounds, clear)
        interleaved(gets, n, rounds, lambda: None)
        cache.put("bench", prefix_ids, src)
        cache.put_blocks("pages", page_keys, pages)
        calls: dict[str, list[float]] = {k: [] for k in whole}
        for r in range(rounds + 1):
            for k, f in whole.items():
                dt = f()
                if r:
                    calls[k].append(dt)
    finally:
        cache.close()
        for s in spinners:
            s.terminate()
            s.wait()
    rows = []
    for group in (puts, gets):
        plain, plain_block = median(group[-1].rounds), median(group[-1].blocks)
        for p in group:
            m = median(p.rounds)
            rows.append([p.name, n * kv_bytes / m / 1e9, f"{plain / m:.2f}", median(p.blocks) * 1e3,
                         p99(p.blocks) * 1e3, f"{plain_block / median(p.blocks):.2f}"])
    plains = calls["plain memcpy of the prefix"]
    for k, xs in calls.items():  # the ratio: the median over rounds of the round's (paired) ratio
        ratio = median([p / x for p, x in zip(plains, xs, strict=True)])
        rows.append([k, n * kv_bytes / median(xs) / 1e9, f"{ratio:.2f}", "", "", ""])
    head = (f"host tier: {n} blocks of {bt} tokens ({kv_bytes / 2**20:.0f} MiB of KV, {nbytes} B encoded), "
            f"codec none, pinned={tier.pinned}, one-pass copy+crc={block_mod.ONE_PASS_COPY}, "
            f"{busy} core(s) kept busy; medians of {rounds} interleaved "
            f"rounds, per-block p99")
    return head + "\n" + table(["path", "GB/s (KV bytes)", "x plain", "per block ms", "p99 ms",
                                "x plain (per block)"], rows)


def _timed(f: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block", default="2MiB", help="KV bytes per block (16 tokens = 2 MiB)")
    ap.add_argument("--prefix", default="256MiB", help="KV bytes per pass")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--busy", type=int, default=1, help="cores to keep busy during the run")
    a = ap.parse_args()
    print(run(parse_size(a.block), parse_size(a.prefix), a.rounds, a.busy))


if __name__ == "__main__":
    main()
