"""Quality benchmark: the clan's final model against what a user would train instead, judged on a test split.

Every method trains the same model on the same data for the same number of member-steps
(``P x total_steps``: ``P x B`` samples a step) from the same seed (model init, data split,
mutations, loader):

- ``clan``: the training machine with the library's defaults (only the task's model, data,
  P, steps and AdamW start are set);
- ``sweep``: a vectorized random sweep: P configs with lr and weight decay drawn log-uniform
  from the genes' ranges, no selection; the best member by validation loss is kept;
- ``pbt``: classic PBT (truncation selection, ``duty_cycle = 1``) from the same P configs;
- ``cosine``: one model trained data-parallel at batch ``P x B`` at the configured lr, with
  linear warmup and cosine decay (what a user runs without tuning);
- ``oracle``: the same with its lr picked per seed, by validation loss, from a grid of P values
  around the configured lr (it costs P times the compute: it says whether the clan's adapted
  schedule is as good as a tuned standard one);
- ``schedulefree``: one model at batch ``P x B`` trained by ``schedulefree.AdamWScheduleFree``
  at that package's defaults but for the configured lr, in a plain loop (no schedule to choose);
- ``schedulefree-oracle``: the same with its lr picked by validation loss from the oracle's grid
  (P times the compute).

Every run is judged on its task's test split, which no method reads for any decision: each
task's ``split`` returns ``(train, val, test)`` (:mod:`vmapclan.bench.quality_tasks`), and
selection, the search, keep-best and the choice among a sweep's or an oracle's models read the
validation split alone. Reported per task and method: mean ± sd over seeds of the test loss and
of the validation loss, the per-seed paired difference of the test loss from the clan's
(method minus clan: positive means the clan did better) and the number of seeds on which the
clan's test loss is lower; and, over all (task, seed) pairs, the share the clan wins against each
method. Tasks named by ``--holdout`` are kept aside: reported in a table and an over-all line
of their own, so that what is tuned on the other tasks can be checked on them.

Tasks (:data:`TASKS`; see :mod:`vmapclan.bench.quality_tasks`): ``digits-mlp``,
``stdlib-chars``, ``diabetes-mlp``, ``breast-cancer-mlp``, ``wine-mlp``, ``iris-mlp``, ``digits-cnn``,
``sequence-gru``, ``teacher-regression``, ``teacher-classification`` and ``digits-finetune``.

Run: ``python -m vmapclan.bench quality [--size small] [--seeds 0 1 2 3 4] [--tasks ...]
[--methods ...] [--holdout ...] [--threads 1] [--out results.json]``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from .quality_tasks import BENCH_TASKS, DiabetesTask, bench_task

__all__ = ["main", "task_configs", "method_config", "run_method", "run_quality", "markdown", "lr_grid",
           "method_lr_grid", "random_configs", "schedulefree_run", "paired_wins", "summarize", "overall",
           "DiabetesTask", "SIZES", "TASKS", "METHODS", "HOLDOUT"]

SIZES = ("tiny", "small", "full")
TASKS = tuple(BENCH_TASKS)
METHODS = ("clan", "sweep", "pbt", "cosine", "oracle", "schedulefree", "schedulefree-oracle")
#: The tasks ``--holdout`` keeps aside by default: two of different kinds, added with the test split,
#: and iris, added after the scarce-data rule of the default schedule was chosen.
HOLDOUT = ("wine-mlp", "iris-mlp", "teacher-classification")
_SWEPT = ("lr", "weight_decay")  # what the random sweep and PBT start from
_STEPS = {"tiny": 0, "small": 1, "full": 2}


def _sized(size: str, tiny, small, full):
    return (tiny, small, full)[_STEPS[size]]


def task_configs(task: str, size: str = "small") -> dict:
    """The base config of ``task`` at ``size``: only what a user sets (model, data, P, steps, AdamW start).

    Args:
        task: One of :data:`TASKS`.
        size: ``"tiny"`` (a second or two a run, for tests), ``"small"`` (seconds a run on one
            CPU thread) or ``"full"``.

    Returns:
        A config dict for :class:`~vmapclan.TrainingMachine` (without ``seed``).

    Raises:
        ValueError: for an unknown task or size.
    """
    if size not in SIZES:
        raise ValueError(f"quality: size must be one of {list(SIZES)}, got {size!r}")
    if task not in TASKS:
        raise ValueError(f"quality: unknown task {task!r}; expected one of {list(TASKS)}")
    tiny = size == "tiny"
    p = 4 if tiny else 8
    adamw = {"lr": 1e-3, "weight_decay": 1e-2}

    def config(steps, model, data, optimizer=adamw):
        return {"task": task, "total_steps": _sized(size, *steps), "model": model, "data": data,
                "optimizer": dict(optimizer), "clan": {"population_size": p}}

    if task == "digits-mlp":
        # 1797 images: 1297 to train on, 250 for validation, 250 for the test.
        return config((40, 3000, 6000), {"hidden": 16 if tiny else 128},
                      {"batch_size": 32, "eval_samples": 0, "val_fraction": 500 / 1797})
    if task == "stdlib-chars":
        # The corpus holds more training windows than a run reads: no window repeats.
        return config((20, 600, 3000),
                      {"d_model": 16 if tiny else 32, "n_layers": 1 if size != "full" else 2, "n_heads": 4},
                      {"batch_size": 4 if tiny else 8, "seq_len": 16 if tiny else 32,
                       "max_chars": _sized(size, 20_000, 2_000_000, 12_000_000), "val_fraction": 0.1,
                       "eval_samples": 16 if tiny else 256},
                      {"lr": 3e-3, "weight_decay": 1e-2, "betas": [0.9, 0.99]})
    if task == "diabetes-mlp":
        # 442 samples: 309 to train on, 66 for validation, 67 for the test.
        return config((40, 2000, 4000), {"hidden": 16 if tiny else 64},
                      {"batch_size": 16, "eval_samples": 0, "val_fraction": 0.3})
    if task == "breast-cancer-mlp":
        # 569 samples: 341 to train on, 114 for validation, 114 for the test.
        return config((40, 1000, 2000), {"hidden": 16 if tiny else 32},
                      {"batch_size": 16, "eval_samples": 0, "val_fraction": 0.4})
    if task == "iris-mlp":
        # 150 samples: 90 to train on, 30 for validation, 30 for the test.
        return config((40, 1000, 2000), {"hidden": 16 if tiny else 32},
                      {"batch_size": 8, "eval_samples": 0, "val_fraction": 0.4})
    if task == "wine-mlp":
        # 178 samples: 107 to train on, 35 for validation, 36 for the test.
        return config((40, 1000, 2000), {"hidden": 16 if tiny else 32},
                      {"batch_size": 8, "eval_samples": 0, "val_fraction": 0.4})
    if task == "digits-cnn":
        return config((30, 1500, 3000), {"channels": 4 if tiny else 8},
                      {"batch_size": 32, "eval_samples": 0, "val_fraction": 500 / 1797})
    if task == "sequence-gru":
        # 3000 sequences of 16 tokens: 2000 to train on, 500 for validation, 500 for the test.
        return config((20, 500, 1500), {"embedding": 8 if tiny else 16, "hidden": 16 if tiny else 48},
                      {"batch_size": 16, "seq_len": 16, "eval_samples": 0, "val_fraction": 1 / 3,
                       "samples": 600 if tiny else 3000})
    if task in ("teacher-regression", "teacher-classification"):
        steps, batch = (40, 600, 2000), 32
        # A training set larger than the run reads (total_steps x P x B): no sample repeats.
        return config(steps, {"hidden": 16 if tiny else 64},
                      {"batch_size": batch, "eval_samples": 512,
                       "train_samples": _sized(size, *steps) * p * batch + 1024,
                       "holdout_samples": 512 if tiny else 4096})
    # digits-finetune: 30 images of each digit 5-9 to train on; the other ~750 held out.
    return config((30, 400, 1000), {"hidden": 16 if tiny else 64, "pretrain_steps": 30 if tiny else 300},
                  {"batch_size": 8, "eval_samples": 0, "shots": 30})


def lr_grid(base_lr: float, population_size: int) -> list[float]:
    """``population_size`` learning rates spaced evenly in log from ``base_lr / 10`` to ``base_lr * 30``.

    Example:
        >>> [round(v, 6) for v in lr_grid(1e-3, 2)]
        [0.0001, 0.03]
    """
    if population_size == 1:
        return [base_lr]
    lo, hi = math.log(base_lr / 10), math.log(base_lr * 30)
    return [math.exp(lo + (hi - lo) * i / (population_size - 1)) for i in range(population_size)]


def method_lr_grid(base: dict, method: str) -> list[float]:
    """The learning rates ``method`` trains a model at for the task's ``base`` config.

    The two oracles try :func:`lr_grid` of the configured lr (P values); every other method
    starts from the configured lr alone (the clan's search and the sweep draw their own).

    Args:
        base: From :func:`task_configs`.
        method: One of :data:`METHODS`.

    Returns:
        The learning rates, lowest first.

    Raises:
        ValueError: for an unknown method.
    """
    _check_method(method)
    lr, p = base["optimizer"]["lr"], base["clan"]["population_size"]
    return lr_grid(lr, p) if method in ("oracle", "schedulefree-oracle") else [lr]


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"quality: unknown method {method!r}; expected one of {list(METHODS)}")


def _merge(base: dict, **sections) -> dict:
    out = {**base}
    for key, value in sections.items():
        out[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return out


def method_config(base: dict, method: str, seed: int, clan: dict | None = None) -> dict:
    """The run config of ``method`` for a task's ``base`` config and ``seed``.

    The two schedule-free methods train outside the machine (:func:`schedulefree_run`); their
    config is ``base`` with the seed, read for the task, model, data, P and steps.

    Args:
        base: From :func:`task_configs`.
        method: One of :data:`METHODS`.
        seed: The run's seed.
        clan: For ``"clan"``: overrides of the config (``{section: {field: value}}`` or top-level
            fields such as ``schedule``), for ablations.

    Raises:
        ValueError: for an unknown method.
    """
    _check_method(method)
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
        grid = method_lr_grid(base, method)
        return _merge(base, optimizer=cosine, data={"batch_size": base["data"]["batch_size"] * p},
                      clan={"selection": "none", "duty_cycle": 1.0, "lr_grid": grid,
                            "genes": {"lr": {"low": min(grid) / 10, "high": max(grid) * 10}}},
                      schedule=one_phase)
    return base  # schedulefree, schedulefree-oracle


def random_configs(clan, seed: int) -> dict[str, list[float]]:
    """P values of each of lr and weight decay, drawn log-uniform from the clan's gene ranges (seeded).

    Args:
        clan: The run's :class:`~vmapclan.Clan` (its genes' ranges and population size).
        seed: The run's seed.

    Returns:
        ``{"lr": [P values], "weight_decay": [P values]}``.
    """
    generator = torch.Generator().manual_seed(10_000 + seed)
    out = {}
    for name in _SWEPT:
        gene = clan.genes[name]
        low, high = (gene.low, gene.high) if gene.scale == "log" else (max(gene.low, 1e-6), gene.high)
        u = torch.rand(clan.population_size, generator=generator, dtype=torch.float64)
        out[name] = torch.exp(math.log(low) + (math.log(high) - math.log(low)) * u).tolist()
    return out


def _task_of(base: dict):
    """The bench's :class:`~vmapclan.Task` for ``base["task"]`` (every bench task has a test split of its own)."""
    return bench_task(base["task"])


