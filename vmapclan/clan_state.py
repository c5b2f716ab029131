"""A clan's state dict: its format, the upgrade of earlier versions, and the composition of its parts.

The state is a plain dict of tensors and values with a format version. Each part of the clan
gives its own entries and checks them when they come back: the round clock and the plan's
position (:class:`~vmapclan.clock.RoundClock`), the genes (:class:`~vmapclan.genepool.GenePool`),
the loader (:class:`~vmapclan.data.LoaderState`), the member tensors
(:meth:`~vmapclan.PopulationModel.check_member_state`), the restore point and the kept incumbent
(:mod:`vmapclan.snapshots`). :func:`load_clan_state` checks every part before it copies any, so
a refused state leaves the clan as it was.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import optree
import torch

from .data import check_generator_state
from .snapshots import KeptIncumbent, RestorePoint

__all__ = ["FORMAT_VERSION", "clan_state_dict", "load_clan_state", "upgrade_state"]

#: Version 2: the state holds the clan's horizon and plan position, its lr settings and its kept incumbent.
FORMAT_VERSION = 2
#: What a version-1 state (saved before the clan held them) trained with: no horizon, the genome's lr.
LEGACY_CONFIG = {"total_steps": None, "schedule": None, "lr_schedule": "constant", "warmup": 0.0, "decay": 0.2,
                 "competitive_lr": "same", "keep_best": False}
_KEYS = ("config", "round", "round_step", "global_step", "time_step", "stretch", "record_start", "genomes",
         "incumbent", "generator", "loader", "torch_rng", "history", "restores", "last_good", "kept", "model",
         "optimizer")


def _with_skipped(optimizer, like: torch.Tensor):
    """A saved optimizer table, with all-zero ``skipped`` counts if it predates them (nothing sat out)."""
    if not isinstance(optimizer, Mapping) or "skipped" in optimizer:
        return optimizer
    return {**optimizer, "skipped": torch.zeros_like(like)}


def upgrade_state(state: Mapping, skipped_like: torch.Tensor | None, who: str = "Clan.load_state_dict") -> dict:
    """A clan state of an earlier format version in today's form.

    A version-1 state comes from a clan without a horizon that trained at its genomes' lr:
    ``competitive_lr = "same"``, ``keep_best = False`` and a constant lr (:data:`LEGACY_CONFIG`),
    which a clan loading it must share (it refuses other settings by name).

    Args:
        state: A clan's state dict.
        skipped_like: The loading clan's ``skipped`` counts (a state older than them gets
            zeros), or ``None`` without a model.
        who: The caller, for the messages.

    Raises:
        ValueError: for a state of no known version.
    """
    if not isinstance(state, Mapping) or "format_version" not in state:
        raise ValueError(f"{who}: not a vmapclan state dict (no 'format_version')")
    version = state["format_version"]
    if version == FORMAT_VERSION:
        return dict(state)
    if version != 1:
        raise ValueError(f"{who}: checkpoint format version {version!r}, this vmapclan reads versions 1 and {FORMAT_VERSION}")
    state = dict(state)
    if isinstance(state.get("config"), Mapping):
        state["config"] = {**LEGACY_CONFIG, **state["config"]}
    state.setdefault("time_step", state.get("global_step"))
    state.setdefault("stretch", 0)
    state.setdefault("record_start", 0)
    state.setdefault("kept", None)
    if skipped_like is not None:
        state["optimizer"] = _with_skipped(state.get("optimizer"), skipped_like)
        good = state.get("last_good")
        if isinstance(good, Mapping) and isinstance(good.get("optimizer"), Mapping):
            state["last_good"] = {**good, "optimizer": _with_skipped(good["optimizer"], skipped_like[0])}
    state["format_version"] = FORMAT_VERSION
    return state


def clan_state_dict(clan) -> dict:
    """``clan``'s state dict (:meth:`vmapclan.Clan.state_dict`): every part's entries, copies throughout."""
    state = {"format_version": FORMAT_VERSION, "config": clan.state_config(), **clan.clock.state_dict(),
             **clan.genepool.state_dict(), "loader": clan.loader_state.state_dict(),
             "torch_rng": torch.get_rng_state(), "history": copy.deepcopy(clan.history),
             **clan.restore_point.state_dict(), "kept": copy.deepcopy(clan.kept.saved), "model": None,
             "optimizer": None}
    if clan.device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(clan.device)
    group = clan.group
    if group is not None:
        state["world_size"] = clan.world_size
        # Dropout draws from each rank's own global RNG: keep every rank's, for a resume at this world size.
        ranks = group.all_gather(torch.get_rng_state().unsqueeze(0), "state_dict's gather of the RNG states")
        state["torch_rng_ranks"] = [r.clone() for r in ranks]  # each its own tensor: set_rng_state reads from 0
    pop = clan.population
    if pop is not None:
        pop.restore_grad_views()  # gradients a user detached with ``p.grad = None`` belong in the state
        members = optree.tree_map(lambda t: t.detach().clone(), pop.member_state())
        if group is not None:
            members = group.gather_rows(members, "state_dict's gather of the members")
        state["model"] = {"shapes": {n: list(s) for n, s in pop.shapes.items()},
                          **{k: members[k] for k in ("params", "grads", "buffers")}}
        state["optimizer"] = members["optimizer"]
    return state


#: Settings a state records since they were found to change a run silently; a state saved before
#: (without them) cannot say what it trained with, and loads as it did then.
_RECORDED_SINCE = ("max_grad_norm", "adamw")


def _check_config(clan, theirs, who: str) -> None:
    if not isinstance(theirs, Mapping):
        raise ValueError(f"{who}: the checkpoint's config must be a table, got {type(theirs).__name__!r}")
    for key, mine in clan.state_config().items():
        if key in ("round_length", "duty_cycle"):
            continue  # round settings are state (see Clan.reconfigure), checked with the round clock
        if key in _RECORDED_SINCE and key not in theirs:
            continue
        if key == "adamw" and isinstance(theirs.get(key), Mapping):  # name the setting that differs
            differs = next((k for k in sorted({*mine, *theirs[key]}) if mine.get(k) != theirs[key].get(k)), None)
            if differs is not None:
                raise ValueError(f"{who}: the checkpoint's optimizer {differs} (no gene holds it) is "
                                 f"{theirs[key].get(differs)!r}, this clan's is {mine.get(differs)!r}")
            continue
        if key == "genes" and isinstance(theirs.get(key), Mapping) and isinstance(mine, Mapping):
            # name the gene and the field that differ, not both whole tables
            for gene in sorted({*mine, *theirs[key]}):
                a, b = theirs[key].get(gene), mine.get(gene)
                if a != b:
                    if not isinstance(a, Mapping) or not isinstance(b, Mapping):
                        raise ValueError(f"{who}: the checkpoint's clan {'has' if a is not None else 'lacks'} the "
                                         f"gene {gene!r}, this clan {'has' if b is not None else 'lacks'} it")
                    field = next(k for k in sorted({*a, *b}, key=str) if a.get(k) != b.get(k))
                    raise ValueError(f"{who}: the checkpoint's gene {gene!r} has {field} {a.get(field)!r}, "
                                     f"this clan's {b.get(field)!r}")
        if mine != theirs.get(key):
            raise ValueError(f"{who}: the checkpoint's {key} is {theirs.get(key)!r}, this clan's is {mine!r}")


def _checked(clan, state: Mapping, who: str) -> dict | None:
    """Every part's check of ``state``; returns the member tensors to copy (``None`` without a model)."""
    missing = [k for k in _KEYS if k not in state]
    if missing:
        raise ValueError(f"{who}: the checkpoint has no {missing[0]!r} entry")
    _check_config(clan, state["config"], who)
    clan.clock.check_state(state, state["config"], who)
    if not isinstance(state["history"], list) or not all(isinstance(r, Mapping) for r in state["history"]):
        raise ValueError(f"{who}: the checkpoint's history must be a list of round records, "
                         f"got {type(state['history']).__name__!r}")
    clan.genepool.check_state(state, who)
    check_generator_state(state["torch_rng"], torch.get_rng_state(), f"{who}: the checkpoint's torch_rng")
    clan.loader_state.check_state(state["loader"], who)
    pop = clan.population
    if (state["model"] is None) != (pop is None):
        raise ValueError(f"{who}: the checkpoint and this clan disagree on having a model")
    saved = None
    if pop is not None:
        rows = {"model": state["model"], "optimizer": state["optimizer"]}
        if clan.group is not None:  # the whole clan's [P, ...] rows: this rank takes its own members'
            rows = optree.tree_map(lambda t: t[clan.members] if isinstance(t, torch.Tensor) and t.dim() > 0
                                   and t.shape[0] == clan.population_size else t, rows)
        saved = pop.check_member_state(rows, who)
    live = None if pop is None else pop.member_state(sync=False)
    RestorePoint.check_state(state["last_good"], live, clan.max_restores, state["restores"], who,
                             lambda name, genes: clan.genepool.check_incumbent(name, genes, who))
    KeptIncumbent.check_state(state["kept"], pop, state["time_step"], who)
    return saved


