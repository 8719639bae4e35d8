"""Fixtures for the engine tests (vLLM, SGLang): a real ``kvtier serve`` on loopback, and a
stand-in for ``torchvision`` where the engines are installed.

The engines are installed with ``--no-deps`` beside the CPU torch (see
``tests/engines/requirements.txt`` and ``.ci/run``); where they are not, their tests skip and say
why. SGLang imports ``torchvision`` on paths kvtier never runs (image processors), and PyPI's
torchvision does not load beside the CPU torch wheel, so an empty stand-in module answers those
imports. transformers is asked first whether torchvision is available (it caches "no"), so it
never takes the stand-in for the real thing.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import httpx
import pytest

from kvtier.server.testing import free_port

ROOT = Path(__file__).resolve().parents[2]


class _Placeholder:
    def __init__(self, *args, **kwargs) -> None:
        pass

    def __call__(self, *args, **kwargs):
        return self

    def __getattr__(self, name: str):
        return _Placeholder()


def _module_getattr(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return _Placeholder()


class _TorchvisionStandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = _module_getattr
        return module

    def exec_module(self, module) -> None:
        pass


def _stand_in_for_torchvision() -> None:
    if importlib.util.find_spec("sglang") is None or importlib.util.find_spec("torchvision") is not None:
        return
    from transformers.utils import import_utils

    import_utils.is_torchvision_available()  # cached as False before the stand-in exists
    sys.meta_path.insert(0, _TorchvisionStandIn())


_stand_in_for_torchvision()


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
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
