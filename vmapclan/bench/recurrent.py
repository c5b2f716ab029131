"""Recurrent models: a population with ``vmapclan.recurrent`` layers against a loop of plain torch models.

For a small LSTM and GRU sequence model (an embedding, one recurrent layer, a linear head over every
position; next-token cross-entropy), in one process and on the same random data, it times one
training step (forward, backward, AdamW) of:

- **loop**: P plain models built on ``torch.nn.LSTM`` / ``torch.nn.GRU`` (torch's fused kernels:
  oneDNN for the LSTM on CPU), each with its own ``torch.optim.AdamW``, stepped one after another;
- **member loop**: the same model with its recurrent layer swapped by :func:`vmapclan.recurrent.vectorizable`
  (same weights), as a clan of P members trained by the README's ``Member`` loop;
- **fused**: that clan stepped by :class:`~vmapclan.FusedStep` with its defaults.

Every member is a sweep member (its own hyperparameters, every step competitive). The variants are
timed in turns, a block of steps each per repetition, and the table gives the median milliseconds
per step and each variant's speed over the loop's (``loop ms / ms``: above 1 is faster).

Run: ``python -m vmapclan.bench recurrent [--population 8] [--threads 1] [--reps 7]``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .speed import _imperative_variant
from .zoo import _interleaved

__all__ = ["SIZES", "SequenceModel", "run_recurrent", "format_recurrent", "main"]

#: ``name: (vocab, embedding, hidden, sequence length, batch per member)``.
SIZES = {"small": (64, 32, 64, 32, 8), "tiny": (8, 4, 6, 5, 2)}


class SequenceModel(nn.Module):
    """Embedding, one ``cell`` layer (``nn.LSTM`` or ``nn.GRU``, batch first), a linear head per position."""

    def __init__(self, cell: type, vocab: int, embedding: int, hidden: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, embedding)
        self.rnn = cell(embedding, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, idx):
        h, _ = self.rnn(self.embed(idx))
        # The head sees [B * T, hidden], not [B, T, hidden]: under vmap, a member's weight times a
        # 3-D input goes through matmul's broadcasting, which copies the weight once per sequence.
        return self.head(h.reshape(-1, h.shape[-1])).view(*h.shape[:-1], -1)


def _loss(output, target):
    return F.cross_entropy(output.flatten(0, -2), target.flatten())


def _loop_variant(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """P plain copies of ``model``, each with its own ``torch.optim.AdamW``, stepped one after another."""
    models = [copy.deepcopy(model) for _ in range(x.shape[0])]
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in models]

    def step():
        for i, (m, opt) in enumerate(zip(models, optimizers)):
            _loss(m(x[i]), y[i]).backward()
            opt.step()
            opt.zero_grad()

    return step


def run_recurrent(cells: list[str] | None = None, population: int = 8, size: str = "small", reps: int = 7,
                  warmup: int = 2, min_time: float = 0.2, log: Callable[[str], None] = print) -> list[dict]:
    """Time the loop of plain models and the clan's two step paths for each recurrent cell.

    Args:
        cells: ``"lstm"`` and/or ``"gru"`` (default both).
        population: P.
        size: A key of :data:`SIZES`.
        reps: Timed repetitions per variant (the median is reported).
        warmup: Untimed steps per variant first.
        min_time: Seconds each repetition's block of steps lasts at least.
        log: Called with one line per result.

    Returns:
        One row per cell and variant: ``{"model", "variant", "ms", "speedup"}`` (``speedup`` = the
        loop's time over the variant's).

    Example:
        >>> rows = run_recurrent(["gru"], population=2, size="tiny", reps=1, warmup=0, min_time=0.0)  # doctest: +SKIP
    """
    from .. import Clan, FusedStep
    from ..recurrent import vectorizable

    cells = cells or ["lstm", "gru"]
    vocab, embedding, hidden, seq, batch = SIZES[size]
    rows = []
    for name in cells:
        torch.manual_seed(0)
        model = SequenceModel({"lstm": nn.LSTM, "gru": nn.GRU}[name], vocab, embedding, hidden)
        idx = torch.randint(0, vocab, (population, batch, seq + 1), generator=torch.Generator().manual_seed(1))
        x, y = idx[..., :-1], idx[..., 1:]

        def clan():
            m = vectorizable(copy.deepcopy(model))
            return Clan(m, torch.optim.AdamW(m.parameters(), lr=1e-3), population_size=population,
                        round_length=10**9, duty_cycle=1.0, selection=None, autobind=["adamw"])

        fused = FusedStep(clan(), _loss)
        steps = {"loop": _loop_variant(model, x, y), "member loop": _imperative_variant(_loss, clan(), x, y),
                 "fused": lambda fused=fused: fused(x, y)}
        seconds = _interleaved(steps, reps, warmup, min_time)
        for label, t in seconds.items():
            row = {"model": name, "variant": label, "ms": t * 1e3, "speedup": seconds["loop"] / t}
            rows.append(row)
            log(f"{name:<5} {label:<12} {row['ms']:8.2f} ms  ({row['speedup']:.2f}x the loop's speed)")
    return rows


def format_recurrent(rows: list[dict]) -> str:
    """A Markdown table of :func:`run_recurrent`'s rows, the variants of each model side by side."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    cell = {(r["model"], r["variant"]): r for r in rows}
    lines = ["| model | " + " | ".join(f"{v}: ms/step" for v in variants) + " | "
             + " | ".join(f"{v}: x loop speed" for v in variants[1:]) + " |",
             "|---|" + "---|" * (2 * len(variants) - 1)]
    for m in models:
        ms = [f"{cell[m, v]['ms']:.2f}" for v in variants]
        speed = [f"{cell[m, v]['speedup']:.2f}" for v in variants[1:]]
        lines.append(f"| {m} | " + " | ".join(ms + speed) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m vmapclan.bench recurrent``."""
    parser = argparse.ArgumentParser(prog="python -m vmapclan.bench recurrent",
                                     description="vmapclan.recurrent layers in a clan against a loop of "
                                                 "plain torch models.")
    parser.add_argument("--models", nargs="+", choices=["lstm", "gru"], default=["lstm", "gru"])
    parser.add_argument("--population", type=int, default=8)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--min-time", type=float, default=0.2)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run_recurrent(args.models, args.population, args.size, args.reps, min_time=args.min_time,
                         log=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_recurrent(rows))
    return 0
