"""The package's import graph (tools/import_cycles.py): no cycle, the checker finds lazy, relative
and type-only ones, and every import points down the layers of docs/architecture.md."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "import_cycles.py"

_spec = importlib.util.spec_from_file_location("import_cycles", TOOL)
assert _spec is not None and _spec.loader is not None
ic = importlib.util.module_from_spec(_spec)
sys.modules["import_cycles"] = ic  # dataclasses look their module up while the class is built
_spec.loader.exec_module(ic)

# Cycles tolerated for now (none): a new one fails the test below; one that is gone must be
# deleted here.
KNOWN: set[tuple[str, ...]] = set()


def test_no_import_cycle_in_the_package():
    found = ic.cycles(ROOT / "kvtier")
    new = [c for c in found if c.modules not in KNOWN]
    assert not new, "\n".join(ic.describe(c, ROOT) for c in new)
    gone = KNOWN - {c.modules for c in found}
    assert not gone, f"no longer a cycle, delete from KNOWN: {sorted(gone)}"


def test_the_package_includes_server_and_bench():
    """kvtier/server and kvtier/bench link to server/ and bench/: the checker walks them."""
    mods = ic.modules(ROOT / "kvtier")
    assert {"kvtier.server.app", "kvtier.server.routes.kv", "kvtier.bench.io", "kvtier.tiers.base"} <= set(mods)


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root / "pkg"


def test_finds_a_cycle_through_a_lazy_relative_import(tmp_path):
    pkg = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "def f():\n    from . import b\n    return b\n",
        "pkg/b.py": "from pkg.a import f\n",
        "pkg/c.py": "import pkg.a\nimport os\n",  # imports into the cycle, not part of it
    })
    [cycle] = ic.cycles(pkg)
    assert cycle.modules == ("pkg.a", "pkg.b")
    assert [(i.source, i.line) for i in cycle.loop] == [("pkg.a", 2), ("pkg.b", 1)]


def test_finds_a_type_only_cycle_in_a_namespace_subpackage(tmp_path):
    """``if TYPE_CHECKING:`` imports count; ``from .. import x`` resolves from a folder without
    ``__init__.py``; ``from pkg.sub import d`` names the module ``pkg.sub.d``."""
    pkg = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.sub import d\n",
        "pkg/sub/d.py": "from ..a import TYPE_CHECKING\n",
        "pkg/sub/e.py": "from . import d\n",
    })
    [cycle] = ic.cycles(pkg)
    assert cycle.modules == ("pkg.a", "pkg.sub.d")


def test_no_cycle_no_report(tmp_path):
    pkg = _write(tmp_path, {"pkg/__init__.py": "from pkg import a\n", "pkg/a.py": "import pkg.b\n",
                            "pkg/b.py": "import json\n"})
    assert ic.cycles(pkg) == []
    r = subprocess.run([sys.executable, str(TOOL), str(pkg)], capture_output=True, text=True)
    assert r.returncode == 0 and "no import cycle in pkg" in r.stdout


def test_command_exits_1_and_names_the_lines(tmp_path):
    pkg = _write(tmp_path, {"pkg/__init__.py": "", "pkg/a.py": "import pkg.b\n",
                            "pkg/b.py": "\n\ndef g():\n    import pkg.a\n"})
    r = subprocess.run([sys.executable, str(TOOL), str(pkg)], capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "cycle among pkg.a, pkg.b" in r.stdout
    assert "pkg/b.py:4: pkg.b imports pkg.a" in r.stdout


# The layers of docs/architecture.md, bottom first: a module imports its own layer and those
# below, never one above (``kvtier`` itself, the public API, sits with the facade).
LAYERS = [
    ("foundation", "errors config keys layout records stats gcpauses readers wire settings calc bytecopy bufpool pieces _fastcopy"),
    ("block format", "codecs block blocks namespaces policies prefixkv"),
    ("tiers", "tiers"),
    ("parts", "index placement writethrough writes lookups reload recorder catalog "
              "shared_namespaces prefetcher prefetch engine_blocks"),
    ("loader", "loader loader_job loader_ranged loader_whole loader_promote loadstream staging costmodel sidecar_loader"),
    ("facade", "manager"),
    ("adapters", "integrations client client_async client_calls client_answers client_ops client_shm shm_pool metrics"),
    ("entry points", "server bench commands cli __main__"),
]


def _layer(module: str) -> int:
    if module == "kvtier":
        return 5
    rest = module.removeprefix("kvtier.")
    for i, (_, names) in enumerate(LAYERS):
        if any(rest == n or rest.startswith(n + ".") for n in names.split()):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and to docs/architecture.md")


def test_layers_point_down():
    mods = ic.modules(ROOT / "kvtier")
    edges = ic.graph(mods, ic.imports(mods))
    up = [f"{i.path.relative_to(ROOT)}:{i.line}: {a} ({LAYERS[_layer(a)][0]}) imports {b} "
          f"({LAYERS[_layer(b)][0]})"
          for a, targets in edges.items() for b, i in targets.items() if _layer(b) > _layer(a)]
    assert not up, "\n".join(up)