def _schedulefree():
    """The ``schedulefree`` package, or a one-line ImportError saying how to install it."""
    try:
        import schedulefree
    except ImportError:
        raise ImportError("quality: the schedulefree methods need the schedulefree package: "
                          "pip install 'vmapclan[bench]'") from None
    return schedulefree


def schedulefree_run(base: dict, seed: int, lr: float) -> dict:
    """One model at batch ``P x B`` for ``total_steps`` steps with ``schedulefree.AdamWScheduleFree`` at ``lr``.

    The data, the model and its initial weights are the machine's for the same config and seed
    (torch seeded, the task's data loaded, the model built); the batches are a fresh
    permutation of the training data every epoch. The optimizer's other settings are the
    package's defaults. It is switched to its averaged weights (``optimizer.eval()``) before
    the model is scored on the whole validation and test splits, in eval mode.

    Args:
        base: From :func:`task_configs`.
        seed: The run's seed.
        lr: The learning rate.

    Returns:
        ``{"lr", "val_loss", "val_accuracy", "test_loss", "test_accuracy", "diverged"}``; a run
        whose training loss is not finite stops there and scores ``inf``.

    Raises:
        ImportError: if the ``schedulefree`` package is not installed.
    """
    schedulefree = _schedulefree()
    from .plain import train_plain

    def adamw_schedulefree(model, _config):
        return schedulefree.AdamWScheduleFree(model.parameters(), lr=lr)

    task, data, model, optimizer, diverged = train_plain({**base, "seed": seed}, adamw_schedulefree, task=_task_of(base))
    optimizer.eval()  # the averaged weights: the ones schedule-free training returns
    out = {"lr": lr, "diverged": diverged}
    for split in ("val", "test"):
        scores = task.evaluate(model, getattr(data, split)) if not diverged else {"loss": math.inf,
                                                                                  "accuracy": math.nan}
        loss = scores["loss"] if math.isfinite(scores["loss"]) else math.inf
        out.update({f"{split}_loss": loss, f"{split}_accuracy": scores["accuracy"]})
    return out


