"""Helper process for the SSD tier's crash and restart tests (tests/test_ssd_*.py).

Blocks are deterministic functions of (seed, index), so the test process can regenerate what a
child wrote. Modes:

- ``python ssd_child.py zygote``: import everything once, print ``ready``, then for each stdin
  line ``trial DIR ACKFILE SEED`` fork a worker that puts blocks with durability ``sync`` and
  appends ``SEED INDEX`` to ACKFILE after each put returns; prints ``pid N`` then, once the
  worker is gone (the test SIGKILLs it), ``exit N STATUS``. Forking saves the ~2 s torch import
  per trial.
  The same zygote takes ``probe DIR OUTFILE SEED COUNT`` (open a damaged directory and use it,
  see ``probe``) and ``live DIR OUTFILE SEED COUNT`` (damage the index of an open cache, see
  ``live``): the worker writes what it saw as JSON to OUTFILE. A worker killed by a signal (a
  SIGBUS from a mapped file) shows in ``exit PID STATUS``, never in the test process.
- ``python ssd_child.py verify DIR SEED COUNT``: open DIR and check blocks 0..COUNT-1 are all
  hits and bit-exact; prints ``ok COUNT`` and exits 0, else prints the problem and exits 1.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import random
import subprocess
import sys
import threading
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


DAMAGE_SIZES = (2048, 40_000)  # a mix of inline blocks and segment records


class Zygote:
    """The test side of ``zygote``: start it, send it jobs, read its lines."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "zygote"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        assert self.line(120) == "ready"

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def line(self, timeout: float) -> str:
        return self.lines.get(timeout=timeout)

    def send(self, *words: object) -> int:
        """Start a job; returns the worker's pid."""
        self.proc.stdin.write(" ".join(map(str, words)) + "\n")
        self.proc.stdin.flush()
        return int(self.line(60).split()[1])

    def run(self, *words: object, timeout: float = 120) -> int:
        """Run a job to its end; returns the worker's wait status."""
        pid = self.send(*words)
        word, got, status = self.line(timeout).split()
        assert (word, int(got)) == ("exit", pid)
        return int(status)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def damage_config(path: str) -> SSDTierConfig:
    return SSDTierConfig(path=path, durability="sync", segment_bytes=1 << 20,
                         inline_threshold=16 << 10, min_free_bytes=0, direct_io=False)


def use_everything(tier: SSDTier, seed: int, count: int) -> dict:
    """Read every block, delete some, put one, ask for health: what a caller would do.

    Only ``KeyError``/``CorruptBlock`` may come out of a read (a miss), nothing out of a delete,
    and only a ``KVTierError`` out of a put; anything else is listed in ``unhandled``.
    """
    from kvtier.errors import CorruptBlock, KVTierError

    out = {"open": "ok", "served": 0, "missed": 0, "wrong": 0, "unhandled": []}
    for i in range(count):
        key, want = block_key(seed, i), make_block(seed, i, *DAMAGE_SIZES)
        buf = torch.empty(len(want), dtype=torch.uint8)
        try:
            n = tier.read_into(key, buf)
        except (KeyError, CorruptBlock):
            out["missed"] += 1
            continue
        except Exception as e:  # noqa: BLE001  the point of the probe
            out["unhandled"].append(f"read_into: {e!r}")
            continue
        good = n == len(want) and buf.numpy().tobytes() == want
        out["served" if good else "wrong"] += 1
    for i in range(0, count, 5):
        try:
            tier.delete(block_key(seed, i))
        except Exception as e:  # noqa: BLE001
            out["unhandled"].append(f"delete: {e!r}")
    try:
        tier.put(block_key(seed, 10**6), make_block(seed, 10**6, *DAMAGE_SIZES), meta_for(0))
    except KVTierError:
        pass
    except Exception as e:  # noqa: BLE001
        out["unhandled"].append(f"put: {e!r}")
    out["health"] = tier.health()
    out["index_errors"] = tier.stats().get("index_errors", 0)
    return out


def probe(path: str, outfile: str, seed: int, count: int) -> None:
    """Open a directory whose index was damaged while closed, and use it."""
    from kvtier.errors import DataDirError

    try:
        tier = SSDTier(damage_config(path))
    except DataDirError as e:
        result = {"open": str(e)}
    else:
        result = use_everything(tier, seed, count)
        tier.close()
    Path(outfile).write_text(json.dumps(result))


