"""Specs: round trips through dict and TOML, and errors that name the bad field."""

import dataclasses
import pathlib

import pytest

from vmapclan import ClanSpec, DataSpec, ModelSpec, OptimizerSpec, RunConfig, ScheduleSpec

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def full_config() -> RunConfig:
    return RunConfig.from_dict({
        "task": "stdlib-chars", "total_steps": 321, "seed": 3, "log_every": 7, "checkpoint_every": 2,
        "model": {"d_model": 48, "n_heads": 6, "n_layers": 1, "dropout": 0.1},
        "data": {"batch_size": 4, "seq_len": 16, "max_chars": 5000, "eval_samples": 0, "val_fraction": 0.3},
        "optimizer": {"lr": 3e-3, "weight_decay": 0.0, "betas": [0.8, 0.99], "eps": 1e-7},
        "clan": {"population_size": 3, "round_length": 9, "duty_cycle": 0.3, "genes": {"lr": {"low": 1e-5}}},
        "schedule": [{"name": "w", "start_t": 0, "end_t": 0.5, "clan": {"competition": False},
                      "optimizer": {"lr": 1e-3}},
                     {"name": "c", "start_t": 0.5, "end_t": 1, "data": {"batch_size": 2}}],
    })


@pytest.mark.parametrize("spec", [ModelSpec(hidden=7), DataSpec(seq_len=9), OptimizerSpec(betas=(0.5, 0.6)),
                                  ClanSpec(population_size=4, selection="none", duty_cycle=1.0,
                                           lr_grid=(1e-3, 2e-3, 3e-3, 4e-3))])
def test_section_round_trip(spec):
    assert type(spec).from_dict(spec.to_dict()) == spec


def test_run_config_round_trips_through_dict_and_toml(tmp_path):
    config = full_config()
    assert RunConfig.from_dict(config.to_dict()) == config
    path = tmp_path / "c.toml"
    path.write_text(config.to_toml())
    assert RunConfig.from_toml(path) == config
    assert config.optimizer.betas == (0.8, 0.99) and isinstance(config.to_dict()["optimizer"]["betas"], list)
    assert config.schedule.to_schedule()["w"].optimizer == {"lr": 1e-3}


