"""The clan over a horizon: its plan (search, rounds, cooperative stretches), the lr in force, keep-best.

- A loop of one's own (the README's) with ``Clan(total_steps=...)`` trains exactly the clan the
  training machine trains from the same settings: the same weights, bit for bit, the same
  winners and genomes, the same kept incumbent.
- The plan by hand: the default schedule's search round, a cooperative stretch's phase, genes
  and record, the end of the plan, what a clan with a plan refuses.
- The lr every update applies is the gene times the time shape times the competitive share.
- A state saved anywhere in the plan resumes bitwise; a state of the previous format loads only
  into a clan of the settings it trained with.
"""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vmapclan import BatchedAdamW, Clan, ClanSettings, Phase, RunConfig, TrainingMachine, default_schedule
from vmapclan.schedule import lr_shape_at
from vmapclan.tasks import get_task

from plain_loop import train_step, train_to_the_end, validation_losses

P, B, T = 4, 8, 60
PHASED = [{"name": "warmup", "start_t": 0.0, "end_t": 0.2, "clan": {"competition": False}},
          {"name": "clan", "start_t": 0.2, "end_t": 0.85},
          {"name": "anneal", "start_t": 0.85, "end_t": 1.0, "optimizer": {"lr_scale": 0.5},
           "clan": {"competition": False}}]


def config(schedule=None):
    """A digits run whose every evaluation scores the whole validation split, as the README loop does."""
    out = {"task": "digits-mlp", "total_steps": T, "seed": 2, "model": {"hidden": 16},
           "data": {"batch_size": B, "eval_samples": 0}, "clan": {"population_size": P, "round_length": 12}}
    return out if schedule is None else {**out, "schedule": schedule}


def readme_clan(cfg: RunConfig):
    """The README loop's clan and data for ``cfg``: the task's model and split, the config's settings."""
    task = get_task(cfg.task)
    torch.manual_seed(cfg.seed)  # as the machine: the same initial weights
    data = task.load(cfg.data, cfg.seed)
    model = task.build_model(task.model_settings(cfg.model), cfg.data)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay)
    schedule = cfg.schedule.to_schedule() if cfg.schedule.phases else None
    clan = Clan(model, optimizer, population_size=P, round_length=cfg.clan.round_length, autobind=["adamw"],
                seed=cfg.seed, total_steps=cfg.total_steps, schedule=schedule)
    return clan, task, data


@pytest.mark.parametrize("schedule", [None, PHASED], ids=["default", "phased"])
def test_the_readme_loop_trains_the_machines_clan(schedule):
    machine = TrainingMachine(config(schedule), fused=False)
    results = machine.train()
    clan, task, data = readme_clan(RunConfig.from_dict(config(schedule)))
    x_val, y_val = data.val
    train_to_the_end(clan, task.loss, data.train, x_val, y_val, B)
    assert clan.done and clan.time_step == T
    assert torch.equal(clan.population.member_state()["params"], machine.clan.population.member_state()["params"])
    ours = [r for r in clan.history if r.get("kind") == "round"]
    assert [(r["winner"], r["genomes"]) for r in ours] == [(r["winner"], r["genomes"]) for r in results.rounds]
    for a, b in zip(ours, results.rounds, strict=True):
        assert a["val_losses"] == pytest.approx(b["val_losses"], rel=1e-5)  # summed in another order
    assert clan.kept.step == machine.clan.kept.step is not None
    for a, b in zip(clan.kept_model().parameters(), machine.clan.kept_model().parameters()):
        assert torch.equal(a, b)
    if schedule is not None:
        kinds = [r["kind"] for r in clan.history]
        assert kinds[0] == kinds[-1] == "cooperative" and "round" in kinds


def linear_clan(**settings):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    return Clan(model, torch.optim.AdamW(model.parameters(), lr=1e-2), population_size=P, autobind=["adamw"],
                **settings)


def finish(clan):
    member = clan.round()
    while not member.done:
        member.step()
    return member


