"""The docs are documentation for someone using kvtier today, and name only what exists.

Every page under ``docs/`` and the README: no changelog talk ("this change", "the last commit",
an issue's report, dates), and every repository path, module, ``python -m`` target and
``kvtier`` subcommand it names exists. Every HTTP path the README names is a route of the app.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")) + ["README.md"]

CHANGELOG = [
    (re.compile(r"\bthis change\b", re.I), "'this change'"),
    (re.compile(r"\bthe last commit\b", re.I), "'the last commit'"),
    (re.compile(r"\bsee the report\b", re.I), "a reference to a report"),
    (re.compile(r"\bissue \d+\b", re.I), "an issue number"),
    (re.compile(r"\b20\d\d-\d\d-\d\d\b"), "a date"),
]
# a path in the repository: ends in an extension or a slash ("kvtier/fio" in prose is a ratio)
REPO_PATH = re.compile(r"(?<![\w./~:-])((?:kvtier|server|bench|tests|deploy|docs|tools|\.ci)/"
                       r"[\w./<>{}*-]*(?:\.\w+|/))(?![\w<>{}*-])")
USER_FILES = {"deploy/.env"}  # files the docs tell the user to create
MODULE = re.compile(r"(?<![\w./-])(kvtier(?:\.[A-Za-z_]\w*)+)")
RUN_MODULE = re.compile(r"python -m ([\w.]+)")
CODE = re.compile(r"```.*?```|`[^`\n]+`", re.S)  # fenced blocks and inline code spans
# ``kvtier`` where a command starts: a line, after ``&&``/``;``/``|``/``(``, a backtick, or ``-m``
CLI = re.compile(r"(?:^\s*(?:\$ )?|&& |; |\| |\(|`|-m )kvtier ((?:[a-z][\w-]*)(?: [a-z][\w-]*)?)", re.M)
HTTP_PATH = re.compile(r"(?<![\w.:/-])(/v1/[\w/{}-]*[\w}]|/(?:healthz|readyz|metrics|openapi\.json|docs)(?![\w./-]))")


def text(doc: str) -> str:
    return (ROOT / doc).read_text()


def changelog_lines(body: str, doc: str) -> list[str]:
    return [f"{what}: {doc}:{n}: {line.strip()}" for n, line in enumerate(body.splitlines(), 1)
            for pattern, what in CHANGELOG if pattern.search(line)]


def exists(path: str, doc: str) -> bool:
    if path in USER_FILES or any(c in path for c in "{}*<>"):
        return True  # a pattern or a placeholder, not one file
    return (ROOT / path).exists() or (ROOT / Path(doc).parent / path).exists()


def missing_files(body: str, doc: str) -> list[str]:
    named = set(REPO_PATH.findall(body))
    named |= {m for m in re.findall(r"\]\(([^)#\s]+)", body) if "://" not in m}  # markdown links
    return sorted(p for p in named if not exists(p, doc))


def resolves(dotted: str) -> bool:
    """``dotted`` is a module, or an attribute reached from the longest module prefix."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        try:
            spec = importlib.util.find_spec(name)
        except ModuleNotFoundError:
            spec = None
        if spec is None:
            continue
        try:
            obj = importlib.import_module(name)
        except ImportError:  # needs an optional dependency (an engine) not installed here
            return True
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def missing_modules(body: str) -> list[str]:
    """kvtier modules (and attributes) that do not exist, and ``python -m`` targets outside the
    package (``bench.X`` runs only from a checkout: the installed name is ``kvtier.bench.X``)."""
    named = {m.rstrip(".") for m in MODULE.findall(body)}
    named |= {m.rstrip(".") for m in RUN_MODULE.findall(body) if m.split(".")[0] == "kvtier"}
    bad = [m for m in named if not resolves(m)]
    bad += [f"python -m {m} (the package runs it as kvtier.{m})" for m in RUN_MODULE.findall(body)
            if m.split(".")[0] in ("bench", "server")]
    return sorted(bad)


def subcommands() -> dict[str, set[str]]:
    """``kvtier``'s commands, each with its own subcommands (empty when it has none)."""
    from kvtier.cli import build_parser

    top = next(a for a in build_parser()._actions if a.dest == "command")
    out: dict[str, set[str]] = {}
    for name, parser in top.choices.items():
        subs = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
        out[name] = set(subs[0].choices) if subs else set()
    return out