def run_method(base: dict, method: str, seed: int, clan: dict | None = None) -> dict:
    """Train one method for one seed.

    Args:
        base: From :func:`task_configs`.
        method: One of :data:`METHODS`.
        seed: The run's seed.
        clan: Overrides of the clan's config (see :func:`method_config`).

    Returns:
        ``{"method", "seed", "val_loss", "val_accuracy", "test_loss", "test_accuracy", "seconds",
        "member_steps", ...}``: the returned model's losses (``inf`` for a run that ended without a
        finite model, with ``"diverged": True``), and what the method picked (``final_lr``,
        ``lr``, ``grid_val_losses``, ``kept_step``, ...).

    Raises:
        ValueError: for an unknown method.
        ImportError: for a schedule-free method without the ``schedulefree`` package.
    """
    from vmapclan import DivergenceError, TrainingMachine

    _check_method(method)
    start = time.perf_counter()
    p, steps = base["clan"]["population_size"], base["total_steps"]
    if method.startswith("schedulefree"):
        grid = method_lr_grid(base, method)
        runs = [schedulefree_run(base, seed, lr) for lr in grid]
        # Picked by the validation loss alone; the test loss is the picked model's.
        best = min(range(len(runs)), key=lambda i: runs[i]["val_loss"])
        out = {"method": method, "seed": seed, **runs[best], "seconds": time.perf_counter() - start,
               "member_steps": steps * p}
        if len(runs) > 1:
            out["grid_val_losses"] = [r["val_loss"] for r in runs]
        return out
    config = method_config(base, method, seed, clan)
    machine = TrainingMachine(config, task=_task_of(base))
    machine.prepare()
    if method in ("sweep", "pbt"):
        for name, values in random_configs(machine.clan, seed).items():
            machine.clan.set_genome(name, values)
    try:
        results = machine.train()
    except DivergenceError:
        return {"method": method, "seed": seed, "val_loss": math.inf, "val_accuracy": math.nan,
                "test_loss": math.inf, "test_accuracy": math.nan, "seconds": time.perf_counter() - start,
                "member_steps": steps * p, "diverged": True}
    final = results.final
    out = {"method": method, "seed": seed, "val_loss": final["val_loss"], "val_accuracy": final["val_accuracy"],
           "test_loss": final.get("test_loss", math.nan), "test_accuracy": final.get("test_accuracy", math.nan),
           "seconds": time.perf_counter() - start, "member_steps": final["member_steps"]}
    # With clan.keep_best: where the returned incumbent was kept, and the last model's loss.
    out.update({key: final[key] for key in ("kept_step", "last_val_loss") if key in final})
    rounds = results.rounds
    if rounds:
        out["final_lr"] = rounds[-1]["incumbent"]["lr"]
        out["adopted"] = sum(1 for r in rounds if r.get("winner") not in (0, None))
        out["rounds"] = len(rounds)
    return out