def test_the_default_plan_searches_then_runs_rounds():
    clan = linear_clan(total_steps=100)
    assert [p.name for p in clan.settings.schedule] == ["search", "clan"]
    assert [(s.kind, s.start, s.end, s.search) for s in clan.plan][:2] == [("round", 0, 10, 30.0),
                                                                          ("round", 10, 50, None)]
    assert clan.phase == "competitive" and clan.round_length == 10 and clan.cooperative_steps == 0
    lrs = clan.genomes["lr"].tolist()
    assert lrs[0] == 1e-2 and min(lrs) == pytest.approx(1e-2 / 30) and max(lrs) == pytest.approx(1e-2 * 30)
    assert clan.genomes["weight_decay"].tolist() == [clan.incumbent["weight_decay"].item()] * P  # held
    finish(clan)
    record = clan.step(torch.tensor([1.0, 0.5, 2.0, 3.0]))
    assert record["search"] == 30.0 and record["winner"] == 1 and record["phase"] == "search"
    assert clan.incumbent["lr"].item() == lrs[1]
    assert (clan.round_length, clan.phase, clan.stretch.start) == (40, "cooperative", 10)


def test_a_cooperative_stretch_has_its_phases_genes_record_and_end():
    phases = [Phase("warm", 0.0, 0.3, clan={"competition": False}, optimizer={"lr_scale": 0.5}),
              Phase("clan", 0.3, 1.0, clan={"round_length": 7})]
    clan = linear_clan(total_steps=10, schedule=phases, lr_schedule="constant", warmup=0.0)
    member = clan.round()
    assert clan.phase == member.phase == "cooperative" and clan.cooperating
    assert member.get_gene("lr").tolist() == [5e-3] * P  # the incumbent's, times the phase's lr_scale
    assert clan.optimizer.hyper.lr.tolist() == [5e-3] * P
    for _ in range(3):
        assert not member.done
        member.step()
    assert member.done and clan.step_in_round == 0 and clan.global_step == 0 and clan.time_step == 3
    with pytest.raises(RuntimeError, match=r"member.step\(\): cooperative stretch 0 is done \(3 steps\)"):
        member.step()
    record = clan.step(torch.full((P,), 0.25))
    assert record == {"kind": "cooperative", "phase": "warm", "start_step": 0, "end_step": 3,
                      "hyper": {"lr": 5e-3, "weight_decay": 0.01, "betas/0": 0.9, "betas/1": 0.999, "eps": 1e-8},
                      "val_loss": 0.25}
    assert clan.kept.step == 3 and clan.kept.val == 0.25
    assert clan.round_index == 0 and clan.round_length == 7 and clan.optimizer.hyper.lr.tolist() == [1e-2] * P
    member = finish(clan)
    record = clan.step(torch.tensor([1.0, 0.5, 2.0, 3.0]))
    assert record["start_step"] == 3 and record["end_step"] == 10 and record["cooperative_steps"] == 5
    assert clan.done and clan.round_done and clan.kept.step == 3  # 0.5 > 0.25: the warm model stays kept
    with pytest.raises(RuntimeError, match=r"member.step\(\): the clan's schedule is done \(10 steps\)"):
        clan.round().step()
    with pytest.raises(RuntimeError, match=r"clan.step\(\): the clan's schedule is done \(10 steps\)"):
        clan.step(torch.zeros(P))


def test_a_clan_with_a_plan_refuses_what_would_leave_it():
    clan = linear_clan(total_steps=50)
    with pytest.raises(RuntimeError, match=r"Clan.reconfigure: this clan follows the plan of its schedule over "
                                           r"total_steps=50; give the phases their round settings instead"):
        clan.reconfigure(round_length=5)
    with pytest.raises(RuntimeError, match=r"Clan.cooperate: this clan follows the plan of its schedule over "
                                           r"total_steps=50; give it a phase with clan.competition = False instead"):
        with clan.cooperate():
            pass


