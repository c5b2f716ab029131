"""The rules behind the clan's quality: the lr's time shape and selection by a paired test.

- ``lr_shape_at`` by hand; the batched AdamW with an lr factor against ``torch.optim.AdamW`` in
  float64; the machine and the replay apply the same factor at every step.
- ``paired_winner`` on hand-built loss matrices: a significant gain adopts, a noise-level gain
  keeps the control, NaN never wins, the Bonferroni threshold; ``student_t_cdf`` against table
  values.
- The clan and the config take ``confidence``, refuse bad values with pinned messages, record
  the decision, and are reproducible from the seed.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vmapclan import BatchedAdamW, Clan, PopulationModel, RunConfig, Task, TrainingMachine, load_checkpoint, save_checkpoint
from vmapclan.optim import AdamWHyper, UPDATES
from vmapclan.replay import replay
from vmapclan.schedule import lr_shape_at
from vmapclan.selection import paired_winner, student_t_cdf

from runs import stop_at_step

DTYPE = torch.float64


# -- the lr's shape over time ---------------------------------------------------------------------
def test_lr_shape_by_hand():
    # Midpoints of 4 steps: t = 1/8, 3/8, 5/8, 7/8.
    cosine = [lr_shape_at(s, 4, "cosine") for s in range(4)]
    assert cosine == pytest.approx([(1 + math.cos(math.pi * t)) / 2 for t in (1 / 8, 3 / 8, 5 / 8, 7 / 8)], abs=1e-15)
    # Warmup over t < 0.25 of 10 steps: steps 0 and 1 (t = 0.05, 0.15) ramp, then the shape.
    assert [lr_shape_at(s, 10, "constant", warmup=0.25) for s in range(4)] == pytest.approx([0.2, 0.6, 1.0, 1.0])
    after = lr_shape_at(2, 10, "cosine", warmup=0.25)  # t = 0.25: the cosine's start
    assert after == pytest.approx(1.0)
    assert lr_shape_at(9, 10, "cosine", warmup=0.25) == pytest.approx((1 + math.cos(math.pi * 0.7 / 0.75)) / 2)
    # wsd: stable at 1 until t = 1 - decay, then linear to 0.
    assert [lr_shape_at(s, 10, "wsd", decay=0.2) for s in (7, 8, 9)] == pytest.approx([1.0, 0.75, 0.25])


@pytest.mark.parametrize("update", [u for u in UPDATES if u != "auto"])
def test_the_lr_factor_equals_torch_adamw_with_that_lr_per_member(update):
    """Every member's lr is multiplied by the factor at each step, and nothing else changes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DTYPE)
    p = 3
    population = PopulationModel(model, p)
    hyper = AdamWHyper(*(torch.tensor(v, dtype=DTYPE) for v in
                         ([1e-2, 3e-3, 5e-2], [0.0, 0.1, 0.01], [0.9, 0.8, 0.95], [0.999, 0.99, 0.9], [1e-8, 1e-6, 1e-3])))
    optimizer = BatchedAdamW(population, hyper, update=update)
    optimizer.lr_factor = torch.ones((), dtype=DTYPE)
    copies = [population.member_module(i) for i in range(p)]
    references = [torch.optim.AdamW(c.parameters(), lr=hyper.lr[i].item(), weight_decay=hyper.weight_decay[i].item(),
                                    betas=(hyper.beta1[i].item(), hyper.beta2[i].item()), eps=hyper.eps[i].item())
                  for i, c in enumerate(copies)]
    generator = torch.Generator().manual_seed(1)
    for step in range(6):
        factor = lr_shape_at(step, 6, "cosine", warmup=0.2)
        optimizer.lr_factor.fill_(factor)
        for leaf in population.parameters():
            leaf.grad.copy_(torch.randn(leaf.shape, dtype=DTYPE, generator=generator))
        for i, (copy, reference) in enumerate(zip(copies, references)):
            for param, leaf in zip(copy.parameters(), population.parameters()):
                param.grad = leaf.grad[i].clone()
            reference.param_groups[0]["lr"] = hyper.lr[i].item() * factor
            reference.step()
        optimizer.step()
    assert hyper.lr.tolist() == [1e-2, 3e-3, 5e-2]  # the genes' values are left alone
    for i, copy in enumerate(copies):
        for param, leaf in zip(copy.parameters(), population.parameters()):
            torch.testing.assert_close(leaf[i].detach(), param.detach(), rtol=1e-12, atol=1e-14)


