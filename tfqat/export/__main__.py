"""``python -m tfqat.export``: :func:`tfqat.export.cli.main`."""

import sys

from tfqat.export.cli import main

if __name__ == "__main__":
    sys.exit(main())