@pytest.mark.parametrize("settings, error, message", [
    ({"schedule": [{"name": "a", "start_t": 0, "end_t": 1}]}, ValueError,
     r"Clan: schedule=\[.*\] needs total_steps \(the horizon it spans\)"),
    ({"lr_schedule": "cosine"}, ValueError, r"Clan: lr_schedule='cosine' needs total_steps"),
    ({"warmup": 0.1}, ValueError, r"Clan: warmup=0.1 needs total_steps"),
    ({"total_steps": 0}, ValueError, r"Clan: total_steps must be a positive int, got 0"),
    ({"total_steps": 10, "schedule": "warm"}, TypeError,
     r"Clan: schedule must be a PhaseSchedule or a list of phases, got str"),
    ({"total_steps": 10, "lr_schedule": "linear"}, ValueError,
     r"Clan: lr_schedule must be one of \['constant', 'cosine', 'wsd'\], got 'linear'"),
    ({"total_steps": 10, "warmup": 0.7}, ValueError, r"Clan: warmup must be a number in \[0, 0.5\], got 0.7"),
    ({"competitive_lr": "half"}, ValueError, r"Clan: competitive_lr must be 'same' or 'sqrt', got 'half'"),
    ({"keep_best": 1}, ValueError, r"Clan: keep_best must be True or False, got 1"),
    ({"total_steps": 10, "selection": None, "duty_cycle": 1.0,
      "schedule": [{"name": "w", "start_t": 0, "end_t": 1, "clan": {"competition": False}}]}, ValueError,
     r"schedule\[0\] \('w'\): clan.competition = false needs clan.selection = 'winner'"),
])
def test_the_horizon_settings_are_refused_by_name(settings, error, message):
    with pytest.raises(error, match=message):
        linear_clan(**settings)


def test_the_settings_resolve_their_defaults_by_the_horizon():
    with_horizon, without = ClanSettings(total_steps=100), ClanSettings()
    assert (with_horizon.lr_schedule, with_horizon.warmup, with_horizon.shapes_lr) == ("cosine", 0.05, True)
    assert (without.lr_schedule, without.warmup, without.schedule) == ("constant", 0.0, None)
    assert without.shapes_lr and without.competitive_share == 8 ** -0.5  # the share alone shapes a step's lr
    assert not ClanSettings(competitive_lr="same").shapes_lr
    assert ClanSettings(selection=None, duty_cycle=1.0).competitive_share == 1.0  # a sweep's lr is the genome's
    assert with_horizon.schedule == default_schedule("winner")


def test_every_update_applies_the_gene_times_the_shape_times_the_share(monkeypatch):
    seen = []
    apply_ = BatchedAdamW.apply_

    def spy(self, grads, *args, **kwargs):
        seen.append((self.hyper.lr * self.lr_factor).tolist())
        return apply_(self, grads, *args, **kwargs)

    monkeypatch.setattr(BatchedAdamW, "apply_", spy)
    clan = linear_clan(total_steps=30, schedule=PHASED, round_length=5, duty_cycle=0.4)
    x, y = torch.randn(P, B, 3), torch.randint(0, 2, (P, B))
    member, expected = clan.round(), []
    while not clan.done:
        genes, cooperating = member.get_gene("lr").tolist(), clan.cooperating
        shape = lr_shape_at(clan.time_step, 30, "cosine", 0.05)
        expected.append([g * shape * (1.0 if cooperating else P ** -0.5) for g in genes])
        train_step(member, F.cross_entropy, x, y)
        if member.done:
            clan.step(torch.rand(P))
            member = clan.round()
    assert len(seen) == 30
    for step, (got, want) in enumerate(zip(seen, expected)):
        assert got == pytest.approx(want[:len(got)], rel=1e-12), step  # while cooperating: member 0's row alone


