"""TensorBoard scalars of a training-machine run and of its replay (the optional ``tensorboard`` extra).

:class:`TensorBoardLogger` is a :class:`~vmapclan.TrainingMachine` callback; ``vmapclan train
--tensorboard`` installs it and writes ``RUN/tensorboard/train``, and ``vmapclan replay
--tensorboard`` writes the replay's curve into ``RUN/tensorboard/replay``, so that
``tensorboard --logdir RUN/tensorboard`` shows both runs on the same tags. Tags, each over the
run's steps:

- ``train/loss``: the population's mean training loss of every ``log_every`` steps (what
  ``metrics.jsonl`` records); the replay's loss of every step under the same tag;
- ``train/member_loss/<i>``: member ``i``'s training loss of every step;
- ``val/member_loss/<i>``: member ``i``'s validation loss at the end of every round (a
  cooperative stretch: the one model's, for every member);
- ``genes/<gene>/<i>``: member ``i``'s gene values in every round (a cooperative stretch: the
  settings it trained with);
- ``phase``: the index of the phase in force in the schedule;
- ``final/val_loss``, ``final/val_accuracy``: the best model's at the end (the replay's model's
  in the replay's run); ``final/test_loss``, ``final/test_accuracy``: the same model's on the
  test split, where the run has one.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping, Sequence

import torch

__all__ = ["TensorBoardLogger", "require_tensorboard", "write_replay_curve", "EXTRA"]

#: The install line named when TensorBoard is missing.
EXTRA = "pip install 'vmapclan[tensorboard]'"


def require_tensorboard():
    """``torch.utils.tensorboard.SummaryWriter``, or an ``ImportError`` in one line naming the extra.

    Raises:
        ImportError: if the ``tensorboard`` package is not installed.
    """
    try:
        importlib.import_module("tensorboard")
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError(f"--tensorboard needs the tensorboard package: {EXTRA}") from None
    return SummaryWriter


class TensorBoardLogger:
    """A :class:`~vmapclan.TrainingMachine` callback writing the run's scalars (see the module's tags).

    The step events' ``[P]`` losses stay on the device until the next training-loss record
    (every ``log_every`` steps), where they are read in one host sync.

    Args:
        log_dir: Where the event files go (e.g. ``RUN/tensorboard/train``).
        phases: The schedule's phase names, in order (the ``phase`` scalar is the index).
        population_size: P.
        purge_step: For a resumed run: the step after the checkpoint's. TensorBoard hides what
            an earlier writer logged from that step on, the work the interruption lost.

    Raises:
        ImportError: if TensorBoard is not installed (naming the extra).

    Example (after ``machine.prepare()``, which settles a default schedule's phases):
        >>> machine.prepare()  # doctest: +SKIP
        >>> machine.callback = TensorBoardLogger("runs/x/tensorboard/train", [p.name for p in machine.schedule],
        ...                                      machine.config.clan.population_size)  # doctest: +SKIP
    """

    def __init__(self, log_dir: str | os.PathLike, phases: Sequence[str], population_size: int, *,
                 purge_step: int | None = None):
        writer = require_tensorboard()
        self.writer = writer(log_dir=str(log_dir), purge_step=purge_step)
        self.phases = {name: i for i, name in enumerate(phases)}
        self.population_size = population_size
        self._pending: list[tuple[int, str, torch.Tensor]] = []

    def __call__(self, event: Mapping) -> None:
        """Take one machine event (``step``, ``train``, ``round``, ``cooperative`` or ``final``)."""
        kind = event.get("event")
        if kind == "step":
            if "losses" in event:  # copied: a fused step may reuse its output buffer
                self._pending.append((event["step"], event["phase"], event["losses"].detach().clone()))
            return
        self.flush_losses()
        add = self.writer.add_scalar
        if kind == "train":
            add("train/loss", event["loss"], event["step"])
        elif kind == "round":
            step = event["end_step"]
            for i, value in enumerate(event["val_losses"]):
                add(f"val/member_loss/{i}", value, step)
            for gene, values in event["genomes"].items():
                for i, value in enumerate(values):
                    add(f"genes/{gene}/{i}", value, step)
        elif kind == "cooperative":
            step = event["end_step"]
            for i in range(self.population_size):
                add(f"val/member_loss/{i}", event["val_loss"], step)
                for gene, value in event["hyper"].items():
                    add(f"genes/{gene}/{i}", value, step)
        elif kind == "final":
            add("final/val_loss", event["val_loss"], event["step"])
            add("final/val_accuracy", event["val_accuracy"], event["step"])
            for name in ("test_loss", "test_accuracy"):
                if name in event:
                    add(f"final/{name}", event[name], event["step"])
            self.writer.flush()

    def flush_losses(self) -> None:
        """Write the buffered per-member training losses and phases (one host read for all of them)."""
        if not self._pending:
            return
        values = torch.stack([losses for _, _, losses in self._pending]).tolist()
        for (step, phase, _), losses in zip(self._pending, values):
            for i, value in enumerate(losses):
                self.writer.add_scalar(f"train/member_loss/{i}", value, step)
            if phase in self.phases:
                self.writer.add_scalar("phase", self.phases[phase], step)
        self._pending.clear()

    def close(self) -> None:
        """Write what is buffered and close the event file."""
        self.flush_losses()
        self.writer.close()


def write_replay_curve(log_dir: str | os.PathLike, losses: Sequence[float], final: Mapping) -> None:
    """Write a replay's training loss of every step (``train/loss``) and its final metrics into ``log_dir``.

    Args:
        log_dir: E.g. ``RUN/tensorboard/replay``.
        losses: :attr:`~vmapclan.replay.ReplayResult.losses`.
        final: ``{"val_loss", "val_accuracy"}``, and ``test_loss``, ``test_accuracy`` where the run has a test split.

    Raises:
        ImportError: if TensorBoard is not installed (naming the extra).
    """
    writer = require_tensorboard()(log_dir=str(log_dir), purge_step=0)
    for step, value in enumerate(losses, 1):
        writer.add_scalar("train/loss", value, step)
    for name in ("val_loss", "val_accuracy", "test_loss", "test_accuracy"):
        if name in final:
            writer.add_scalar(f"final/{name}", final[name], len(losses))
    writer.close()
