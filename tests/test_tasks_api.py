"""The public task protocol: a task of the user's own, per-phase freezing and per-phase data settings."""

import dataclasses
import math
import tomllib
import warnings

import numpy as np
import pytest
import tomli_w
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from vmapclan import RunConfig, Task, TrainingMachine, replay
from vmapclan.cli import EXIT_INPUT, EXIT_OK, main
from vmapclan.tasks import get_task, resolve_task

from runs import assert_resumes_exactly


class Blobs(Dataset):
    """A Dataset class of the test's own: 4 features, the label is whether they sum above 0."""

    def __init__(self, n: int, seed: int):
        self.x = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed))
        self.y = (self.x.sum(1) > 0).long()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class BlobsTask(Task):
    model_defaults = {"width": 8}

    def split(self, data, seed):
        return Blobs(96, seed), Blobs(32, seed + 100)

    def build_model(self, model, data):
        return nn.Sequential(nn.Linear(4, model["width"]), nn.ReLU(), nn.Linear(model["width"], 2))

    def loss(self, output, target):
        return F.cross_entropy(output, target)


class ParityTask(Task):
    """Per-token parity of random token windows of ``data.seq_len``: a phase may change the length."""

    phase_data = ("seq_len",)

    def __init__(self):
        self.last_len = None

    def split(self, data, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randint(0, 16, (64, data.seq_len), generator=g)
        return (x[:48], x[:48] % 2), (x[48:], x[48:] % 2)

    def build_model(self, model, data):
        return nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 2))

    def loss(self, output, target):
        self.last_len = target.shape[-1]  # which windows the step trained on
        return F.cross_entropy(output.flatten(0, -2), target.flatten())


class NotATask:
    pass


BASE = {"total_steps": 24, "seed": 1, "data": {"batch_size": 4, "eval_samples": 8},
        "clan": {"population_size": 3, "round_length": 6, "duty_cycle": 0.5}}
WARMUP = [{"name": "warmup", "start_t": 0.0, "end_t": 0.25, "clan": {"competition": False}},
          {"name": "clan", "start_t": 0.25, "end_t": 1.0}]


def blobs_config(**changes) -> dict:
    return {**BASE, "task": "test_tasks_api:BlobsTask", "model": {"width": 6}, "schedule": WARMUP, **changes}


def test_a_user_task_runs_from_python_and_from_the_command_with_the_same_results(tmp_path, capsys):
    config = blobs_config()
    results = TrainingMachine({k: v for k, v in config.items() if k != "task"}, task=BlobsTask()).train()
    assert results.config.task == "test_tasks_api:BlobsTask"  # what a resume and the replay import
    path = tmp_path / "blobs.toml"
    path.write_text(tomli_w.dumps(config))
    out = tmp_path / "run"
    assert main(["train", str(path), "--out", str(out), "--no-progress", "--no-plots"]) == EXIT_OK
    saved = torch.load(out / "best_model.pt")
    assert all(torch.equal(t, saved[k]) for k, t in results.best_model.state_dict().items())
    assert tomllib.loads((out / "config.toml").read_text())["model"] == {"width": 6}
    assert main(["replay", str(out / "schedule.json"), "--no-progress"]) == EXIT_OK
    assert "replay (one model, torch AdamW)" in capsys.readouterr().out