def _lr_spy(monkeypatch):
    """Record ``lr * lr_factor`` for every member at every update of the batched AdamW."""
    seen = []
    apply_ = BatchedAdamW.apply_

    def spy(self, grads, *args, **kwargs):
        factor = 1.0 if self.lr_factor is None else self.lr_factor.item()
        seen.append([v * factor for v in self.hyper.lr.tolist()])
        return apply_(self, grads, *args, **kwargs)

    monkeypatch.setattr(BatchedAdamW, "apply_", spy)
    return seen


@pytest.mark.parametrize("fused, competitive_lr", [(True, "same"), (False, "same"), (True, "sqrt")],
                         ids=["fused", "loop", "fused-sqrt"])
def test_the_machine_and_the_replay_apply_the_shape_at_every_step(monkeypatch, fused, competitive_lr):
    config = RunConfig.from_dict({
        "task": "digits-mlp", "total_steps": 40, "model": {"hidden": 8},
        "data": {"batch_size": 8, "eval_samples": 32},
        "optimizer": {"lr": 2e-3, "lr_schedule": "cosine", "warmup": 0.1},
        "clan": {"population_size": 2, "round_length": 10, "duty_cycle": 0.2, "competitive_lr": competitive_lr},
        "schedule": [{"name": "warmup", "start_t": 0.0, "end_t": 0.25, "clan": {"competition": False}},
                     {"name": "clan", "start_t": 0.25, "end_t": 1.0}],
    })
    seen = _lr_spy(monkeypatch)
    results = TrainingMachine(config, fused=fused).train()
    assert len(seen) == 40
    shape = [lr_shape_at(s, 40, "cosine", 0.1) for s in range(40)]
    lineage = [0] * 40  # the member the exported schedule follows at each step: the winner while competing
    share = 2 ** -0.5 if competitive_lr == "sqrt" else 1.0  # a competitive step's share of the genome's lr
    for record in results.rounds:
        for step in range(record["start_step"] + record["cooperative_steps"], record["end_step"]):
            lineage[step] = record["winner"]
            for i, lr in enumerate(record["genomes"]["lr"]):
                assert seen[step][i] == pytest.approx(lr * shape[step] * share, rel=1e-12)
        for step in range(record["start_step"], record["start_step"] + record["cooperative_steps"]):
            assert seen[step] == pytest.approx([record["genomes"]["lr"][0] * shape[step]] * 2, rel=1e-12)
    assert any(lineage)
    for step, lrs in enumerate(seen):
        genes = results.schedule.phase_at_step(step, 40).optimizer["lr"]
        assert lrs[lineage[step]] == pytest.approx(genes * shape[step], rel=1e-12)
    trace = replay(results.schedule, config, trace=True).trace
    for step, entry in enumerate(trace):
        assert entry["lr"] == pytest.approx(results.schedule.phase_at_step(step, 40).optimizer["lr"] * shape[step],
                                            rel=1e-12)


def test_a_constant_shape_without_warmup_sets_no_factor():
    machine = TrainingMachine({"task": "digits-mlp", "total_steps": 10, "model": {"hidden": 8},
                               "data": {"batch_size": 8, "eval_samples": 32},
                               "optimizer": {"lr_schedule": "constant", "warmup": 0.0},
                               "clan": {"population_size": 2, "round_length": 10, "duty_cycle": 0.2,
                                        "competitive_lr": "same"}})
    machine.prepare()
    assert machine.clan.optimizer.lr_factor is None


