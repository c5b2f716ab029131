"""PNG plots of a run over normalized time t: genes and the lr in force, every member's validation loss, the training loss.

The step of the incumbent the run returns, when keep-best kept an earlier one, is marked on each.

matplotlib is imported only when a plot is drawn, and through its object API with the Agg
canvas, so the core package does not need it and a notebook's own backend is left alone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["plot_genes", "plot_val_losses", "plot_train_loss", "save_plots"]


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("vmapclan.plots needs matplotlib: pip install matplotlib") from None
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _rounds(history: Sequence[Mapping]) -> list[Mapping]:
    return [r for r in history if r.get("kind", "round") == "round"]


def _mark_kept(ax, kept_step: int | None, total_steps: int) -> None:
    if kept_step is not None:
        ax.axvline(kept_step / total_steps, color="tab:purple", linestyle="--", linewidth=1, label="kept incumbent")


def plot_genes(history: Sequence[Mapping], total_steps: int, path: str | os.PathLike,
               metrics: Sequence[Mapping] = (), kept_step: int | None = None) -> Path:
    """Each gene over normalized time: every member's value per round, the winner starred.

    Cooperative stretches (no competition) are drawn as a line at the value in force. The lr
    panel also draws the lr in force (the gene with the time shape and the competitive share
    applied: member 0's, from the training records of ``metrics``).

    Args:
        history: The training machine's history (or a ``clan.history`` with ``step`` per round).
        total_steps: Steps of the run (for ``t``).
        path: PNG to write.
        metrics: The run's metrics records (their ``train`` records' ``lr``).
        kept_step: The kept incumbent's step, marked (``None``: none).

    Returns:
        The path written.
    """
    rounds = _rounds(history)
    genes = list(rounds[0]["genomes"]) if rounds else ["lr"]
    figure = _figure(5 * min(len(genes), 3), 3.2 * ((len(genes) + 2) // 3))
    for i, gene in enumerate(genes):
        ax = figure.add_subplot((len(genes) + 2) // 3, min(len(genes), 3), i + 1)
        for r in rounds:
            t = r.get("end_step", r.get("step", 0)) / total_steps
            values = r["genomes"][gene]
            ax.scatter([t] * len(values), values, s=10, color="tab:blue", alpha=0.5)
            ax.scatter([t], [values[r["winner"]]], marker="*", s=80, color="tab:red", zorder=3)
        for r in history:
            if r.get("kind") == "cooperative":
                t0, t1 = r["start_step"] / total_steps, r["end_step"] / total_steps
                ax.plot([t0, t1], [r["hyper"][gene]] * 2, color="tab:green", linewidth=2)
        if gene == "lr":
            in_force = [(m["t"], m["lr"]) for m in metrics if m.get("event") == "train" and m.get("lr", 0) > 0]
            if in_force:
                ax.plot(*zip(*in_force), color="black", linewidth=1, label="lr in force")
                ax.legend(fontsize=7)
        _mark_kept(ax, kept_step, total_steps)
        if gene in ("lr", "weight_decay", "eps"):
            ax.set_yscale("log")
        ax.set_title(gene)
        ax.set_xlabel("t")
        ax.set_xlim(0, 1)
    figure.suptitle("genes per round (members: dots, winner: star, cooperative phases: line)")
    figure.tight_layout()
    figure.savefig(path)
    return Path(path)


def plot_val_losses(history: Sequence[Mapping], path: str | os.PathLike, total_steps: int | None = None,
                    kept_step: int | None = None) -> Path:
    """Every member's validation loss at each round's end over t, and each round's spread.

    Top: the members' losses (the winner starred, a cooperative stretch's one model in green).
    Bottom: each member's loss minus the round's winner's, where the spread between members
    shows at its own scale.

    Args:
        history: The training machine's history (or a ``clan.history``).
        path: PNG to write.
        total_steps: Steps of the run (for ``t``; default: the last record's end).
        kept_step: The kept incumbent's step, marked (``None``: none).

    Returns:
        The path written.
    """
    total = total_steps or max([r.get("end_step", r.get("step", 1)) for r in history] + [1])
    figure = _figure(7, 6)
    top, bottom = figure.add_subplot(2, 1, 1), figure.add_subplot(2, 1, 2, sharex=None)
    for r in history:
        t = r.get("end_step", r.get("step", 0)) / total
        if r.get("kind", "round") == "cooperative":
            top.scatter([t], [r["val_loss"]], s=14, color="tab:green", zorder=2)
            continue
        losses = r["val_losses"]
        if r["winner"] is None:  # every member diverged
            continue
        best = losses[r["winner"]]
        top.scatter([t] * len(losses), losses, s=10, color="tab:blue", alpha=0.5)
        top.scatter([t], [best], marker="*", s=80, color="tab:red", zorder=3)
        bottom.scatter([t] * len(losses), [v - best for v in losses], s=10, color="tab:blue", alpha=0.5)
    for ax in (top, bottom):
        _mark_kept(ax, kept_step, total)
        ax.set_xlim(0, 1)
    bottom.axhline(0.0, color="tab:red", linewidth=0.8)
    bottom.set_yscale("symlog", linthresh=1e-3)  # the spread of later rounds shows beside the search's
    top.set_ylabel("validation loss")
    top.set_title("validation loss of every member (winner: star, cooperative stretch: green)")
    bottom.set_xlabel("t")
    bottom.set_ylabel("member - winner")
    figure.tight_layout()
    figure.savefig(path)
    return Path(path)


def plot_train_loss(metrics: Sequence[Mapping], path: str | os.PathLike, kept_step: int | None = None,
                    total_steps: int | None = None) -> Path:
    """The training loss (mean over members) against normalized time, with phase names marked.

    Args:
        metrics: Metrics records; those with ``event == "train"`` are drawn.
        path: PNG to write.
        kept_step, total_steps: The kept incumbent's step, marked (``None``: none), and the run's steps.

    Returns:
        The path written.
    """
    figure = _figure(7, 4)
    ax = figure.add_subplot(1, 1, 1)
    train = [m for m in metrics if m.get("event") == "train"]
    ax.plot([m["t"] for m in train], [m["loss"] for m in train], color="tab:blue")
    previous, last_t = None, 0.0
    for m in train:
        if m["phase"] != previous:
            # A record covers the steps since the one before it, so the phase began after that one.
            ax.axvline(last_t, color="grey", linewidth=0.5)
            ax.annotate(m["phase"], (last_t, 1.0), xycoords=("data", "axes fraction"), fontsize=8,
                        va="top", rotation=90)
            previous = m["phase"]
        last_t = m["t"]
    if total_steps:
        _mark_kept(ax, kept_step, total_steps)
    ax.set_yscale("log")
    ax.set_xlabel("t")
    ax.set_ylabel("training loss")
    ax.set_title("training loss (mean over members)")
    figure.tight_layout()
    figure.savefig(path)
    return Path(path)


def save_plots(results, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``genes.png``, ``val_losses.png`` and ``train_loss.png`` for a :class:`~vmapclan.TrainingResults`.

    Returns:
        ``{"genes_plot", "val_losses_plot", "train_loss_plot"}`` paths.
    """
    out, total, kept = Path(out_dir), results.total_steps, results.final.get("kept_step")
    return {
        "genes_plot": plot_genes(results.history, total, out / "genes.png", results.metrics, kept),
        "val_losses_plot": plot_val_losses(results.history, out / "val_losses.png", total, kept),
        "train_loss_plot": plot_train_loss(results.metrics, out / "train_loss.png", kept, total),
    }