def db_roots(tier: SSDTier) -> dict[str, int]:
    """The root page number of each LMDB table (``MDB_db.md_root``, in the main table)."""
    with tier._index.env.begin() as txn:
        return {name: int.from_bytes(txn.get(name.encode())[40:48], "little")
                for name in ("blocks", "inline")}


def zero_page(path: str, pgno: int, psize: int = 4096) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, bytes(psize), pgno * psize)
    finally:
        os.close(fd)


def live(path: str, outfile: str, seed: int, count: int) -> None:
    """Fill a tier, then zero the root pages of its index tables under it, and use it."""
    tier = SSDTier(damage_config(path))
    for i in range(count):
        tier.put(block_key(seed, i), make_block(seed, i, *DAMAGE_SIZES), meta_for(i))
    for pgno in db_roots(tier).values():
        zero_page(os.path.join(path, "index", "data.mdb"), pgno)
    result = use_everything(tier, seed, count)
    tier.close()
    Path(outfile).write_text(json.dumps(result))


def live_cache(path: str, outfile: str, seed: int, count: int) -> None:
    """A cache (SSD tier only) whose index tables lose their root pages while it runs: every call
    a client makes must answer (misses, fewer tokens), none may raise. Namespace ``small`` has
    inline blocks (lost with the index), ``big`` has segment blocks (still served)."""
    from kvtier import CacheConfig, HostTierConfig, TieredCache

    bt = 16
    cfg = CacheConfig(block_tokens=bt, host=HostTierConfig(capacity_bytes=0), ssd=damage_config(path))

    def kv(i: int, heads: int, dim: int):
        g = torch.Generator().manual_seed(seed + i)
        return [tuple(torch.randn(4 * bt, heads, dim, generator=g) for _ in range(2)) for _ in range(2)]

    prompts = [("small" if i % 2 else "big", [seed * 10_000 + i * 100 + j for j in range(4 * bt)],
                kv(i, 2, 8) if i % 2 else kv(i, 8, 32)) for i in range(count)]
    out: dict = {"unhandled": [], "wrong": 0, "served_tokens": {"small": 0, "big": 0}}
    with TieredCache(cfg) as cache:
        for ns, toks, kvs in prompts:
            cache.put(ns, toks, kvs)
        tier = cache.tier("ssd")
        for pgno in db_roots(tier).values():
            zero_page(os.path.join(path, "index", "data.mdb"), pgno)
        calls = []
        for i, (ns, toks, kvs) in enumerate(prompts):
            calls.append(("lookup", lambda n=ns, t=toks: cache.lookup(n, t)))
            calls.append(("get", lambda n=ns, t=toks, k=kvs: _check_get(cache, n, t, k, out)))
            if i % 3 == 0:
                calls.append(("evict", lambda n=ns, t=toks: cache.evict(n, t[: 2 * bt])))
        calls.append(("put", lambda: cache.put(*prompts[0])))
        calls.append(("put-new", lambda: cache.put("small", [7] * (4 * bt), prompts[1][2])))
        calls.append(("drop", lambda: cache.drop_namespace("small")))
        for name, call in calls:
            try:
                call()
            except Exception as e:  # noqa: BLE001  the point of the probe
                out["unhandled"].append(f"{name}: {e!r}")
        out["health"] = cache.health()
        out["index_errors"] = tier.stats().get("index_errors", 0)
    Path(outfile).write_text(json.dumps(out))


def _check_get(cache, ns: str, toks, kv, out: dict) -> None:
    got, n = cache.get(ns, toks)
    out["served_tokens"][ns] += n
    if n and not all(torch.equal(g, w[:n]) for lg, lw in zip(got, kv, strict=True)
                     for g, w in zip(lg, lw, strict=True)):
        out["wrong"] += 1


def zygote() -> None:
    torch.set_num_threads(1)
    print("ready", flush=True)
    jobs = {"probe": probe, "live": live, "live-cache": live_cache}
    for line in sys.stdin:
        cmd, path, outfile, seed, *rest = line.split()
        assert cmd == "trial" or cmd in jobs, cmd
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                if cmd == "trial":
                    worker(path, outfile, int(seed))
                else:
                    jobs[cmd](path, outfile, int(seed), int(rest[0]))
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
