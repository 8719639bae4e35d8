"""Helper process for the crash tests of a whole cache (host tier + SSD tier), in-process and
through ``kvtier serve``.

Puts are deterministic functions of (seed, index), so the test process can regenerate what a
worker stored: put ``i`` of seed ``s`` is a prefix of ``1 + i % 3`` blocks of its own tokens.

- ``python cache_child.py zygote``: import everything once, print ``ready``, then for each stdin
  line fork a worker and print ``pid N``; once the worker is gone (the test SIGKILLs it), print
  ``exit N STATUS``. Forking saves the ~2 s torch import per trial. Lines:

  - ``put DIR ACKFILE SEED DURABILITY``: a worker that opens a ``TieredCache`` on DIR and puts
    prefixes in a loop, appending ``ack INDEX MONOTONIC`` to ACKFILE after each put returns,
    and ``commit START END`` after each batch commit of the SSD tier (monotonic seconds).
  - ``serve DIR PORT DURABILITY``: a worker running ``kvtier serve`` on 127.0.0.1:PORT (no
    ``exit`` line: the test watches the process itself).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kvtier import CacheConfig, HostTierConfig, SSDTierConfig, TieredCache  # noqa: E402

BT, LAYERS, HEADS, DIM = 16, 2, 2, 64  # a block: 2 layers x (K, V) x 16 x 2 x 64 fp16 = 16 KiB
NAMESPACE = "crash"


def tokens_of(seed: int, i: int) -> list[int]:
    n = (1 + i % 3) * BT
    return [seed % 1000, i % 100_000] + [(seed * 7919 + i * 104_729 + j) % 50_000 for j in range(n - 2)]


def kv_of(seed: int, i: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + i)
    n = len(tokens_of(seed, i))
    return [tuple(torch.randn(n, HEADS, DIM, generator=g).to(torch.float16) for _ in range(2))
            for _ in range(LAYERS)]


def config(path: str, durability: str) -> CacheConfig:
    """A host tier big enough that no block is ever demoted: the SSD copy comes from the
    write-through alone, the case a crash used to lose."""
    return CacheConfig(block_tokens=BT, host=HostTierConfig(capacity_bytes="64MiB"),
                       ssd=SSDTierConfig(path=path, durability=durability, segment_bytes="1MiB",
                                         inline_threshold=8192, min_free_bytes=0,
                                         capacity_bytes="4GiB", compaction_interval_s=None))


def put_worker(path: str, ackfile: str, seed: int, durability: str) -> None:
    fd = os.open(ackfile, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    cache = TieredCache(config(path, durability))
    ssd = cache.tier("ssd")
    flush = ssd.flush

    def logged_flush() -> None:  # the commits a crash's losses are checked against
        start = time.monotonic()
        flush()
        os.write(fd, f"commit {start} {time.monotonic()}\n".encode())

    ssd.flush = logged_flush
    for i in range(100_000):
        cache.put(NAMESPACE, tokens_of(seed, i), kv_of(seed, i))
        os.write(fd, f"ack {i} {time.monotonic()}\n".encode())  # acknowledged: put returned


def serve_worker(path: str, port: int, durability: str) -> None:
    from kvtier.commands.serve import main

    sys.exit(main(["--data-dir", path, "--port", str(port), "--host", "127.0.0.1",
                   "--ssd-durability", durability, "--host-capacity", "64MiB",
                   "--block-tokens", str(BT), "--log-level", "warning"]))


def zygote() -> None:
    torch.set_num_threads(1)
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, *args = line.split()
        _reap()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                if cmd == "put":
                    put_worker(args[0], args[1], int(args[2]), args[3])
                elif cmd == "serve":
                    serve_worker(args[0], int(args[1]), args[2])
                else:
                    raise ValueError(f"unknown command {cmd!r}")
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 0
            except BaseException as e:  # reported through the exit status and stderr
                print(f"worker failed: {e!r}", file=sys.stderr, flush=True)
                code = 3
            os._exit(code)
        print(f"pid {pid}", flush=True)
        if cmd == "put":
            _, status = os.waitpid(pid, 0)
            print(f"exit {pid} {status}", flush=True)


def _reap() -> None:
    """Collect server workers that died since (their exit is seen by the test through /proc)."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


if __name__ == "__main__":
    if sys.argv[1] == "zygote":
        zygote()
    else:
        sys.exit(f"unknown mode {sys.argv[1]!r}")