@pytest.mark.parametrize("task, message", [
    ("no_such_module_for_vmapclan:T", "task 'no_such_module_for_vmapclan:T': cannot import "
                                      "'no_such_module_for_vmapclan': ModuleNotFoundError"),
    ("test_tasks_api:Missing", "task 'test_tasks_api:Missing': module 'test_tasks_api' has no 'Missing'"),
    ("test_tasks_api:NotATask", "task 'test_tasks_api:NotATask': NotATask is not a vmapclan.Task subclass"),
    ("mnist", "task 'mnist' is neither a built-in task"),
])
def test_a_task_that_cannot_be_imported_is_exit_3_in_one_line(tmp_path, capsys, task, message):
    path = tmp_path / "bad.toml"
    path.write_text(tomli_w.dumps(blobs_config(task=task)))
    assert main(["train", str(path), "--out", str(tmp_path / "r"), "--no-progress"]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_task(task)


def test_model_settings_are_the_tasks_and_task_must_be_a_task():
    with pytest.raises(ValueError, match=r"model: unknown setting 'depth' for task 'test_tasks_api:BlobsTask'; "
                                         r"it reads \['width'\]"):
        TrainingMachine(blobs_config(model={"depth": 2}))
    with pytest.raises(TypeError, match="TrainingMachine: task must be a vmapclan.Task, got NotATask"):
        TrainingMachine(blobs_config(), task=NotATask())
    with pytest.raises(TypeError, match=r"Broken.split \(train\): expected a map-style torch Dataset \(with __len__\) or \(inputs, targets\) tensors, got list"):
        class Broken(BlobsTask):
            def split(self, data, seed):
                return [1, 2, 3], Blobs(8, 0)
        TrainingMachine(blobs_config(), task=Broken()).prepare()


# -- freeze ------------------------------------------------------------------------------------
FREEZE = [{"name": "warmup", "start_t": 0.0, "end_t": 0.25, "clan": {"competition": False}},
          {"name": "first-frozen", "start_t": 0.25, "end_t": 0.75, "model": {"freeze": ["0.*"]}},
          {"name": "last-frozen", "start_t": 0.75, "end_t": 1.0, "clan": {"competition": False},
           "model": {"freeze": ["2.weight", "2.bias"]}}]


def columns_of(state: dict, columns: slice) -> dict:
    return {"params": state["params"][:, columns].clone(), "exp_avg": state["optimizer"]["exp_avg"][:, columns].clone(),
            "exp_avg_sq": state["optimizer"]["exp_avg_sq"][:, columns].clone()}


def test_a_frozen_parameter_is_bitwise_unchanged_while_the_others_train():
    machine = TrainingMachine(blobs_config(schedule=FREEZE))
    machine.prepare()
    columns = machine.clan.population.columns
    first = slice(columns["0.weight"].start, columns["0.bias"].stop)
    last = slice(columns["2.weight"].start, columns["2.bias"].stop)
    snapshots = {}

    def snap(event):  # at the end of each stretch, after its selection
        if event["event"] in ("round", "cooperative") and event["end_step"] in (6, 18, 24):
            state = machine.clan.member_state()
            snapshots[event["end_step"]] = (columns_of(state, first), columns_of(state, last))

    machine.callback = snap
    results = machine.train()
    for name in ("params", "exp_avg", "exp_avg_sq"):
        assert torch.equal(snapshots[6][0][name], snapshots[18][0][name]), name  # frozen in first-frozen
        assert not torch.equal(snapshots[6][1][name], snapshots[18][1][name]), name  # the rest trains
        assert torch.equal(snapshots[18][1][name], snapshots[24][1][name]), name  # frozen in last-frozen
        assert not torch.equal(snapshots[18][0][name], snapshots[24][0][name]), name  # trains again
    assert [r.get("freeze") for r in results.history] == [None, ["0.*"], ["0.*"], ["2.weight", "2.bias"]]
    # The exported schedule records the freeze and the replay follows it.
    frozen = {p.model.get("freeze", None) and tuple(p.model["freeze"]) for p in results.schedule}
    assert frozen == {None, ("0.*",), ("2.weight", "2.bias")}
    out = replay(results.schedule, results.config, trace=True)
    assert [s["freeze"] for s in out.trace] == [[]] * 6 + [["0.weight", "0.bias"]] * 12 + [["2.weight", "2.bias"]] * 6


def test_a_freeze_pattern_that_matches_nothing_is_refused():
    schedule = [{**FREEZE[0]}, {**FREEZE[1], "model": {"freeze": ["embed.*"]}}, FREEZE[2]]
    with pytest.raises(ValueError, match=r"schedule\[1\] \('first-frozen'\): model.freeze pattern 'embed.\*' matches "
                                         r"no parameter; the parameters are \['0.weight'"):
        TrainingMachine(blobs_config(schedule=schedule)).prepare()


@pytest.mark.parametrize("stop_at", [10, 20])  # inside each frozen phase
def test_resume_across_a_freeze_is_exact(tmp_path, stop_at):
    assert_resumes_exactly(blobs_config(schedule=FREEZE), tmp_path, stop_at)


# -- data settings per phase -------------------------------------------------------------------
LONGER = [{"name": "short", "start_t": 0.0, "end_t": 0.5},
          {"name": "long", "start_t": 0.5, "end_t": 1.0, "data": {"seq_len": 12}}]


def parity_config() -> dict:
    return {**BASE, "task": "test_tasks_api:ParityTask", "data": {**BASE["data"], "seq_len": 6},
            "schedule": LONGER}


def test_a_phase_data_setting_changes_the_batches_from_the_boundary_and_the_replay_follows():
    task = ParityTask()
    lengths = []
    machine = TrainingMachine(parity_config(), task=task,
                              callback=lambda e: lengths.append(task.last_len) if e["event"] == "step" else None)
    results = machine.train()
    assert lengths == [6] * 12 + [12] * 12
    assert [p.data.get("seq_len") for p in results.schedule][-1] == 12
    out = replay(results.schedule, results.config, trace=True)
    assert [s["input_shape"][-1] for s in out.trace] == lengths


def test_a_data_setting_the_task_does_not_offer_is_refused():
    with pytest.raises(ValueError, match=r"schedule\[1\] \('long'\): unknown data setting 'seq_len' for task "
                                         r"'test_tasks_api:BlobsTask'; a phase may change \['batch_size'\]"):
        TrainingMachine(blobs_config(schedule=LONGER))
    with pytest.raises(ValueError, match=r"data.seq_len=80 is longer than model.max_len=64"):
        TrainingMachine({"task": "stdlib-chars", "model": {"max_len": 64},
                         "schedule": [{**LONGER[0]}, {**LONGER[1], "data": {"seq_len": 80}}]})


def test_resume_across_a_data_change_is_exact(tmp_path):
    assert_resumes_exactly(parity_config(), tmp_path, 14)


def test_round_config_keeps_the_model_table():
    config = RunConfig.from_dict(blobs_config())
    assert dict(config.model) == {"width": 6} and RunConfig.from_dict(config.to_dict()) == config


def test_the_custom_task_example_runs_from_python_and_from_the_command(tmp_path):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "examples" / "custom_task.py"
    spec = importlib.util.spec_from_file_location("custom_task_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    from_python = example.main(size=300, steps=40, population_size=3)
    from_command = example.main(size=300, steps=40, population_size=3, command=True, out=str(tmp_path / "run"))
    assert from_command["exit"] == [0, 0]
    assert from_command["val_loss"] == pytest.approx(from_python["val_loss"], rel=1e-6)


# -- the task's own data settings ----------------------------------------------------------------
class ModuloTask(ParityTask):
    """Tokens modulo ``data.modulus``, a data setting of the task's own that a phase may change."""

    data_defaults = {"modulus": 2}
    phase_data = ("modulus",)

    def __init__(self):
        super().__init__()
        self.loaded = []  # the moduli split was called with

    def split(self, data, seed):
        self.loaded.append(data.modulus)
        g = torch.Generator().manual_seed(seed)
        x = torch.randint(0, 16, (64, data.seq_len), generator=g)
        return (x[:48], x[:48] % data.modulus), (x[48:], x[48:] % data.modulus)

    def build_model(self, model, data):
        return nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 4))


