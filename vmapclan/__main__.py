"""``python -m vmapclan``: the ``vmapclan`` command (:func:`vmapclan.cli.main`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
