"""A built wheel installs one top-level package, ``kvtier``, with server/ and bench/ inside it
(``kvtier.server``, ``kvtier.bench``), and the package proper imports nothing from outside it."""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# where each folder of the repository installs
SOURCES = {"kvtier": "kvtier", "server": "kvtier/server", "bench": "kvtier/bench"}

_spec = importlib.util.spec_from_file_location("import_cycles", ROOT / "tools" / "import_cycles.py")
assert _spec is not None and _spec.loader is not None
ic = importlib.util.module_from_spec(_spec)
sys.modules["import_cycles"] = ic  # dataclasses look their module up while the class is built
_spec.loader.exec_module(ic)


def _sources() -> set[str]:
    """Every .py of the three folders, named by where it installs (links not followed)."""
    out = set()
    for folder, dest in SOURCES.items():
        for dirpath, dirnames, filenames in os.walk(ROOT / folder):
            dirnames[:] = [d for d in dirnames if d != "__pycache__" and d != "out"]
            rel = Path(dirpath).relative_to(ROOT / folder)
            out |= {(Path(dest) / rel / f).as_posix() for f in filenames if f.endswith(".py")}
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of what the build reads (the checkout stays clean)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "out", "*.egg-info", "*.so")  # built in place
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, src / f)
    for folder in SOURCES:
        shutil.copytree(ROOT / folder, src / folder, symlinks=True, ignore=ignore)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    [whl] = (tmp / "dist").glob("kvtier-*.whl")
    return whl


def test_wheel_installs_kvtier_alone_at_top_level(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        [top_level] = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert z.read(top_level).decode().split() == ["kvtier"]
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"kvtier"}


def test_wheel_holds_every_module_of_kvtier_server_and_bench(wheel):
    with zipfile.ZipFile(wheel) as z:
        modules = {n for n in z.namelist() if n.endswith(".py")}
    expected = _sources()
    assert "kvtier/server/routes/kv.py" in expected and "kvtier/bench/io.py" in expected
    assert modules == expected, (f"missing (add the package to pyproject's [tool.setuptools] packages): "
                                 f"{sorted(expected - modules)}; unexpected: {sorted(modules - expected)}")


def test_wheel_carries_the_one_pass_copy_where_it_can_be_built(wheel):
    """kvtier/_fastcopy.c is an optional extension: a wheel built where a C compiler is holds it
    compiled (an install without one still works, on numpy's path)."""
    if platform.machine() != "x86_64" or not shutil.which("cc"):
        pytest.skip("kvtier._fastcopy builds on x86-64 with a C compiler only")
    with zipfile.ZipFile(wheel) as z:
        assert any(n.startswith("kvtier/_fastcopy.") and n.endswith(".so") for n in z.namelist())


def test_the_installed_tree_imports_the_server_and_the_benchmarks(wheel, tmp_path):
    """Unpacked as site-packages would hold it, outside the checkout."""
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    code = ("import kvtier, kvtier.server.app, kvtier.bench.params, kvtier.commands.serve; "
            "print(kvtier.__file__); print(kvtier.server.app.__file__); print(kvtier.bench.params.__file__)")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(site)}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert all(Path(p).is_relative_to(site) for p in r.stdout.split()), r.stdout


def test_dockerfile_copies_every_folder_the_package_is_built_from():
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    ignore = (ROOT / "deploy" / "Dockerfile.dockerignore").read_text().split()
    for folder in SOURCES:
        assert f"COPY {folder} ./{folder}" in dockerfile
        assert f"!{folder}/" in ignore


def test_the_package_proper_imports_nothing_from_outside_it():
    """No module of kvtier/ (nor the server) imports a test, a benchmark script by its old
    top-level name, or anything else that lives beside the package in the repository."""
    outside = {p.stem if p.suffix == ".py" else p.name for p in ROOT.iterdir()
               if p.name != "kvtier" and not p.name.startswith(".") and (p.is_dir() or p.suffix == ".py")}
    assert {"tests", "server", "bench"} <= outside
    mods = {m: p for m, p in ic.modules(ROOT / "kvtier").items() if not m.startswith("kvtier.bench")}
    bad = [f"{i.path.relative_to(ROOT)}:{i.line}: {i.target}" for i in ic.imports(mods)
           if i.target.split(".")[0] in outside]
    assert not bad, bad


def test_only_the_commands_reach_into_the_server_and_the_benchmarks():
    """Layers point one way: the core never imports kvtier.server or kvtier.bench (``kvtier serve``
    and ``kvtier bench`` do), and the server never imports a benchmark (benchmarks use both)."""
    allowed = {("kvtier.commands.serve", "kvtier.server"), ("kvtier.commands.bench", "kvtier.bench")}
    bad = []
    for i in ic.imports(ic.modules(ROOT / "kvtier")):
        for upper in ("kvtier.server", "kvtier.bench"):
            inside = lambda name: name == upper or name.startswith(upper + ".")  # noqa: B023, E731
            if (inside(i.target) and not inside(i.source) and not i.source.startswith("kvtier.bench")
                    and (i.source, upper) not in allowed):
                bad.append(f"{i.source} imports {i.target} (line {i.line})")
    assert not bad, bad