HARDER = [{"name": "easy", "start_t": 0.0, "end_t": 0.5},
          {"name": "hard", "start_t": 0.5, "end_t": 1.0, "data": {"modulus": 3}}]


def modulo_config(**data) -> dict:
    return {**BASE, "task": "test_tasks_api:ModuloTask", "data": {**BASE["data"], "seq_len": 6, **data},
            "schedule": HARDER}


def test_a_tasks_own_data_setting_is_read_from_the_config_and_changed_by_a_phase(tmp_path):
    task = ModuloTask()
    results = TrainingMachine(modulo_config(), task=task).train()
    assert task.loaded == [2, 3]
    assert [r.get("data") for r in results.history] == [None, None, {"modulus": 3}, {"modulus": 3}]
    assert results.config.data.modulus == 2 and results.config.to_dict()["data"]["modulus"] == 2  # the default
    assert [p.data.get("modulus") for p in results.schedule][-1] == 3
    out = replay(results.schedule, results.config, trace=True, task=ModuloTask())
    assert [s["data"].get("modulus", 2) for s in out.trace] == [2] * 12 + [3] * 12
    # From a config file: the setting sits in [data] beside the fields.
    path = tmp_path / "modulo.toml"
    path.write_text(tomli_w.dumps(modulo_config(modulus=2)))
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--no-progress", "--no-plots"]) == EXIT_OK
    assert tomllib.loads((tmp_path / "run" / "config.toml").read_text())["data"]["modulus"] == 2
    resumed_config = RunConfig.from_toml(tmp_path / "run" / "config.toml")
    assert resumed_config.data.modulus == 2


