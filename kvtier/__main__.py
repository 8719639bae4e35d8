"""``python -m kvtier``: the same entry point as the ``kvtier`` console script."""

import sys

from kvtier.cli import main

sys.exit(main())
