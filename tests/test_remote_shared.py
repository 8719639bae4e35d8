"""Two kvtier processes with separate data directories share a remote tier; a prefix put through
A is a hit on B with no registration call on B (the namespace's record travels with the shared
tier), and B's reload gives logits equal to recompute."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.remote_servers import REDIS_CLI, REDIS_SERVER, SKIP_REASON, RedisServer

pytest.importorskip("redis", reason="redis-py missing: pip install 'kvtier[redis]'")
pytestmark = pytest.mark.skipif(not (REDIS_SERVER and REDIS_CLI), reason=SKIP_REASON)
ROOT = Path(__file__).resolve().parents[1]


def _child(role: str, url: str, data_dir: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.integration.remote_shared_child", role, url, str(data_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_prefix_put_through_a_reloads_on_b_equal_to_recompute(tmp_path):
    server = RedisServer().start()
    try:
        a = _child("put", server.url, tmp_path / "a")
        assert a["stored"] == 512 and a["remote"] >= 4
        b = _child("reload", server.url, tmp_path / "b")
        assert b["hit_tokens"] == 512 and b["tiers"].get("remote") == 4
        assert b["loaded"] == 512
        assert b["max_logit_diff"] <= 1e-4
    finally:
        server.stop()
