"""Honest, cheap evaluation: a test split nothing decides on, eval mode, each model scored once, and the time record.

- ``Task.split`` may give a test split; without one, ``data.test_fraction`` of the validation
  data is set aside by seed, and nothing but the final record reads it (a spy on a poisoned
  test split).
- Every evaluation runs in eval mode without gradients.
- Identical members are scored once, as one model; the final evaluation scores each model once
  on the validation split, and only the returned one on the test split.
- The final record says where the run's time went, and a resumed run keeps counting.
"""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from vmapclan import PopulationModel, RunConfig, Task, TrainingMachine
from vmapclan.cli import EXIT_OK, main
from vmapclan.record import TIME_PARTS, RunLog
from vmapclan.resume import load_run_checkpoint


class Points(Dataset):
    """A map-style dataset of 3-feature points (label: the sign of their sum) that logs who reads it."""

    def __init__(self, n: int, seed: int, reads: list | None = None, poisoned: bool = False):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, generator=g)
        self.y = (self.x.sum(1) > 0).long()
        if poisoned:  # what selection would chase if it ever saw these
            self.x, self.y = torch.full_like(self.x, 1e6), 1 - self.y
        self.reads = reads

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if self.reads is not None:
            self.reads.append(i)
        return self.x[i], self.y[i]


class PointsTask(Task):
    """Train, validation and (unless ``carve``) its own test split; ``events`` logs reads of the test split."""

    def __init__(self, poisoned: bool = False, carve: bool = False):
        self.events, self.poisoned, self.carve = [], poisoned, carve

    def split(self, data, seed):
        train, val = Points(64, seed), Points(24, seed + 1)
        if self.carve:
            return train, val
        reads = []
        self.events.append(reads)
        return train, val, Points(16, seed + 2, reads, self.poisoned)

    def build_model(self, model, data):
        return nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.2), nn.ReLU(), nn.Linear(8, 2))

    def loss(self, output, target):
        return F.cross_entropy(output, target)


CONFIG = {"total_steps": 40, "seed": 3, "data": {"batch_size": 4, "eval_samples": 0},
          "clan": {"population_size": 4, "round_length": 10}}


# -- the test split ----------------------------------------------------------------------------------
def test_a_tasks_own_test_split_is_read_only_by_the_final_record():
    spied = PointsTask(poisoned=True)
    events = []
    machine = TrainingMachine(CONFIG, task=spied, callback=lambda r: events.append((r["event"], len(spied.events[0]))))
    results = machine.train()
    reads = spied.events[0]
    # When the run was built, a check ran the model once on the first batch (it decides nothing);
    # the final record read all of it.
    checked = list(range(CONFIG["data"]["batch_size"]))
    assert reads[:len(checked)] == checked and sorted(set(reads)) == list(range(16))
    # Nothing else before the final record read it: every round and stretch came before.
    assert all(count == len(checked) for event, count in events if event != "final") and events[-1][0] == "final"
    clean = TrainingMachine(CONFIG, task=PointsTask()).train()
    assert json.dumps(results.history) == json.dumps(clean.history)  # the poison changed no decision
    assert torch.equal(results.best_model.state_dict()["0.weight"], clean.best_model.state_dict()["0.weight"])
    assert results.final["test_loss"] > 100 * clean.final["test_loss"]
    assert results.final["val_loss"] == clean.final["val_loss"]


def test_without_a_test_split_a_share_of_validation_is_set_aside_by_seed():
    task = PointsTask(carve=True)
    spec = RunConfig.from_dict({"data": {"test_fraction": 0.25}}).data
    data = task.load(spec, 5)
    assert len(data.val) == 18 and len(data.test) == 6
    val, test = set(data.val.indices), set(data.test.indices)
    assert not val & test and val | test == set(range(24))
    assert set(task.load(spec, 5).test.indices) == test and set(task.load(spec, 6).test.indices) != test
    assert {data.val.indices[i] for i in data.eval.indices} <= val  # the round scoring draws from what remains
    # Tensors are indexed the same way.
    tensors = PointsTask(carve=True)
    tensors.split = lambda data, seed: ((torch.zeros(8, 3), torch.zeros(8)), (torch.arange(10.0)[:, None], torch.arange(10)))
    split = tensors.load(spec, 0)
    assert sorted(split.val[1].tolist() + split.test[1].tolist()) == list(range(10)) and len(split.test[1]) == 2
    none = task.load(dataclasses.replace(spec, test_fraction=0.0), 5)
    assert none.test is None and len(none.val) == 24


