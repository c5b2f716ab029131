"""A training-machine run stopped at any moment and resumed from its run directory ends where it would have."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from vmapclan import RunConfig, TrainingMachine
from vmapclan.cli import main as cli_main

CONFIG = {
    "task": "digits-mlp", "total_steps": 60, "seed": 3, "checkpoint_every": 1,
    "model": {"hidden": 32}, "data": {"batch_size": 16, "eval_samples": 128},
    "clan": {"population_size": 4, "round_length": 10, "duty_cycle": 0.3},
    "schedule": [
        {"name": "warmup", "start_t": 0.0, "end_t": 0.2, "clan": {"competition": False}},
        {"name": "clan", "start_t": 0.2, "end_t": 0.85},
        {"name": "anneal", "start_t": 0.85, "end_t": 1.0, "optimizer": {"lr_scale": 0.5},
         "clan": {"competition": False}},
    ],
}


class Stop(Exception):
    """Stands in for a crash at a chosen step."""


def comparable(results):
    """What must not change when a run is interrupted and resumed (wall time aside)."""
    metrics = [{k: v for k, v in r.items() if not k.startswith("seconds")} for r in results.metrics]
    return {"history": repr(results.history), "metrics": repr(metrics), "final": repr(
        {k: v for k, v in results.final.items() if not k.startswith("seconds")})}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    # One thread, as the tests that compare with it run (conftest): another thread count may
    # round the same sums differently, and the comparison is bitwise.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = TrainingMachine(RunConfig.from_dict(CONFIG), out_dir=out).train()
    finally:
        torch.set_num_threads(threads)
    return results, out


@pytest.mark.parametrize("stop_at", [5, 23, 37, 55])  # warmup, mid-round, a round's last step, anneal
def test_resume_after_a_stop_at_any_step_gives_the_same_run(uninterrupted, tmp_path, stop_at):
    reference, reference_dir = uninterrupted

    def crash(event):
        if event["event"] == "step" and event["step"] == stop_at:
            raise Stop

    with pytest.raises(Stop):
        TrainingMachine(RunConfig.from_dict(CONFIG), out_dir=tmp_path, callback=crash).train()
    assert (tmp_path / "checkpoint.pt").exists()
    results = TrainingMachine.resume(tmp_path).train()

    assert comparable(results) == comparable(reference)
    for name, tensor in reference.best_model.state_dict().items():
        assert torch.equal(results.best_model.state_dict()[name], tensor), name
    # metrics.jsonl holds every record once, as in the uninterrupted run
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (reference_dir / "metrics.jsonl").read_text().splitlines()]
    strip = lambda records: [{k: v for k, v in r.items() if not k.startswith("seconds")} for r in records]  # noqa: E731
    assert strip(lines) == strip(expected)


def test_a_long_cooperative_stretch_is_checkpointed_as_often_as_rounds_and_resumes(tmp_path):
    """One data-parallel model over most of the run (the default plan on abundant data) saves a
    checkpoint every ``checkpoint_every x round_length`` steps, at a divergence check: a crash loses
    no more of it, and the run resumes from there to the uninterrupted run's end."""
    config = {**CONFIG, "total_steps": 100, "schedule": [
        {"name": "train", "start_t": 0.0, "end_t": 0.9, "clan": {"competition": False}},
        {"name": "clan", "start_t": 0.9, "end_t": 1.0}]}
    config["clan"] = {**CONFIG["clan"], "round_length": 20}  # 1 x 20 steps: saved at steps 25, 50, 75
    reference = TrainingMachine(RunConfig.from_dict(config)).train()
    machine = TrainingMachine(RunConfig.from_dict(config), out_dir=tmp_path)
    saved = []
    checkpoint = machine.checkpoint
    machine.checkpoint = lambda: (saved.append(machine.step), checkpoint())[1]

    def crash(event):
        if event["event"] == "step" and event["step"] == 62:
            raise Stop

    machine.log.callback = crash
    with pytest.raises(Stop):
        machine.train()
    assert saved == [0, 25, 50]
    results = TrainingMachine.resume(tmp_path).train()
    # A stop requested at a step whose checkpoint is due saves that step once.
    stopped = TrainingMachine(RunConfig.from_dict(config), out_dir=tmp_path / "stopped")
    saved.clear()
    checkpoint_of_stopped = stopped.checkpoint
    stopped.checkpoint = lambda: (saved.append(stopped.step), checkpoint_of_stopped())[1]
    stopped.log.callback = lambda event: stopped.request_stop() if event.get("step") == 25 else None
    with pytest.raises(Exception, match="stopped at step 25"):
        stopped.train()
    assert saved == [0, 25]
    assert comparable(results) == comparable(reference)
    for name, tensor in reference.best_model.state_dict().items():
        assert torch.equal(results.best_model.state_dict()[name], tensor), name


def test_resume_of_a_finished_run_changes_nothing(uninterrupted):
    reference, reference_dir = uninterrupted
    again = TrainingMachine.resume(reference_dir).train()
    assert comparable(again) == comparable(reference)


def test_resume_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        TrainingMachine.resume(tmp_path)
    assert cli_main(["train", "--resume", str(tmp_path)]) == 3
    assert cli_main(["train"]) == 2
    assert cli_main(["train", "some.toml", "--resume", str(tmp_path)]) == 2


def test_command_killed_with_sigkill_resumes_to_the_same_files(tmp_path):
    import tomli_w

    config = tmp_path / "run.toml"
    config.write_text(tomli_w.dumps({**CONFIG, "total_steps": 120}))
    args = [sys.executable, "-m", "vmapclan.cli", "train", str(config), "--no-progress", "--no-plots", "--threads", "1"]

    full = subprocess.run([*args, "--out", str(tmp_path / "full")], capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr

    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen([*args, "--out", str(killed_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (killed_dir / "checkpoint.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # somewhere later in training
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    resumed = subprocess.run([sys.executable, "-m", "vmapclan.cli", "train", "--resume", str(killed_dir),
                              "--no-progress", "--no-plots", "--threads", "1"], capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr

    history = lambda d: json.loads((d / "history.json").read_text())  # noqa: E731
    assert history(killed_dir) == history(tmp_path / "full")
    weights = lambda d: torch.load(d / "best_model.pt", weights_only=True)  # noqa: E731
    for name, tensor in weights(tmp_path / "full").items():
        assert torch.equal(weights(killed_dir)[name], tensor), name
