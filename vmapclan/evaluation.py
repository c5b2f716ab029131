"""What a run scores, and when: members only where they differ, each model once.

At a round's end the members differ (each trained its own genome) and are scored in one pass
over the round's evaluation samples (vmapped on CUDA, member after member on CPU); after a
data-parallel stretch, or a winner selection, they are identical, and one of them is scored as
a plain model. The final evaluation scores the members once on the whole validation split,
picks the best (or the incumbent kept earlier, when it scores better) and scores that model, and
only it, on the test split.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .clan import Clan, DivergenceError
from .distributed import any_rank, broadcast_object
from .task import Task, TaskData

__all__ = ["members_identical", "score_round", "final_model"]


def members_identical(clan: Clan) -> bool:
    """Whether every member of ``clan``, on every rank, holds the same weights and buffers.

    Under torch.distributed only a winner selection's broadcast makes the ranks' members the
    same, so with another selection the members of different ranks count as different.
    """
    same = clan.population.identical() and (clan.group is None or clan.selection == "winner")
    return not any_rank(clan.group, not same, "the check for identical members")


def score_round(task: Task, clan: Clan, data, blocks: int | None = None) -> torch.Tensor:
    """Every local member's loss on ``data`` (``[P]``; ``[P, blocks]`` paired values with ``blocks``).

    Identical members are scored once, as one plain model (paired values need members that differ).
    """
    if blocks is None and members_identical(clan):
        loss = task.evaluate(clan.population.member_module(0), data)["loss"]
        return torch.full((clan.local_size,), loss, dtype=torch.float64)
    return task.population_losses(clan.population, data, **({} if blocks is None else {"blocks": blocks}))


def final_model(task: Task, clan: Clan, data: TaskData) -> tuple[dict, int, nn.Module]:
    """The run's model and its scores: the best member on the whole validation split, or the kept incumbent.

    Returns:
        ``(scores, best, model)``: ``scores`` holds ``val_loss``, ``val_accuracy``,
        ``member_val_losses`` (every member's), with a test split ``test_loss`` and
        ``test_accuracy`` (of the model returned), ``diverged_members`` (those whose
        validation loss is not finite, when any), and when the kept incumbent beats the last
        model ``kept_step`` and ``last_val_loss``; ``best`` is the best member's global index.

    Raises:
        DivergenceError: if the best member is not finite.
    """
    if members_identical(clan):
        best, model = 0, member_module(clan, 0).eval()
        scores = task.evaluate(model, data.val)
        members = torch.full((clan.population_size,), scores["loss"], dtype=torch.float64)
    else:
        local = task.population_scores(clan.population, data.val)
        members, accuracy = local["loss"], local["accuracy"]
        if clan.group is not None:
            members = clan.group.all_gather(members, "the final all-gather of the validation losses")
            accuracy = clan.group.all_gather(accuracy, "the final all-gather of the validation accuracies")
        finite = torch.where(torch.isfinite(members), members, torch.full_like(members, math.inf))
        best = int(torch.argmin(finite).item())
        model = member_module(clan, best).eval()
        scores = {"loss": members[best].item(), "accuracy": accuracy[best].item()}
    if not math.isfinite(scores["loss"]) or not member_finite(clan, best):
        raise DivergenceError(f"TrainingMachine: the run ends without a finite model: the best member's "
                              f"validation loss is {scores['loss']}")
    out = {"val_loss": scores["loss"], "val_accuracy": scores["accuracy"], "member_val_losses": members.tolist()}
    diverged = [i for i, v in enumerate(out["member_val_losses"]) if not math.isfinite(v)]
    if diverged:  # a sweep's member that diverged stays so: the record says which
        out["diverged_members"] = diverged
    if clan.kept.step is not None and clan.kept.step < clan.time_step:
        kept = clan.kept_model().eval()
        kept_scores = task.evaluate(kept, data.val)
        if kept_scores["loss"] < scores["loss"]:  # the incumbent kept earlier beats the last model
            out.update(val_loss=kept_scores["loss"], val_accuracy=kept_scores["accuracy"],
                       kept_step=clan.kept.step, last_val_loss=scores["loss"])
            model = kept
    if data.test is not None:
        test = task.evaluate(model, data.test)
        out.update(test_loss=test["loss"], test_accuracy=test["accuracy"])
    return out, best, model


def member_module(clan: Clan, member: int) -> nn.Module:
    """A plain module of the clan's member ``member`` (a global index: its rank sends it to the others)."""
    if clan.group is None:
        return clan.population.member_module(member)
    owner, local = clan.group.owner(member), member - clan.member_offset
    state = clan.population.member_module(local).state_dict() if clan.group.rank == owner else None
    state = broadcast_object(clan.group, state, owner, "the broadcast of the best member")
    module = clan.population.member_module(0)
    module.load_state_dict(state)
    return module


def member_finite(clan: Clan, member: int) -> bool:
    """Whether the clan's member ``member`` (a global index) holds only finite values."""
    local = member - clan.member_offset
    mine = 0 <= local < clan.local_size and bool(clan.population.finite_members()[local])
    return any_rank(clan.group, mine, "the finiteness check")
