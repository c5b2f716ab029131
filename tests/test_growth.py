"""Growing the model at a phase boundary: the population rebuilt with every member's state, resume and replay."""

import copy
import math

import pytest
import torch
from torch import nn

from vmapclan import Clan, FusedStep, TrainingMachine, replay
from vmapclan.resume import load_run_checkpoint
from vmapclan.population import check_growth
from vmapclan.tasks import CharTransformer, StdlibCharsTask

from runs import assert_resumes_exactly, same_model

GROW = [{"name": "warmup", "start_t": 0.0, "end_t": 0.25, "clan": {"competition": False}},
        {"name": "small", "start_t": 0.25, "end_t": 0.5},
        {"name": "big", "start_t": 0.5, "end_t": 1.0, "model": {"grow": {"blocks": 1}}}]


def chars_config(schedule=GROW, **changes) -> dict:
    return {"task": "stdlib-chars", "total_steps": 24, "seed": 2, "checkpoint_every": 1,
            "model": {"d_model": 16, "n_layers": 1, "n_heads": 2},
            "data": {"batch_size": 4, "seq_len": 8, "max_chars": 6000, "eval_samples": 8},
            "clan": {"population_size": 3, "round_length": 6, "duty_cycle": 0.5}, "schedule": schedule, **changes}


def outputs(population, x):
    with torch.no_grad():
        return population.eval()(population.share(x))


def watch_growth(machine, x, seen):
    """Record every member's output on ``x`` just before and just after each growth."""
    grow_to = machine.grow_to

    def watched(count):
        if machine.growths < count:
            before = outputs(machine.clan.population, x)
            grow_to(count)
            seen.append((before, outputs(machine.clan.population, x), machine.clan.population.member_module(0)))
            machine.clan.population.train()
        else:
            grow_to(count)

    machine.grow_to = watched


@pytest.mark.parametrize("clan", [{"population_size": 3, "round_length": 6, "duty_cycle": 0.5},
                                  {"population_size": 3, "round_length": 6, "duty_cycle": 1.0, "selection": "none"}])
def test_growth_keeps_every_members_function_at_the_boundary(clan):
    schedule = GROW
    if clan.get("selection") == "none":  # a sweep: the members differ, each keeps its own function
        schedule = [{**GROW[1], "start_t": 0.0}, GROW[2]]
    machine = TrainingMachine(chars_config(schedule, clan=clan))
    x = torch.randint(0, 128, (5, 8), generator=torch.Generator().manual_seed(0))
    seen = []
    watch_growth(machine, x, seen)
    results = machine.train()
    (before, after, grown), = seen
    assert len(grown.blocks) == 2 and torch.equal(before, after)
    if clan.get("selection") == "none":
        assert not torch.equal(before[0], before[1])  # member by member, not one function
    assert len(results.best_model.blocks) == 2
    assert [r.get("grow") for r in results.history].count({"blocks": 1}) == 1


def test_a_grown_clan_keeps_each_members_weights_and_optimizer_state():
    torch.manual_seed(0)
    model = CharTransformer(128, 16, 1, 2, 8)
    clan = Clan(model, torch.optim.AdamW(model.parameters(), lr=1e-2), population_size=3, round_length=4,
                duty_cycle=1.0, selection=None, autobind=["adamw", "gradient_accumulation"], seed=0)
    clan.set_genome("num_grad_accum", [1, 2, 3])
    step = FusedStep(clan, StdlibCharsTask().loss)
    x = torch.randint(0, 128, (3, 2, 9), generator=torch.Generator().manual_seed(1))
    for _ in range(4):
        step(x[..., :-1], x[..., 1:])
    clan.step(torch.tensor([1.0, 2.0, 3.0]))
    for _ in range(4):  # the next round's steps, ending with micro-batches pending
        step(x[..., :-1], x[..., 1:])
    clan.step(torch.tensor([1.0, 2.0, 3.0]))
    old_columns, old = dict(clan.population.columns), copy.deepcopy(clan.member_state())
    probe = torch.randint(0, 128, (4, 8))
    before = outputs(clan.population, probe)
    clan.grow(lambda m: StdlibCharsTask().grow(m, {"blocks": 2}))
    new = clan.member_state()
    assert torch.equal(outputs(clan.population, probe), before)
    for name, columns in clan.population.columns.items():
        if name in old_columns:
            for key in ("params", "grads"):
                assert torch.equal(new[key][:, columns], old[key][:, old_columns[name]]), (key, name)
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(new["optimizer"][key][:, columns], old["optimizer"][key][:, old_columns[name]])
        else:
            assert name.startswith(("blocks.1.", "blocks.2.")), name
            for key in ("exp_avg", "exp_avg_sq"):
                assert not new["optimizer"][key][:, columns].any(), (key, name)  # fresh moments
    for key in ("step", "accum_count"):
        assert torch.equal(new["optimizer"][key], old["optimizer"][key])
    assert old["optimizer"]["accum_count"].any()  # the accumulation state really was carried
    with pytest.raises(RuntimeError, match=r"FusedStep: the clan's population was rebuilt \(Clan.grow\) after "
                                           r"this step was made; make a new FusedStep"):
        step(x[..., :-1], x[..., 1:])
    FusedStep(clan, StdlibCharsTask().loss)(x[..., :-1], x[..., 1:])  # a new one trains the grown members