@pytest.mark.parametrize("optimizer, message", [
    ({"lr_schedule": "linear"}, r"optimizer.lr_schedule must be one of \['constant', 'cosine', 'wsd'\], got 'linear'"),
    ({"warmup": 0.6}, r"optimizer.warmup must be a number in \[0, 0.5\], got 0.6"),
    ({"warmup": True}, r"optimizer.warmup must be a number in \[0, 0.5\], got True"),
    ({"lr_schedule": "wsd", "warmup": 0.2, "decay": 0.9},
     r"optimizer.decay must be a number in \(0, 1 - warmup\] = \(0, 0.8\], got 0.9"),
    ({"decay": 0, "warmup": 0.0}, r"optimizer.decay must be a number in \(0, 1 - warmup\] = \(0, 1\], got 0"),
])
def test_bad_lr_shapes_are_refused(optimizer, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.from_dict({"optimizer": optimizer})


# -- the paired test ------------------------------------------------------------------------------
@pytest.mark.parametrize("t, df, cdf", [(2.228, 10, 0.975), (1.812, 10, 0.95), (-2.015, 5, 0.05), (12.706, 1, 0.975),
                                        (0.0, 3, 0.5), (2.576, 10**7, 0.995), (3.883, 3, 0.9845)])
def test_student_t_cdf_matches_the_tables(t, df, cdf):
    assert student_t_cdf(t, df) == pytest.approx(cdf, abs=5e-4)


def test_student_t_cdf_is_a_distribution():
    values = [student_t_cdf(t / 4, 7) for t in range(-40, 41)]
    assert all(a < b for a, b in zip(values, values[1:]))
    assert values[0] < 1e-3 and values[-1] > 1 - 1e-3
    assert all(student_t_cdf(t, 4) + student_t_cdf(-t, 4) == pytest.approx(1.0) for t in (0.3, 1.7, 5.0))


def _noise(k, seed, scale=1.0):
    return scale * torch.randn(k, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))


def test_a_significant_gain_adopts_the_challenger():
    base = 2.0 + _noise(32, 0)  # samples differ a lot; the pairing removes that
    losses = torch.stack([base, base + 0.01 * _noise(32, 1), base - 0.05 + 0.01 * _noise(32, 2)])
    choice = paired_winner(losses, 0.9)
    assert choice.winner == 2 and choice.challenger == 2
    assert choice.gain == pytest.approx((losses[0] - losses[2]).mean().item())
    assert choice.confidence > 0.999
    assert choice.needed == pytest.approx(1 - 0.1 / 2)


def test_a_noise_level_gain_keeps_the_control():
    base = 2.0 + _noise(32, 0)
    # The challenger's mean is lower, but by far less than the paired noise: no adoption.
    challenger = base + 0.1 * _noise(32, 3)
    challenger = challenger - (challenger - base).mean() - 0.002
    losses = torch.stack([base, challenger, base + 0.5])
    choice = paired_winner(losses, 0.9)
    assert losses[1].mean() < losses[0].mean()
    assert choice.winner == 0 and choice.challenger == 1
    assert choice.gain == pytest.approx(0.002) and 0.5 < choice.confidence < choice.needed


def test_the_threshold_is_bonferroni_over_the_challengers():
    """The same gain is adopted among 2 challengers and refused among 8 (the family-wise confidence)."""
    k = 12
    base = _noise(k, 0)
    diff = 0.1 + 0.2 * _noise(k, 5)
    t = diff.mean() / (diff.std() / math.sqrt(k))
    confidence = student_t_cdf(float(t), k - 1)
    family = 1 - (1 - confidence) * 3  # between the thresholds for 2 and 8 challengers
    small = torch.stack([base, base - diff, base + 1])
    large = torch.stack([base, base - diff] + [base + 1] * 7)
    assert paired_winner(small, family).winner == 1
    assert paired_winner(large, family).winner == 0
    assert paired_winner(large, family).confidence == pytest.approx(confidence)


