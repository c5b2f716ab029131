"""Faults injected through the command, in every kind of phase: the documented outcome, never a silent one.

NaN and inf go into the weights, into one training batch and into the validation losses, in a
search round, in clan rounds, in a data-parallel stretch and in an anneal. Each run must end
either with exit 0 and a finite model, or with exit 4 (divergence it could not undo) and the
last good checkpoint kept, finite and loadable; every line on stderr is one of the command's
one-line messages, never a traceback or a warning's source line.
"""

import json
import math

import pytest
import torch

import vmapclan.machine as machine_module
from vmapclan import TrainingMachine
from vmapclan.checkpoint import load_checkpoint
from vmapclan.cli import EXIT_DIVERGED, EXIT_INPUT, EXIT_OK, main

STEPS = 60
CONFIG = f"""
task = "digits-mlp"
total_steps = {STEPS}
seed = 3
[model]
hidden = 8
[data]
batch_size = 8
eval_samples = 64
[clan]
population_size = 3
round_length = 6
[[schedule]]
name = "search"
start_t = 0.0
end_t = 0.2
clan = {{ search = 30 }}
[[schedule]]
name = "clan"
start_t = 0.2
end_t = 0.5
[[schedule]]
name = "train"
start_t = 0.5
end_t = 0.8
clan = {{ competition = false }}
[[schedule]]
name = "anneal"
start_t = 0.8
end_t = 1.0
optimizer = {{ lr_scale = 0.3 }}
clan = {{ competition = false }}
"""
AT = {"search": 6, "clan": 20, "train": 40, "anneal": 54}  # a step inside each phase


def inject(monkeypatch, what: str, at: int, value: float) -> None:
    """Put ``value`` into the weights after step ``at``, into the training batch of that step, or into the
    first validation scoring after it."""
    if what == "val":
        real = machine_module.score_round
        done = []

        def scored(task, clan, data, blocks=None):
            losses = real(task, clan, data, blocks)
            if clan.time_step >= at and not done:
                done.append(True)
                return torch.full_like(losses, value)
            return losses

        monkeypatch.setattr(machine_module, "score_round", scored)
        return
    real_step = TrainingMachine._step

    def step(self, member, batch):
        if what == "inputs" and self.step == at - 1:
            x, y = batch
            batch = (torch.full_like(x, value), y)
        losses = real_step(self, member, batch)
        if what == "weights" and self.step == at:
            with torch.no_grad():
                rows = self.clan.population.flat
                (rows if self.clan.population.one_model else rows[1:2]).fill_(value)
        return losses

    monkeypatch.setattr(TrainingMachine, "_step", step)


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("what", ["weights", "inputs", "val"])
@pytest.mark.parametrize("phase", list(AT))
def test_a_fault_in_any_phase_ends_in_the_documented_outcome(tmp_path, capsys, monkeypatch, phase, what, value):
    config = tmp_path / "c.toml"
    config.write_text(CONFIG)
    out = tmp_path / "run"
    inject(monkeypatch, what, AT[phase], value)
    code = main(["train", str(config), "--out", str(out), "--no-progress", "--no-plots"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert all(line.startswith("vmapclan: ") for line in lines), lines  # one-line messages only
    assert "Traceback" not in err
    assert code in (EXIT_OK, EXIT_DIVERGED), (code, lines)
    if code == EXIT_OK:
        history = json.loads((out / "history.json").read_text())
        seen = [r for r in history if r.get("event") == "diverged" or
                (r["kind"] == "round" and not all(math.isfinite(v) for v in r["val_losses"]))]
        assert seen, "the fault left no trace in the history"  # it happened, and the run says so
        weights = torch.load(out / "best_model.pt")
        assert all(torch.isfinite(t).all() for t in weights.values())
        final = [line for line in (out / "metrics.jsonl").read_text().splitlines() if '"final"' in line]
        assert final and math.isfinite(json.loads(final[-1])["val_loss"])
    else:
        assert lines[-1].startswith("vmapclan: training diverged:")
        state = load_checkpoint(out / "checkpoint.pt")  # the last good checkpoint: kept, and finite
        assert torch.isfinite(state["clan"]["model"]["params"]).all()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A short run's directory (its checkpoint at the end)."""
    root = tmp_path_factory.mktemp("finished")
    (root / "c.toml").write_text(CONFIG.replace(f"total_steps = {STEPS}", "total_steps = 24"))
    assert main(["train", str(root / "c.toml"), "--out", str(root / "run"), "--no-progress", "--no-plots"]) == EXIT_OK
    return root / "run"


class Payload:
    """A pickle that would run code when loaded: a foreign checkpoint must never be unpickled."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def corruptions(good: bytes):
    g = torch.Generator().manual_seed(0)
    for k, at in enumerate(torch.randint(0, len(good), (8,), generator=g).tolist()):
        yield f"flip-{k}", good[:at] + bytes([good[at] ^ 0x5A]) + good[at + 1:]
    for k, cut in enumerate(torch.randint(0, len(good), (4,), generator=g).tolist()):
        yield f"truncated-{k}", good[:cut]
    import io
    import pickle

    yield "foreign-pickle", pickle.dumps(Payload())
    buffer = io.BytesIO()
    torch.save({"format_version": 3, "clan": {}, "machine": {}}, buffer)
    yield "torch-save-without-header", buffer.getvalue()
    yield "empty", b""


def test_a_damaged_checkpoint_is_refused_in_one_line_and_nothing_else_changes(finished_run, tmp_path, capsys):
    import shutil

    good = (finished_run / "checkpoint.pt").read_bytes()
    for name, data in corruptions(good):
        run = tmp_path / name
        shutil.copytree(finished_run, run)
        (run / "checkpoint.pt").write_bytes(data)
        before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
        code = main(["train", "--resume", str(run), "--no-progress", "--no-plots"])
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert code == EXIT_INPUT and len(lines) == 1 and lines[0].startswith("vmapclan: error: "), (name, lines)
        assert "unpickled!" not in captured.out
        after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
        assert after == before, name  # no data lost, nothing written
