"""One plain model trained data-parallel at batch ``P x B``: the baseline the benches hold the clan against.

The data, the model and its initial weights are the training machine's for the same config
(torch seeded, the task's data loaded, the model built); the batches are a fresh permutation of
the training data every epoch, as the clan's loader draws them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from .. import RunConfig
from ..task import Task, TaskData, call_model, data_batches, data_length, resolve_task

__all__ = ["PlainRun", "train_plain"]


class PlainRun(NamedTuple):
    """What :func:`train_plain` trained: its task, data, model and optimizer, and whether it stopped on a non-finite loss."""

    task: Task
    data: TaskData
    model: nn.Module
    optimizer: torch.optim.Optimizer
    diverged: bool


def train_plain(config: dict, optimizer: Callable | None = None, *, task: Task | None = None) -> PlainRun:
    """Train one model at batch ``P x B`` for the config's ``total_steps``.

    Args:
        config: A run config (its dict form).
        optimizer: ``optimizer(model, config) -> torch.optim.Optimizer`` (default: the config's
            AdamW); one with ``train()`` (schedule-free AdamW) is put in training mode first.
        task: The task (default: the config's).

    Returns:
        The run; a non-finite training loss stops it there, with ``diverged`` set.

    Raises:
        ValueError: if ``P x B`` is more than the training samples.
    """
    cfg = RunConfig.from_dict(config)
    task = resolve_task(cfg.task, cfg.task_args) if task is None else task
    cfg = cfg.replace(data=task.data_settings(cfg.data))
    torch.manual_seed(cfg.seed)  # the model's init, as the machine seeds it
    data = task.load(cfg.data, cfg.seed)
    model = task.build_model(task.model_settings(cfg.model), cfg.data)
    opt = cfg.optimizer.build(model.parameters()) if optimizer is None else optimizer(model, cfg)
    batch = cfg.clan.population_size * cfg.data.batch_size
    n, generator = data_length(data.train), torch.Generator().manual_seed(cfg.seed)
    if batch > n:
        raise ValueError(f"the plain model's batch P x B = {batch} is more than the {n} training samples")
    order, position = torch.randperm(n, generator=generator), 0
    model.train()
    if callable(getattr(opt, "train", None)):
        opt.train()
    for _ in range(cfg.total_steps):
        if position + batch > n:
            order, position = torch.randperm(n, generator=generator), 0
        x, y = next(data_batches(data.train, order[position:position + batch]))
        position += batch
        loss = task.loss(call_model(model, x), y)
        if not torch.isfinite(loss):
            return PlainRun(task, data, model, opt, True)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()
    return PlainRun(task, data, model, opt, False)
