"""pyproject.toml: the pytest settings every run relies on."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is Python 3.11+")
def test_pytest_asyncio_loop_scope_is_set():
    """Unset, pytest-asyncio 0.24-0.26 warns at every run."""
    import tomllib

    ini = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert ini["asyncio_default_fixture_loop_scope"] == "function"