@pytest.mark.parametrize("stop_at", [3, 7, 14, 26])  # in the warmup, a round's cooperative and competitive steps, the anneal
def test_a_state_saved_anywhere_in_the_plan_resumes_bitwise(stop_at):
    x, y = torch.randn(P, B, 3, generator=torch.Generator().manual_seed(1)), torch.randint(0, 2, (P, B))

    def run(clan, steps, member=None):
        member = member or clan.round()
        for _ in range(steps):
            train_step(member, F.cross_entropy, x, y)
            if member.done:
                clan.step(validation_losses(member, F.cross_entropy, x[0], y[0]))
                member = clan.round()
        return member

    settings = dict(total_steps=30, schedule=PHASED, round_length=5, duty_cycle=0.4)
    full = linear_clan(**settings)
    run(full, 30)
    first = linear_clan(**settings)
    run(first, stop_at)
    state = first.state_dict()
    resumed = linear_clan(**settings)
    resumed.load_state_dict(state)
    run(resumed, 30 - stop_at)
    same = torch.equal(resumed.member_state()["params"], full.member_state()["params"])  # rows brought up to date
    assert same and resumed.history == full.history
    assert resumed.done and resumed.kept.step == full.kept.step


def test_a_state_of_the_previous_format_loads_into_a_clan_of_its_settings():
    old = linear_clan(competitive_lr="same", keep_best=False)
    finish(old)
    old.step(torch.tensor([1.0, 0.5, 2.0, 3.0]))
    state = old.state_dict()
    state["format_version"] = 1  # a clan of the previous release: none of these entries
    for key in ("time_step", "stretch", "record_start", "kept"):
        del state[key]
    for key in ClanSettings.STATE_KEYS:
        del state["config"][key]
    with pytest.raises(ValueError, match=r"Clan.load_state_dict: the checkpoint's competitive_lr is 'same', "
                                         r"this clan's is 'sqrt'"):
        linear_clan().load_state_dict(state)
    again = linear_clan(competitive_lr="same", keep_best=False)
    again.load_state_dict(state)
    assert torch.equal(again.population.flat, old.population.flat) and again.time_step == old.global_step
    assert math.isinf(again.kept.val)


def test_a_genome_set_at_a_stretch_start_survives_a_save_and_load():
    clan = linear_clan(total_steps=100)  # the search round stands at its start
    clan.set_genome("lr", [1e-3, 2e-3, 3e-3, 4e-3])
    again = linear_clan(total_steps=100)
    again.load_state_dict(clan.state_dict())
    assert again.genomes["lr"].tolist() == [1e-3, 2e-3, 3e-3, 4e-3]


def test_restore_is_refused_in_the_middle_of_a_round_and_after_the_plan():
    clan = linear_clan(total_steps=20, schedule=[{"name": "clan", "start_t": 0.0, "end_t": 1.0}], round_length=10)
    clan.round().step()
    with pytest.raises(RuntimeError, match=r"Clan.restore: only at a round's end or inside a cooperative stretch"):
        clan.restore()
    member = finish(clan)
    clan.step(torch.rand(P))
    finish(clan)
    clan.step(torch.rand(P))
    assert clan.done
    with pytest.raises(RuntimeError, match=r"Clan.restore: only at a round's end"):
        clan.restore()
    assert member is not None


def test_a_horizon_without_an_lr_gene_plans_rounds_and_refuses_a_search():
    genes = {"dropout": {"low": 0.0, "high": 0.5, "init": 0.1, "scale": "linear"}}
    clan = Clan(genome_config=genes, population_size=P, total_steps=40)
    assert [p.name for p in clan.settings.schedule] == ["clan"] and clan.plan[0].search is None
    with pytest.raises(ValueError, match=r"Clan: phase 'look' is a search \(clan.search\), which spreads the lr gene"):
        Clan(genome_config=genes, population_size=P, total_steps=40,
             schedule=[Phase("look", 0.0, 0.5, clan={"search": 10.0}), Phase("clan", 0.5, 1.0)])


def test_a_clan_refuses_the_machines_data_and_model_planes():
    with pytest.raises(ValueError, match=r"Clan: schedule\[0\] \('a'\): model settings \['freeze'\] are the training "
                                         r"machine's"):
        linear_clan(total_steps=10, schedule=[Phase("a", 0.0, 1.0, model={"freeze": ["weight"]})])
    with pytest.raises(ValueError, match=r"schedule\[0\] \('a'\): data settings \['batch_size'\]"):
        linear_clan(total_steps=10, schedule=[Phase("a", 0.0, 1.0, data={"batch_size": 4})])


