"""``vmapclan train --tensorboard``: every member's training loss, validation losses, genes and the phase as scalars."""

import json
import sys

import pytest
import tomli_w
import torch

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from vmapclan import TrainingMachine  # noqa: E402
from vmapclan.tensorboard_logger import TensorBoardLogger  # noqa: E402
from vmapclan.cli import EXIT_INPUT, EXIT_OK, main  # noqa: E402
from vmapclan.machine import TrainingStopped  # noqa: E402

P = 3
CONFIG = {"task": "digits-mlp", "total_steps": 24, "seed": 4, "log_every": 4, "checkpoint_every": 1,
          "model": {"hidden": 8}, "data": {"batch_size": 8, "eval_samples": 32},
          "clan": {"population_size": P, "round_length": 6, "duty_cycle": 0.5},
          "schedule": [{"name": "warmup", "start_t": 0.0, "end_t": 0.25, "clan": {"competition": False}},
                       {"name": "clan", "start_t": 0.25, "end_t": 1.0}]}


def close(found, expected) -> bool:
    """Whether two ``[(step, value), ...]`` series have the same steps and values to float32 precision."""
    return [s for s, _ in found] == [s for s, _ in expected] and \
        [v for _, v in found] == pytest.approx([v for _, v in expected], rel=1e-6)


def scalars(log_dir) -> dict:
    """``{tag: [(step, value), ...]}`` of the event files in ``log_dir``."""
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("board")
    path = root / "digits.toml"
    path.write_text(tomli_w.dumps(CONFIG))
    out = root / "run"
    assert main(["train", str(path), "--out", str(out), "--no-progress", "--no-plots", "--tensorboard"]) == EXIT_OK
    assert main(["replay", str(out / "schedule.json"), "--no-progress", "--tensorboard"]) == EXIT_OK
    return out


def test_the_run_writes_every_members_losses_genes_and_the_phase(run):
    found = scalars(run / "tensorboard" / "train")
    genes = ["lr", "weight_decay", "betas/0", "betas/1", "eps"]
    expected = {"train/loss", "phase", "final/val_loss", "final/val_accuracy", "final/test_loss", "final/test_accuracy",
                *(f"{kind}/member_loss/{i}" for kind in ("train", "val") for i in range(P)),
                *(f"genes/{g}/{i}" for g in genes for i in range(P))}
    assert set(found) == expected
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in metrics if r["event"] == "train"]
    assert [s for s, _ in found["train/loss"]] == [s for s, _ in train] == [4, 8, 12, 16, 20, 24]
    assert [v for _, v in found["train/loss"]] == pytest.approx([v for _, v in train], rel=1e-6)
    for i in range(P):
        assert [s for s, _ in found[f"train/member_loss/{i}"]] == list(range(1, 25))
    # The population's mean loss of every 4 steps is the mean of the members' losses over them.
    per_step = torch.tensor([[v for _, v in found[f"train/member_loss/{i}"]] for i in range(P)])
    assert per_step.mean(0).view(6, 4).mean(1).tolist() == pytest.approx([v for _, v in train], rel=1e-5)
    assert torch.equal(per_step[0, :6], per_step[1, :6])  # the warmup trains one model
    history = json.loads((run / "history.json").read_text())
    rounds = [r for r in history if r["kind"] == "round"]
    cooperative = history[0]
    for i in range(P):
        assert close(found[f"val/member_loss/{i}"], [(cooperative["end_step"], cooperative["val_loss"])]
                     + [(r["end_step"], r["val_losses"][i]) for r in rounds])
        for g in genes:
            assert close(found[f"genes/{g}/{i}"], [(cooperative["end_step"], cooperative["hyper"][g])]
                         + [(r["end_step"], r["genomes"][g][i]) for r in rounds])
    assert found["phase"] == [(s, 0.0 if s <= 6 else 1.0) for s in range(1, 25)]
    final = metrics[-1]
    assert close(found["final/val_loss"], [(24, final["val_loss"])])


def test_the_replays_curve_is_in_the_same_run_directory(run):
    report = json.loads((run / "replay.json").read_text())
    found = scalars(run / "tensorboard" / "replay")
    assert [s for s, _ in found["train/loss"]] == list(range(1, 25))
    assert [v for _, v in found["train/loss"]] == pytest.approx(report["losses"], rel=1e-6)
    assert close(found["final/val_loss"], [(24, report["replay"]["val_loss"])])


def test_without_tensorboard_the_option_is_exit_3_in_one_line(tmp_path, capsys, monkeypatch):
    path = tmp_path / "digits.toml"
    path.write_text(tomli_w.dumps(CONFIG))
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if it were not installed
    out = tmp_path / "run"
    assert main(["train", str(path), "--out", str(out), "--no-progress", "--tensorboard"]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert err == ("vmapclan: error: --tensorboard needs the tensorboard package: "
                   "pip install 'vmapclan[tensorboard]'\n")
    assert not out.exists()


def test_a_resumed_run_logs_each_step_once_with_the_uninterrupted_values(tmp_path):
    def logged(out, stop_at=None):
        machine = TrainingMachine(CONFIG, out_dir=out)
        board = TensorBoardLogger(out / "tensorboard" / "train", [p.name for p in machine.schedule], P)

        def on_event(event):
            board(event)
            if stop_at is not None and event["event"] == "step" and event["step"] == stop_at:
                machine.request_stop()

        machine.callback = on_event
        try:
            machine.train()
        except TrainingStopped:
            pass
        board.close()
        return machine

    logged(tmp_path / "full")
    logged(tmp_path / "stopped", stop_at=15)
    machine = TrainingMachine.resume(tmp_path / "stopped")
    machine.prepare()
    board = TensorBoardLogger(tmp_path / "stopped" / "tensorboard" / "train", [p.name for p in machine.schedule], P,
                              purge_step=machine.step + 1)
    machine.callback = board
    machine.train()
    board.close()
    full, resumed = scalars(tmp_path / "full" / "tensorboard" / "train"), scalars(tmp_path / "stopped" / "tensorboard"
                                                                                 / "train")
    assert resumed == full