@pytest.mark.parametrize("fused", [True, False])
def test_training_goes_on_after_the_growth_on_every_step_path(fused):
    machine = TrainingMachine(chars_config(), fused=fused)
    seen = []
    watch_growth(machine, torch.zeros(1, 8, dtype=torch.long), seen)
    results = machine.train()
    (_, _, grown), = seen
    start, trained = grown.blocks[1].state_dict(), results.best_model.blocks[1].state_dict()
    assert all(not torch.equal(trained[k], v) for k, v in start.items())  # every new tensor trained
    assert results.final["val_loss"] < math.log(128)  # below a uniform guess


def test_the_fused_step_and_the_member_loop_agree_across_the_growth():
    fused = TrainingMachine(chars_config(), fused=True).train()
    loop = TrainingMachine(chars_config(), fused=False).train()
    for name, tensor in fused.best_model.state_dict().items():
        torch.testing.assert_close(loop.best_model.state_dict()[name], tensor, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stop_at", [9, 15, 20])  # before the growth, in its first round, in its second
def test_resume_across_the_growth_is_exact(tmp_path, stop_at):
    assert_resumes_exactly(chars_config(), tmp_path, stop_at)


def test_resume_from_the_checkpoint_before_the_growth_is_exact(tmp_path):
    config = chars_config()
    full = TrainingMachine(config).train()

    class Crash(Exception):
        pass

    def crash(event):  # the last checkpoint is the one at the end of 'small', before the growth
        if event["event"] == "step" and event["step"] == 13:
            raise Crash

    with pytest.raises(Crash):
        TrainingMachine(config, out_dir=tmp_path, callback=crash).train()
    saved = load_run_checkpoint(tmp_path / "checkpoint.pt")
    assert saved["clan"]["time_step"] == 12 and len(saved["clan"]["model"]["shapes"]) == 18  # one block
    resumed = TrainingMachine.resume(tmp_path).train()
    assert repr(resumed.history) == repr(full.history) and same_model(resumed.best_model, full.best_model)


class CountedGrowth(StdlibCharsTask):
    """stdlib-chars, noting the step count at each growth."""

    def __init__(self):
        self.steps, self.grown_at = 0, []

    def grow(self, module, settings):
        self.grown_at.append(self.steps)
        return super().grow(module, settings)


def test_the_replay_grows_at_the_same_step():
    results = TrainingMachine(chars_config()).train()
    grows = [(p.name, p.start_t) for p in results.schedule if "grow" in p.model]
    assert grows == [("big/r1/coop", 0.5)]  # once, on the phase where the model grew
    task = CountedGrowth()
    out = replay(results.schedule, results.config, task=task,
                 callback=lambda step, name: setattr(task, "steps", step))
    assert task.grown_at == [12] and len(out.model.blocks) == 2
    out.model.load_state_dict(results.best_model.state_dict())  # the clan's best model has its architecture


def test_growth_in_a_cooperative_phase_and_a_freeze_of_the_new_block():
    schedule = [{"name": "small", "start_t": 0.0, "end_t": 0.5, "clan": {"competition": False}},
                {"name": "big", "start_t": 0.5, "end_t": 1.0, "clan": {"competition": False},
                 "model": {"grow": {"init": "copy"}, "freeze": ["blocks.0.*"]}}]
    machine = TrainingMachine(chars_config(schedule))
    seen = []
    watch_growth(machine, torch.zeros(1, 8, dtype=torch.long), seen)
    results = machine.train()
    (_, _, grown), = seen
    assert same_model(grown.blocks[1], grown.blocks[0])  # 'copy' starts the new block as the last one
    best = results.best_model
    assert same_model(best.blocks[0], grown.blocks[0])  # frozen while the copy trains
    assert not same_model(best.blocks[1], grown.blocks[1])
    assert results.history[1]["grow"] == {"init": "copy"} and results.history[1]["freeze"] == ["blocks.0.*"]
    out = replay(results.schedule, results.config, trace=True)
    assert [s["freeze"][:1] for s in out.trace][12:] == [["blocks.0.ln1.weight"]] * 12


@pytest.mark.parametrize("schedule, error, message", [
    ([{**GROW[0], "model": {"grow": {}}}, *GROW[1:]], ValueError,
     r"schedule\[0\] \('warmup'\): model.grow applies at a phase's start; the first phase trains the model the "
     r"task builds"),
    ([*GROW[:2], {**GROW[2], "model": {"grow": {"blocks": 0}}}], ValueError,
     r"schedule\[2\] \('big'\): model.grow.blocks must be a positive int, got 0"),
    ([*GROW[:2], {**GROW[2], "model": {"grow": {"init": "zero"}}}], ValueError,
     r"schedule\[2\] \('big'\): model.grow.init must be 'identity' or 'copy', got 'zero'"),
    ([*GROW[:2], {**GROW[2], "model": {"grow": {"depth": 1}}}], ValueError,
     r"schedule\[2\] \('big'\): model.grow: unknown setting 'depth'; it reads \['blocks', 'init'\]"),
    ([*GROW[:2], {**GROW[2], "model": {"grow": 2}}], TypeError,
     r"schedule\[2\] \('big'\): model.grow must be a table of \['blocks', 'init'\], got 2"),
    ([*GROW[:2], {**GROW[2], "model": {"grow": {}, "freeze": ["blocks.2.*"]}}], ValueError,
     r"schedule\[2\] \('big'\): model.freeze pattern 'blocks.2.\*' matches no parameter"),
    ([{**GROW[0], "model": {"freeze": ["blocks.1.*"]}}, *GROW[1:]], ValueError,
     r"schedule\[0\] \('warmup'\): model.freeze pattern 'blocks.1.\*' matches no parameter"),
    ([*GROW[:2], {**GROW[2], "start_t": 0.5, "end_t": 0.51}, {"name": "rest", "start_t": 0.51, "end_t": 1.0}],
     ValueError, r"schedule\[2\] \('big'\): model.grow needs a phase that runs at least one step; it has none in "
                 r"24 steps"),
])
def test_bad_growth_settings_are_refused_before_training(schedule, error, message):
    with pytest.raises(error, match=message):
        TrainingMachine(chars_config(schedule)).prepare()


def test_a_task_that_does_not_grow_and_a_growth_that_breaks_the_model_are_refused():
    digits = {"task": "digits-mlp", "model": {"hidden": 8}, "total_steps": 10,
              "schedule": [{"name": "a", "start_t": 0.0, "end_t": 0.5},
                           {"name": "b", "start_t": 0.5, "end_t": 1.0, "model": {"grow": {}}}]}
    with pytest.raises(ValueError, match=r"schedule\[1\] \('b'\): model.grow: task 'digits-mlp' does not grow its "
                                         r"model \(it defines no Task.grow\)"):
        TrainingMachine(digits).prepare()
    base = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    for grown, message in [
        (nn.Sequential(nn.Linear(2, 3)), r"g: the grown model has no '1.weight'; growth may add parameters, not "
                                         r"remove them"),
        (nn.Sequential(nn.Linear(2, 4), nn.Linear(3, 1)),
         r"g: the grown model changed '0.weight' from trainable torch.float32 \[3, 2\] to trainable torch.float32 "
         r"\[4, 2\]; growth may add parameters, not reshape them"),
        (copy.deepcopy(base), r"g: the grown model has no new parameter or buffer"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_growth(base, grown, "g")
    with pytest.raises(TypeError, match=r"g: expected the grown nn.Module, got NoneType"):
        check_growth(base, None, "g")
    clan = Clan(base, torch.optim.AdamW(base.parameters()), population_size=2, round_length=2, duty_cycle=0.5)
    with pytest.raises(ValueError, match=r"Clan.grow: the grown model has no new parameter or buffer"):
        clan.grow(lambda m: m)
    clan.advance()
    with pytest.raises(RuntimeError, match=r"Clan.grow: only between rounds; round 0 is at step 1"):
        clan.grow(lambda m: nn.Sequential(*m, nn.Linear(1, 1)))
    with pytest.raises(ValueError, match=r"Clan.grow: this clan has no model \(a genome-only clan\)"):
        Clan(population_size=2, round_length=2, duty_cycle=0.5).grow(lambda m: m)
