"""vmapclan: train a population of one PyTorch model at once, evolving its hyperparameter schedule.

P members are stacked along a leading member dimension and trained with ``torch.func.vmap``
and a batched AdamW whose hyperparameters differ per member. See :class:`Clan`.
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .clan import FORMAT_VERSION, Clan, DivergenceError, Member
from .settings import ClanSettings
from .data import ClanLoader
from .distributed import DistributedError
from .step import FusedStep
from .genome import Gene
from .optim import AdamWHyper, AdamWState, BatchedAdamW, adamw_init, adamw_step_
from .population import PopulationModel, additive_attention_mask, member_loss
from .schedule import Phase, PhaseSchedule, TimeController, default_schedule
from .config import ClanSpec, DataSpec, ModelSpec, OptimizerSpec, RunConfig, ScheduleSpec
from .task import Task, get_task
from . import tasks  # noqa: F401 - the built-in tasks register their names
from .replay import ReplayResult, export_schedule, read_schedule, replay, write_schedule
from .record import TrainingResults
from .resume import load_run_checkpoint, save_run_checkpoint
from .machine import TrainingMachine
from . import recurrent
from .recurrent import unsupported_recurrent, vectorizable

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``vmapclan.nn`` (the recurrent layers' old name) still imports, with a deprecation warning.
    if name == "nn":
        import importlib

        return importlib.import_module(".nn", __name__)
    raise AttributeError(f"module 'vmapclan' has no attribute {name!r}")

__all__ = [
    "Clan",
    "ClanSettings",
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
    "default_schedule",
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
    "recurrent",
    "vectorizable",
    "unsupported_recurrent",
    "__version__",
]