def test_too_little_validation_data_for_a_test_split_is_refused():
    task = PointsTask(carve=True)
    task.split = lambda data, seed: (Points(8, 0), Points(1, 1))
    with pytest.raises(ValueError, match=r"PointsTask.split: 1 validation samples are too few to set "
                                         r"data.test_fraction = 0.5 of them aside as the test split; give the task "
                                         r"a test split of its own, or set data.test_fraction = 0"):
        task.load(RunConfig().data, 0)
    task.split = lambda data, seed: (Points(8, 0), Points(4, 1), Points(0, 2))
    with pytest.raises(ValueError, match=r"PointsTask.split: the train and validation and test data must not be empty"):
        task.load(RunConfig().data, 0)
    task.split = lambda data, seed: (Points(8, 0),)
    with pytest.raises(TypeError, match=r"PointsTask.split: expected \(train, val\) or \(train, val, test\), "
                                        r"got tuple of 1"):
        task.load(RunConfig().data, 0)


@pytest.mark.parametrize("value, message", [
    (1.0, r"data.test_fraction must be a number in \[0, 1\), got 1.0"),
    (-0.1, r"data.test_fraction must be a number in \[0, 1\), got -0.1"),
    ("half", r"data.test_fraction must be a number in \[0, 1\), got 'half'"),
])
def test_a_bad_test_fraction_is_refused(value, message):
    with pytest.raises((ValueError, TypeError), match=message):
        RunConfig.from_dict({"data": {"test_fraction": value}})


def test_a_saved_config_of_before_test_splits_reads_as_none():
    saved = RunConfig().to_dict()
    del saved["data"]["test_fraction"]
    assert RunConfig.from_saved(saved).data.test_fraction == 0.0
    assert RunConfig.from_dict(saved).data.test_fraction == 0.5  # a config a user writes gets the default


