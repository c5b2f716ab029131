"""The ``vmapclan`` command (placeholder entry point until the training machine lands)."""

import sys


def main(argv=None) -> int:
    """Entry point of the ``vmapclan`` command."""
    print("vmapclan: no commands yet", file=sys.stderr)
    return 2
