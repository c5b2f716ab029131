"""Exact resume: a run killed with SIGKILL at random moments, resumed, ends where an uninterrupted run ends."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vmapclan import Clan, member_loss
from vmapclan.checkpoint import load_checkpoint, save_checkpoint

from plain_loop import train_step

import models

WORKER = Path(__file__).with_name("resume_worker.py")
TOTAL_STEPS = 40


def launch(run_dir, *extra):
    return subprocess.Popen([sys.executable, str(WORKER), str(run_dir), str(TOTAL_STEPS), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(run_dir, *extra):
    proc = launch(run_dir, *extra)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, err


def load_final(run_dir):
    return load_checkpoint(Path(run_dir) / "final.pt")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    code, err = finish(run_dir)
    assert code == 0, err
    return load_final(run_dir)


def assert_same_run(final, reference):
    assert torch.equal(final["params"], reference["params"])
    for name, buffer in reference["buffers"].items():
        assert torch.equal(final["buffers"][name], buffer), name
    for name, genes in reference["genomes"].items():
        assert torch.equal(final["genomes"][name], genes), name
    assert final["history"] == reference["history"]


def test_killed_at_random_moments_resumes_bitwise(reference, tmp_path):
    rng = random.Random(1234)
    kills = 0
    for trial in range(3):
        run_dir = tmp_path / f"trial{trial}"
        run_dir.mkdir()
        for _attempt in range(50):
            proc = launch(run_dir)
            ready = proc.stdout.readline().split()  # "ready STEP": imports done, training begins now
            if ready[:1] != ["ready"]:
                pytest.fail(f"the worker did not start: {proc.communicate()[1][-2000:]}")
            time.sleep(rng.uniform(0.0, 0.4))
            # Past the last step only the final report is left to write: let it finish.
            if int(ready[1]) < TOTAL_STEPS and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait(timeout=60)
            if proc.returncode == 0:
                break
        else:
            pytest.fail("the run never finished")
        assert_same_run(load_final(run_dir), reference)
    assert kills >= 3  # the test really interrupted runs


@pytest.mark.parametrize("mode", ["before-rename", "mid-write"])
def test_killed_while_writing_a_checkpoint_keeps_the_previous_one(reference, tmp_path, mode):
    code, _ = finish(tmp_path, "--crash-at", "17", "--crash-mode", mode)
    assert code == -signal.SIGKILL
    state = load_checkpoint(tmp_path / "ckpt.pt")  # still readable: the last complete one
    assert state["clan"]["global_step"] == 16
    code, err = finish(tmp_path)
    assert code == 0, err
    assert_same_run(load_final(tmp_path), reference)


def test_save_checkpoint_replaces_atomically(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    save_checkpoint({"step": torch.tensor(1)}, path)

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"step": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"].item() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no temporary file left behind


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")
    torn = tmp_path / "torn.pt"
    torn.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is not a vmapclan checkpoint"):
        load_checkpoint(torn)


def make_clan(hidden=8, **kwargs):
    model = models.mlp(4, hidden, 1, act="relu", dtype=torch.float32, seed=0)
    return models.adamw_clan(model, population_size=3, round_length=4, duty_cycle=0.5, **kwargs)


def test_checkpoint_of_another_version_or_model_is_refused():
    state = make_clan().state_dict()
    with pytest.raises(ValueError, match="checkpoint format version 99"):
        make_clan().load_state_dict({**state, "format_version": 99})
    with pytest.raises(ValueError, match="the checkpoint is of another model"):
        make_clan(hidden=16).load_state_dict(state)
    with pytest.raises(ValueError, match="the checkpoint's population_size is 3"):
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        Clan(model, torch.optim.AdamW(model.parameters()), population_size=5, round_length=4, duty_cycle=0.5,
             autobind=["adamw"]).load_state_dict(state)
    with pytest.raises(ValueError, match="not a vmapclan state dict"):
        make_clan().load_state_dict({"weights": 1})


def trained_clan(steps=6):
    """``make_clan()`` trained ``steps`` steps of the plain loop, through one selection."""
    clan = make_clan()
    g = torch.Generator().manual_seed(7)
    member = clan.round()
    for _ in range(steps):
        x, y = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 1, generator=g)
        train_step(member, F.mse_loss, x, y)
        if member.done:
            clan.step(torch.tensor([3.0, 1.0, 2.0]))
            member = clan.round()
    # A backward not yet stepped leaves gradients pending: they are state too.
    x, y = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 1, generator=g)
    with member.sync_context():
        member_loss(F.mse_loss, member.model(x), y).sum().backward()
    return clan


def clan_values(clan):
    """What a resume must carry over, as comparable values."""
    state = clan.optimizer.adamw_state  # its accum_count is always 0 without the accumulation gene
    return {"flat": clan.population.flat.detach().clone(), "grad_flat": clan.population.grad_flat.clone(),
            **{f"adamw:{n}": getattr(state, n).clone() for n in ("step", "exp_avg", "exp_avg_sq")},
            **{f"gene:{n}": v.clone() for n, v in clan.genomes.items()},
            "clock": torch.tensor([clan.round_index, clan.step_in_round, clan.global_step])}


def test_state_dict_is_plain_and_loads_with_weights_only(tmp_path):
    clan = trained_clan()
    assert (clan.round_index, clan.step_in_round) == (1, 2)  # mid-round, after a selection
    save_checkpoint(clan.state_dict(), tmp_path / "c.pt")
    restored = make_clan(seed=5)
    source, before = clan_values(clan), clan_values(restored)
    # Everything a load must bring differs before it (a fresh clan is not the trained one) ...
    assert [n for n in source if torch.equal(source[n], before[n])] == []
    restored.load_state_dict(load_checkpoint(tmp_path / "c.pt"))
    after = clan_values(restored)
    # ... and is equal after it.
    assert [n for n in source if not torch.equal(source[n], after[n])] == []
    assert restored.history == clan.history and len(restored.history) == 1
    assert torch.equal(restored.optimizer.hyper.lr, clan.optimizer.hyper.lr)
