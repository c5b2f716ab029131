"""A clan over several processes: one vectorized sub-population per rank of a ``torch.distributed`` group.

With ``W`` ranks, a clan of ``population_size = P`` holds ``P / W`` members on each rank: rank
``r`` holds the members ``r * P / W`` to ``(r + 1) * P / W - 1`` (their *global* indices). What
crosses the ranks, and when:

- the cooperative phase, where the members are copies of one model trained as one
  (:attr:`~vmapclan.PopulationModel.one_model`): one all-reduce per step of that one model's
  flat gradient (member 0's row of ``grad_flat``, ``N`` values), so the population trains as one
  data-parallel model at batch ``P x B`` across all the ranks;
- selection: an all-gather of the ``P`` validation losses, after which every rank ranks them the
  same way, and a broadcast of the winner's row (parameters, gradients, buffers, optimizer
  moments, counters and accumulation state, packed as one byte tensor) from the rank that holds it;
- nothing else. The genomes of all ``P`` members live on every rank and are mutated from the
  shared seed, so every rank draws the same mutations, and the loader draws the same permutation
  everywhere and hands each rank its own members' shards.

A collective that fails (a rank died) or times out (a rank hung) raises :class:`DistributedError`
naming the ranks that stopped answering. The timeout is the process group's
(``torch.distributed.init_process_group(timeout=...)``; :func:`init_from_env` takes it in seconds).
"""

from __future__ import annotations

import datetime
import hashlib
import math
import os
import time

import optree
import torch
import torch.distributed as dist

from .checks import number_in

__all__ = ["ClanGroup", "DistributedError", "resolve_group", "check_clan_group", "init_from_env", "current_rank",
           "any_rank", "broadcast_object", "communication_bytes", "DEFAULT_TIMEOUT"]

#: Seconds a collective waits for the other ranks before it fails (:func:`init_from_env`'s default).
DEFAULT_TIMEOUT = 300.0

# Where each surviving rank says that a collective failed, so that the survivors can tell who is missing.
_FAILED_KEY = "vmapclan/failed/{}"


class DistributedError(RuntimeError):
    """A collective of a clan across ranks failed: another rank died, hung or ran different steps."""


def init_from_env(backend: str | None = None, timeout: float | None = None) -> bool:
    """Initialise the default process group from ``torchrun``'s environment, if it set one and none exists.

    Args:
        backend: ``"gloo"`` or ``"nccl"`` (default: NCCL when this rank has a CUDA device, else gloo).
        timeout: Seconds a collective waits for the others before failing (default: the environment's
            ``VMAPCLAN_TIMEOUT``, else :data:`DEFAULT_TIMEOUT`).

    Returns:
        Whether a group of more than one rank is in force.

    Raises:
        ValueError: for a timeout that is not a positive number.
    """
    if not dist.is_available():
        return False
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) < 2:
            return False
        if timeout is None:
            text = os.environ.get("VMAPCLAN_TIMEOUT", str(DEFAULT_TIMEOUT))
            try:
                timeout = float(text)
            except ValueError:
                raise ValueError(f"VMAPCLAN_TIMEOUT must be a number of seconds, got {text!r}") from None
        number_in(timeout, "init_from_env: timeout", 0, math.inf, low_open=True, high_open=True,
                  expected="a positive number of seconds")
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    return dist.get_world_size() > 1


def resolve_group(process_group, population_size: int, who: str = "Clan") -> ClanGroup | None:
    """The clan's group: ``process_group``, else the default group when one is initialised; ``None`` for one rank.

    Args:
        process_group: A ``torch.distributed`` process group, or ``None``.
        population_size: The clan's ``P`` over all ranks.
        who: The caller, for messages.

    Raises:
        ValueError: for a group given without an initialised ``torch.distributed``, or a
            ``population_size`` that the ranks cannot share equally.
    """
    if not dist.is_available() or not dist.is_initialized():
        if process_group is not None:
            raise ValueError(f"{who}: process_group was given but torch.distributed is not initialised")
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    if world == 1:
        return None
    if population_size % world:
        raise ValueError(
            f"{who}: population_size={population_size} must be a multiple of the world size {world} "
            f"(each rank holds population_size / world_size members)"
        )
    return ClanGroup(group, population_size)


def check_clan_group(group: ClanGroup, *, selection: str | None, init: str, model, settings: str) -> None:
    """Refuse what a clan across ranks cannot do, and a clan that differs between the ranks.

    Args:
        group: The clan's ranks.
        selection, init: The clan's settings.
        model: Its model (``None`` for a genome-only clan): its state's shapes are compared too.
        settings: The clan's settings as text, the same on every rank that built the same clan.

    Raises:
        ValueError: for truncation selection or independent members, or ranks whose settings,
            seed or model differ (naming them).
    """
    world = group.world_size
    if selection == "truncation":
        raise ValueError(f"Clan: selection='truncation' is not supported across {world} ranks (a member may copy "
                         "one held by another rank); use selection='winner' or None")
    if init == "independent" and model is not None:
        raise ValueError(f"Clan: init='independent' is not supported across {world} ranks; use init='copy'")
    # Ranks that built different clans would train in lockstep on wrong numbers: compare now.
    shapes = {n: list(t.shape) for n, t in model.state_dict().items()} if model is not None else None
    group.check_same(repr((settings, shapes)), "the clan's settings, seed and model")


