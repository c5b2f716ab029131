"""Quality benchmark: the clan's final model against what a user would train instead.

Every method trains the same model on the same data for the same number of member-steps
(``P x total_steps``) from the same seed (model init, data split, mutations, loader):

- ``clan``: the training machine with the library's defaults (only the task's model, data,
  P, steps and AdamW start are set);
- ``sweep``: a vectorized random sweep: P configs with lr and weight decay drawn log-uniform
  from the genes' ranges, no selection; the best member is kept;
- ``pbt``: classic PBT (truncation selection, ``duty_cycle = 1``) from the same P configs;
- ``cosine``: one model trained data-parallel at batch ``P x B`` at the configured lr, with
  linear warmup and cosine decay (what a user runs without tuning);
- ``oracle``: the same with its lr picked per seed from a grid of P values around the
  configured lr (it costs P times the compute: it says whether the clan's adapted schedule is
  as good as a tuned standard one).

Every method's lr follows the config's ``optimizer.lr_schedule`` (the library default unless a
method sets it). Reported: each run's final validation loss on the whole validation split (for
the sweep and the oracle: the best member's, picked on that same split, which flatters them),
mean ± sd over seeds, and each method's per-seed paired difference from the clan (method
minus clan: positive means the clan did better).

Tasks: ``digits-mlp`` (little data, many epochs), ``stdlib-chars`` on a corpus large enough
that no run repeats a window (data-parallel training pays), and ``diabetes-mlp`` (scikit-learn's
bundled diabetes regression: 442 samples, mean squared error).

Run: ``python -m vmapclan.bench quality [--size small] [--seeds 0 1 2 3 4] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..tasks import Task

__all__ = ["main", "task_configs", "method_config", "run_method", "run_quality", "markdown", "lr_grid",
           "DiabetesTask", "SIZES", "TASKS", "METHODS"]

SIZES = ("tiny", "small", "full")
TASKS = ("digits-mlp", "stdlib-chars", "diabetes-mlp")
METHODS = ("clan", "sweep", "pbt", "cosine", "oracle")
_SWEPT = ("lr", "weight_decay")  # what the random sweep and PBT start from


class DiabetesTask(Task):
    """Regression on scikit-learn's bundled diabetes data (442 samples, 10 features), MSE on standardised targets.

    Model settings: ``hidden`` (64), the width of a two-hidden-layer MLP.
    """

    model_defaults = {"hidden": 64}

    def split(self, data, seed):
        """A seeded split (``data.val_fraction`` held out), features and target standardised on the training part."""
        from sklearn.datasets import load_diabetes

        x, y = (torch.as_tensor(a, dtype=torch.float32) for a in load_diabetes(return_X_y=True))
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        n_val = max(1, int(round(data.val_fraction * len(x))))
        val, train = order[:n_val], order[n_val:]
        mean, std = x[train].mean(0), x[train].std(0)
        y_mean, y_std = y[train].mean(), y[train].std()
        x, y = (x - mean) / std, ((y - y_mean) / y_std).unsqueeze(1)
        return (x[train], y[train]), (x[val], y[val])

    def build_model(self, model, data):
        """An MLP 10 - hidden - hidden - 1."""
        h = model["hidden"]
        return nn.Sequential(nn.Linear(10, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 1))

    def loss(self, output, target):
        """Mean squared error."""
        return F.mse_loss(output, target)


def task_configs(task: str, size: str = "small") -> dict:
    """The base config of ``task`` at ``size``: only what a user sets (model, data, P, steps, AdamW start).

    Args:
        task: One of :data:`TASKS`.
        size: ``"tiny"`` (seconds, for tests), ``"small"`` (minutes on 2 CPU cores) or ``"full"``.

    Raises:
        ValueError: for an unknown task or size.
    """
    if size not in SIZES:
        raise ValueError(f"quality: size must be one of {list(SIZES)}, got {size!r}")
    tiny = size == "tiny"
    if task == "digits-mlp":
        return {"task": task, "total_steps": {"tiny": 40, "small": 3000, "full": 6000}[size],
                "model": {"hidden": 16 if tiny else 128},
                "data": {"batch_size": 32, "eval_samples": 0, "val_fraction": 500 / 1797},
                "optimizer": {"lr": 1e-3, "weight_decay": 1e-2},
                "clan": {"population_size": 4 if tiny else 8}}
    if task == "stdlib-chars":
        return {"task": task, "total_steps": {"tiny": 20, "small": 600, "full": 3000}[size],
                "model": {"d_model": 16 if tiny else 32, "n_layers": 1 if size != "full" else 2, "n_heads": 4},
                "data": {"batch_size": 4 if tiny else 8, "seq_len": 16 if tiny else 32,
                         "max_chars": {"tiny": 20_000, "small": 2_000_000, "full": 12_000_000}[size], "val_fraction": 0.1,
                         "eval_samples": 16 if tiny else 256},
                "optimizer": {"lr": 3e-3, "weight_decay": 1e-2, "betas": [0.9, 0.99]},
                "clan": {"population_size": 4 if tiny else 8}}
    if task == "diabetes-mlp":
        return {"task": task, "total_steps": {"tiny": 40, "small": 2000, "full": 4000}[size],
                "model": {"hidden": 16 if tiny else 64},
                "data": {"batch_size": 16, "eval_samples": 0, "val_fraction": 0.2},
                "optimizer": {"lr": 1e-3, "weight_decay": 1e-2},
                "clan": {"population_size": 4 if tiny else 8}}
    raise ValueError(f"quality: unknown task {task!r}; expected one of {list(TASKS)}")


def _task_of(base: dict):
    """The :class:`~vmapclan.Task` instance for the bench's own tasks, else ``None`` (a built-in name)."""
    return DiabetesTask() if base["task"] == "diabetes-mlp" else None


