"""Helpers the tests share for whole training-machine runs: comparing models, stopping and resuming."""

import pytest
import torch
from torch import nn

from vmapclan import TrainingMachine
from vmapclan.machine import TrainingStopped


def same_model(a: nn.Module, b: nn.Module) -> bool:
    """Whether two modules hold the same tensors under the same names, bit for bit."""
    return a.state_dict().keys() == b.state_dict().keys() and all(
        torch.equal(t, b.state_dict()[k]) for k, t in a.state_dict().items())


def stop_at_step(config, out_dir, stop_at: int, task=None) -> None:
    """Train ``config`` into ``out_dir`` and stop it after step ``stop_at`` (as Ctrl-C would), with its checkpoint."""
    def stop(event):
        if event["event"] == "step" and event["step"] == stop_at:
            machine.request_stop()

    machine = TrainingMachine(config, out_dir=out_dir, callback=stop, task=task)
    with pytest.raises(TrainingStopped):
        machine.train()


def assert_resumes_exactly(config, out_dir, stop_at: int, task=None):
    """A run stopped at ``stop_at`` and resumed ends with the uninterrupted run's history and best model.

    Returns:
        ``(uninterrupted, resumed)`` results.
    """
    full = TrainingMachine(config, task=task).train()
    stop_at_step(config, out_dir, stop_at, task)
    resumed = TrainingMachine.resume(out_dir, task=task).train()
    assert repr(resumed.history) == repr(full.history) and same_model(resumed.best_model, full.best_model)
    return full, resumed