def test_defaults_and_replace():
    config = RunConfig()
    assert config.task == "digits-mlp" and config.clan.population_size == 8
    # Without phases: a search, then clan rounds, or one data-parallel model when no sample repeats.
    assert [(p.name, p.start_t, p.end_t, p.clan) for p in config.schedule.to_schedule()] == \
        [("search", 0.0, 0.1, {"search": 30.0}), ("clan", 0.1, 1.0, {})]
    assert [(p.name, p.clan) for p in config.schedule.to_schedule("winner", passes=1.0)] == \
        [("search", {"search": 30.0}), ("train", {"competition": False})]
    assert [p.name for p in config.schedule.to_schedule("winner", passes=1.01)] == ["search", "clan"]
    assert [p.name for p in config.schedule.to_schedule("truncation", passes=0.5)] == ["clan"]
    # Scarce data (one cooperative batch at least a quarter of the training set): all competition.
    assert [(p.name, p.clan) for p in config.schedule.to_schedule("winner", 100.0, 0.25)][1] == \
        ("compete", {"duty_cycle": 1.0})
    assert [p.name for p in config.schedule.to_schedule("winner", 100.0, 0.2499)] == ["search", "clan"]
    assert [p.name for p in config.schedule.to_schedule("winner", 1.0, 0.5)] == ["search", "train"]
    assert [p.name for p in config.schedule.to_schedule("truncation", 100.0, 0.5)] == ["clan"]
    assert config.optimizer.lr_schedule == "cosine" and config.optimizer.warmup == 0.05
    assert config.clan.competitive_lr == "sqrt" and config.clan.keep_best
    changed = config.replace(total_steps=50, clan={"population_size": 4},
                             schedule=[{"name": "a", "start_t": 0, "end_t": 1}])
    assert changed.total_steps == 50 and changed.clan.population_size == 4 and changed.clan.round_length == 40
    assert changed.schedule.to_schedule()[0].name == "a"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    config = RunConfig.from_toml(path)
    assert RunConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("data, error, message", [
    ({"task": ""}, ValueError, "config.task must be a task name or 'package.module:ClassName', got ''"),
    ({"model": 5}, TypeError, "model: expected a table of settings, got int"),
    ({"total_steps": 0}, ValueError, "config.total_steps must be a positive int, got 0"),
    ({"seed": -1}, ValueError, "config.seed must be an int >= 0, got -1"),
    ({"steps": 10}, ValueError, r"config: unknown field 'steps'; expected some of \['task'"),
    ({"clan": {"populaton_size": 4}}, ValueError, "clan: unknown field 'populaton_size'"),
    ({"clan": {"duty_cycle": 1.5}}, ValueError, r"clan.duty_cycle must be a number in \(0, 1\], got 1.5"),
    ({"clan": {"population_size": 1}}, ValueError, "clan.population_size must be >= 2 for selection 'winner', got 1"),
    ({"clan": {"selection": "best"}}, ValueError, "clan.selection must be 'winner', 'truncation' or 'none', got 'best'"),
    ({"clan": {"selection": "none"}}, ValueError, "clan.duty_cycle must be 1.0 for selection 'none'"),
    ({"clan": {"round_length": 1, "duty_cycle": 0.5}}, ValueError,
     "clan.round_length=1 with duty_cycle=0.5 leaves no cooperative step"),
    ({"clan": {"lr_grid": [1e-3, 1e-2]}}, ValueError, "clan.lr_grid needs clan.selection = 'none'"),
    ({"clan": {"selection": "none", "duty_cycle": 1.0, "population_size": 3, "lr_grid": [1e-3]}}, ValueError,
     "clan.lr_grid must hold population_size=3 values, got 1"),
    ({"clan": {"selection": "none", "duty_cycle": 1.0, "population_size": 1, "lr_grid": [-1.0]}}, ValueError,
     r"clan.lr_grid\[0\] must be a number in \(0, inf\), got -1.0"),
    ({"clan": {"init": "random", "duty_cycle": 1.0}}, ValueError, "clan.init must be 'copy' or 'independent', got 'random'"),
    ({"clan": {"genes": {"lr": 3}}}, ValueError, r"clan.genes must be a table \{gene name: \{field: value\}\}"),
    ({"clan": {"genes": {"lrr": {"low": 1e-4}}}}, ValueError,
     r"clan.genes: no gene 'lrr'; a run's genes are the AdamW genes \['lr', 'weight_decay', 'betas/0', 'betas/1', "
     r"'eps'\], whose fields clan.genes overrides"),
    ({"clan": 5}, TypeError, "clan: expected a table of settings, got int"),
    ({"optimizer": {"lr": 0}}, ValueError, r"optimizer.lr must be a number in \(0, inf\), got 0"),
    ({"optimizer": {"betas": [0.9]}}, ValueError, r"optimizer.betas must be a pair \[beta1, beta2\], got \[0.9\]"),
    ({"optimizer": {"betas": [0.9, 1.0]}}, ValueError, r"optimizer.betas\[1\] must be a number in \[0, 1\), got 1.0"),
    ({"optimizer": {"weight_decay": -0.1}}, ValueError, r"optimizer.weight_decay must be a number in \[0, inf\)"),
    ({"data": {"batch_size": 2.5}}, ValueError, "data.batch_size must be a positive int, got 2.5"),
    ({"data": {"val_fraction": 1}}, ValueError, r"data.val_fraction must be a number in \(0, 1\), got 1"),
    ({"data": {"max_chars": 10}}, ValueError, "data.max_chars must be an int >= 1000, got 10"),
    ({"schedule": [{"name": "a", "start_t": 0, "end_t": 0.5}]}, ValueError,
     r"schedule: PhaseSchedule: the last phase 'a' ends at t=0.5"),
    ({"schedule": {"stages": []}}, ValueError, r"schedule: expected a list of phase tables or \{'phases'"),
    ({"schedule": "warmup"}, TypeError, "schedule must be a list of phase tables, got str"),
    ({"schedule": [3]}, TypeError, r"schedule\[0\] must be a phase table, got int"),
    ({"clan": {"selection": "none", "duty_cycle": 1.0},
      "schedule": [{"name": "w", "start_t": 0, "end_t": 1, "clan": {"competition": False}}]}, ValueError,
     r"schedule\[0\] \('w'\): clan.competition = false needs clan.selection = 'winner'"),
    ({"clan": {"init": "independent"},
      "schedule": [{"name": "w", "start_t": 0, "end_t": 1, "clan": {"competition": False}}]}, ValueError,
     r"schedule\[0\] \('w'\): clan.competition = false before any clan round needs clan.init = 'copy'"),
    ({"clan": {"init": "independent"}, "schedule": [{"name": "clan", "start_t": 0, "end_t": 1}]}, ValueError,
     r"schedule\[0\] \('clan'\): clan.init = 'independent' needs clan.duty_cycle = 1.0 in the first clan phase"),
    ({"schedule": [{"name": "c", "start_t": 0, "end_t": 1, "clan": {"round_length": 2, "duty_cycle": 0.9}}]},
     ValueError, r"schedule\[0\] \('c'\).clan.round_length=2 with duty_cycle=0.9 leaves no cooperative step"),
    ({"clan": {"selection": "truncation", "duty_cycle": 1.0},
      "schedule": [{"name": "c", "start_t": 0, "end_t": 1, "clan": {"duty_cycle": 0.5}}]},
     ValueError, r"schedule\[0\] \('c'\): clan.duty_cycle must be 1.0 for selection 'truncation', got 0.5"),
])
def test_errors_name_the_field(data, error, message):
    with pytest.raises(error, match=message):
        RunConfig.from_dict(data)