def test_nan_never_wins_and_a_diverged_control_gives_way():
    base = 1.0 + _noise(8, 0)
    nan_row = base - 1.0
    nan_row[3] = math.nan
    losses = torch.stack([base, nan_row, base + 0.1])
    assert paired_winner(losses, 0.9).winner == 0  # far better on 7 samples, NaN on one: never adopted
    diverged = torch.stack([torch.full((8,), math.nan, dtype=DTYPE), base + 0.2, base + 0.1])
    choice = paired_winner(diverged, 0.9)
    assert choice.winner == 2 and choice.challenger is None and math.isnan(choice.gain)
    assert paired_winner(torch.full((3, 8), math.nan, dtype=DTYPE), 0.9).winner == 0


def test_an_exact_gain_and_ties():
    base = torch.tensor([1.0, 2.0, 3.0], dtype=DTYPE)
    assert paired_winner(torch.stack([base, base - 0.1]), 0.9).confidence == 1.0  # no variance: certain
    tie = paired_winner(torch.stack([base, base - 0.1, base - 0.1]), 0.9)
    assert tie.winner == 1  # equal challengers: the lowest index
    assert paired_winner(torch.stack([base, base, base + 0.1]), 0.9).winner == 0


@pytest.mark.parametrize("losses, confidence, message", [
    (torch.zeros(3), 0.9, r"paired_winner: losses must have shape \[P, K\] with P >= 2 members and K >= 2 paired "
                          r"values, got \[3\]"),
    (torch.zeros(3, 1), 0.9, r"got \[3, 1\]"),
    (torch.zeros(1, 5), 0.9, r"got \[1, 5\]"),
    (torch.zeros(3, 5), 1.0, r"paired_winner: confidence must be a float in \(0, 1\), got 1.0"),
    (torch.zeros(3, 5), 0, r"paired_winner: confidence must be a float in \(0, 1\), got 0"),
])
def test_paired_winner_refuses_bad_input(losses, confidence, message):
    with pytest.raises(ValueError, match=message):
        paired_winner(losses, confidence)


def test_blocks_of_validation_samples_pair_the_members():
    task = NoiseTask()
    torch.manual_seed(0)
    model = task.build_model({"hidden": 4}, None)
    population = PopulationModel(model, 2, init="independent", generator=torch.Generator().manual_seed(0))
    data = task.load(RunConfig.from_dict({"data": {"test_fraction": 0}}).data, 0).val  # 24 samples
    blocks = task.population_losses(population, data, blocks=5)
    assert blocks.shape == (2, 5)
    sizes = [len(p) for p in torch.arange(24).tensor_split(5)]
    weighted = (blocks * torch.tensor(sizes, dtype=DTYPE)).sum(1) / 24
    torch.testing.assert_close(weighted, task.population_losses(population, data), rtol=1e-6, atol=0)
    assert task.population_losses(population, data, blocks=100).shape == (2, 24)  # at most a block per sample
    with pytest.raises(ValueError, match=r"NoiseTask.population_losses: blocks must be a positive int or None, got 0"):
        task.population_losses(population, data, blocks=0)


# -- the clan and the config ----------------------------------------------------------------------
def _clan(**kwargs):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    settings = {"population_size": 3, "round_length": 2, "duty_cycle": 0.5, "autobind": ["adamw"], "seed": 0, **kwargs}
    return Clan(model, torch.optim.AdamW(model.parameters(), lr=1e-3), **settings)


def _finish(clan):
    member = clan.round()
    while not member.done:
        member.step()