def test_the_run_table_and_tensorboard_report_the_test_split(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text('task = "digits-mlp"\ntotal_steps = 30\n[model]\nhidden = 8\n[clan]\npopulation_size = 2\n'
                      'round_length = 10\n')
    assert main(["train", str(config), "--out", str(tmp_path / "r"), "--no-progress", "--no-plots"]) == EXIT_OK
    out = capsys.readouterr().out
    final = [line for line in out.splitlines() if line.startswith("final:")][0]
    assert "test loss" in final and "test accuracy" in final
    assert [line for line in out.splitlines() if line.startswith("time: ")]
    schedule = json.loads((tmp_path / "r" / "schedule.json").read_text())
    assert {"test_loss", "test_accuracy"} <= set(schedule["clan"])


# -- eval mode ----------------------------------------------------------------------------------------
class ModeSpy(nn.Module):
    """Records, at every forward, whether the module was in training mode and gradients were on."""

    seen: list = []

    def forward(self, x):
        ModeSpy.seen.append((self.training, torch.is_grad_enabled()))
        return x


class SpyTask(PointsTask):
    def build_model(self, model, data):
        return nn.Sequential(nn.Linear(3, 8), ModeSpy(), nn.ReLU(), nn.Linear(8, 2))


@pytest.mark.parametrize("schedule", [None, [{"name": "sweep", "start_t": 0.0, "end_t": 1.0}]], ids=["default", "rounds"])
def test_every_evaluation_runs_in_eval_mode_without_gradients(schedule):
    ModeSpy.seen = []
    config = CONFIG if schedule is None else {**CONFIG, "schedule": schedule}
    TrainingMachine(config, task=SpyTask(), fused=False).train()
    scoring = [training for training, grad in ModeSpy.seen if not grad]
    training = [training for training, grad in ModeSpy.seen if grad]
    assert scoring and not any(scoring)
    assert training and all(training)


# -- each model scored once ---------------------------------------------------------------------------
class CountingTask(PointsTask):
    """Counts what scores what: one-model evaluations and population passes, by split."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def load(self, data, seed):
        self.data = super().load(data, seed)
        return self.data

    def _split_name(self, data):
        return next(name for name in ("val", "eval", "test") if getattr(self.data, name) is data)

    def evaluate(self, model, data, target=None):
        self.calls.append(("one model", self._split_name(data)))
        return super().evaluate(model, data, target)

    def population_losses(self, population, data, target=None, *, blocks=None):
        self.calls.append(("population", self._split_name(data)))
        return super().population_losses(population, data, target, blocks=blocks)

    def population_scores(self, population, data):
        self.calls.append(("population", self._split_name(data)))
        return super().population_scores(population, data)


def test_identical_members_are_scored_as_one_model():
    task = CountingTask()
    config = {**CONFIG, "schedule": [{"name": "train", "start_t": 0.0, "end_t": 1.0, "clan": {"competition": False}}],
              "clan": {"population_size": 4, "round_length": 10, "keep_best": False}}
    results = TrainingMachine(config, task=task).train()
    assert task.calls == [("one model", "eval"), ("one model", "val"), ("one model", "test")]
    assert results.final["member_val_losses"] == [results.final["val_loss"]] * 4


def test_members_that_differ_are_scored_in_one_pass_and_only_the_chosen_model_is_tested():
    task = CountingTask()
    config = {**CONFIG, "schedule": [{"name": "sweep", "start_t": 0.0, "end_t": 1.0}],
              "clan": {"population_size": 4, "round_length": 40, "duty_cycle": 1.0, "selection": "none"}}
    results = TrainingMachine(config, task=task).train()
    assert task.calls == [("population", "eval"), ("population", "val"), ("one model", "test")]
    members = results.final["member_val_losses"]
    assert len(set(members)) == 4 and results.final["val_loss"] == min(members)
    best = results.final["best_member"]
    assert members[best] == min(members)
    alone = PointsTask().evaluate(results.best_model, task.data.val)
    assert alone["loss"] == pytest.approx(results.final["val_loss"], rel=1e-5)
    assert alone["accuracy"] == pytest.approx(results.final["val_accuracy"])


def test_a_population_knows_when_its_members_are_identical():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    population = PopulationModel(model, 3)
    assert population.identical()
    population.buffers["1.running_mean"][2, 0] += 1.0
    assert not population.identical()
    population.buffers["1.running_mean"][2, 0] -= 1.0
    assert population.identical()
    with torch.no_grad():
        population.flat[1, 0] = float("nan")
    assert not population.identical()
    assert PopulationModel(model, 3, init="independent", generator=torch.Generator().manual_seed(0)).identical() is False
    assert PopulationModel(model, 1).identical()


# -- where the time went ------------------------------------------------------------------------------
def test_the_final_record_says_where_the_time_went(tmp_path):
    results = TrainingMachine(CONFIG, task=PointsTask(), out_dir=tmp_path / "r").train()
    final = results.final
    assert set(final["seconds_in"]) == set(TIME_PARTS)
    assert final["seconds"] == pytest.approx(sum(final["seconds_in"].values()))
    for part in ("setup", "train", "compete", "evaluate", "select", "checkpoint"):
        assert final["seconds_in"][part] > 0, part


def test_a_resumed_run_keeps_counting_its_time(tmp_path):
    run = tmp_path / "r"
    machine = TrainingMachine(CONFIG, task=PointsTask(), out_dir=run)
    machine.callback = lambda r: machine.request_stop() if r["event"] == "round" else None
    with pytest.raises(Exception, match="stopped"):
        machine.train()
    saved = load_run_checkpoint(run / "checkpoint.pt")["machine"]["seconds"]
    assert saved["train"] > 0
    resumed = TrainingMachine.resume(run, task=PointsTask()).train().final["seconds_in"]
    assert all(resumed[part] >= saved[part] for part in TIME_PARTS)


def test_a_saved_time_record_is_checked():
    log = RunLog(10, 5, torch.device("cpu"))
    state = log.state_dict()
    log.check_state(state, 0, "who")
    del state["seconds"]
    log.check_state(state, 0, "who")  # a checkpoint of before the time record
    with pytest.raises(ValueError, match=r"who: the checkpoint's machine/seconds must be a table of non-negative "
                                         r"seconds with keys from \['setup', 'train', 'compete', 'evaluate', "
                                         r"'select', 'checkpoint', 'other'\], got \{'train': -1.0\}"):
        log.check_state({**state, "seconds": {"train": -1.0}}, 0, "who")


def test_a_sweep_member_that_diverged_is_named_in_its_rounds_and_the_final_record():
    config = {**CONFIG, "schedule": [{"name": "sweep", "start_t": 0.0, "end_t": 1.0}],
              "clan": {"population_size": 4, "round_length": 20, "duty_cycle": 1.0, "selection": "none"}}
    machine = TrainingMachine(config, task=PointsTask())
    machine.prepare()
    with torch.no_grad():
        machine.clan.population.flat[2] = float("nan")
    results = machine.train()
    assert [r["diverged_members"] for r in results.rounds] == [[2], [2]]
    assert results.final["diverged_members"] == [2] and results.final["best_member"] != 2
    assert "diverged, not finite at the end: members [2]" in results.rounds_table()
