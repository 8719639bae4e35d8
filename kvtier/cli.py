"""``kvtier`` command line: one argparse sub-command per module in ``kvtier/commands/``.

A command module exposes ``add_parser(subparsers)`` and ``run(args) -> int``; adding a command is
adding its name to ``COMMANDS``. Bad input never shows a traceback: usage errors, bad values and
unusable data directories print one ``kvtier <command>: error: ...`` line on stderr and exit 2;
other kvtier and OS errors print one such line and exit 1.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys
from typing import NoReturn

from kvtier.commands import HelpFormatter
from kvtier.errors import DataDirError, InvalidRequest, KVTierError

COMMANDS: tuple[str, ...] = ("serve", "bench", "calc")

EXIT_USAGE = 2
EXIT_FAILURE = 1


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage dump) and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``only`` (a command name) just that command's module is imported, so a
    light command does not pay for the imports of a heavy one (torch, for ``bench``)."""
    parser = OneLineParser(prog="kvtier", formatter_class=HelpFormatter,
                           description="kvtier: a tiered KV-cache offload service for LLM inference "
                                       "(GPU, host DRAM, SSD, shared remote tier).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name in COMMANDS if only not in COMMANDS else (only,):
        module = importlib.import_module(f"kvtier.commands.{name}")
        module.add_parser(sub)
        sub.choices[name].set_defaults(_run=module.run)
    return parser


_NEGATIVE = re.compile(r"^-\.?\d")


def join_negative_values(argv: list[str]) -> list[str]:
    """``--flag -1GiB`` -> ``--flag=-1GiB``: argparse takes a value that starts with ``-`` for a
    flag (and says only "expected one argument"); joined, the value reaches its parser, which
    says what is wrong with it."""
    out: list[str] = []
    for arg in argv:
        if out and _NEGATIVE.match(arg) and out[-1].startswith("--") and "=" not in out[-1]:
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the command, return its exit status."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    argv = join_negative_values(sys.argv[1:] if argv is None else list(argv))
    parser = build_parser(argv[0] if argv else None)
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit as e:  # argparse's own exits (--help, usage errors)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    prog = f"kvtier {args.command}"
    if extra:  # reported here so the message names the command, not just "kvtier"
        print(f"{prog}: error: unrecognized arguments: {' '.join(extra)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return int(args._run(args) or 0)
    except (InvalidRequest, DataDirError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (KVTierError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
