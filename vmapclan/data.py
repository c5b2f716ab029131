"""The clan's data loader: disjoint shards when cooperating, one common window when competing."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping

import einops
import optree
import torch
from torch.utils.data import Dataset, TensorDataset, default_collate

from .checks import is_int, positive_int, refuse

__all__ = ["ClanLoader", "LoaderState", "check_generator_state"]


@dataclasses.dataclass
class LoaderState:
    """Where the loader stands in its epoch; part of the clan's state.

    Attributes:
        generator: CPU generator drawing each epoch's permutation.
        perm: The current epoch's permutation, or ``None`` between epochs.
        position: How many samples of ``perm`` were handed out.
        epoch: Epochs started so far.
    """

    generator: torch.Generator
    perm: torch.Tensor | None = None
    position: int = 0
    epoch: int = 0

    def state_dict(self) -> dict:
        """Plain-dict form (generator state included)."""
        return {"generator": self.generator.get_state(), "perm": self.perm, "position": self.position,
                "epoch": self.epoch}

    def check_state(self, state, who: str) -> None:
        """Refuse a saved state that no loader can be in: another generator's, a permutation that is
        not one, or a position or epoch out of range.

        Args:
            state: A :meth:`state_dict`.
            who: The caller, for the messages (``"Clan.load_state_dict"``).

        Raises:
            ValueError: naming the entry (``loader/position``, ...).
        """
        def bad(name: str, expected: str, got) -> None:
            refuse(f"{who}: the checkpoint's loader{name}", expected, got)

        if not isinstance(state, Mapping) or set(state) != {"generator", "perm", "position", "epoch"}:
            bad("", "a table of generator, perm, position and epoch", state if not isinstance(state, Mapping)
                else sorted(state))
        check_generator_state(state["generator"], self.generator, f"{who}: the checkpoint's loader/generator")
        perm, position, epoch = state["perm"], state["position"], state["epoch"]
        if perm is not None:
            if not isinstance(perm, torch.Tensor) or perm.dtype != torch.long or perm.dim() != 1:
                bad("/perm", "None or a 1-D long tensor", type(perm).__name__ if not isinstance(perm, torch.Tensor)
                    else f"{perm.dtype} {list(perm.shape)}")
            if not torch.equal(perm.sort().values, torch.arange(perm.numel())):
                raise ValueError(f"{who}: the checkpoint's loader/perm is not a permutation of {perm.numel()} samples")
        limit = perm.numel() if perm is not None else None
        if not is_int(position) or position < 0 or (limit is not None and position > limit):
            bad("/position", f"an int in [0, {limit if limit is not None else 'inf'}]", position)
        if not is_int(epoch) or epoch < (1 if perm is not None else 0):
            bad("/epoch", f"an int >= {1 if perm is not None else 0}", epoch)

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict` (checked by :meth:`check_state` where it comes from a file)."""
        self.generator.set_state(state["generator"])
        self.perm, self.position, self.epoch = state["perm"], int(state["position"]), int(state["epoch"])


def check_generator_state(value, like: torch.Generator | torch.Tensor, what: str) -> None:
    """Refuse a saved random generator state that ``like`` (a generator, or a state of one) cannot take.

    Raises:
        ValueError: ``"<what> is <got>, expected a generator state (uint8 [n])"``.
    """
    expected = like.get_state() if isinstance(like, torch.Generator) else like
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.shape != expected.shape:
        got = f"{value.dtype} {list(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{what} is {got}, expected a generator state (uint8 {list(expected.shape)})")


