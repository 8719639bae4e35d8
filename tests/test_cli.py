"""kvtier.cli: the ``kvtier`` command line, run as a real subprocess (``python -m kvtier``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvtier import cli

ROOT = Path(__file__).resolve().parents[1]


def kvtier(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "kvtier", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def assert_one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("kvtier calc: error: "), lines[0]
    assert needle in lines[0]
    assert proc.stdout == ""


@pytest.fixture
def bad_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"num_hidden_layers": 4,')
    return path


@pytest.mark.parametrize(("args", "needle"), [
    (["--preset", "GPT-9"], "unknown preset 'GPT-9'"),
    (["--preset", "GLM-5", "--host", "12XB"], "malformed size '12XB'"),
    (["--preset", "GLM-5", "--tokens", "lots"], "malformed token count 'lots'"),
    (["--preset", "GLM-5", "--kv-dtype", "int3"], "invalid choice: 'int3'"),
    (["--config", "no/such/config.json"], "not found"),
    ([], "give --preset NAME, --config PATH or --list"),
    (["--preset", "GLM-5", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_arguments_print_one_line_and_exit_2(args, needle):
    assert_one_line_error(kvtier("calc", *args), needle)


def test_malformed_config_file_is_one_line(bad_json):
    assert_one_line_error(kvtier("calc", "--config", str(bad_json)), "is not valid JSON")


def test_config_file_without_the_needed_fields_is_one_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "mystery", "num_hidden_layers": 4}))
    assert_one_line_error(kvtier("calc", "--config", str(path)), "num_attention_heads")


def test_json_output_reproduces_the_published_comparison():
    proc = kvtier("calc", "--preset", "DeepSeek-V4-Pro", "--preset", "GLM-5", "--preset",
                  "Qwen3-235B-A22B", "--tokens", "1M", "--kv-dtype", "fp8", "--indexer-dtype", "bf16",
                  "--host", "64GiB", "--ssd", "2TiB", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["model"]: r for r in json.loads(proc.stdout)}
    for name, gib in (("DeepSeek-V4-Pro", 5.48), ("GLM-5", 60.4), ("Qwen3-235B-A22B", 89.6)):
        assert rows[name]["total_gib"] == pytest.approx(gib, rel=0.01)
        assert rows[name]["tiers"]["ssd"]["tokens"] > rows[name]["tiers"]["host"]["tokens"] > 0


def test_table_output_labels_gib_and_gb(capsys):
    assert cli.main(["calc", "--preset", "Llama-3-8B", "--tokens", "128k", "--host", "64GiB"]) == 0
    out = capsys.readouterr().out
    assert "GiB = 2^30 bytes, GB = 10^9 bytes" in out
    assert "total GiB" in out and "total GB" in out
    assert "131,072.0" in out  # Llama-3-8B bf16 bytes per token


def test_list_shows_every_preset_with_its_source(capsys):
    assert cli.main(["calc", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("Llama-3-8B", "DeepSeek-V4-Flash", "Kimi-K2"):
        assert name in out
    assert "config.json" in out


def test_every_listed_command_is_a_module_with_add_parser_and_run():
    import importlib

    assert "calc" in cli.COMMANDS
    parser = cli.build_parser()
    for name in cli.COMMANDS:
        module = importlib.import_module(f"kvtier.commands.{name}")
        assert callable(module.add_parser) and callable(module.run)
        assert f"{{{','.join(cli.COMMANDS)}}}" in parser.format_usage()


def test_missing_command_is_one_line(capsys):
    assert cli.main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kvtier: error:")


def _command_paths(parser=None, prefix=()):
    """Every (sub)command's argv prefix: [], ["serve"], ["bench"], ["bench", "trace"], ..."""
    import argparse

    parser = parser or cli.build_parser()
    yield list(prefix)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _command_paths(sub, (*prefix, name))


_HELP_PROBE = """\
import sys
from kvtier.cli import main
code = main(sys.argv[1:] + ["--help"])
sys.stderr.write("torch imported: %s\\n" % ("torch" in sys.modules))
sys.exit(code)
"""


@pytest.mark.parametrize("path", [" ".join(p) or "(none)" for p in _command_paths()])
def test_every_help_answers_without_torch_in_plain_words_with_defaults(path, tmp_path):
    import argparse

    argv = [] if path == "(none)" else path.split()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", _HELP_PROBE, *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "torch imported: False" in proc.stderr, f"kvtier {path} --help imported torch"
    out = proc.stdout
    assert "``" not in out and "kvtier.settings" not in out, out  # no reStructuredText markup
    parser = cli.build_parser()
    for name in argv:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    with_default = [a for a in parser._actions if a.option_strings and a.default not in (None, argparse.SUPPRESS)
                    and not isinstance(a.default, bool)]
    assert " ".join(out.split()).count("(default: ") >= len(with_default), out
