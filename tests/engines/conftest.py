"""For the engine tests (vLLM, SGLang): a stand-in for ``torchvision`` where the engines are
installed (``kvtier_serve``, a real sidecar on loopback, is in ``tests/conftest.py``).

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
import sys
import types
from pathlib import Path

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