def lr_grid(base_lr: float, population_size: int) -> list[float]:
    """``population_size`` learning rates spaced evenly in log from ``base_lr / 10`` to ``base_lr * 30``."""
    if population_size == 1:
        return [base_lr]
    lo, hi = math.log(base_lr / 10), math.log(base_lr * 30)
    return [math.exp(lo + (hi - lo) * i / (population_size - 1)) for i in range(population_size)]


def _merge(base: dict, **sections) -> dict:
    out = {**base}
    for key, value in sections.items():
        out[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return out


def method_config(base: dict, method: str, seed: int, clan: dict | None = None) -> dict:
    """The run config of ``method`` for a task's ``base`` config and ``seed``.

    Args:
        base: From :func:`task_configs`.
        method: One of :data:`METHODS`.
        seed: The run's seed.
        clan: For ``"clan"``: overrides of the config (``{section: {field: value}}`` or top-level
            fields such as ``schedule``), for ablations.

    Raises:
        ValueError: for an unknown method.
    """
    base = {**base, "seed": seed}
    p = base["clan"]["population_size"]
    cosine = {"lr_schedule": "cosine", "warmup": 0.05}
    one_phase = [{"name": "main", "start_t": 0.0, "end_t": 1.0}]
    if method == "clan":
        return _merge(base, **(clan or {}))
    if method == "sweep":
        return _merge(base, clan={"selection": "none", "duty_cycle": 1.0}, schedule=one_phase)
    if method == "pbt":
        return _merge(base, clan={"selection": "truncation", "duty_cycle": 1.0}, schedule=one_phase)
    if method == "cosine":
        return _merge(base, optimizer=cosine,
                      schedule=[{"name": "data-parallel", "start_t": 0.0, "end_t": 1.0,
                                 "clan": {"competition": False}}])
    if method == "oracle":
        grid = lr_grid(base["optimizer"]["lr"], p)
        return _merge(base, optimizer=cosine, data={"batch_size": base["data"]["batch_size"] * p},
                      clan={"selection": "none", "duty_cycle": 1.0, "lr_grid": grid,
                            "genes": {"lr": {"low": min(grid) / 10, "high": max(grid) * 10}}},
                      schedule=one_phase)
    raise ValueError(f"quality: unknown method {method!r}; expected one of {list(METHODS)}")


def random_configs(clan, seed: int) -> dict[str, list[float]]:
    """P values of each of lr and weight decay, drawn log-uniform from the clan's gene ranges (seeded)."""
    generator = torch.Generator().manual_seed(10_000 + seed)
    out = {}
    for name in _SWEPT:
        gene = clan.genes[name]
        low, high = (gene.low, gene.high) if gene.scale == "log" else (max(gene.low, 1e-6), gene.high)
        u = torch.rand(clan.population_size, generator=generator, dtype=torch.float64)
        out[name] = torch.exp(math.log(low) + (math.log(high) - math.log(low)) * u).tolist()
    return out


def run_method(base: dict, method: str, seed: int, clan: dict | None = None) -> dict:
    """Train one method for one seed; returns ``{"val_loss", "seconds", "member_steps", ...}``."""
    from vmapclan import TrainingMachine

    config = method_config(base, method, seed, clan)
    start = time.perf_counter()
    machine = TrainingMachine(config, task=_task_of(base))
    machine.prepare()
    if method in ("sweep", "pbt"):
        for name, values in random_configs(machine.clan, seed).items():
            machine.clan.set_genome(name, values)
    results = machine.train()
    out = {"method": method, "seed": seed, "val_loss": results.final["val_loss"],
           "val_accuracy": results.final["val_accuracy"], "seconds": time.perf_counter() - start,
           "member_steps": results.final["member_steps"]}
    # With clan.keep_best: where the returned incumbent was kept, and the last model's loss.
    out.update({key: results.final[key] for key in ("kept_step", "last_val_loss") if key in results.final})
    rounds = results.rounds
    if rounds:
        out["final_lr"] = rounds[-1]["incumbent"]["lr"]
        out["adopted"] = sum(1 for r in rounds if r.get("winner") not in (0, None))
        out["rounds"] = len(rounds)
    return out


def run_quality(tasks, seeds, size: str = "small", methods=METHODS, log=print, clan: dict | None = None) -> dict:
    """Run the benchmark and return its results as plain data.

    Args:
        tasks: Task names (of :data:`TASKS`).
        seeds: Seeds.
        size: See :func:`task_configs`.
        methods: Which of :data:`METHODS` to run (``"clan"`` is the reference of the differences).
        log: Called with a line of text after every run.
        clan: Overrides of the clan's config (see :func:`method_config`).

    Returns:
        ``{task: {"config": base, "runs": {method: [run, ...]}, "summary": {method: {...}}}}``.
    """
    out = {}
    for task in tasks:
        base = task_configs(task, size)
        runs = {m: [] for m in methods}
        for seed in seeds:
            for method in methods:
                run = run_method(base, method, seed, clan)
                runs[method].append(run)
                log(f"{task} seed {seed} {method}: {run['val_loss']:.4f} ({run['seconds']:.0f}s)")
        out[task] = {"config": base, "runs": runs, "summary": _summary(runs)}
    return out


def _summary(runs: dict) -> dict:
    """Per method: mean and sd of the final loss over seeds, and the mean ± sd of its paired difference from the clan."""
    out = {}
    reference = {r["seed"]: r["val_loss"] for r in runs.get("clan", [])}
    for method, items in runs.items():
        losses = [r["val_loss"] for r in items]
        finite = all(math.isfinite(v) for v in losses)
        entry = {"mean": statistics.fmean(losses) if finite else math.inf,
                 "sd": statistics.stdev(losses) if finite and len(losses) > 1 else 0.0,
                 "seconds": statistics.fmean(r["seconds"] for r in items)}
        diffs = [r["val_loss"] - reference[r["seed"]] for r in items if r["seed"] in reference]
        if method != "clan" and diffs and all(math.isfinite(d) for d in diffs):
            entry["diff_mean"] = statistics.fmean(diffs)
            entry["diff_sd"] = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
            entry["clan_better"] = sum(d > 0 for d in diffs)
            entry["seeds"] = len(diffs)
        out[method] = entry
    return out


def markdown(results: dict) -> str:
    """The results as Markdown: a per-seed table per task, then the summary with the paired differences."""
    lines = []
    for task, res in results.items():
        runs = res["runs"]
        methods = list(runs)
        seeds = [r["seed"] for r in runs[methods[0]]]
        lines.append(f"**{task}** (final validation loss; lower is better)\n")
        lines.append("| seed | " + " | ".join(methods) + " |")
        lines.append("|---|" + "---|" * len(methods))
        for i, seed in enumerate(seeds):
            lines.append(f"| {seed} | " + " | ".join(f"{runs[m][i]['val_loss']:.4f}" for m in methods) + " |")
        lines.append("")
    lines.append("| task | method | mean ± sd | method - clan (mean ± sd, paired) | clan better on | s per run |")
    lines.append("|---|---|---|---|---|---|")
    for task, res in results.items():
        for method, s in res["summary"].items():
            diff = (f"{s['diff_mean']:+.4f} ± {s['diff_sd']:.4f}" if "diff_mean" in s else "")
            better = f"{s['clan_better']}/{s['seeds']}" if "clan_better" in s else ""
            lines.append(f"| {task} | {method} | {s['mean']:.4f} ± {s['sd']:.4f} | {diff} | {better} | "
                         f"{s['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Entry point of ``python -m vmapclan.bench quality``.

    Args:
        argv: Arguments after ``quality`` (default: ``sys.argv[1:]``).

    Returns:
        0 when it ran, 2 for a bad command line.
    """
    parser = argparse.ArgumentParser(prog="python -m vmapclan.bench quality", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="small", help="run size (default: small)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="seeds (default: 0 1 2 3 4)")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="tasks (default: all)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="methods (default: all)")
    parser.add_argument("--clan", type=json.loads, default=None,
                        help='overrides of the clan\'s config as JSON, e.g. \'{"clan": {"duty_cycle": 0.1}}\'')
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    if args.threads is not None:
        if args.threads < 1:
            print(f"quality: --threads must be a positive int, got {args.threads}", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    if args.clan is not None and not isinstance(args.clan, dict):
        print(f"quality: --clan must be a JSON object, got {args.clan!r}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    results = run_quality(args.tasks, args.seeds, args.size, args.methods,
                          log=lambda line: print(line, flush=True), clan=args.clan)
    seconds = time.perf_counter() - start
    print()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), size {args.size}, "
          f"seeds {args.seeds}, {seconds:.0f}s")
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "seeds": args.seeds, "torch": torch.__version__,
                                         "threads": torch.get_num_threads(), "seconds": seconds,
                                         "clan": args.clan, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