def test_a_data_setting_no_task_reads_is_refused():
    with pytest.raises(ValueError, match=r"data: unknown setting 'modulo' for task 'test_tasks_api:ModuloTask'; it "
                                         r"reads \['batch_size', 'val_fraction', 'seq_len', 'max_chars', "
                                         r"'eval_samples', 'test_fraction', 'modulus'\]"):
        TrainingMachine(modulo_config(modulo=3))
    with pytest.raises(ValueError, match=r"data: unknown setting 'augment' for task 'digits-mlp'"):
        TrainingMachine({"task": "digits-mlp", "data": {"augment": True}})

    class Misdeclared(ModuloTask):
        phase_data = ("difficulty",)

    with pytest.raises(ValueError, match=r"task 'test_tasks_api:.*Misdeclared': phase_data names 'difficulty', "
                                         r"which is neither a data field nor one of its data_defaults \['modulus'\]"):
        TrainingMachine(modulo_config(), task=Misdeclared())


# -- a task class built with arguments from the config ------------------------------------------
class SizedBlobsTask(BlobsTask):
    """Blobs with the training set's size an argument of the class."""

    def __init__(self, n: int = 96):
        self.n = n

    def split(self, data, seed):
        return Blobs(self.n, seed), Blobs(32, seed + 100)


def test_a_task_records_what_it_was_built_with():
    class Wider(SizedBlobsTask):
        def __init__(self, width=8, **extra):
            super().__init__(n=200)  # the parent's call does not overwrite the record
            self.width, self.extra = width, extra

    class Listed(BlobsTask):
        def __init__(self, *sizes):
            self.sizes = sizes

    @dataclasses.dataclass
    class Declared(SizedBlobsTask):  # a dataclass's __init__ comes after the class is made
        n: int = 96
        noise: float = 0.1

    assert SizedBlobsTask(64).init_arguments == {"n": 64} and SizedBlobsTask().init_arguments == {}
    assert SizedBlobsTask(96).init_arguments == {}  # the default itself: nothing to rebuild
    assert Wider(width=4, seed=1).init_arguments == {"width": 4, "seed": 1} and Wider().n == 200
    assert BlobsTask().init_arguments == {} and Listed().init_arguments == {}
    assert Declared(64).init_arguments == {"n": 64} and Declared(noise=0.2).init_arguments == {"noise": 0.2}
    # What Class(**task_args) cannot rebuild: a *args, a value no TOML table holds (kept out of
    # the record, so the task still pickles).
    for task in (Listed(1, 2), SizedBlobsTask(torch.tensor(64)), SizedBlobsTask(np.float64(64)),
                 SizedBlobsTask(n=lambda: 64)):
        assert task.init_arguments is None and task.built_with({"n": 3})
    # built_with fills in the defaults both ways.
    assert SizedBlobsTask(64).built_with({"n": 64}) and not SizedBlobsTask(64).built_with({})
    assert SizedBlobsTask().built_with({"n": 96}) and not SizedBlobsTask().built_with({"n": 64})
    assert not SizedBlobsTask().built_with({"m": 1}) and Declared(noise=0.2).built_with({"noise": 0.2, "n": 96})


