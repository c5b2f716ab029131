"""Quality benchmark: the clan against a grid of fixed learning rates at equal compute.

For each task and seed, two runs of the training machine with the same model, data, P and
``total_steps`` (so the same number of member-steps, ``P x total_steps``):

- **clan**: winner selection over the AdamW genes, a short cooperative warmup then clan rounds
  to the end (no anneal, so nothing but the evolved schedule separates it from the grid);
- **grid**: a vectorized sweep (``selection = "none"``, ``duty_cycle = 1``) where member ``i``
  trains the whole run at the fixed learning rate ``lr_grid[i]`` (the other hyperparameters at
  the config's values).

Reported: each run's final validation loss on the whole validation split (the grid's per lr),
the best fixed lr of the grid chosen by its mean over seeds, and the per-seed best of the grid
(an optimistic baseline: it picks the lr after seeing that seed's result). Goal: the clan's
mean at or below the best fixed lr's mean on every task.

Run: ``python -m vmapclan.bench quality [--size small] [--seeds 0 1 2] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

__all__ = ["main", "task_configs", "run_quality", "markdown", "SIZES"]

SIZES = ("tiny", "small", "full")


def task_configs(task: str, size: str = "small") -> dict:
    """The base config (a dict for :class:`vmapclan.RunConfig`) of ``task`` at ``size``.

    Args:
        task: ``"digits-mlp"`` or ``"stdlib-chars"``.
        size: ``"tiny"`` (seconds, for tests), ``"small"`` (minutes on 2 CPU cores) or ``"full"``.

    Raises:
        ValueError: for an unknown task or size.
    """
    if size not in SIZES:
        raise ValueError(f"quality: size must be one of {list(SIZES)}, got {size!r}")
    steps = {"tiny": 40, "small": 1500, "full": 4000}[size]
    if task == "digits-mlp":
        return {
            "task": task, "total_steps": steps,
            "model": {"hidden": 16 if size == "tiny" else 128},
            "data": {"batch_size": 32, "eval_samples": 0},
            "optimizer": {"lr": 1e-3, "weight_decay": 1e-2},
            "clan": {"population_size": 4 if size == "tiny" else 8, "round_length": 10 if size == "tiny" else 50,
                     "duty_cycle": 0.2},
        }
    if task == "stdlib-chars":
        return {
            "task": task, "total_steps": {"tiny": 20, "small": 1200, "full": 3000}[size],
            "model": {"d_model": 16 if size == "tiny" else 32, "n_layers": 1 if size != "full" else 2, "n_heads": 4},
            "data": {"batch_size": 4 if size == "tiny" else 8, "seq_len": 16 if size == "tiny" else 32,
                     "max_chars": 20_000 if size == "tiny" else 200_000, "val_fraction": 0.1,
                     "eval_samples": 16 if size == "tiny" else 64},
            "optimizer": {"lr": 3e-3, "weight_decay": 1e-2, "betas": [0.9, 0.99]},
            "clan": {"population_size": 4 if size == "tiny" else 8, "round_length": 10 if size == "tiny" else 60,
                     "duty_cycle": 0.25},
        }
    raise ValueError(f"quality: unknown task {task!r}; expected 'digits-mlp' or 'stdlib-chars'")


def lr_grid(base_lr: float, population_size: int) -> list[float]:
    """``population_size`` learning rates spaced evenly in log from ``base_lr / 10`` to ``base_lr * 30``."""
    if population_size == 1:
        return [base_lr]
    lo, hi = math.log(base_lr / 10), math.log(base_lr * 30)
    return [math.exp(lo + (hi - lo) * i / (population_size - 1)) for i in range(population_size)]


def clan_config(base: dict, seed: int) -> dict:
    """The clan run: a cooperative warmup over the first 10% of t, then clan rounds."""
    return {**base, "seed": seed, "schedule": [
        {"name": "warmup", "start_t": 0.0, "end_t": 0.1, "clan": {"competition": False}},
        {"name": "clan", "start_t": 0.1, "end_t": 1.0},
    ]}


def grid_config(base: dict, seed: int) -> dict:
    """The fixed-lr grid: a sweep, one lr per member, for the whole run."""
    clan = dict(base["clan"])
    grid = lr_grid(base["optimizer"]["lr"], clan["population_size"])
    # The lr gene's bounds must hold the whole grid.
    clan.update(selection="none", duty_cycle=1.0, lr_grid=grid,
                genes={"lr": {"low": min(grid) / 10, "high": max(grid) * 10}})
    return {**base, "seed": seed, "clan": clan, "schedule": [{"name": "grid", "start_t": 0.0, "end_t": 1.0}]}


def run_quality(tasks, seeds, size: str = "small", log=print) -> dict:
    """Run the benchmark and return its results as plain data.

    Args:
        tasks: Task names.
        seeds: Seeds (each seeds the model init, data split, mutations and loader of both runs).
        size: See :func:`task_configs`.
        log: Called with a line of text after every run.

    Returns:
        ``{task: {"grid": [lrs], "runs": [{"seed", "clan", "grid", "clan_seconds", "grid_seconds",
        "clan_final_lr"}], "summary": {...}}}``.
    """
    from vmapclan import TrainingMachine

    out = {}
    for task in tasks:
        base = task_configs(task, size)
        runs = []
        grid = None
        for seed in seeds:
            start = time.perf_counter()
            clan = TrainingMachine(clan_config(base, seed)).train()
            clan_seconds = time.perf_counter() - start
            start = time.perf_counter()
            sweep_config = grid_config(base, seed)
            sweep = TrainingMachine(sweep_config).train()
            grid_seconds = time.perf_counter() - start
            grid = sweep_config["clan"]["lr_grid"]
            rounds = clan.rounds
            run = {"seed": seed, "clan": clan.final["val_loss"], "clan_accuracy": clan.final["val_accuracy"],
                   "grid": sweep.final["member_val_losses"], "clan_seconds": clan_seconds,
                   "grid_seconds": grid_seconds, "clan_final_lr": rounds[-1]["incumbent"]["lr"] if rounds else None,
                   "member_steps": clan.final["member_steps"]}
            runs.append(run)
            log(f"{task} seed {seed}: clan {run['clan']:.4f} ({clan_seconds:.0f}s)  "
                f"best fixed lr {min(run['grid']):.4f} ({grid_seconds:.0f}s)")
        out[task] = {"grid": grid, "runs": runs, "summary": _summary(grid, runs), "config": base}
    return out


def _mean(values):
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if len(finite) == len(values) else math.inf


def _summary(grid, runs) -> dict:
    per_lr = [_mean([r["grid"][i] for r in runs]) for i in range(len(grid))]
    best = min(range(len(grid)), key=per_lr.__getitem__)
    clan = _mean([r["clan"] for r in runs])
    oracle = _mean([min(r["grid"]) for r in runs])
    return {"clan_mean": clan, "grid_means": per_lr, "best_lr": grid[best], "best_lr_mean": per_lr[best],
            "per_seed_best_mean": oracle, "goal_met": clan <= per_lr[best],
            "clan_std": statistics.pstdev([r["clan"] for r in runs]) if len(runs) > 1 else 0.0}


def markdown(results: dict) -> str:
    """The results as Markdown tables (one per task, then a summary)."""
    lines = []
    for task, res in results.items():
        grid, runs, s = res["grid"], res["runs"], res["summary"]
        lines.append(f"**{task}** (final validation loss, whole validation split; lower is better)\n")
        head = "| seed | clan | " + " | ".join(f"lr {lr:.1e}" for lr in grid) + " | best of grid (that seed) |"
        lines.append(head)
        lines.append("|" + "---|" * (3 + len(grid)))
        for r in runs:
            cells = " | ".join(f"{v:.4f}" for v in r["grid"])
            lines.append(f"| {r['seed']} | {r['clan']:.4f} | {cells} | {min(r['grid']):.4f} |")
        cells = " | ".join(f"**{v:.4f}**" if v == s["best_lr_mean"] else f"{v:.4f}" for v in s["grid_means"])
        lines.append(f"| mean | {s['clan_mean']:.4f} | {cells} | {s['per_seed_best_mean']:.4f} |")
        lines.append("")
    lines.append("| task | clan (mean ± sd) | best fixed lr (mean) | per-seed best of grid (mean) | goal met |")
    lines.append("|---|---|---|---|---|")
    for task, res in results.items():
        s = res["summary"]
        lines.append(f"| {task} | {s['clan_mean']:.4f} ± {s['clan_std']:.4f} | {s['best_lr_mean']:.4f} "
                     f"(lr {s['best_lr']:.1e}) | {s['per_seed_best_mean']:.4f} | "
                     f"{'yes' if s['goal_met'] else 'no'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Entry point of ``python -m vmapclan.bench quality``.

    Args:
        argv: Arguments after ``quality`` (default: ``sys.argv[1:]``).

    Returns:
        0 when it ran (whether or not the goal was met), 2 for a bad command line.
    """
    parser = argparse.ArgumentParser(prog="python -m vmapclan.bench quality", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="small", help="run size (default: small)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    parser.add_argument("--tasks", nargs="+", choices=("digits-mlp", "stdlib-chars"),
                        default=["digits-mlp", "stdlib-chars"], help="tasks (default: both)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    import torch

    if args.threads is not None:
        if args.threads < 1:
            print(f"quality: --threads must be a positive int, got {args.threads}", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = run_quality(args.tasks, args.seeds, args.size, log=lambda line: print(line, flush=True))
    seconds = time.perf_counter() - start
    print()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), size {args.size}, "
          f"seeds {args.seeds}, {seconds:.0f}s")
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "seeds": args.seeds, "torch": torch.__version__,
                                         "threads": torch.get_num_threads(), "seconds": seconds,
                                         "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
