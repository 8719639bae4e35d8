"""CLI sub-commands: one module per command, each with ``add_parser(subparsers)`` and ``run(args)``.

``kvtier.cli.COMMANDS`` lists the modules the ``kvtier`` command line loads. Command modules
import nothing heavy (torch, the cache) at module level or while building their parsers, so
every ``--help`` answers at once; the work imports what it needs when it runs.
"""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written (plain text, line breaks kept); every option that has a default
    shows it, as fio, redis-server and ``vllm serve`` do."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        default = action.default
        if ("%(default)" in help or default is None or default is argparse.SUPPRESS
                or isinstance(default, bool) or not action.option_strings):
            return help
        return f"{help} (default: %(default)s)"