@pytest.mark.parametrize("task, model, message", [
    ("digits-mlp", {"hidden": 0}, "model.hidden must be a positive int, got 0"),
    ("digits-mlp", {"d_model": 128}, r"model: unknown setting 'd_model' for task 'digits-mlp'; it reads \['hidden'\]"),
    ("stdlib-chars", {"d_model": 30, "n_heads": 4}, "model.n_heads must divide model.d_model, got n_heads=4, d_model=30"),
    ("stdlib-chars", {"dropout": 1.0}, r"model.dropout must be a number in \[0, 1\), got 1.0"),
    ("stdlib-chars", {"max_len": -1}, "model.max_len must be an int >= 0, got -1"),
])
def test_the_task_checks_its_model_settings(task, model, message):
    from vmapclan import TrainingMachine

    config = RunConfig.from_dict({"task": task, "model": model})  # free-form: the task checks it
    with pytest.raises(ValueError, match=message):
        TrainingMachine(config)


def test_unknown_task_is_refused_when_the_run_is_built():
    from vmapclan import TrainingMachine

    with pytest.raises(ValueError, match=r"task 'mnist' is neither a built-in task \['digits-mlp', 'stdlib-chars'\] "
                                         r"nor 'package.module:ClassName'"):
        TrainingMachine({"task": "mnist"})


def test_run_config_type_errors(tmp_path):
    with pytest.raises(TypeError, match="config: expected a table of settings, got list"):
        RunConfig.from_dict([])
    with pytest.raises(TypeError, match="config.clan must be a ClanSpec, got dict"):
        RunConfig(clan={"population_size": 4})
    bad = tmp_path / "bad.toml"
    bad.write_text("task = [")
    with pytest.raises(ValueError, match="bad.toml: invalid TOML"):
        RunConfig.from_toml(bad)
    with pytest.raises(FileNotFoundError):
        RunConfig.from_toml(tmp_path / "missing.toml")


def test_specs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ClanSpec().population_size = 3


def test_schedule_spec_accepts_phases_key():
    spec = ScheduleSpec.from_dict({"phases": [{"name": "a", "start_t": 0, "end_t": 1}]})
    assert spec.to_dict() == [{"name": "a", "start_t": 0, "end_t": 1}]