def _timeout_of(group) -> float | None:
    try:  # not public API: only used to word the error message
        if group is dist.group.WORLD:
            group = dist.distributed_c10d._get_default_group()
        device = torch.device("cuda") if dist.get_backend(group) == "nccl" else torch.device("cpu")
        return group._get_backend(device).options._timeout.total_seconds()
    except Exception:  # noqa: BLE001 - the message can do without it
        return None


#: Seconds a rank whose collective failed waits for the others to report the same failure.
_REPORT_WAIT = 3.0


class ClanGroup:
    """The ranks a clan spans, and the few collectives it runs over them (see the module docstring).

    Args:
        group: The ``torch.distributed`` process group.
        population_size: ``P`` over all ranks (a multiple of the group's size).

    Attributes:
        rank: This process's rank in ``group``.
        world_size: The number of ranks ``W``.
        local_size: Members held by each rank, ``P / W``.
        offset: The global index of this rank's first member.
    """

    def __init__(self, group, population_size: int):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.local_size = population_size // self.world_size
        self.offset = self.rank * self.local_size
        self.timeout = _timeout_of(group)
        self.backend = dist.get_backend(group)

    def owner(self, member: int) -> int:
        """The rank holding global member ``member``."""
        return member // self.local_size

    def _collective(self, what: str, fn):
        try:
            return fn()
        except (RuntimeError, dist.DistBackendError) as err:  # gloo and NCCL raise these on a lost or slow peer
            raise self._failure(what, err) from err

    def _failure(self, what: str, err: Exception) -> DistributedError:
        """The error for a failed collective, naming the ranks that did not report the same failure."""
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        missing = None
        try:
            store = dist.distributed_c10d._get_default_store()
            store.set(_FAILED_KEY.format(self.rank), what)
            # The ranks still alive fail at about the same time (the lost connection or the same
            # timeout): give them a moment to say so; whoever stays silent is the one that stopped.
            deadline = time.monotonic() + _REPORT_WAIT
            while True:
                missing = [r for r in range(self.world_size) if not store.check([_FAILED_KEY.format(r)])]
                if not missing or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            if self.rank == 0 and missing:
                # Under torchrun's env:// rendezvous rank 0 hosts the store: stay as long again, so
                # that a rank which saw the failure later can still read who reported it.
                time.sleep(_REPORT_WAIT)
        except Exception:  # noqa: BLE001 - the store lives on a rank or agent that may be gone too
            missing = None
        if missing:
            who = f"rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} stopped answering (died or hung)"
        elif missing is None:
            who = "another rank stopped answering, and the rendezvous store is unreachable too"
        else:
            who = "every rank saw it fail (a rank ran different steps, or the network failed)"
        limit = f" within the timeout of {self.timeout:g} s" if self.timeout else ""
        return DistributedError(f"vmapclan: {what} failed on rank {self.rank} of {self.world_size}{limit}: {who} "
                                f"({detail})")

    # -- the collectives ----------------------------------------------------------------------------
    def all_reduce_(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place (every rank gets the same values)."""
        self._collective(what, lambda: dist.all_reduce(tensor, group=self.group))
        return tensor

    def all_gather(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """Every rank's ``tensor`` (``[P / W, ...]``) concatenated in rank order: ``[P, ...]``, on ``tensor``'s device."""
        device = tensor.device
        tensor = self._on_backend(tensor).contiguous()  # NCCL gathers CUDA tensors only (the losses are on the CPU)
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self._collective(what, lambda: dist.all_gather(parts, tensor, group=self.group))
        return torch.cat(parts).to(device)

    def check_same(self, text: str, what: str, who: str = "Clan") -> None:
        """Refuse to go on unless every rank gives the same ``text`` (compared by a hash).

        Raises:
            ValueError: naming the ranks whose ``what`` differs from rank 0's.
        """
        digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little", signed=True)
        device = self._device()
        hashes = self.all_gather(torch.tensor([digest], dtype=torch.long, device=device),
                                 f"{who}'s comparison of {what}").tolist()
        differ = [r for r, h in enumerate(hashes) if h != hashes[0]]
        if differ:
            ranks = f"ranks {', '.join(map(str, differ))} differ" if len(differ) > 1 else f"rank {differ[0]} differs"
            raise ValueError(f"{who}: the ranks disagree on {what}: {ranks} from rank 0; every rank must run the same "
                             "configuration and seed")

    def _device(self) -> torch.device:
        # NCCL moves CUDA tensors only; gloo CPU ones.
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _on_backend(self, tensor: torch.Tensor) -> torch.Tensor:
        device = self._device()
        return tensor if tensor.device == device else tensor.to(device)

    def broadcast_row_(self, tree, member: int, what: str) -> None:
        """Copy global member ``member``'s row of every tensor in ``tree`` into every row on every rank.

        ``tree`` is this rank's member-major state (every leaf ``[P / W, ...]``). The owner packs the
        row's bytes into one tensor, broadcasts it, and every rank (the owner too) writes it into
        each of its rows: after it, every member on every rank holds the winner's state.
        """
        leaves = optree.tree_leaves(tree)
        owner, local = self.owner(member), member - self.owner(member) * self.local_size
        sizes = [_padded(t[0].numel() * t.element_size()) for t in leaves]
        if self.rank == owner:
            packed = torch.cat([_bytes(t[local], size) for t, size in zip(leaves, sizes)])
        else:
            packed = torch.empty(sum(sizes), dtype=torch.uint8, device=leaves[0].device if leaves else "cpu")
        packed = self._on_backend(packed)
        # group_src: the owner's rank within the clan's group (src would be its global rank).
        self._collective(what, lambda: dist.broadcast(packed, group=self.group, group_src=owner))
        offset = 0
        with torch.no_grad():
            for t, size in zip(leaves, sizes):
                n = t[0].numel() * t.element_size()
                row = packed[offset:offset + n].to(t.device).view(t.dtype).view(t.shape[1:])
                t.copy_(row.expand_as(t))
                offset += size

    def gather_rows(self, tree, what: str):
        """Every rank's member-major tensors joined in member order: the ``[P, ...]`` state of the whole clan."""
        return optree.tree_map(lambda t: self.all_gather(t, what), tree)


def _padded(nbytes: int) -> int:
    # Each tensor starts on an 8-byte boundary of the packed bytes, so that it can be viewed as its dtype.
    return (nbytes + 7) // 8 * 8


def _bytes(row: torch.Tensor, size: int) -> torch.Tensor:
    flat = row.contiguous().reshape(-1).view(torch.uint8)
    return torch.cat([flat, flat.new_zeros(size - flat.numel())]) if size > flat.numel() else flat


def current_rank() -> int:
    """This process's rank in the default group (0 without ``torch.distributed``): rank 0 writes the run's files."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def any_rank(group: ClanGroup | None, flag: bool, what: str) -> bool:
    """Whether ``flag`` holds on any rank (itself without a group): decisions every rank must take alike."""
    if group is None:
        return bool(flag)
    value = group._on_backend(torch.tensor([int(bool(flag))], dtype=torch.int32))
    group._collective(what, lambda: dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group.group))
    return bool(value.item())


def broadcast_object(group: ClanGroup | None, obj, src: int, what: str):
    """Rank ``src``'s ``obj`` (any picklable value; ``src`` is a rank of the clan's group) on every rank.

    Without a group, ``obj`` itself.
    """
    if group is None:
        return obj
    box = [obj]
    group._collective(what, lambda: dist.broadcast_object_list(box, group=group.group, group_src=src))
    return box[0]


def communication_bytes(clan, world_size: int | None = None) -> dict[str, int]:
    """A model of what a clan across ranks moves: bytes per cooperative step and per selection.

    The payloads, as :class:`ClanGroup` sends them (what the wire carries depends on the backend's
    algorithm: a ring all-reduce sends about ``2 (W - 1) / W`` times its payload from every rank;
    a broadcast, about its payload per receiving rank over a tree or a ring):

    - ``allreduce``: the cooperative step's one model gradient, ``N`` values of the parameters'
      dtype, once per cooperative step (once per micro-batch with gradient accumulation);
    - ``ring_allreduce_sent``: what each rank sends for it over a ring, ``2 (W - 1) / W`` times that;
    - ``gather``: selection's ``P`` float64 validation losses;
    - ``winner``: selection's broadcast of one member's whole state (parameters, gradients, the
      two AdamW moments, buffers, counters), once per round with winner selection.

    Args:
        clan: A :class:`~vmapclan.Clan` with a model.
        world_size: The ranks to model (default: the clan's).
    """
    world = clan.world_size if world_size is None else world_size
    state = clan.member_state()
    row = sum(_padded(t[0].numel() * t.element_size()) for t in optree.tree_leaves(state))
    payload = clan.population.numel * clan.population.flat.element_size()
    return {"allreduce": payload, "ring_allreduce_sent": int(2 * (world - 1) / world * payload),
            "gather": 8 * clan.population_size, "winner": row}