def test_a_task_object_s_arguments_become_the_run_s_task_args(tmp_path):
    """``TrainingMachine(config, task=obj)`` writes what ``obj`` was built with into the run's
    config, so that a resume from the command rebuilds it, not the class with its defaults."""
    out = tmp_path / "run"
    machine = TrainingMachine(blobs_config(total_steps=48), task=SizedBlobsTask(n=64), out_dir=out)
    machine.callback = lambda event: machine.request_stop() if event.get("step", 0) >= 24 else None
    with pytest.raises(Exception, match="stopped at step"):
        machine.train()
    assert tomllib.loads((out / "config.toml").read_text())["task_args"] == {"n": 64}
    assert main(["train", "--resume", str(out), "--no-progress", "--no-plots"]) == EXIT_OK
    whole = TrainingMachine(blobs_config(total_steps=48), task=SizedBlobsTask(n=64)).train()
    resumed = torch.load(out / "best_model.pt")
    assert all(torch.equal(t, resumed[k]) for k, t in whole.best_model.state_dict().items())
    # task_args that name other values than the object was built with would rebuild another task.
    with pytest.raises(ValueError, match=r"TrainingMachine: config.task_args \{'n': 32\} would build SizedBlobsTask "
                                         r"with other arguments than it was built with, \{'n': 64\}"):
        TrainingMachine(blobs_config(task_args={"n": 32}), task=SizedBlobsTask(n=64))
    with pytest.raises(ValueError, match=r"config.task_args \{'n': 64\} would build SizedBlobsTask with other "
                                         r"arguments than it was built with, its defaults"):
        TrainingMachine(blobs_config(task_args={"n": 64}), task=SizedBlobsTask())
    assert TrainingMachine(blobs_config(task_args={"n": 64}), task=SizedBlobsTask(n=64)).config.task_args == {"n": 64}
    # Arguments no TOML table holds: the run goes on, with a warning where it can be resumed.
    with pytest.warns(UserWarning, match=r"TrainingMachine: SizedBlobsTask was built with arguments that "
                                         r"config.task_args cannot hold"):
        TrainingMachine(blobs_config(), task=SizedBlobsTask(n=torch.tensor(64)), out_dir=tmp_path / "other")


def test_task_args_build_the_class_from_the_config_and_the_command(tmp_path):
    config = blobs_config(task="test_tasks_api:SizedBlobsTask", task_args={"n": 64})
    machine = TrainingMachine(config, out_dir=tmp_path / "python")
    assert machine.task.n == 64
    results = machine.train()
    assert results.config.task_args == {"n": 64}
    assert TrainingMachine.resume(tmp_path / "python").task.n == 64  # a resume rebuilds it with them
    path = tmp_path / "sized.toml"
    path.write_text(tomli_w.dumps(config))
    assert "[task_args]" in path.read_text()
    out = tmp_path / "run"
    assert main(["train", str(path), "--out", str(out), "--no-progress", "--no-plots"]) == EXIT_OK
    saved = torch.load(out / "best_model.pt")
    assert all(torch.equal(t, saved[k]) for k, t in results.best_model.state_dict().items())
    assert main(["replay", str(out / "schedule.json"), "--no-progress"]) == EXIT_OK


@pytest.mark.parametrize("changes, error, message", [
    ({"task": "test_tasks_api:SizedBlobsTask", "task_args": {"m": 1}}, ValueError,
     r"task 'test_tasks_api:SizedBlobsTask': SizedBlobsTask\(\*\*task_args\) failed: TypeError: .*unexpected "
     r"keyword argument 'm'"),
    ({"task": "digits-mlp", "task_args": {"n": 1}}, ValueError,
     r"task_args: the built-in task 'digits-mlp' takes no arguments, got \['n'\]"),
    ({"task_args": 3}, ValueError,
     r"config.task_args must be a table of keyword arguments for the task's class, got 3"),
])
def test_bad_task_args_are_refused_in_one_line(tmp_path, capsys, changes, error, message):
    with pytest.raises(error, match=message):
        TrainingMachine(blobs_config(**changes))
    if changes.get("task_args") != 3:
        path = tmp_path / "bad.toml"
        path.write_text(tomli_w.dumps(blobs_config(**changes)))
        assert main(["train", str(path), "--out", str(tmp_path / "r"), "--no-progress"]) == EXIT_INPUT
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err


