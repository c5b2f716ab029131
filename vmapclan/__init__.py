"""vmapclan: train a population of one PyTorch model at once, evolving its hyperparameter schedule.

P members are stacked along a leading member dimension and trained with ``torch.func.vmap``
and a batched AdamW whose hyperparameters differ per member. See :class:`Clan`.
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .clan import FORMAT_VERSION, Clan, DivergenceError, Member
from .data import ClanLoader
from .distributed import DistributedError
from .fused import FusedStep
from .genome import Gene
from .optim import AdamWHyper, AdamWState, BatchedAdamW, adamw_init, adamw_step_
from .population import PopulationModel, additive_attention_mask, member_loss
from .schedule import Phase, PhaseSchedule, TimeController
from .specs import ClanSpec, DataSpec, ModelSpec, OptimizerSpec, RunConfig, ScheduleSpec
from .tasks import Task, get_task
from .replay import ReplayResult, export_schedule, read_schedule, replay, write_schedule
from .machine import TrainingMachine, TrainingResults, load_run_checkpoint, save_run_checkpoint
from . import nn
from .nn import unsupported_recurrent, vectorizable

__version__ = "0.1.0"

__all__ = [
    "Clan",
    "Member",
    "DivergenceError",
    "FORMAT_VERSION",
    "ClanLoader",
    "DistributedError",
    "FusedStep",
    "Gene",
    "PopulationModel",
    "member_loss",
    "additive_attention_mask",
    "BatchedAdamW",
    "AdamWHyper",
    "AdamWState",
    "adamw_init",
    "adamw_step_",
    "TimeController",
    "Phase",
    "PhaseSchedule",
    "RunConfig",
    "ModelSpec",
    "DataSpec",
    "OptimizerSpec",
    "ClanSpec",
    "ScheduleSpec",
    "Task",
    "get_task",
    "TrainingMachine",
    "TrainingResults",
    "save_checkpoint",
    "load_checkpoint",
    "save_run_checkpoint",
    "load_run_checkpoint",
    "export_schedule",
    "write_schedule",
    "read_schedule",
    "replay",
    "ReplayResult",
    "nn",
    "vectorizable",
    "unsupported_recurrent",
    "__version__",
]
