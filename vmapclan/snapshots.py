"""The copies of one member a clan keeps: the point a divergence restores to, and the best incumbent seen.

Both hold member 0's row when its members are copies of one model (between rounds, with winner
selection), so one row is the whole population's state:

- :class:`RestorePoint`: every member-major tensor's row (weights, gradients, buffers, AdamW
  moments and counters) and the incumbent genome, taken at the start of every round and the
  end of every cooperative stretch; a diverged round or stretch goes back to it.
- :class:`KeptIncumbent`: the weights and buffers of the incumbent with the lowest validation
  loss seen at a round's or stretch's end, and the step it was kept at (``keep_best``): the
  run's model when it beats the last one, as early stopping keeps its best.

Each checks its own saved state (``check_state``) before the clan copies anything.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import optree
import torch

from .checks import is_int, refuse

__all__ = ["RestorePoint", "KeptIncumbent"]


def _described(t) -> str:
    return f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


class RestorePoint:
    """The state a divergence restores to, and how many restores ran in a row.

    Attributes:
        saved: ``{"round", "params", "grads", "buffers", "optimizer", "incumbent"}``, one row of each
            member-major tensor, or ``None`` (no model, or not winner selection).
        restores: Consecutive restores since the last good selection.
    """

    def __init__(self):
        self.saved: dict | None = None
        self.restores = 0

    def mark(self, members: Mapping, round_index: int, incumbent: Mapping[str, torch.Tensor]) -> None:
        """Keep member 0's row of every tensor of ``members`` (member 0's rows must be up to date)."""
        self.saved = {"round": round_index, **optree.tree_map(lambda t: t[0].clone(), dict(members)),
                      "incumbent": {n: v.clone() for n, v in incumbent.items()}}

    def restore(self, population) -> None:
        """Write the kept row into every row of every tensor of ``population``'s member state; count the restore."""
        members = population.member_state(sync=False)
        with torch.no_grad():
            optree.tree_map(lambda t, row: t.copy_(row.expand_as(t)), dict(members),
                            {k: self.saved[k] for k in members})
        population.rows_stale = False  # every row written
        self.restores += 1

    def state_dict(self) -> dict:
        """``{"last_good": the kept rows (or None), "restores": count}``, as the clan's state holds them."""
        return {"last_good": copy.deepcopy(self.saved), "restores": self.restores}

    @staticmethod
    def check_state(good, members: Mapping | None, max_restores: int, restores, who: str, check_incumbent) -> None:
        """Refuse a saved restore point that is not one finite row of ``members``, or a restore count out of range.

        Args:
            good: The saved ``last_good``.
            members: The live member-major tree (``None`` for a clan without a model).
            max_restores: The clan's limit.
            restores: The saved count.
            who: The caller, for the messages.
            check_incumbent: ``check_incumbent(name, genes)`` refuses an incumbent out of bounds.
        """
        if not is_int(restores) or not 0 <= restores <= max_restores:
            refuse(f"{who}: the checkpoint's restores", f"an int in [0, {max_restores}]", restores)
        if members is None:
            if good is not None:
                refuse(f"{who}: the checkpoint's last_good", "None for a clan without a model", type(good).__name__)
            return
        if good is None:
            return
        rows = {k: good.get(k) for k in members} if isinstance(good, Mapping) else None
        if rows is None or not is_int(good.get("round")) or \
                optree.tree_structure(rows) != optree.tree_structure(dict(members)):
            refuse(f"{who}: the checkpoint's last_good", "None or a restore point of this model", type(good).__name__)
        paths, targets, _ = optree.tree_flatten_with_path(dict(members))
        for path, target, row in zip(paths, targets, optree.tree_leaves(rows)):
            name = "/".join(map(str, path))
            if not isinstance(row, torch.Tensor) or row.shape != target.shape[1:] or row.dtype != target.dtype:
                raise ValueError(f"{who}: the checkpoint's last_good/{name} is {_described(row)}, "
                                 f"expected {target.dtype} {list(target.shape[1:])}")
            if row.is_floating_point() and not bool(torch.isfinite(row).all()):
                raise ValueError(f"{who}: the checkpoint's restore point holds NaN or infinite values in {name}")
        check_incumbent("last_good/incumbent", good.get("incumbent"))

    def load_state_dict(self, good, restores: int) -> None:
        """Take a saved restore point that :meth:`check_state` accepted."""
        self.saved, self.restores = copy.deepcopy(good), restores


class KeptIncumbent:
    """The incumbent with the lowest validation loss seen (``keep_best``): its weights, buffers, step and loss.

    Attributes:
        saved: ``{"step", "val", "row"}`` (``row`` as :meth:`~vmapclan.PopulationModel.member_row`
            gives it), or ``None`` before the first one.
    """

    def __init__(self):
        self.saved: dict | None = None

    @property
    def step(self) -> int | None:
        """The step it was kept at (``None``: nothing kept)."""
        return None if self.saved is None else self.saved["step"]

    @property
    def val(self) -> float:
        """Its validation loss (``inf``: nothing kept)."""
        return math.inf if self.saved is None else self.saved["val"]

    def offer(self, val: float, step: int, row) -> bool:
        """Keep ``row()`` (member 0's copy, made only if needed) if ``val`` is finite and the lowest yet."""
        if not math.isfinite(val) or (self.saved is not None and not val < self.saved["val"]):
            return False
        self.saved = {"step": step, "val": val, "row": row()}
        return True

    def forget(self) -> None:
        """Drop what was kept (the model grew: the kept one is another architecture)."""
        self.saved = None

    @staticmethod
    def check_state(kept, population, step: int, who: str) -> None:
        """Refuse a saved kept incumbent that is not one member of ``population`` kept by ``step``, with a finite loss."""
        if kept is None:
            return
        row = kept.get("row") if isinstance(kept, Mapping) else None
        step_ok = isinstance(kept, Mapping) and is_int(kept.get("step")) and 0 <= kept["step"] <= step
        val = kept.get("val") if isinstance(kept, Mapping) else None
        ok = (population is not None and step_ok and isinstance(val, float) and math.isfinite(val)
              and isinstance(row, Mapping) and isinstance(row.get("params"), torch.Tensor)
              and row["params"].shape == population.flat.shape[1:]
              and isinstance(row.get("buffers"), Mapping) and set(row["buffers"]) == set(population.buffers)
              and all(isinstance(v, torch.Tensor) and v.shape == population.buffers[n].shape[1:]
                      for n, v in row["buffers"].items()))
        if not ok:
            width = population.flat.shape[1] if population is not None else 0
            raise ValueError(f"{who}: the checkpoint's kept must be the best incumbent's step (<= {step}), finite "
                             f"loss and one member's weights [{width}] and buffers, got {type(kept).__name__}")

    def load_state_dict(self, kept) -> None:
        """Take a saved kept incumbent that :meth:`check_state` accepted."""
        self.saved = copy.deepcopy(kept)