def _check_names(tasks, methods, holdout) -> None:
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"quality: unknown task {task!r}; expected one of {list(TASKS)}")
    for task in holdout:
        if task not in TASKS:
            raise ValueError(f"quality: unknown holdout task {task!r}; expected one of {list(TASKS)}")
    for method in methods:
        _check_method(method)


def run_quality(tasks, seeds, size: str = "small", methods=METHODS, log=print, clan: dict | None = None,
                holdout=()) -> dict:
    """Run the benchmark and return its results as plain data.

    Args:
        tasks: Task names (of :data:`TASKS`).
        seeds: Seeds (distinct ints).
        size: See :func:`task_configs`.
        methods: Which of :data:`METHODS` to run (``"clan"`` is the reference of the differences).
        log: Called with a line of text after every run.
        clan: Overrides of the clan's config (see :func:`method_config`).
        holdout: Tasks kept aside: marked ``"holdout": True`` and reported on their own.

    Returns:
        ``{task: {"config": base, "holdout": bool, "runs": {method: [run, ...]}, "summary":
        {method: {...}}}}`` (see :func:`run_method` and :func:`summarize`).

    Raises:
        ValueError: for an unknown task, method, holdout task or size, or repeated seeds,
            before anything runs.
    """
    tasks, methods, seeds, holdout = list(tasks), list(methods), list(seeds), set(holdout)
    _check_names(tasks, methods, holdout)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"quality: seeds must be distinct, got {seeds}")
    bases = {task: task_configs(task, size) for task in tasks}
    out = {}
    for task, base in bases.items():
        runs = {m: [] for m in methods}
        for seed in seeds:
            for method in methods:
                run = run_method(base, method, seed, clan)
                runs[method].append(run)
                log(f"{task} seed {seed} {method}: test {run['test_loss']:.4f}, val {run['val_loss']:.4f} "
                    f"({run['seconds']:.1f}s)")
        out[task] = {"config": base, "holdout": task in holdout, "runs": runs, "summary": summarize(runs)}
    return out