class OutputNet(nn.Module):
    """Returns its logits in one of the forms models return (``kind``), or something no loss can use."""

    def __init__(self, kind):
        super().__init__()
        self.kind, self.lin = kind, nn.Linear(4, 2)

    def forward(self, x):
        z = self.lin(x)
        return {"str": lambda: "oops", "dataclass": lambda: OutputBox(z), "list": lambda: [z],
                "tuple-none": lambda: (z, None), "dict-int": lambda: {"logits": z, "n": 3},
                "raises": lambda: z.view(3, -1, 7), "bad-loss": lambda: z, "vector-loss": lambda: z,
                "narrow-val": lambda: z}[self.kind]()


@dataclasses.dataclass
class OutputBox:
    logits: torch.Tensor


class OutputTask(BlobsTask):
    def __init__(self, kind="list"):
        self.kind = kind

    def split(self, data, seed):
        train, val = super().split(data, seed)
        if self.kind == "narrow-val":  # 3 features where the model takes 4: it fails at the first scoring
            val = (torch.randn(32, 3), torch.randint(0, 2, (32,)))
        return train, val

    def build_model(self, model, data):
        if self.kind == "none-model":
            return None  # a build_model without its return
        if self.kind == "bad-width":
            return nn.Linear(4, str(model["width"]))  # the type error is torch's, deep inside
        return OutputNet(self.kind)

    def loss(self, output, target):
        if self.kind == "bad-loss":
            return F.cross_entropy(output, target.float().unsqueeze(1))
        if self.kind == "vector-loss":
            return F.cross_entropy(output, target, reduction="none")
        logits = output[0] if isinstance(output, (list, tuple)) else output["logits"] if isinstance(output, dict) \
            else output
        return F.cross_entropy(logits, target)


@pytest.mark.parametrize("kind", ["list", "tuple-none", "dict-int"])
def test_outputs_with_other_leaves_train_through_the_machine(kind):
    results = TrainingMachine({"total_steps": 24, "data": {"batch_size": 4},
                               "clan": {"population_size": 2, "round_length": 8}}, task=OutputTask(kind)).train()
    assert results.final["val_loss"] < 1.0 and math.isnan(results.final["val_accuracy"])


BROKEN = [
    ("str", r"OutputTask: the model returned a str; expected a tensor, or a tuple, list or dict holding tensors"),
    ("dataclass", r"OutputTask: the model returned an OutputBox \(a dataclass\); expected a tensor, or a tuple, "
                  r"list or dict holding tensors"),
    ("raises", r"OutputTask: the model fails on a batch of 32 training samples: RuntimeError: shape '\[3, -1, 7\]' "
               r"is invalid for input of size 64"),
    ("bad-loss", r"OutputTask.loss fails on the model's output \(a tensor of shape \[32, 2\]\) for training "
                 r"samples: "),
    ("narrow-val", r"OutputTask: the model fails on a batch of 16 validation samples: RuntimeError: mat1 and mat2 "
                   r"shapes cannot be multiplied \(16x3 and 4x2\)"),
    ("none-model", r"OutputTask.build_model must return an nn.Module, got None"),
    ("bad-width", r"OutputTask.build_model fails for the model settings \{'width': 8\}: TypeError: "),
    ("vector-loss", r"OutputTask.loss must return one model's loss as a scalar float tensor, got a tensor of shape "
                    r"\[32\]"),
]


@pytest.mark.parametrize("kind, message", BROKEN, ids=[k for k, _ in BROKEN])
def test_a_model_or_loss_that_cannot_run_is_refused_when_the_run_is_built(kind, message):
    machine = TrainingMachine({"total_steps": 24, "clan": {"population_size": 2, "round_length": 8}},
                              task=OutputTask(kind))
    with pytest.raises((ValueError, TypeError), match=message):
        machine.prepare()