def bad_commands(body: str) -> list[str]:
    commands = subcommands()
    bad = set()
    for block in CODE.findall(body):
        for words in CLI.findall(block):
            cmd, _, sub = words.partition(" ")
            if cmd not in commands:
                bad.add(f"kvtier {cmd}")
            elif commands[cmd] and sub and sub not in commands[cmd]:
                bad.add(f"kvtier {cmd} {sub}")
    return sorted(bad)


@pytest.mark.parametrize("doc", DOCS)
def test_a_doc_reads_as_documentation_not_a_changelog(doc):
    found = changelog_lines(text(doc), doc)
    assert not found, "history belongs in git, not in the docs:\n" + "\n".join(found)


@pytest.mark.parametrize("doc", DOCS)
def test_every_file_a_doc_names_exists(doc):
    missing = missing_files(text(doc), doc)
    assert not missing, f"{doc} names files that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS)
def test_every_module_and_python_m_target_a_doc_names_exists(doc):
    missing = missing_modules(text(doc))
    assert not missing, f"{doc} names modules or attributes that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS)
def test_every_kvtier_subcommand_a_doc_names_exists(doc):
    bad = bad_commands(text(doc))
    assert not bad, f"{doc} names kvtier commands that do not exist: {bad}"


def test_the_checks_catch_what_they_are_for():
    stale = ("Measured 2026-12-01, before this change.\nSee the report of issue 4.\n"
             "(the tree at the last commit)\n")
    assert len(changelog_lines(stale, "x.md")) == 5
    assert changelog_lines("The batch commit; issues are tracked elsewhere.\n", "x.md") == []
    assert missing_files("see `kvtier/gone.py`, [a](nowhere.md) and `docs/ssd.md`", "docs/x.md") == [
        "kvtier/gone.py", "nowhere.md"]
    assert missing_files("kvtier/fio bandwidth; `tests/test_<name>.py`", "README.md") == []
    assert missing_modules("`kvtier.loader.Loader`, `kvtier.loader.Nothing`, `kvtier.gone`\n"
                           "python -m kvtier.bench.ttft; python -m kvtier.bench.nope; python -m bench.io") == [
        "kvtier.bench.nope", "kvtier.gone", "kvtier.loader.Nothing",
        "python -m bench.io (the package runs it as kvtier.bench.io)"]
    assert bad_commands("```\nkvtier serve\nkvtier bench trace\nkvtier bench replay\nkvtier run x\n"
                        "# the kvtier entry point\n```\n`python -m kvtier bench io`") == [
        "kvtier bench replay", "kvtier run"]
    readme = text("README.md")
    assert {"docs/architecture.md", "deploy/docker-compose.yml"} <= set(REPO_PATH.findall(readme))
    assert {"kvtier.bench.ttft", "kvtier.bench.http_load"} <= set(RUN_MODULE.findall(readme))


def test_every_http_path_in_the_readme_is_a_route_of_the_app(tmp_path):
    from kvtier import CacheConfig, TieredCache
    from kvtier.config import HostTierConfig
    from kvtier.server.app import create_app

    with TieredCache(CacheConfig(host=HostTierConfig(capacity_bytes=1 << 20, pinned=False))) as cache:
        app = create_app(cache)
        routes = sorted(app.openapi()["paths"]) + [getattr(r, "path", "") for r in app.routes]
    patterns = [re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", re.escape(p).replace(r"\{", "{")
                                        .replace(r"\}", "}")) + "$") for p in routes if p]
    named = set(HTTP_PATH.findall(text("README.md")))
    assert {"/v1/kv", "/v1/lookup", "/metrics", "/healthz"} <= named  # the scan sees the table
    missing = sorted(p for p in named if not any(r.match(p) for r in patterns))
    assert not missing, f"README names HTTP paths the app does not serve: {missing} (routes: {routes})"


def test_the_dashboard_doc_names_the_image_s_entry_point_and_compose_commands_build():
    import json

    entry = next(line for line in (ROOT / "deploy/Dockerfile").read_text().splitlines()
                 if line.startswith("ENTRYPOINT"))
    command = " ".join(json.loads(entry.removeprefix("ENTRYPOINT")))
    assert f"`{command}`" in text("docs/dashboard.md"), f"docs/dashboard.md must name {command!r}"
    header = [line for line in (ROOT / "deploy/docker-compose.yml").read_text().splitlines()
              if line.startswith("#")]
    ups = [line for line in header + text("docs/dashboard.md").splitlines() + text("README.md").splitlines()
           if "docker compose" in line and " up" in line]
    assert ups and all("--build" in line for line in ups), [line for line in ups if "--build" not in line]