class ClanLoader:
    """Yields batches with a member dimension, ``[P, B, ...]``, as the clan's phase requires.

    Made by :meth:`Clan.loader`. One pass over it is one epoch of a fresh random permutation;
    for each batch it asks the clan which phase the next step is in (``clan.cooperating``):

    - cooperative (a step of the round's cooperative phase, of a cooperative stretch of the
      clan's plan, or inside ``clan.cooperate()``): the next ``P * B`` samples, member ``i`` taking the ``i``-th block of ``B``
      (disjoint shards; together one data-parallel batch of ``P * B``);
    - competitive: the next ``B`` samples, shared by every member as an expanded view (no copy).

    In a clan across ranks (``process_group``), every rank draws the same permutation and takes
    the same positions: a cooperative step's ``P * B`` samples are the whole population's, and
    this rank's ``local_size`` members take their own blocks of them (member ``i`` of the clan,
    on whichever rank, still the ``i``-th block); a competitive step's window is the same on
    every rank. The batches are ``[local_size, B, ...]``.

    The epoch ends when fewer samples remain than the next step needs, so no sample repeats
    within an epoch. The position and the generator belong to the clan (saved by
    ``clan.state_dict()``), so a loader made after ``clan.load_state_dict`` continues where the
    saved one stopped, and breaking out of a loop and iterating again continues the epoch.

    The dataset must hold one step of every stretch of the clan's plan still to come (``P x B``
    samples where one cooperates), or of the stretches given as ``stretches`` (a loader of one
    phase's data, as the training machine makes).

    ``TensorDataset`` (or a tuple of tensors) is indexed directly; any map-style ``Dataset`` works
    through ``default_collate``. Non-tensor fields (strings) come as ``default_collate`` gives
    them, a flat list of the step's samples in batch order, without the member dimension.
    """

    def __init__(self, clan, dataset, batch_size: int, *, device: torch.device | str | None = None,
                 stretches=None):
        if isinstance(dataset, (tuple, list)) and dataset and all(isinstance(t, torch.Tensor) for t in dataset):
            lengths = [len(t) if t.dim() else None for t in dataset]
            if len(set(lengths)) > 1 or None in lengths:
                raise ValueError(f"clan.loader: the tensors must hold the same number of samples (their first "
                                 f"dimension), got {[list(t.shape) for t in dataset]}")
            dataset = TensorDataset(*dataset)
        if not (isinstance(dataset, Dataset) or hasattr(dataset, "__getitem__")) or not hasattr(dataset, "__len__"):
            raise TypeError(
                f"clan.loader: expected a map-style Dataset (with __len__ and __getitem__) or a tuple of tensors, "
                f"got {type(dataset).__name__}"
            )
        positive_int(batch_size, "clan.loader: batch_size")
        self.clan, self.dataset, self.batch_size = clan, dataset, batch_size
        self.device = torch.device(device) if device is not None else clan.device
        p = clan.population_size
        # Over the plan, not the round in force: a plan that searches first cooperates later.
        later = [stretch for stretch in (clan.plan if stretches is None else stretches) if stretch.end > clan.time_step]
        cooperates = any(stretch.cooperates for stretch in later) if later else clan.cooperative_steps > 0
        smallest = batch_size * (p if cooperates else 1)
        if len(dataset) < smallest:
            raise ValueError(
                f"clan.loader: the dataset has {len(dataset)} samples, fewer than one step needs "
                f"({smallest} = {'population_size x ' if cooperates else ''}batch_size)"
            )
        self._plan_checked = False

    @property
    def state(self) -> LoaderState:
        """The clan's loader state (shared by every loader of the clan)."""
        return self.clan.loader_state

    def _check_plan(self) -> None:
        """Warn, once, before the clan's first step, when its data would get another default plan.

        Checked on the first iteration, not when the loader is made: a loader made before
        ``clan.load_state_dict`` serves a resumed clan, whose plan is the checkpoint's. Across
        ranks only rank 0 warns: every rank holds the same plan and data.
        """
        self._plan_checked = True
        n, clan = len(self.dataset), self.clan
        first = clan.time_step == 0 and (clan.group is None or clan.group.rank == 0)
        plan = clan.settings.data_plan(n, self.batch_size) if first else None
        if plan is None:
            return
        share = clan.population_size * self.batch_size / n
        warnings.warn(
            f"clan.loader: for {n} training samples at batch_size={self.batch_size} (one cooperative batch is "
            f"{share:.3g} of them), the default plan is {[ph.name for ph in plan]}, but this clan was built without "
            f"its data's size and follows {[ph.name for ph in clan.settings.schedule]}; build it with "
            f"schedule=vmapclan.default_schedule({clan.selection!r}, {clan.settings.total_steps * share!r}, "
            f"{share!r}) to follow the plan for this data, or with a schedule of your own", stacklevel=3)

    def __iter__(self):
        if not self._plan_checked:
            self._check_plan()
        state = self.state
        n, p, b = len(self.dataset), self.clan.population_size, self.batch_size
        local, first = self.clan.local_size, self.clan.member_offset  # this rank's members (all, in one process)
        while True:
            if state.perm is None or state.perm.numel() != n:
                state.perm = torch.randperm(n, generator=state.generator)
                state.position = 0
                state.epoch += 1
            cooperative = self.clan.cooperating
            need = p * b if cooperative else b
            if need > n:  # inside clan.cooperate() a clan that only competes needs more than its check asked
                raise ValueError(f"clan.loader: the dataset has {n} samples, fewer than one cooperative step needs "
                                 f"({need} = population_size x batch_size)")
            if n - state.position < need:
                state.perm = None  # epoch over: the next pass draws a new permutation
                return
            index = state.perm[state.position:state.position + need]
            state.position += need
            if cooperative and local != p:
                index = index[first * b:(first + local) * b]
            batch = self._fetch(index)
            # Non-tensor fields (file names, captions: default_collate keeps them as lists) pass
            # through unchanged; only tensors get the member dimension.
            if cooperative:
                yield optree.tree_map(
                    lambda t: einops.rearrange(t, "(p b) ... -> p b ...", p=local) if isinstance(t, torch.Tensor) else t,
                    batch)
            else:
                yield optree.tree_map(
                    lambda t: t.unsqueeze(0).expand(local, *t.shape) if isinstance(t, torch.Tensor) else t, batch)

    def _fetch(self, index: torch.Tensor):
        if isinstance(self.dataset, TensorDataset):
            batch = tuple(t[index.to(t.device)] for t in self.dataset.tensors)
        else:
            batch = default_collate([self.dataset[i] for i in index.tolist()])
        return optree.tree_map(
            lambda t: t.to(self.device, non_blocking=True) if isinstance(t, torch.Tensor) else t, batch
        )

    def steps_per_epoch(self) -> int:
        """Batches in one epoch if every step were cooperative (a lower bound when some compete)."""
        p = self.clan.population_size if self.clan.cooperative_steps > 0 else 1
        return len(self.dataset) // (p * self.batch_size)