@pytest.mark.parametrize("kind", ["str", "raises", "vector-loss", "narrow-val", "none-model", "bad-width"])
def test_the_command_refuses_a_broken_model_in_one_line_and_leaves_no_run_directory(tmp_path, capsys, kind):
    config = tmp_path / "c.toml"
    config.write_text(f'task = "test_tasks_api:OutputTask"\ntotal_steps = 24\n[task_args]\nkind = "{kind}"\n'
                      f'[clan]\npopulation_size = 2\nround_length = 8\n')
    out = tmp_path / "run"
    assert main(["train", str(config), "--out", str(out), "--no-progress", "--no-plots"]) == EXIT_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vmapclan: error: OutputTask")
    assert not out.exists()


class GroupedNet(nn.Module):
    """Two parameters the loss reaches with a zero gradient: only weight decay moves them."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.kept = nn.Parameter(torch.ones(3))
        self.decayed = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.lin(x) + 0.0 * (self.kept.sum() + self.decayed.sum())


class GroupedTask(BlobsTask):
    def build_model(self, model, data):
        return GroupedNet()

    def param_groups(self, model):
        return [{"params": [model.lin.weight, model.decayed]},
                {"params": [model.lin.bias, model.kept], "weight_decay": 0.0, "lr_scale": 0.5}]


GROUPED = {"total_steps": 24, "optimizer": {"lr": 1e-2, "weight_decay": 0.5},
           "clan": {"population_size": 2, "round_length": 8}}


def test_a_tasks_param_groups_are_honoured_by_the_machine_and_the_replay(tmp_path):
    results = TrainingMachine(GROUPED, task=GroupedTask(), out_dir=tmp_path / "r").train()
    model = results.best_model
    assert torch.equal(model.kept.detach(), torch.ones(3))  # the no-decay group: never decayed
    assert (model.decayed.detach() < 1).all()  # the decay group: decayed
    results.save(tmp_path / "r", plots=False)
    from vmapclan.replay import read_schedule

    schedule, config, _ = read_schedule(tmp_path / "r" / "schedule.json")
    replayed = replay(schedule, config, task=GroupedTask(), trace=True)
    assert torch.equal(replayed.model.kept.detach(), torch.ones(3)) and (replayed.model.decayed.detach() < 1).all()


class BadGroups(GroupedTask):
    def __init__(self, groups):
        self.groups = groups

    def param_groups(self, model):
        return self.groups(model)


@pytest.mark.parametrize("groups, message", [
    (lambda m: [{"params": [m.lin.weight]}], r"BadGroups.param_groups: the trainable parameter 'kept' is in no "
                                             r"group \(3 in all\)"),
    (lambda m: [{"params": list(m.parameters())}, {"params": [m.kept]}],
     r"BadGroups.param_groups: a parameter is in groups 0 and 1; give each to one group"),
    (lambda m: [{"params": list(m.parameters()), "lr": 1e-3}],
     r"BadGroups.param_groups: group 0 has unknown key 'lr' \(give the group's lr as lr_scale, a factor of the "
     r"run's lr\); a group takes \['params', 'weight_decay', 'lr_scale'\]"),
    (lambda m: [{"params": list(m.parameters()), "weight_decay": -1.0}],
     r"BadGroups.param_groups: group 0 weight_decay must be a number in \[0, inf\), got -1.0"),
    (lambda m: list(m.parameters()), r"BadGroups.param_groups: expected a non-empty list of dicts with 'params'"),
])
def test_bad_param_groups_are_refused_by_name(groups, message):
    with pytest.raises((ValueError, TypeError), match=message):
        TrainingMachine(GROUPED, task=BadGroups(groups)).prepare()


def test_config_toml_holds_only_the_data_settings_the_task_reads(tmp_path):
    results = TrainingMachine({"total_steps": 16, "data": {"batch_size": 4},
                               "clan": {"population_size": 2, "round_length": 8}}, task=BlobsTask(),
                              out_dir=tmp_path / "r").train()
    results.save(tmp_path / "r", plots=False)
    for text in ((tmp_path / "r" / "config.toml").read_text(),):
        data = tomllib.loads(text)["data"]
        assert set(data) == {"batch_size", "eval_samples", "test_fraction"}  # BlobsTask reads none of the rest
    # Set away from its default, a field is written whoever reads it (a resume must not change it).
    config = {"total_steps": 16, "data": {"batch_size": 4, "seq_len": 12}, "clan": {"population_size": 2,
                                                                                 "round_length": 8}}
    TrainingMachine(config, task=BlobsTask(), out_dir=tmp_path / "s").train()
    assert tomllib.loads((tmp_path / "s" / "config.toml").read_text())["data"]["seq_len"] == 12
    assert "seq_len" in tomllib.loads(RunConfig.from_dict({"task": "stdlib-chars"}).to_toml(
        get_task("stdlib-chars").unread_data()))["data"]


def test_a_run_without_task_args_resumes_with_none_again_and_again(tmp_path):
    """A run written before tasks recorded their arguments has no task_args. Resumed with its task
    object, it keeps none (its config.toml says none), so a second resume is not refused."""
    old = SizedBlobsTask(n=64)
    del old.__dict__["_init_record"]  # as a task object of before the record
    out = tmp_path / "run"

    def stopping_at(step, machine):
        machine.callback = lambda event: machine.request_stop() if event.get("step", 0) >= step else None
        with pytest.raises(Exception, match="stopped at step"):
            machine.train()

    stopping_at(12, TrainingMachine(blobs_config(total_steps=48), task=old, out_dir=out))
    assert "task_args" not in tomllib.loads((out / "config.toml").read_text())
    stopping_at(30, TrainingMachine.resume(out, task=SizedBlobsTask(n=64)))
    resumed = TrainingMachine.resume(out, task=SizedBlobsTask(n=64))
    assert resumed.config.task_args == {}
    resumed.train()


def test_a_loader_of_one_phase_is_checked_against_that_phase_s_stretches():
    """A phase that only competes at a large batch, then one that cooperates at a small one: each
    of the machine's loaders serves its own phase, and neither is held to the other's step."""
    config = blobs_config(total_steps=40, data={"batch_size": 8, "eval_samples": 8},
                          clan={"population_size": 4, "round_length": 10, "duty_cycle": 0.5},
                          schedule=[{"name": "compete", "start_t": 0.0, "end_t": 0.5, "clan": {"duty_cycle": 1.0},
                                     "data": {"batch_size": 64}},
                                    {"name": "coop", "start_t": 0.5, "end_t": 1.0, "clan": {"competition": False}}])
    results = TrainingMachine(config, task=SizedBlobsTask(n=80)).train()  # 64 > 4 x 8 = 32 < 80 < 4 x 64
    assert [r["phase"] for r in results.history][-1] == "coop"


def test_the_build_checks_score_the_validation_and_test_splits_as_scoring_does():
    """The check that the model runs on each split runs the validation and test samples in eval
    mode, as scoring does: a BatchNorm model with a split of one sample trains (in training mode
    BatchNorm refuses a batch of one), and the model comes back in training mode."""
    class Normed(BlobsTask):
        def split(self, data, seed):
            return Blobs(96, seed), Blobs(2, seed + 100)  # one validation and one test sample

        def build_model(self, model, data):
            return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))

    machine = TrainingMachine(blobs_config(), task=Normed())
    machine.prepare()
    assert machine.clan.population.training
    assert math.isfinite(machine.train().final["test_loss"])


def test_a_data_setting_the_task_does_not_read_is_warned_of():
    """``[data]`` fields the task does not name in ``data_reads`` are dropped from the run's config;
    one set to another value than its default was meant for something, and is named."""
    data = {**BASE["data"], "val_fraction": 0.5}
    with pytest.warns(UserWarning, match=r"TrainingMachine: data.val_fraction = 0.5 is set, but task "
                                         r"'test_tasks_api:BlobsTask' does not read it \(a task names the data fields "
                                         r"it reads in Task.data_reads\)"):
        TrainingMachine(blobs_config(data=data))

    class Reading(BlobsTask):
        data_reads = ("val_fraction",)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TrainingMachine(blobs_config(), task=Reading())
        TrainingMachine(blobs_config(data=data), task=Reading())
        TrainingMachine(blobs_config(data={**BASE["data"], "val_fraction": 0.2}))  # the default: nothing meant
