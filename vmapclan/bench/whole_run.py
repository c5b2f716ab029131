"""A whole run with the defaults against one plain model at batch ``P x B`` plus one evaluation.

The population's promise is a better model for about the cost of training one model
data-parallel. This bench times both from the same config, on one thread, in turns:

- **clan**: ``TrainingMachine(config).train()`` with the library's defaults (its search, rounds
  or data-parallel stretch, scoring, selection and final evaluation; no run directory), and
  where its time went (``final["seconds_in"]``);
- **plain**: the task's model, built from the same seed, trained with ``torch.optim.AdamW`` at
  batch ``P x B`` for the same steps (a fresh permutation of the training data every epoch, as
  the clan's loader), then scored once on the whole validation and test splits
  (:meth:`Task.evaluate`): the report the clan's final record gives.

Before the timed runs, each runs once for a few steps, untimed (torch's first optimizer and
vmap calls import and warm up what every later run reuses).

Each case runs ``--reps`` times and reports the medians. Tasks:

- ``digits``: scikit-learn's digits, the MLP of 128, 1500 steps (data that repeats: clan rounds);
- ``abundant``: stdlib-chars with a corpus large enough that no window repeats (one model after
  the search), a transformer of d_model 32 and one block, batch 8 windows of 32, 600 steps.

Run: ``python -m vmapclan.bench run [--tasks digits abundant] [--reps 3] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

__all__ = ["CASES", "run_whole", "format_whole", "main"]

CASES: dict[str, dict] = {
    "digits": {"task": "digits-mlp", "total_steps": 1500, "seed": 0, "clan": {"population_size": 8}},
    "abundant": {"task": "stdlib-chars", "total_steps": 600, "seed": 0,
                 "model": {"d_model": 32, "n_layers": 1, "n_heads": 4},
                 "data": {"batch_size": 8, "seq_len": 32, "max_chars": 2_000_000},
                 "clan": {"population_size": 8}},
}


def _clan_run(config: dict) -> dict:
    from .. import TrainingMachine

    start = time.perf_counter()
    final = TrainingMachine(config).train().final
    return {"seconds": time.perf_counter() - start, "val_loss": final["val_loss"],
            "parts": final.get("seconds_in", {})}


def _plain_run(config: dict) -> dict:
    """One model at batch ``P x B`` for the run's steps, then one evaluation on the validation (and test) split."""
    from .plain import train_plain

    start = time.perf_counter()
    run = train_plain(config)
    val = run.task.evaluate(run.model, run.data.val)["loss"]
    if run.data.test is not None:
        run.task.evaluate(run.model, run.data.test)
    return {"seconds": time.perf_counter() - start, "val_loss": val}


def run_whole(tasks: list[str], reps: int = 3, log=None) -> list[dict]:
    """One row per task: the medians of ``reps`` clan and plain runs, timed in turns."""
    rows = []
    for name in tasks:
        warm = {**CASES[name], "total_steps": 20}
        _clan_run(warm), _plain_run(warm)
        clan, plain = [], []
        for rep in range(reps):
            clan.append(_clan_run(CASES[name]))
            plain.append(_plain_run(CASES[name]))
            if log is not None:
                log(f"{name} rep {rep}: clan {clan[-1]['seconds']:.2f}s, plain {plain[-1]['seconds']:.2f}s")
        parts = {part: statistics.median(r["parts"].get(part, 0.0) for r in clan) for part in clan[0]["parts"]}
        seconds = statistics.median(r["seconds"] for r in clan)
        rows.append({"task": name, "clan_seconds": seconds,
                     "plain_seconds": statistics.median(r["seconds"] for r in plain),
                     "clan_val_loss": clan[0]["val_loss"], "plain_val_loss": plain[0]["val_loss"], "parts": parts})
    return rows


def format_whole(rows: list[dict]) -> str:
    """A text table of :func:`run_whole`'s rows."""
    head = f"{'task':<10} {'clan s':>8} {'plain s':>8} {'ratio':>6} {'eval %':>7} {'clan val':>9} {'plain val':>9}  where"
    lines = [head, "-" * len(head)]
    for r in rows:
        parts = r["parts"]
        share = 100 * parts.get("evaluate", 0.0) / r["clan_seconds"]
        where = ", ".join(f"{part} {seconds:.2f}" for part, seconds in parts.items() if seconds >= 0.005)
        lines.append(f"{r['task']:<10} {r['clan_seconds']:>8.2f} {r['plain_seconds']:>8.2f} "
                     f"{r['clan_seconds'] / r['plain_seconds']:>6.2f} {share:>6.1f}% {r['clan_val_loss']:>9.4f} "
                     f"{r['plain_val_loss']:>9.4f}  {where}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m vmapclan.bench run``."""
    parser = argparse.ArgumentParser(prog="python -m vmapclan.bench run",
                                     description="A whole run with the defaults against one plain model at P x B.")
    parser.add_argument("--tasks", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error(f"--reps must be at least 1, got {args.reps}")
    torch.set_num_threads(args.threads)
    print(format_whole(run_whole(args.tasks, args.reps, log=lambda line: print(line, file=sys.stderr, flush=True))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