def paired_wins(clan: Mapping, other: Mapping) -> tuple[int, int]:
    """How often the clan's loss is lower than another method's, over the seeds both ran.

    Args:
        clan: The clan's loss by seed.
        other: The other method's loss by seed.

    Returns:
        ``(wins, seeds compared)``: a tie is no win, and neither is a comparison with a NaN (a
        run scored ``inf`` loses to any finite one).

    Example:
        >>> paired_wins({0: 0.5, 1: 0.7, 2: 0.4}, {0: 0.6, 1: 0.6, 2: 0.4})
        (1, 3)
    """
    seeds = [s for s in clan if s in other]
    return sum(1 for s in seeds if clan[s] < other[s]), len(seeds)


def _stats(items: list[dict], key: str, reference: dict | None, compare: bool) -> dict:
    """Mean and sd of ``key`` over ``items``; with ``compare``, the paired differences from ``reference``."""
    values = [r[key] for r in items]
    finite = all(math.isfinite(v) for v in values)
    entry = {"mean": statistics.fmean(values) if finite else math.inf,
             "sd": statistics.stdev(values) if finite and len(values) > 1 else 0.0}
    if compare and reference:
        other = {r["seed"]: r[key] for r in items}
        wins, seeds = paired_wins(reference, other)
        diffs = [other[s] - reference[s] for s in other if s in reference]
        if seeds:
            entry.update(clan_better=wins, seeds=seeds)
        if diffs and all(math.isfinite(d) for d in diffs):
            entry["diff_mean"] = statistics.fmean(diffs)
            entry["diff_sd"] = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    return entry


