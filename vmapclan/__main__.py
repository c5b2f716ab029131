"""``python -m vmapclan``: the ``vmapclan`` command (:func:`vmapclan.cli.main`)."""

import sys

from .cli import main

sys.exit(main())
