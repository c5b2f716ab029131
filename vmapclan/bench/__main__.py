"""``python -m vmapclan.bench [speed options]``, ``python -m vmapclan.bench quality [options]``, ``... zoo [options]``
``... recurrent [options]``, ``... cooperative [options]``, ``... distributed [options]`` or ``... run [options]``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Dispatch to the quality benchmark (first argument ``quality``), the zoo (``zoo``), the recurrent
    layers (``recurrent``), the cooperative step (``cooperative``), one process against several
    (``distributed``), a whole run against one plain model (``run``) or the speed benchmark.

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The chosen benchmark's exit status.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "quality":
        from .quality import main as quality_main  # imported lazily: it pulls in the training machine

        return quality_main(argv[1:])
    if argv and argv[0] == "zoo":
        from .zoo import main as zoo_main

        return zoo_main(argv[1:])
    if argv and argv[0] == "recurrent":
        from .recurrent import main as recurrent_main

        return recurrent_main(argv[1:])
    if argv and argv[0] == "cooperative":
        from .cooperative import main as cooperative_main

        return cooperative_main(argv[1:])
    if argv and argv[0] == "distributed":
        from .distributed import main as distributed_main

        return distributed_main(argv[1:])
    if argv and argv[0] == "run":
        from .whole_run import main as whole_run_main

        return whole_run_main(argv[1:])
    if argv and argv[0] == "speed":
        argv = argv[1:]
    from .speed import main as speed_main

    return speed_main(argv)


if __name__ == "__main__":
    sys.exit(main())
