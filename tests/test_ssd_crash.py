"""Crash safety: SIGKILL a writer (durability ``sync``) at random moments, then reopen.

Every acknowledged block must read back bit-exact, nothing unacknowledged may be served (the
one put in flight at the kill may have committed: then it must be exact too), and the index
and segments must agree. Workers are forked from one pre-imported helper process
(tests/ssd_child.py) so each trial does not pay the torch import.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import time
from pathlib import Path

import torch

from kvtier.tiers.ssd import SSDTier
from tests.ssd_child import Zygote, block_key, crash_config, make_block

TRIALS = 24


def digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def test_sigkill_during_sync_puts_loses_nothing_acknowledged(tmp_path):
    rng = random.Random(1234)
    data_dir, expected = tmp_path / "data", {}
    zygote = Zygote()
    try:
        for trial in range(TRIALS):
            seed = 1000 + trial
            ackfile = tmp_path / f"ack{trial}"
            zygote.proc.stdin.write(f"trial {data_dir} {ackfile} {seed}\n")
            zygote.proc.stdin.flush()
            pid = int(zygote.line(30).split()[1])
            # Random moment: sometimes during open/recovery, mostly mid-put.
            time.sleep(rng.uniform(0.0, 0.5))
            os.kill(pid, signal.SIGKILL)
            word, got_pid, status = zygote.line(30).split()
            assert (word, int(got_pid)) == ("exit", pid)
            assert os.WIFSIGNALED(int(status)), f"worker exited on its own: status {status}"
            lines = ackfile.read_text().splitlines() if ackfile.exists() else []
            acked = [int(line.split()[1]) for line in lines]
            assert acked == list(range(len(acked)))
            for i in acked:
                key = block_key(seed, i)
                expected[key] = digest(make_block(seed, i, 2048, 256 << 10))
            in_flight = block_key(seed, len(acked))
            check_directory(data_dir, expected, in_flight, seed, len(acked))
    finally:
        zygote.close()
    assert len(expected) > TRIALS  # the trials did put blocks


def check_directory(data_dir: Path, expected: dict, in_flight: bytes, seed: int, n: int) -> None:
    with SSDTier(crash_config(str(data_dir))) as tier:
        stored = {k for k, _, _ in tier.scan()}
        extra = stored - expected.keys()
        assert extra <= {in_flight}, f"{len(extra)} unacknowledged blocks served"
        for key in stored:
            out = torch.empty(tier.size(key), dtype=torch.uint8)
            assert tier.read_into(key, out) == out.numel()
            want = expected.get(key) or digest(make_block(seed, n, 2048, 256 << 10))
            assert digest(out.numpy().tobytes()) == want, f"block {key.hex()} differs"
        missing = expected.keys() - stored
        assert not missing, f"{len(missing)} acknowledged blocks lost"
        assert tier.check() == []
        if in_flight in stored:  # committed but not acknowledged: keep expectations honest
            expected[in_flight] = digest(make_block(seed, n, 2048, 256 << 10))
