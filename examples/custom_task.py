"""A task of your own: its own Dataset class, its own model, run by the training machine and the command.

A :class:`vmapclan.Task` gives the data (``split``), builds the model (``build_model``, from the
config's free-form ``[model]`` table) and defines one model's loss (``loss``). Here: points on
``n_rings`` noisy concentric rings in the plane, the label is the ring, and a small residual
MLP of this file's own. The schedule warms up cooperatively with the input layer frozen, runs
clan rounds, and anneals with everything but the head frozen.

Run: ``python examples/custom_task.py`` (seconds on 2 CPU cores); ``--command`` runs the same
config through ``vmapclan train`` (with ``task = "custom_task:RingsTask"``, imported from this
directory) and replays its schedule.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import tempfile

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from vmapclan import Task, TrainingMachine

HERE = pathlib.Path(__file__).resolve().parent


class Rings(Dataset):
    """``n`` points on ``n_rings`` noisy concentric rings: ``(xy [2], ring index)`` samples."""

    def __init__(self, n: int, n_rings: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, n_rings, (n,), generator=g)
        angle = torch.rand(n, generator=g) * 2 * math.pi
        radius = 1.0 + self.y.float() + 0.15 * torch.randn(n, generator=g)
        self.x = torch.stack([radius * angle.cos(), radius * angle.sin()], 1)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


class RingNet(nn.Module):
    """An input layer, residual blocks and a head (parameter names ``embed.*``, ``blocks.N.*``, ``head.*``)."""

    def __init__(self, width: int, depth: int, n_rings: int):
        super().__init__()
        self.embed = nn.Linear(2, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU())
                                    for _ in range(depth))
        self.head = nn.Linear(width, n_rings)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


class RingsTask(Task):
    """Classify the ring a point lies on. Model settings: ``width``, ``depth``, ``n_rings``, ``samples``."""

    model_defaults = {"width": 32, "depth": 2, "n_rings": 3, "samples": 2000}

    def split(self, data, seed):
        n = self.settings["samples"]
        dataset = Rings(n, self.settings["n_rings"], seed)
        cut = n - max(1, round(data.val_fraction * n))
        return torch.utils.data.Subset(dataset, range(cut)), torch.utils.data.Subset(dataset, range(cut, n))

    def model_settings(self, model):
        """The settings with defaults; kept, since :meth:`split` reads the sample count from them."""
        self.settings = super().model_settings(model)
        return self.settings

    def build_model(self, model, data):
        return RingNet(model["width"], model["depth"], model["n_rings"])

    def loss(self, output, target):
        return F.cross_entropy(output, target)


def config(size: int = 2000, steps: int = 400, population_size: int = 4) -> dict:
    """The run: a frozen-input warmup, clan rounds, and a head-only anneal."""
    return {
        "total_steps": steps, "seed": 0,
        "model": {"width": 32, "depth": 2, "n_rings": 3, "samples": size},
        "data": {"batch_size": 16, "eval_samples": 0},
        "clan": {"population_size": population_size, "round_length": max(4, steps // 10), "duty_cycle": 0.25},
        "schedule": [
            {"name": "warmup", "start_t": 0.0, "end_t": 0.1, "clan": {"competition": False},
             "model": {"freeze": ["embed.*"]}},
            {"name": "clan", "start_t": 0.1, "end_t": 0.9},
            {"name": "head-only", "start_t": 0.9, "end_t": 1.0, "clan": {"competition": False},
             "optimizer": {"lr_scale": 0.3}, "model": {"freeze": ["embed.*", "blocks.*"]}},
        ],
    }


def main(size: int = 2000, steps: int = 400, population_size: int = 4, command: bool = False,
         out: str | None = None) -> dict:
    """Train the rings task from Python, or with ``command`` through ``vmapclan train`` and ``vmapclan replay``.

    Args:
        size: Samples in the dataset (the size knob).
        steps: Training steps.
        population_size: Members.
        command: Run through the command line instead of :class:`TrainingMachine`.
        out: The run directory for ``command`` (default: a temporary one).

    Returns:
        ``{"val_loss", "val_accuracy"}`` of the best model (and ``"exit"`` codes with ``command``).

    Example:
        >>> main(size=300, steps=40)["val_accuracy"] > 0.4  # doctest: +SKIP
    """
    settings = config(size, steps, population_size)
    if not command:
        results = TrainingMachine(settings, task=RingsTask()).train()
        print(results.rounds_table(max_rows=12))
        return {"val_loss": results.final["val_loss"], "val_accuracy": results.final["val_accuracy"]}
    import json

    import tomli_w

    from vmapclan.cli import main as vmapclan

    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))  # where the command imports "custom_task:RingsTask" from
    run = pathlib.Path(out or tempfile.mkdtemp(prefix="rings-"))
    toml = run.parent / f"{run.name}.toml"
    toml.write_text(tomli_w.dumps({"task": "custom_task:RingsTask", **settings}))
    codes = [vmapclan(["train", str(toml), "--out", str(run), "--no-progress", "--no-plots", "--overwrite"]),
             vmapclan(["replay", str(run / "schedule.json"), "--no-progress"])]
    final = json.loads((run / "replay.json").read_text())["clan"] if codes[0] == 0 else {}
    return {**final, "exit": codes}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--command", action="store_true", help="run through vmapclan train and replay")
    args = parser.parse_args()
    print(main(args.size, args.steps, command=args.command))
