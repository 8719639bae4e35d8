"""Shared fixtures: a tiny real transformers decoder, small caches, a real ``kvtier serve``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from kvtier.server.testing import free_port

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_llama_config(layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=hidden * 2,
                       num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, max_position_embeddings=32768)


@pytest.fixture(scope="session")
def tiny_llama():
    """A Llama-architecture decoder with GQA and random weights, float32, eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = tiny_llama_config()
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def redis_server():
    """A fresh redis-server on a free loopback port, stopped after the test; skips, saying why,
    where redis-server or redis-py cannot be had."""
    from tests.integration.remote_servers import REDIS_CLI, REDIS_SERVER, SKIP_REASON, RedisServer

    if not (REDIS_SERVER and REDIS_CLI):
        pytest.skip(SKIP_REASON)
    pytest.importorskip("redis", reason="redis-py missing: pip install 'kvtier[redis]'")
    srv = RedisServer().start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def mooncake_store():
    """A mooncake_master and one storage node on loopback for the test module; skips, saying
    why, where the pip package or its system library cannot be had."""
    from tests.integration.remote_mooncake import MooncakeMaster, mooncake_skip_reason

    reason = mooncake_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    m = MooncakeMaster().start()
    yield m
    m.stop()


def random_bytes(n: int, seed: int = 0) -> torch.Tensor:
    """``n`` reproducible random bytes as a 1-D uint8 tensor (remote-tier payloads)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)


def random_kv(tokens: int, layers: int = 2, heads: int = 2, dim: int = 8, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(tokens, heads, dim, generator=g).to(dtype) for _ in range(2)) for _ in range(layers)]


@pytest.fixture
def kvtier_serve(tmp_path):
    """A real ``kvtier serve`` subprocess on a free loopback port over an SSD data dir; yields its
    URL and stops it with SIGTERM."""
    port = free_port()
    data, log = tmp_path / "serve-data", tmp_path / "serve.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KVTIER_HOST_CAPACITY": "32MiB"}
    cmd = [sys.executable, "-m", "kvtier.commands.serve", "--port", str(port), "--data-dir", str(data),
           "--ssd-capacity", "1GiB"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"kvtier serve exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("kvtier serve did not become ready")
            time.sleep(0.05)
        yield url
    finally:
        stop_serve(proc)


def stop_serve(proc: subprocess.Popen) -> None:
    """Stop a ``kvtier serve`` subprocess as an operator would (SIGTERM), killing it only if it
    has not exited within a minute."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
