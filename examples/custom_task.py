"""A task of your own: its own Dataset class, its own model, run by the training machine and the command.

A :class:`vmapclan.Task` gives the data (``split``), builds the model (``build_model``, from the
config's free-form ``[model]`` table) and defines one model's loss (``loss``). Here: points on
``n_rings`` noisy concentric rings in the plane, the label is the ring, and a small residual
MLP of this file's own. The ring count and the sample count are data settings of the task's own
(``data_defaults``), the noise is an argument of the class (``[task_args]`` in a config), and
the task grows its model by appending residual blocks that start as the identity (``grow``).
The schedule warms up cooperatively with the input layer frozen, runs clan rounds, grows one
block and runs more rounds, and anneals with everything but the head frozen.

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

    def __init__(self, n: int, n_rings: int, seed: int, noise: float = 0.15):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, n_rings, (n,), generator=g)
        angle = torch.rand(n, generator=g) * 2 * math.pi
        radius = 1.0 + self.y.float() + noise * torch.randn(n, generator=g)
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
        self.blocks = nn.ModuleList(block(width) for _ in range(depth))
        self.head = nn.Linear(width, n_rings)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def block(width: int) -> nn.Module:
    """One residual block's branch: LayerNorm, Linear, GELU."""
    return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU())


class RingsTask(Task):
    """Classify the ring a point lies on.

    Model settings: ``width``, ``depth``. Data settings of its own: ``n_rings``, ``samples``.
    Argument: ``noise``, the rings' radial spread.
    """

    model_defaults = {"width": 32, "depth": 2}
    data_defaults = {"n_rings": 3, "samples": 2000}
    data_reads = ("val_fraction",)  # the machine's data field its split reads

    def __init__(self, noise: float = 0.15):
        self.noise = noise

    def split(self, data, seed):
        n = data.samples
        dataset = Rings(n, data.n_rings, seed, self.noise)
        cut = n - max(1, round(data.val_fraction * n))
        return torch.utils.data.Subset(dataset, range(cut)), torch.utils.data.Subset(dataset, range(cut, n))

    def build_model(self, model, data):
        return RingNet(model["width"], model["depth"], data.n_rings)

    def loss(self, output, target):
        return F.cross_entropy(output, target)

    def grow(self, module, settings):
        """Append ``settings["blocks"]`` residual blocks whose Linear starts at zero (GELU(0) = 0: each adds nothing yet)."""
        for _ in range(settings.get("blocks", 1)):
            new = block(module.head.in_features)
            with torch.no_grad():
                new[1].weight.zero_()
                new[1].bias.zero_()
            module.blocks.append(new)
        return module


NOISE = 0.15


def config(size: int = 2000, steps: int = 400, population_size: int = 4) -> dict:
    """The run: a frozen-input warmup, clan rounds, one more block and more rounds, and a head-only anneal."""
    return {
        "total_steps": steps, "seed": 0,
        "task_args": {"noise": NOISE},  # what a resume or the command builds RingsTask with
        "model": {"width": 32, "depth": 2},
        "data": {"batch_size": 16, "eval_samples": 0, "n_rings": 3, "samples": size},
        "clan": {"population_size": population_size, "round_length": max(4, steps // 10), "duty_cycle": 0.25},
        "schedule": [
            {"name": "warmup", "start_t": 0.0, "end_t": 0.1, "clan": {"competition": False},
             "model": {"freeze": ["embed.*"]}},
            {"name": "clan", "start_t": 0.1, "end_t": 0.5},
            {"name": "deeper", "start_t": 0.5, "end_t": 0.9, "model": {"grow": {"blocks": 1}}},
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
        results = TrainingMachine(settings, task=RingsTask(**settings["task_args"])).train()
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
