"""The vmapclan command: exit codes, messages, and the run directory."""

import math
import json
import subprocess
import sys
import tomllib

import pytest
import torch

from vmapclan import RunConfig, cli
from vmapclan.cli import EXIT_DIVERGED, EXIT_INPUT, EXIT_OK, EXIT_USAGE, main

TINY = """
task = "digits-mlp"
total_steps = 40
[model]
hidden = 16
[data]
batch_size = 8
eval_samples = 64
[clan]
population_size = 3
round_length = 10
duty_cycle = 0.3
[[schedule]]
name = "warmup"
start_t = 0.0
end_t = 0.25
clan = { competition = false }
[[schedule]]
name = "clan"
start_t = 0.25
end_t = 1.0
"""


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


def test_train_writes_the_run_directory(config_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(config_file), "--out", str(out), "--no-progress"]) == EXIT_OK
    printed = capsys.readouterr().out
    assert "warmup" in printed and "final: val loss" in printed and f"run directory: {out}" in printed
    names = {p.name for p in out.iterdir()}
    assert {"metrics.jsonl", "history.json", "schedule.json", "config.toml", "best_model.pt", "checkpoint.pt",
            "genes.png", "val_losses.png", "train_loss.png"} <= names
    for png in ("genes.png", "val_losses.png", "train_loss.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = json.loads((out / "history.json").read_text())
    assert [r["kind"] for r in history] == ["cooperative", "round", "round", "round"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["event"] == "final" and sum(m["event"] == "round" for m in metrics) == 3
    saved = RunConfig.from_dict(tomllib.loads((out / "config.toml").read_text()))
    assert saved == RunConfig.from_toml(config_file)
    weights = torch.load(out / "best_model.pt")
    assert weights["0.weight"].shape == (16, 64)

    # replay the exported schedule: prints both losses and writes replay.json
    assert main(["replay", str(out / "schedule.json"), "--no-progress"]) == EXIT_OK
    printed = capsys.readouterr().out
    assert "clan (best model, P members)" in printed and "replay (one model, torch AdamW)" in printed
    report = json.loads((out / "replay.json").read_text())
    assert report["total_steps"] == 40 and report["replay"]["val_loss"] > 0
    assert report["clan"]["val_loss"] == pytest.approx(metrics[-1]["val_loss"])


def test_steps_option_overrides_the_config(config_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(config_file), "--out", str(out), "--steps", "12", "--no-progress", "--no-plots"]) == 0
    assert json.loads((out / "history.json").read_text())[-1]["end_step"] == 12
    assert not (out / "genes.png").exists()
    assert tomllib.loads((out / "config.toml").read_text())["total_steps"] == 12


def test_progress_bar_shows_the_round_its_validation_loss_the_training_loss_and_the_lr(config_file, tmp_path,
                                                                                        capsys):
    assert main(["train", str(config_file), "--out", str(tmp_path / "r"), "--no-plots"]) == EXIT_OK
    last = capsys.readouterr().err.split("\r")[-1]
    assert "40/40" in last and "phase=clan round=2 val=" in last
    for field in ("val", "loss", "lr"):  # each a number by the end
        value = last.split(f" {field}=")[1].split()[0].rstrip("]")
        assert float(value) > 0, field


def test_the_python_machine_shows_the_same_bar(capsys):
    from vmapclan import TrainingMachine

    seen = []
    TrainingMachine(RunConfig.from_dict(tomllib.loads(TINY)), progress=True, callback=seen.append).train()
    err = capsys.readouterr().err
    assert "40/40" in err and "phase=clan" in err and " lr=" in err
    assert any(e["event"] == "round" for e in seen)  # the caller's callback still gets every record
    with pytest.raises(TypeError, match=r"TrainingMachine: progress must be a bool, got str"):
        TrainingMachine(RunConfig.from_dict(tomllib.loads(TINY)), progress="yes")


@pytest.mark.parametrize("argv, code, message", [
    ([], EXIT_USAGE, "the following arguments are required: command"),
    (["fly"], EXIT_USAGE, "invalid choice: 'fly'"),
    (["train"], EXIT_USAGE, "train needs a CONFIG (a TOML file) or --resume RUN_DIR"),
    (["train", "x.toml", "--steps", "many"], EXIT_USAGE, "argument --steps: invalid int value: 'many'"),
    (["demo", "--threads", "0"], EXIT_USAGE, "--threads must be a positive int, got 0"),
    (["train", "x.toml", "--steps", "-3"], EXIT_USAGE, "--steps must be a positive int, got -3"),
    (["train", "x.toml", "--rows", "0"], EXIT_USAGE, "--rows must be a positive int, got 0"),
    (["replay", "schedule.json", "--out", "x.json"], EXIT_USAGE,
     "vmapclan: error: replay --out is a directory (it gets replay.json, and tensorboard/ with --tensorboard), "
     "got 'x.json'"),
    (["train", "missing.toml"], EXIT_INPUT, "vmapclan: error: no such file: missing.toml"),
    (["replay", "missing.json"], EXIT_INPUT, "vmapclan: error: no such file: missing.json"),
    (["demo", "--device", "abacus"], EXIT_INPUT, "device type at start of device string: abacus"),
    (["demo", "--cuda-graph"], EXIT_USAGE, "cuda_graph=True needs the clan on a CUDA device, it is on cpu"),
    (["demo", "--compile", "everything"], EXIT_USAGE, "argument --compile: invalid choice: 'everything'"),
    (["demo", "--device", "cuda", "--cuda-graph", "--compile", "step"], EXIT_USAGE, "captures the step itself"),
])
def test_bad_command_lines(argv, code, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == code
    assert message in capsys.readouterr().err


def test_bad_config_names_the_field(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text(TINY.replace("duty_cycle = 0.3", "duty_cycle = 3.0"))
    assert main(["train", str(path)]) == EXIT_INPUT
    assert "clan.duty_cycle must be a number in (0, 1], got 3.0" in capsys.readouterr().err
    path.write_text("task = ")
    assert main(["train", str(path)]) == EXIT_INPUT
    assert "invalid TOML" in capsys.readouterr().err
    path.write_text(TINY)
    assert main(["train", str(path), "--steps", "0"]) == EXIT_USAGE
    assert "--steps must be a positive int, got 0" in capsys.readouterr().err
    schedule = tmp_path / "schedule.json"
    schedule.write_text('{"format_version": 1, "phases": []}')
    assert main(["replay", str(schedule)]) == EXIT_INPUT
    assert "missing field 'config'" in capsys.readouterr().err


def test_divergence_exits_4(config_file, tmp_path, capsys, monkeypatch):
    from vmapclan.tasks import DigitsTask

    def nan_losses(self, population, data, target=None):
        return torch.full((population.population_size,), float("nan"))

    monkeypatch.setattr(DigitsTask, "population_losses", nan_losses)
    # The default schedule: the search round, then clan rounds (a cooperative warmup would diverge
    # first, see test_divergence_everywhere.py).
    config_file.write_text(TINY[:TINY.index("[[schedule]]")])
    # The clan restores the round's start up to 3 times in a row; the 4th divergence is fatal.
    argv = ["train", str(config_file), "--out", str(tmp_path / "r"), "--no-progress", "--steps", "60"]
    with pytest.warns(RuntimeWarning, match=r"the whole population diverged in round \d"):
        assert main(argv) == EXIT_DIVERGED
    err = capsys.readouterr().err
    assert "vmapclan: training diverged: clan.step: every member's validation loss is NaN" in err
    assert "gave up after 3 consecutive restores" in err


def test_restored_rounds_export_and_show(config_file, tmp_path, capsys, monkeypatch):
    from vmapclan.tasks import DigitsTask

    real = DigitsTask.population_losses
    calls = []

    def nan_once(self, population, data, target=None):
        calls.append(1)
        losses = real(self, population, data, target)
        # Rounds 0 and 1 are the first members scored apart (the warmup's identical members are
        # scored as one model): round 1 diverges.
        return torch.full_like(losses, float("nan")) if len(calls) == 2 else losses

    monkeypatch.setattr(DigitsTask, "population_losses", nan_once)
    out = tmp_path / "r"
    with pytest.warns(RuntimeWarning, match="diverged in round 1"):
        assert main(["train", str(config_file), "--out", str(out), "--no-progress", "--no-plots"]) == EXIT_OK
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("clan") and line.split()[1] == "1"][0]
    assert " div " in row and " nan " in row
    names = [p["name"] for p in json.loads((out / "schedule.json").read_text())["phases"]]
    assert "clan/r1/diverged" in names


def test_demo_runs_at_a_small_size(tmp_path, capsys, monkeypatch):
    # The demo's own config, shortened: the same phases, at 60 steps.
    monkeypatch.setitem(cli.DEMO_CONFIG, "model", {"hidden": 16})
    assert main(["demo", "--steps", "60", "--out", str(tmp_path / "demo"), "--no-progress", "--no-plots"]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert any(line.startswith("search") for line in lines) and any(line.startswith("clan") for line in lines)


def test_help_and_module_entry_point():
    assert main(["--help"]) == EXIT_OK
    for module in ("vmapclan.cli", "vmapclan"):  # python -m vmapclan is the command too
        done = subprocess.run([sys.executable, "-m", module, "train", "nope.toml"], capture_output=True, text=True)
        assert done.returncode == EXIT_INPUT and "no such file: nope.toml" in done.stderr


def test_quality_benchmark_tiny(tmp_path, capsys):
    from vmapclan.bench import quality

    out = tmp_path / "q.json"
    argv = ["--size", "tiny", "--seeds", "0", "1", "--tasks", "diabetes-mlp", "--json", str(out)]
    assert quality.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| diabetes-mlp | sweep |" in printed and "method - clan" in printed
    res = json.loads(out.read_text())["results"]["diabetes-mlp"]
    assert set(res["runs"]) == set(quality.METHODS)
    for method, runs in res["runs"].items():
        assert [r["seed"] for r in runs] == [0, 1]
        # Equal member-steps, P x steps (the oracle's members each take P x B samples a step: P times the compute).
        assert all(r["member_steps"] == 40 * 4 and math.isfinite(r["val_loss"]) for r in runs)
    clan = [r["val_loss"] for r in res["runs"]["clan"]]
    sweep = [r["val_loss"] for r in res["runs"]["sweep"]]
    assert res["summary"]["sweep"]["diff_mean"] == pytest.approx((sweep[0] - clan[0] + sweep[1] - clan[1]) / 2)


def test_quality_methods_train_what_they_say():
    from vmapclan.bench.quality import method_config, random_configs, task_configs
    from vmapclan import TrainingMachine

    base = task_configs("digits-mlp", "tiny")
    oracle = method_config(base, "oracle", 3)
    assert oracle["seed"] == 3 and oracle["data"]["batch_size"] == 32 * 4
    assert oracle["clan"]["selection"] == "none" and len(oracle["clan"]["lr_grid"]) == 4
    assert oracle["optimizer"]["lr_schedule"] == "cosine"
    cosine = method_config(base, "cosine", 3)
    assert cosine["schedule"][0]["clan"] == {"competition": False} and cosine["data"]["batch_size"] == 32
    assert method_config(base, "pbt", 0)["clan"]["selection"] == "truncation"
    assert method_config(base, "clan", 0, {"clan": {"duty_cycle": 0.1}})["clan"] == {"population_size": 4,
                                                                                       "duty_cycle": 0.1}
    machine = TrainingMachine(method_config(base, "sweep", 0))
    machine.prepare()
    drawn = random_configs(machine.clan, 0)
    assert drawn == random_configs(machine.clan, 0) and drawn != random_configs(machine.clan, 1)
    for name, values in drawn.items():
        gene = machine.clan.genes[name]
        assert len(values) == 4 and all(gene.low <= v <= gene.high for v in values)
    with pytest.raises(ValueError, match="quality: unknown method 'grid'"):
        method_config(base, "grid", 0)


def test_quality_summary_and_table():
    from vmapclan.bench.quality import _summary, lr_grid, markdown

    grid = lr_grid(1e-3, 3)
    assert grid == pytest.approx([1e-4, 1e-4 * 300 ** 0.5, 3e-2])
    runs = {"clan": [{"seed": 0, "val_loss": 0.5, "seconds": 1.0}, {"seed": 1, "val_loss": 0.7, "seconds": 3.0}],
            "sweep": [{"seed": 0, "val_loss": 0.6, "seconds": 2.0}, {"seed": 1, "val_loss": 0.6, "seconds": 2.0}]}
    s = _summary(runs)
    assert s["clan"]["mean"] == pytest.approx(0.6) and s["clan"]["seconds"] == 2.0 and "diff_mean" not in s["clan"]
    assert s["sweep"]["diff_mean"] == pytest.approx(0.0) and s["sweep"]["diff_sd"] == pytest.approx(0.02 ** 0.5)
    assert s["sweep"]["clan_better"] == 1 and s["sweep"]["seeds"] == 2
    table = markdown({"t": {"runs": runs, "summary": s}})
    assert "| 1 | 0.7000 | 0.6000 |" in table
    assert "| t | sweep | 0.6000 ± 0.0000 | +0.0000 ± 0.1414 | 1/2 | 2 |" in table
    diverged = _summary({"clan": [{"seed": 0, "val_loss": float("nan"), "seconds": 1.0}]})
    assert diverged["clan"]["mean"] == math.inf


def test_quality_bad_arguments(capsys):
    from vmapclan.bench import quality

    assert quality.main(["--size", "huge"]) == 2
    assert "invalid choice: 'huge'" in capsys.readouterr().err
    assert quality.main(["--threads", "0"]) == 2
    assert "--threads must be a positive int, got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="quality: size must be one of"):
        quality.task_configs("digits-mlp", "huge")
    with pytest.raises(ValueError, match="quality: unknown task 'mnist'"):
        quality.task_configs("mnist")
    assert quality.main(["--clan", "[1]"]) == 2
    assert "--clan must be a JSON object, got [1]" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "fused"), [
    ([], True),
    (["--compile", "optimizer"], {"compile": "optimizer"}),
    (["--compile", "optimizer", "--device", "cuda", "--cuda-graph"], {"cuda_graph": True, "compile": "optimizer"}),
])
def test_step_options_reach_the_machine(argv, fused, monkeypatch, tmp_path, capsys):
    """--cuda-graph and --compile become the machine's FusedStep options (checked, then passed on)."""
    import vmapclan.step
    import vmapclan.machine

    seen = {}

    class Recorder:
        def __init__(self, config, steps=None, **kwargs):
            seen.update(kwargs)
            raise ValueError("recorded")

    monkeypatch.setattr(vmapclan.machine, "TrainingMachine", Recorder)
    monkeypatch.setattr(vmapclan.step, "check_options", lambda device, **options: seen.setdefault("checked", options))
    monkeypatch.chdir(tmp_path)
    assert main(["demo", *argv]) == EXIT_INPUT
    assert "recorded" in capsys.readouterr().err
    assert seen["fused"] == fused
    assert seen.get("checked", True) == fused


def test_a_divergence_warning_is_one_line_without_code(tmp_path):
    """The command shows each warning as one line: no file name, no source line under it."""
    (tmp_path / "nan_task.py").write_text(
        "import torch\nfrom vmapclan.tasks import DigitsTask\n\n"
        "class NanTask(DigitsTask):\n"
        "    def population_losses(self, population, data, target=None, *, blocks=None):\n"
        "        return torch.full((population.population_size,), float('nan'))\n")
    config = TINY[:TINY.index("[[schedule]]")].replace('task = "digits-mlp"', 'task = "nan_task:NanTask"')
    (tmp_path / "c.toml").write_text(config)
    done = subprocess.run([sys.executable, "-m", "vmapclan.cli", "train", "c.toml", "--out", "r", "--no-progress",
                           "--steps", "60"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == EXIT_DIVERGED, done.stderr
    lines = done.stderr.strip().splitlines()
    warned = [line for line in lines if line.startswith("vmapclan: warning: the whole population diverged in round")]
    assert len(warned) == 3 and len(lines) == 4, lines  # three restores, then the one-line error
    assert lines[-1].startswith("vmapclan: training diverged:")