def load_clan_state(clan, state: Mapping) -> bool:
    """Check ``state`` with every part of ``clan``, then copy it in (:meth:`vmapclan.Clan.load_state_dict`).

    Returns:
        Whether the state came in an earlier format (upgraded): it may stand at the start of a
        stretch it has not taken up yet.

    Raises:
        ValueError: naming the first entry a part refuses; nothing is copied then.
    """
    who = "Clan.load_state_dict"
    optimizer = clan.optimizer
    upgraded = isinstance(state, Mapping) and state.get("format_version") != FORMAT_VERSION
    state = upgrade_state(state, None if optimizer is None else optimizer.adamw_state.skipped, who)
    saved = _checked(clan, state, who)
    pop = clan.population
    if pop is not None:
        with torch.no_grad():
            optree.tree_map(lambda t, src: t.copy_(src), pop.member_state(sync=False), saved)
        pop.rows_stale = False
        good = state["last_good"]
        optimizer.lagging = bool(saved["optimizer"]["skipped"].any()) or (
            good is not None and bool(good["optimizer"]["skipped"].any()))
    clan.genepool.load_state_dict(state)
    clan.clock.load_state_dict(state, state["config"])
    clan.loader_state.load_state_dict(state["loader"])
    ranks, group = state.get("torch_rng_ranks"), clan.group
    torch.set_rng_state(ranks[group.rank] if group is not None and isinstance(ranks, list)
                        and len(ranks) == clan.world_size else state["torch_rng"])
    if "cuda_rng" in state and clan.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], clan.device)
    clan.history = copy.deepcopy(state["history"])
    clan.restore_point.load_state_dict(state["last_good"] if pop is not None else None, state["restores"])
    clan.kept.load_state_dict(state["kept"])
    return upgraded