def test_the_lr_factor_and_the_phase_ahead_inside_cooperate():
    clan = linear_clan(round_length=4, duty_cycle=0.5)  # no horizon: the share alone
    assert clan.lr_factor == 1.0 and clan.phase_ahead(2) == "competitive"
    with clan.cooperate():
        assert clan.lr_factor == 1.0 and clan.phase_ahead(2) == "cooperative" and clan.cooperating_ahead(2)
    finish(clan)
    assert clan.lr_factor == P ** -0.5  # a done round stays in its competitive phase until selection


def test_inside_cooperate_the_genome_in_force_is_the_incumbents_the_one_model_trains_with():
    model = nn.Linear(3, 2)
    clan = Clan(model, torch.optim.AdamW(model.parameters(), lr=1e-2), population_size=4, autobind=["adamw"],
                round_length=4, duty_cycle=1.0)
    finish(clan)
    clan.step(torch.tensor([1.0, 2.0, 3.0, 0.5]))
    member = clan.round()
    assert len(set(member.genome["lr"].tolist())) > 1  # the winner's offspring differ
    with clan.cooperate():
        assert member.genome["lr"].tolist() == [clan.incumbent["lr"].item()] * 4
    assert len(set(member.genome["lr"].tolist())) > 1


def test_freezing_checks_its_indices_and_outlives_a_growth():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    clan = Clan(model, torch.optim.AdamW(model.parameters()), population_size=P, round_length=4, duty_cycle=0.5)
    with pytest.raises(ValueError, match=r"BatchedAdamW.freeze: parameter indices must be ints in \[0, 2\), got 5"):
        clan.optimizer.freeze([5])
    clan.optimizer.freeze([1])  # the bias
    clan.grow(lambda m: nn.Sequential(*m, nn.Linear(2, 2)))
    names = list(clan.population.columns)
    assert [names[k] for k in clan.optimizer.frozen] == ["0.bias"]
    with pytest.raises(ValueError, match=r"PopulationModel: the member state already has 'optimizer'"):
        BatchedAdamW(clan.population, clan.optimizer.hyper)


def test_a_state_loads_only_into_a_clan_that_clips_and_steps_as_it_did():
    """Gradient clipping and the optimizer values no gene holds change every update: a state
    carries them, and a clan of other values refuses it by name (a state saved before it carried
    them cannot say, and loads as it did then)."""
    saved = linear_clan().state_dict()
    with pytest.raises(ValueError, match=r"Clan.load_state_dict: the checkpoint's max_grad_norm is None, "
                                         r"this clan's is 0.001"):
        linear_clan(max_grad_norm=1e-3).load_state_dict(saved)
    torch.manual_seed(0)
    genes = {"mix": {"init": 0.5, "low": 0.1, "high": 1.0}}

    def genome_clan(lr):
        model = nn.Linear(3, 2)
        return Clan(model, torch.optim.AdamW(model.parameters(), lr=lr), population_size=P, genome_config=genes)

    state = genome_clan(1e-3).state_dict()
    with pytest.raises(ValueError, match=r"Clan.load_state_dict: the checkpoint's optimizer lr \(no gene holds it\) "
                                         r"is 0.001, this clan's is 0.5"):
        genome_clan(0.5).load_state_dict(state)
    genome_clan(1e-3).load_state_dict(state)
    old = {**state, "config": {k: v for k, v in state["config"].items() if k not in ("max_grad_norm", "adamw")}}
    genome_clan(0.5).load_state_dict(old)  # saved before the state carried them


