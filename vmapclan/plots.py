"""PNG plots of a run: genes over time, every member's validation loss, the training loss.

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


def plot_genes(history: Sequence[Mapping], total_steps: int, path: str | os.PathLike) -> Path:
    """Each gene over normalized time: every member's value per round, the winner starred.

    Cooperative stretches (no competition) are drawn as a line at the value in force.

    Args:
        history: The training machine's history (or a ``clan.history`` with ``step`` per round).
        total_steps: Steps of the run (for ``t``).
        path: PNG to write.

    Returns:
        The path written.
    """
    rounds = _rounds(history)
    genes = list(rounds[0]["genomes"]) if rounds else ["lr"]
    figure = _figure(5 * min(len(genes), 3), 3.2 * ((len(genes) + 2) // 3))
    for i, gene in enumerate(genes):
        ax = figure.add_subplot((len(genes) + 2) // 3, min(len(genes), 3), i + 1)
        for r in rounds:
            t = r.get("end_step", r["step"]) / total_steps
            values = r["genomes"][gene]
            ax.scatter([t] * len(values), values, s=10, color="tab:blue", alpha=0.5)
            ax.scatter([t], [values[r["winner"]]], marker="*", s=80, color="tab:red", zorder=3)
        for r in history:
            if r.get("kind") == "cooperative":
                t0, t1 = r["start_step"] / total_steps, r["end_step"] / total_steps
                ax.plot([t0, t1], [r["hyper"][gene]] * 2, color="tab:green", linewidth=2)
        if gene in ("lr", "weight_decay", "eps"):
            ax.set_yscale("log")
        ax.set_title(gene)
        ax.set_xlabel("t")
        ax.set_xlim(0, 1)
    figure.suptitle("genes per round (members: dots, winner: star, cooperative phases: line)")
    figure.tight_layout()
    figure.savefig(path)
    return Path(path)


def plot_val_losses(history: Sequence[Mapping], path: str | os.PathLike) -> Path:
    """Every member's validation loss per round, the winner starred.

    Args:
        history: The training machine's history (or a ``clan.history``).
        path: PNG to write.

    Returns:
        The path written.
    """
    figure = _figure(7, 4)
    ax = figure.add_subplot(1, 1, 1)
    rounds = _rounds(history)
    for r in rounds:
        losses = r["val_losses"]
        ax.scatter([r["round"]] * len(losses), losses, s=10, color="tab:blue", alpha=0.5)
        ax.scatter([r["round"]], [losses[r["winner"]]], marker="*", s=80, color="tab:red", zorder=3)
    ax.set_xlabel("round")
    ax.set_ylabel("validation loss")
    ax.set_title("validation loss of every member (winner: star)")
    figure.tight_layout()
    figure.savefig(path)
    return Path(path)


def plot_train_loss(metrics: Sequence[Mapping], path: str | os.PathLike) -> Path:
    """The training loss (mean over members) against normalized time, with phase names marked.

    Args:
        metrics: Metrics records; those with ``event == "train"`` are drawn.
        path: PNG to write.

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
    out = Path(out_dir)
    return {
        "genes_plot": plot_genes(results.history, results.total_steps, out / "genes.png"),
        "val_losses_plot": plot_val_losses(results.history, out / "val_losses.png"),
        "train_loss_plot": plot_train_loss(results.metrics, out / "train_loss.png"),
    }
