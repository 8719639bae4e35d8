"""CLI sub-commands: one module per command, each with ``add_parser(subparsers)`` and ``run(args)``.

``kvtier.cli.COMMANDS`` lists the modules the ``kvtier`` command line loads.
"""
