"""Helper process for the SSD tier's crash and restart tests (tests/test_ssd_*.py).

Blocks are deterministic functions of (seed, index), so the test process can regenerate what a
child wrote. Modes:

- ``python ssd_child.py zygote``: import everything once, print ``ready``, then for each stdin
  line ``trial DIR ACKFILE SEED`` fork a worker that puts blocks with durability ``sync`` and
  appends ``SEED INDEX`` to ACKFILE after each put returns; prints ``pid N`` then, once the
  worker is gone (the test SIGKILLs it), ``exit N STATUS``. Forking saves the ~2 s torch import
  per trial.
- ``python ssd_child.py verify DIR SEED COUNT``: open DIR and check blocks 0..COUNT-1 are all
  hits and bit-exact; prints ``ok COUNT`` and exits 0, else prints the problem and exits 1.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kvtier.block import encode_block  # noqa: E402
from kvtier.codecs import get_codec  # noqa: E402
from kvtier.config import SSDTierConfig  # noqa: E402
from kvtier.tiers.base import BlockMeta  # noqa: E402
from kvtier.tiers.ssd import SSDTier  # noqa: E402

HEADS, DIM = 2, 64  # one token of one layer is 2 x 2 x 64 fp16 = 512 bytes


def block_key(seed: int, i: int) -> bytes:
    return hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=16).digest()


def make_block(seed: int, i: int, min_bytes: int = 4096, max_bytes: int = 4 << 20) -> bytes:
    """An encoded block (codec ``none``) of random fp16 K/V, size log-uniform in the range."""
    rng = random.Random(seed * 1_000_003 + i)
    layers = rng.randint(2, 4)
    target = math.exp(rng.uniform(math.log(min_bytes), math.log(max_bytes)))
    tokens = max(1, int(target / (512 * layers)))
    gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
    kv = [[torch.randn(tokens, HEADS, DIM, generator=gen, dtype=torch.float16) for _ in range(2)]
          for _ in range(layers)]
    return encode_block(get_codec("none"), kv)


def meta_for(i: int, parent: bytes | None = None, namespace: str = "test") -> BlockMeta:
    return BlockMeta(namespace, parent, 16, "none", time.time())


def crash_config(path: str) -> SSDTierConfig:
    return SSDTierConfig(path=path, durability="sync", segment_bytes=1 << 20,
                         inline_threshold=8192, min_free_bytes=0, capacity_bytes=1 << 34)


def worker(path: str, ackfile: str, seed: int) -> None:
    tier = SSDTier(crash_config(path))
    fd = os.open(ackfile, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    for i in range(10_000):
        tier.put(block_key(seed, i), make_block(seed, i, 2048, 256 << 10), meta_for(i))
        os.write(fd, f"{seed} {i}\n".encode())  # acknowledged: put returned


def zygote() -> None:
    torch.set_num_threads(1)
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, path, ackfile, seed = line.split()
        assert cmd == "trial", cmd
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                worker(path, ackfile, int(seed))
            except BaseException as e:  # reported through the exit status and stderr
                print(f"worker failed: {e!r}", file=sys.stderr, flush=True)
                code = 3
            os._exit(code)
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exit {pid} {status}", flush=True)


def verify(path: str, seed: int, count: int) -> int:
    cfg = SSDTierConfig(path=path, min_free_bytes=0)
    with SSDTier(cfg) as tier:
        for i in range(count):
            key, want = block_key(seed, i), make_block(seed, i, 2048, 2 << 20)
            if not tier.contains(key):
                print(f"block {i} missing")
                return 1
            out = torch.empty(len(want), dtype=torch.uint8)
            if tier.read_into(key, out) != len(want) or out.numpy().tobytes() != want:
                print(f"block {i} differs")
                return 1
        if tier.stats()["blocks"] != count:
            print(f"{tier.stats()['blocks']} blocks stored, expected {count}")
            return 1
    print(f"ok {count}")
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "zygote":
        zygote()
    elif sys.argv[1] == "verify":
        sys.exit(verify(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
    else:
        sys.exit(f"unknown mode {sys.argv[1]!r}")