def summarize(runs: dict) -> dict:
    """Per method: the mean and sd over seeds of the validation and the test loss, each paired with the clan's.

    Args:
        runs: ``{method: [run, ...]}``, each run with ``seed``, ``val_loss`` and ``seconds``, and
            ``test_loss`` where the task has a test split.

    Returns:
        ``{method: entry}``. An entry's unprefixed keys are on the validation split: ``mean``,
        ``sd`` and, for a method other than the clan, ``diff_mean`` and ``diff_sd`` (method minus
        clan, paired by seed; only when every difference is finite), ``clan_better`` (seeds on
        which the clan's loss is lower: :func:`paired_wins`) and ``seeds`` (compared). The same
        keys prefixed ``test_`` are on the test split, when every run of the method has a
        ``test_loss``: the benchmark's verdict. ``seconds`` is the mean wall time of a run.
        A mean over a run that is not finite is ``inf``.
    """
    out = {}
    clan = runs.get("clan", [])
    for method, items in runs.items():
        compare = method != "clan"
        entry = _stats(items, "val_loss", {r["seed"]: r["val_loss"] for r in clan}, compare)
        if items and all("test_loss" in r for r in items):
            reference = {r["seed"]: r["test_loss"] for r in clan} if all("test_loss" in r for r in clan) else None
            entry.update({f"test_{k}": v for k, v in _stats(items, "test_loss", reference, compare).items()})
        entry["seconds"] = statistics.fmean(r["seconds"] for r in items) if items else 0.0
        out[method] = entry
    return out


_summary = summarize  # the name this function had before it judged the test split


def _tested(results: dict) -> bool:
    return any("test_loss" in r for res in results.values() for items in res["runs"].values() for r in items)


def overall(results: dict, holdout: bool = False) -> dict:
    """Over all (task, seed) pairs of the main (or the held-out) tasks: how often the clan beats each method.

    The loss compared is the test loss (the validation loss for results without one).

    Args:
        results: From :func:`run_quality`.
        holdout: Count the tasks kept aside instead of the others.

    Returns:
        ``{method: {"wins", "pairs", "share"}}`` for every method but the clan (``share`` is
        ``wins / pairs``, NaN with no pairs).
    """
    key = "test_loss" if _tested(results) else "val_loss"
    counts: dict[str, list[int]] = {}
    for res in results.values():
        if bool(res.get("holdout")) != holdout or "clan" not in res["runs"]:
            continue
        clan = {r["seed"]: r[key] for r in res["runs"]["clan"]}
        for method, items in res["runs"].items():
            if method == "clan":
                continue
            wins, pairs = paired_wins(clan, {r["seed"]: r[key] for r in items})
            total = counts.setdefault(method, [0, 0])
            total[0] += wins
            total[1] += pairs
    return {m: {"wins": w, "pairs": n, "share": w / n if n else math.nan} for m, (w, n) in counts.items()}


def _overall_line(results: dict, holdout: bool) -> str:
    shares = overall(results, holdout)
    if not shares:
        return ""
    pairs = max(s["pairs"] for s in shares.values())
    parts = [f"{m} on {100 * s['share']:.0f}% ({s['wins']}/{s['pairs']})" for m, s in shares.items() if s["pairs"]]
    return f"Over all {pairs} (task, seed) pairs: clan beats " + ", ".join(parts) + "."