def test_the_clan_adopts_only_a_significant_challenger_and_records_it():
    clan = _clan(confidence=0.9)
    base = 2.0 + _noise(16, 0)
    _finish(clan)
    record = clan.step(torch.stack([base, base + 0.3, base + 0.01 * _noise(16, 1) - 0.2]))
    assert record["winner"] == 2 and record["challenger"] == 2
    assert record["gain"] == pytest.approx(0.2, abs=0.01) and record["confidence"] > 0.99
    assert record["val_losses"] == pytest.approx([base.mean().item(), base.mean().item() + 0.3,
                                                  (base + 0.01 * _noise(16, 1) - 0.2).mean().item()])
    incumbent = {n: v.item() for n, v in clan.incumbent.items()}
    assert incumbent == record["incumbent"] == {n: v[2] for n, v in record["genomes"].items()}
    _finish(clan)
    noisy = base + 0.05 * _noise(16, 2)
    record = clan.step(torch.stack([base, noisy - (noisy - base).mean() - 1e-4, base + 1.0]))
    assert record["winner"] == 0 and record["challenger"] == 1 and record["confidence"] < 0.9


def test_paired_losses_without_confidence_rank_by_their_means():
    clan = _clan()
    _finish(clan)
    losses = torch.tensor([[1.0, 3.0], [2.0, 1.0], [0.0, 5.0]])
    record = clan.step(losses)
    assert record["val_losses"] == [2.0, 1.5, 2.5] and record["winner"] == 1 and "confidence" not in record


def test_a_run_with_confidence_is_reproducible_from_its_seed():
    config = {"task": "digits-mlp", "total_steps": 60, "model": {"hidden": 8},
              "data": {"batch_size": 8, "eval_samples": 64},
              "clan": {"population_size": 3, "round_length": 20, "duty_cycle": 0.25, "confidence": 0.8}}
    a, b = (TrainingMachine(config).train() for _ in range(2))
    assert a.rounds == b.rounds and all("confidence" in r for r in a.rounds)
    for x, y in zip(a.best_model.parameters(), b.best_model.parameters()):
        assert torch.equal(x, y)


