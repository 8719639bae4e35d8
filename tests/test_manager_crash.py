"""Crash safety of a whole cache with a host tier in front of the SSD tier (the server's default).

A put lands in host memory first; the SSD copy comes from the write-through. Workers forked from
one pre-imported helper (tests/cache_child.py) put prefixes in a loop and are SIGKILLed at
random moments; the data directory is then reopened and every acknowledged put read back.

- ``sync``: nothing acknowledged may be lost, nothing may be wrong.
- ``batch``: nothing may be wrong, and a put may be lost only if it was acknowledged after the
  start of the last batch commit that completed before the kill (the documented window: one
  commit interval plus one commit).
"""

from __future__ import annotations

import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from kvtier import TieredCache
from tests.cache_child import NAMESPACE, config, kv_of, tokens_of

CHILD = Path(__file__).with_name("cache_child.py")
KILLS = 20


class Zygote:
    """The pre-imported helper; ``fork(line)`` starts a worker and returns its pid."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(CHILD), "zygote"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        assert self.line(120) == "ready"

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def line(self, timeout: float) -> str:
        return self.lines.get(timeout=timeout)

    def fork(self, command: str) -> int:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        word, pid = self.line(60).split()
        assert word == "pid"
        return int(pid)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


def wait_for_acks(ackfile: Path, n: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ackfile.exists() and ackfile.read_text().count("ack ") >= n:
            return
        time.sleep(0.005)
    raise AssertionError(f"the worker acknowledged fewer than {n} puts in {timeout} s")


def read_log(ackfile: Path) -> tuple[dict[int, float], list[tuple[float, float]]]:
    acks, commits = {}, []
    for line in ackfile.read_text().splitlines():
        word, a, b = line.split()
        if word == "ack":
            acks[int(a)] = float(b)
        else:
            commits.append((float(a), float(b)))
    return acks, commits


def served(cache: TieredCache, seed: int, i: int) -> bool:
    """True if put ``i`` is whole and bit-exact; False if absent; fails the test if wrong."""
    tokens = tokens_of(seed, i)
    kv, n = cache.get(NAMESPACE, tokens)
    want = kv_of(seed, i)
    for layer, ref in zip(kv or [], want, strict=False):
        for got, exp in zip(layer, ref, strict=True):
            assert torch.equal(got, exp[:n]), f"put {i} of seed {seed}: wrong bytes served"
    return n == len(tokens)


@pytest.mark.slow
@pytest.mark.parametrize("durability", ["sync", "batch"])
def test_sigkill_with_a_host_tier_loses_nothing_acknowledged(tmp_path, zygote, durability):
    rng = random.Random(4321)
    data = tmp_path / "data"
    acked_before: dict[int, list[int]] = {}  # seed -> puts that must survive
    lost_windows = []
    for trial in range(KILLS):
        seed = 100 + trial
        ackfile = tmp_path / f"ack{trial}"
        pid = zygote.fork(f"put {data} {ackfile} {seed} {durability}")
        wait_for_acks(ackfile, rng.randint(1, 40))
        time.sleep(rng.uniform(0.0, 0.05))  # then a random moment: mid-put, mid-commit...
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        word, got, status = zygote.line(60).split()
        assert (word, int(got)) == ("exit", pid)
        assert os.WIFSIGNALED(int(status)), f"worker exited on its own: status {status}"
        acks, commits = read_log(ackfile)
        with TieredCache(config(str(data), durability)) as cache:
            for s, must in acked_before.items():  # earlier trials' puts are still there
                lost = [i for i in must if not served(cache, s, i)]
                assert not lost, f"seed {s}: {len(lost)} puts lost by a later crash"
            lost = [i for i in sorted(acks) if not served(cache, seed, i)]
            served(cache, seed, max(acks, default=-1) + 1)  # the put in flight: exact or absent
        if durability == "sync":
            assert not lost, f"trial {trial}: {len(lost)} of {len(acks)} acknowledged puts lost"
        else:
            # Puts acknowledged before the last completed commit began were in that commit.
            last_start = commits[-1][0] if commits else float("-inf")
            early = [i for i in lost if acks[i] < last_start]
            assert not early, f"trial {trial}: puts {early} lost though committed before the kill"
            if lost:
                lost_windows.append(killed_at - min(acks[i] for i in lost))
        acked_before[seed] = [i for i in acks if i not in lost]
    assert sum(map(len, acked_before.values())) > KILLS  # the trials did put
    if lost_windows:
        print(f"batch: lost puts acknowledged up to {max(lost_windows) * 1000:.0f} ms before the kill")