def _fmt(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else "inf"


def _seed_tables(results: dict, what: str, cell) -> list[str]:
    """Per task, a table of every method's ``cell(run)`` on each seed, captioned ``what``."""
    lines = []
    for task, res in results.items():
        runs = res["runs"]
        methods = list(runs)
        seeds = [r["seed"] for r in runs[methods[0]]]
        lines.append(f"**{task}** ({what}; lower is better)\n")
        lines.append("| seed | " + " | ".join(methods) + " |")
        lines.append("|---|" + "---|" * len(methods))
        for i, seed in enumerate(seeds):
            lines.append(f"| {seed} | " + " | ".join(cell(runs[m][i]) for m in methods) + " |")
        lines.append("")
    return lines


def _markdown_validation(results: dict) -> str:
    """The table of results without a test split: the final validation loss."""
    lines = _seed_tables(results, "final validation loss", lambda run: f"{run['val_loss']:.4f}")
    lines.append("| task | method | mean ± sd | method - clan (mean ± sd, paired) | clan better on | s per run |")
    lines.append("|---|---|---|---|---|---|")
    for task, res in results.items():
        for method, s in res["summary"].items():
            diff = (f"{s['diff_mean']:+.4f} ± {s['diff_sd']:.4f}" if "diff_mean" in s else "")
            better = f"{s['clan_better']}/{s['seeds']}" if "clan_better" in s else ""
            lines.append(f"| {task} | {method} | {s['mean']:.4f} ± {s['sd']:.4f} | {diff} | {better} | "
                         f"{s['seconds']:.0f} |")
    return "\n".join(lines)


def _markdown_group(results: dict, title: str, holdout: bool) -> list[str]:
    group = {task: res for task, res in results.items() if bool(res.get("holdout")) == holdout}
    if not group:
        return []
    lines = [f"### {title}", ""]
    lines += _seed_tables(group, "test loss of the returned model", lambda run: _fmt(run.get("test_loss", math.nan)))
    lines.append("| task | method | test loss (mean ± sd) | val loss (mean ± sd) | "
                 "method - clan, test (mean ± sd, paired) | clan better on (test) | s per run |")
    lines.append("|---|---|---|---|---|---|---|")
    for task, res in group.items():
        for method, s in res["summary"].items():
            test = f"{_fmt(s['test_mean'])} ± {s['test_sd']:.4f}" if "test_mean" in s else ""
            diff = f"{s['test_diff_mean']:+.4f} ± {s['test_diff_sd']:.4f}" if "test_diff_mean" in s else ""
            better = f"{s['test_clan_better']}/{s['test_seeds']}" if "test_clan_better" in s else ""
            lines.append(f"| {task} | {method} | {test} | {_fmt(s['mean'])} ± {s['sd']:.4f} | {diff} | {better} | "
                         f"{s['seconds']:.1f} |")
    line = _overall_line(results, holdout)
    return lines + ([""] + [line] if line else []) + [""]


def markdown(results: dict) -> str:
    """The results as Markdown.

    With test losses: per task a per-seed table of the test loss, then per group (the main tasks,
    then the held-out ones) a summary table with the test and validation losses, the paired
    differences and wins on the test split, and the over-all share of (task, seed) pairs the clan
    wins. Results without a test split get the table of the final validation loss.

    Args:
        results: From :func:`run_quality` (or of that form).
    """
    if not _tested(results):
        return _markdown_validation(results)
    lines = _markdown_group(results, "Tasks", False) + _markdown_group(results, "Held-out tasks", True)
    return "\n".join(lines).rstrip() + "\n"


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
    parser.add_argument("--holdout", nargs="*", choices=TASKS, default=list(HOLDOUT),
                        help=f"tasks kept aside, reported on their own (default: {' '.join(HOLDOUT)}; "
                             f"none when given no names)")
    parser.add_argument("--clan", type=json.loads, default=None,
                        help='overrides of the clan\'s config as JSON, e.g. \'{"clan": {"duty_cycle": 0.1}}\'')
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument("--out", "--json", dest="out", type=Path, help="also write the results as JSON here")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    if args.threads < 1:
        print(f"quality: --threads must be a positive int, got {args.threads}", file=sys.stderr)
        return 2
    if args.clan is not None and not isinstance(args.clan, dict):
        print(f"quality: --clan must be a JSON object, got {args.clan!r}", file=sys.stderr)
        return 2
    if len(set(args.seeds)) != len(args.seeds):
        print(f"quality: --seeds must be distinct, got {args.seeds}", file=sys.stderr)
        return 2
    if any(m.startswith("schedulefree") for m in args.methods):
        try:
            _schedulefree()
        except ImportError as err:
            print(err, file=sys.stderr)
            return 2
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = run_quality(args.tasks, args.seeds, args.size, args.methods,
                          log=lambda line: print(line, flush=True), clan=args.clan, holdout=args.holdout)
    seconds = time.perf_counter() - start
    print()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), size {args.size}, "
          f"seeds {args.seeds}, {seconds:.0f}s")
    print(markdown(results))
    if args.out:
        args.out.write_text(json.dumps({"size": args.size, "seeds": args.seeds, "torch": torch.__version__,
                                        "threads": torch.get_num_threads(), "seconds": seconds,
                                        "tasks": args.tasks, "methods": args.methods, "holdout": args.holdout,
                                        "clan": args.clan, "results": results,
                                        "overall": {"tasks": overall(results), "holdout": overall(results, True)}},
                                       indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