@pytest.mark.parametrize("kwargs, message", [
    ({"confidence": 1.0}, r"Clan: confidence must be a number in \(0, 1\) or None, got 1.0"),
    ({"confidence": "high"}, r"Clan: confidence must be a number in \(0, 1\) or None, got 'high'"),
    ({"confidence": 0.9, "selection": "truncation", "duty_cycle": 1.0},
     r"Clan: confidence needs selection='winner' \(a control to test challengers against\), got selection='truncation'"),
])
def test_the_clan_refuses_bad_confidence(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _clan(**kwargs)


def test_confidence_needs_paired_losses():
    clan = _clan(confidence=0.9)
    _finish(clan)
    for losses in (torch.zeros(3), torch.zeros(3, 1)):
        with pytest.raises(ValueError, match=r"clan.step: val_losses must have shape \[3, K\] \(paired losses\) "
                                             r"\(every member's losses on the same K >= 2 samples or blocks"):
            clan.step(losses)


@pytest.mark.parametrize("clan, message", [
    ({"confidence": 1.0}, r"clan.confidence must be a number in \[0, 1\), got 1.0"),
    ({"confidence": -0.1}, r"clan.confidence must be a number in \[0, 1\), got -0.1"),
    ({"confidence": 0.9, "selection": "truncation", "duty_cycle": 1.0},
     r"clan.confidence needs clan.selection = 'winner' \(a control to test challengers against\), got 'truncation'"),
])
def test_the_config_refuses_bad_confidence(clan, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.from_dict({"clan": clan})


# -- keeping the best incumbent -------------------------------------------------------------------
class NoiseTask(Task):
    """Random labels: training memorises noise, so the validation loss rises after the first rounds."""

    model_defaults = {"hidden": 32}

    def split(self, data, seed):
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(72, 6, generator=g), torch.randint(0, 3, (72,), generator=g)
        return (x[:48], y[:48]), (x[48:], y[48:])

    def build_model(self, model, data):
        return nn.Sequential(nn.Linear(6, model["hidden"]), nn.ReLU(), nn.Linear(model["hidden"], 3))

    def loss(self, output, target):
        return F.cross_entropy(output, target)


KEEP = {"task": "noise", "total_steps": 60, "seed": 1, "data": {"batch_size": 8, "eval_samples": 0},
        "optimizer": {"lr": 3e-2, "weight_decay": 0.0}, "clan": {"population_size": 2, "round_length": 10,
                                                                "duty_cycle": 0.2}}


def test_the_best_incumbent_is_kept_and_returned():
    results = TrainingMachine(KEEP, task=NoiseTask()).train()
    final, rounds = results.final, results.rounds
    ends = {r["end_step"]: r["val_losses"][r["winner"]] for r in rounds}
    assert final["kept_step"] in ends and final["kept_step"] < 60
    assert final["val_loss"] == pytest.approx(ends[final["kept_step"]], rel=1e-6)  # eval split = whole val split
    assert final["val_loss"] == pytest.approx(min(ends.values()), rel=1e-6)
    assert final["last_val_loss"] > final["val_loss"]
    assert NoiseTask().evaluate(results.best_model, NoiseTask().load(results.config.data, 1).val)["loss"] == \
        pytest.approx(final["val_loss"])
    off = TrainingMachine({**KEEP, "clan": {**KEEP["clan"], "keep_best": False}}, task=NoiseTask()).train()
    assert "kept_step" not in off.final and off.final["val_loss"] == pytest.approx(final["last_val_loss"])


def test_the_replay_returns_the_model_of_the_kept_step(tmp_path):
    results = TrainingMachine(KEEP, task=NoiseTask()).train()
    config, task = results.config, NoiseTask()
    start = replay(results.schedule, config, task=task, keep_step=0).model
    torch.manual_seed(config.seed)
    initial = task.build_model(task.model_settings(config.model), config.data)
    for a, b in zip(start.parameters(), initial.parameters()):
        assert torch.equal(a, b)
    kept = replay(results.schedule, config, task=task, keep_step=results.final["kept_step"], trace=True)
    last = replay(results.schedule, config, task=task)
    assert len(kept.trace) == 60 and kept.losses == last.losses  # the whole schedule runs either way
    assert not all(torch.equal(a, b) for a, b in zip(kept.model.parameters(), last.model.parameters()))
    with pytest.raises(ValueError, match=r"replay: keep_step must be an int in \[0, 60\], got 61"):
        replay(results.schedule, config, task=task, keep_step=61)


def test_a_resume_keeps_the_same_incumbent(tmp_path):
    full = TrainingMachine(KEEP, task=NoiseTask()).train()
    kept_at = full.final["kept_step"]
    stop_at_step(KEEP, tmp_path, kept_at + 5, task=NoiseTask())
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["clan"]["kept"]["step"] == kept_at
    resumed = TrainingMachine.resume(tmp_path, task=NoiseTask()).train()
    assert resumed.final["kept_step"] == kept_at and resumed.final["val_loss"] == full.final["val_loss"]
    for a, b in zip(resumed.best_model.parameters(), full.best_model.parameters()):
        assert torch.equal(a, b)
    state["clan"]["kept"]["row"]["params"] = torch.zeros(3)
    save_checkpoint(state, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"Clan.load_state_dict: the checkpoint's kept must be the best "
                                         r"incumbent's step \(<= \d+\), finite loss and one member's weights"):
        TrainingMachine.resume(tmp_path, task=NoiseTask()).prepare()


def test_keep_best_and_competitive_lr_are_checked():
    with pytest.raises(ValueError, match=r"clan.keep_best must be true or false, got 1"):
        RunConfig.from_dict({"clan": {"keep_best": 1}})
    with pytest.raises(ValueError, match=r"clan.competitive_lr must be 'same' or 'sqrt', got 'linear'"):
        RunConfig.from_dict({"clan": {"competitive_lr": "linear"}})