def test_a_loader_warns_when_the_data_would_get_another_default_plan():
    def clan(**kw):
        model = nn.Linear(4, 2)
        return Clan(model, torch.optim.AdamW(model.parameters(), lr=1e-2), population_size=4,
                    **{"autobind": ["adamw"], **kw})

    data = (torch.randn(100, 4), torch.randint(0, 2, (100,)))
    # 4 x 8 = 32 of 100 samples a cooperative step: scarce data, whose default plan competes.
    # The check comes with the first batch (a loader made before load_state_dict serves a resume).
    loader = clan(total_steps=100).loader(data, 8)
    with pytest.warns(UserWarning, match=r"clan.loader: for 100 training samples at batch_size=8 \(one cooperative "
                      r"batch is 0.32 of them\), the default plan is \['search', 'compete'\], but this clan .* follows "
                      r"\['search', 'clan'\]; build it with schedule=vmapclan.default_schedule\('winner', 32.0, 0.32\)"):
        next(iter(loader))
    assert ClanSettings(population_size=4, total_steps=100).data_plan(100, 8) == default_schedule("winner", 32, 0.32)
    # Each sample read at most once: the plan's one data-parallel model.
    with pytest.warns(UserWarning, match=r"the default plan is \['search', 'train'\]"):
        next(iter(clan(total_steps=3).loader(data, 8)))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="clan.loader")
        next(iter(loader))  # once per loader
        # No warning where the data gets the plan the clan follows, with a schedule given (even
        # the default itself), for a clan that only competes anyway, or without a horizon.
        next(iter(clan(total_steps=100).loader(data, 4)))  # 16 of 100: rounds
        for schedule in (default_schedule("winner", 32, 0.32), default_schedule("winner"), [Phase("only", 0.0, 1.0)]):
            next(iter(clan(total_steps=100, schedule=schedule).loader(data, 8)))
        next(iter(clan(total_steps=100, duty_cycle=1.0).loader(data, 8)))
        next(iter(clan().loader(data, 8)))
        # A resumed clan keeps the plan of its checkpoint: no advice to change it.
        trained = clan(total_steps=100)
        trained.advance()
        resumed = clan(total_steps=100)
        later = resumed.loader(data, 8)
        resumed.load_state_dict(trained.state_dict())
        next(iter(later))
    assert ClanSettings(population_size=4, total_steps=100, selection="truncation", duty_cycle=1.0).data_plan(100, 8) is None
    assert clan(total_steps=100, autobind=[]).settings.data_plan(100, 8) is None  # no lr gene: no search to plan
    with pytest.raises(ValueError, match="ClanSettings.data_plan: train_samples must be a positive int, got 0"):
        ClanSettings(population_size=4, total_steps=100).data_plan(0, 8)


def test_a_decay_that_the_lr_shape_does_not_read_gives_a_warning():
    model = nn.Linear(3, 2)
    with pytest.warns(UserWarning, match=r"Clan: decay=0.3 is the share of the 'wsd' shape's final decay; "
                                         r"lr_schedule='cosine' does not read it"):
        Clan(model, torch.optim.AdamW(model.parameters()), population_size=2, total_steps=100, lr_schedule="cosine",
             decay=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Clan(model, torch.optim.AdamW(model.parameters()), population_size=2, total_steps=100, lr_schedule="wsd",
             decay=0.3)
        Clan(model, torch.optim.AdamW(model.parameters()), population_size=2, total_steps=100, decay=0.2)


def test_a_grown_population_resolves_an_auto_update_for_its_new_size_and_keeps_an_explicit_one():
    model = nn.Sequential(nn.Linear(8, 8))  # 72 values a member: the batched update
    clan = Clan(model, torch.optim.AdamW(model.parameters()), population_size=4, round_length=4, duty_cycle=0.5)
    assert clan.optimizer.update == "batched"
    clan.grow(lambda m: nn.Sequential(*m, nn.Linear(8, 1024), nn.Linear(1024, 8)))  # 17k values: the per-member kernel
    assert clan.optimizer.update == "per-member" and clan.optimizer.requested_update == "auto"
    clan.optimizer.update = "batched"
    clan.grow(lambda m: nn.Sequential(*m, nn.Linear(8, 8)))
    assert clan.optimizer.update == "batched"
