"""The training machine end to end on tiny configs, schedule export, and replay on one model."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vmapclan import (Clan, PhaseSchedule, RunConfig, TrainingMachine, default_schedule, export_schedule,
                      load_run_checkpoint, member_loss, read_schedule, replay, save_run_checkpoint)
from vmapclan.checkpoint import save_checkpoint
from vmapclan.rounds import plan_rounds
from vmapclan.tasks import get_task, stdlib_corpus, stdlib_files


def tiny(**changes) -> RunConfig:
    base = RunConfig.from_dict({
        "task": "digits-mlp", "total_steps": 120, "seed": 0,
        "model": {"hidden": 32}, "data": {"batch_size": 16, "eval_samples": 128},
        # The lr as the genes and phases give it (the tests read it off the optimizer's hyperparameters).
        "optimizer": {"lr_schedule": "constant", "warmup": 0.0},
        "clan": {"population_size": 4, "round_length": 20, "duty_cycle": 0.25, "competitive_lr": "same"},
        "schedule": [
            {"name": "warmup", "start_t": 0.0, "end_t": 0.2, "clan": {"competition": False}},
            {"name": "clan", "start_t": 0.2, "end_t": 0.9},
            {"name": "anneal", "start_t": 0.9, "end_t": 1.0, "optimizer": {"lr_scale": 0.5},
             "clan": {"competition": False}},
        ],
    })
    return base.replace(**changes)


@pytest.fixture(scope="module")
def three_phase_run():
    torch.set_num_threads(1)
    events = []
    results = TrainingMachine(tiny(), callback=events.append).train()
    return results, events


def test_plan_rounds():
    assert plan_rounds(100, 30, 0.25) == ([30, 30, 40], 0)
    assert plan_rounds(60, 30, 0.25) == ([30, 30], 0)
    assert plan_rounds(10, 30, 0.25) == ([10], 0)
    assert plan_rounds(1, 30, 0.25) == ([], 1)        # no room for a cooperative step
    assert plan_rounds(1, 30, 1.0) == ([1], 0)


def test_phases_run_in_order_and_cover_the_run(three_phase_run):
    results, _ = three_phase_run
    history = results.history
    assert [r["phase"] for r in history] == ["warmup"] + ["clan"] * 4 + ["anneal"]
    assert [r["kind"] for r in history] == ["cooperative"] + ["round"] * 4 + ["cooperative"]
    assert history[0]["start_step"] == 0 and history[-1]["end_step"] == 120
    for a, b in zip(history, history[1:]):
        assert a["end_step"] == b["start_step"]
    # clan phase: steps 24..108, four rounds of 20, the last absorbing the remainder
    assert [r["end_step"] - r["start_step"] for r in history[1:5]] == [20, 20, 20, 24]
    assert [r["cooperative_steps"] for r in history[1:5]] == [15, 15, 15, 18]
    assert [r["round"] for r in results.rounds] == [0, 1, 2, 3]
    assert history[0]["batch_size"] == 16 * 4  # cooperative: P shards of the per-member batch


def test_anneal_scales_the_incumbent_lr(three_phase_run):
    results, _ = three_phase_run
    last_round, anneal = results.history[-2], results.history[-1]
    assert anneal["hyper"]["lr"] == pytest.approx(0.5 * last_round["incumbent"]["lr"])
    assert anneal["hyper"]["weight_decay"] == pytest.approx(last_round["incumbent"]["weight_decay"])
    assert results.history[0]["hyper"]["lr"] == pytest.approx(1e-3)  # the warmup runs at the config's lr


def test_learns_and_reports(three_phase_run):
    results, events = three_phase_run
    assert results.final["val_accuracy"] > 0.5  # chance is 0.1
    assert isinstance(results.best_model, nn.Module)
    task = get_task("digits-mlp")
    data = task.load(results.config.data, results.config.seed)
    again = task.evaluate(results.best_model, *data.val)
    assert again["loss"] == pytest.approx(results.final["val_loss"], rel=1e-5)
    # winner selection ends with every member a copy of the best one
    assert max(results.final["member_val_losses"]) == pytest.approx(min(results.final["member_val_losses"]), rel=1e-5)
    train = [m for m in results.metrics if m["event"] == "train"]
    assert train[-1]["step"] == 120 and train[-1]["loss"] < train[0]["loss"]
    steps = [e["step"] for e in events if e["event"] == "step"]
    assert steps == list(range(1, 121))
    assert {e["phase"] for e in events if e["event"] == "step"} == {"warmup", "clan", "anneal"}
    table = results.rounds_table()
    assert "anneal" in table and "final: val loss" in table and len(table.splitlines()) == 2 + 6 + 2
    assert table.splitlines()[-1].startswith("time: ") and "train" in table.splitlines()[-1]


def test_cooperative_phase_keeps_members_identical_with_its_overrides():
    config = tiny(total_steps=12, schedule=[
        {"name": "coop", "start_t": 0, "end_t": 1, "clan": {"competition": False},
         "optimizer": {"lr": 3e-3, "weight_decay": 0.0}, "data": {"batch_size": 8}}])
    seen = []
    machine = TrainingMachine(config)
    machine.callback = lambda e: seen.append(machine.clan.optimizer.hyper.lr.clone()) if e["event"] == "step" else None
    results = machine.train()
    assert all(torch.all(lr == 3e-3) for lr in seen) and len(seen) == 12
    flat = machine.clan.population.flat
    assert torch.equal(flat, flat[:1].expand_as(flat))
    # The record's val_loss, computed another way: the plain model on the per-round evaluation data.
    evaluated = machine.task.evaluate(machine.clan.best_model(), *machine.data.eval)["loss"]
    # The phase's overrides on the config's AdamW (betas and eps at their defaults), and 4 x 8 samples a step.
    assert results.history == [{"kind": "cooperative", "phase": "coop", "start_step": 0, "end_step": 12,
                                "hyper": {"lr": 3e-3, "weight_decay": 0.0, "betas/0": 0.9, "betas/1": 0.999,
                                          "eps": 1e-8},
                                "batch_size": 32, "val_loss": pytest.approx(evaluated, rel=1e-6)}]
    assert machine.clan.round_index == 0  # cooperative steps are outside the round clock
    # afterwards the optimizer holds the clan's own genes again
    assert torch.all(machine.clan.optimizer.hyper.lr == 1e-3)


def test_a_cooperative_phase_after_an_all_competitive_one_takes_p_shards_a_step():
    """After a phase of rounds that only compete (``duty_cycle = 1``), a cooperative phase's step is
    one data-parallel batch of P x B samples (P disjoint shards), not one window of B copied to
    every member: the loader advances by P x B (it once advanced by B, training at batch B)."""
    config = tiny(total_steps=12, schedule=[
        {"name": "pbt", "start_t": 0, "end_t": 0.5, "clan": {"duty_cycle": 1.0, "round_length": 6}},
        {"name": "anneal", "start_t": 0.5, "end_t": 1, "clan": {"competition": False}}])
    positions = []
    machine = TrainingMachine(config)
    machine.callback = lambda e: positions.append(machine.clan.loader_state.position) if e["event"] == "step" else None
    machine.train()
    steps = [b - a for a, b in zip([0] + positions, positions)]
    assert steps == [16] * 6 + [4 * 16] * 6


def test_sweep_holds_a_fixed_lr_grid():
    grid = [3e-4, 1e-3, 3e-3, 1e-2]
    config = tiny(total_steps=60, clan={"selection": "none", "duty_cycle": 1.0, "lr_grid": grid},
                  schedule=[{"name": "sweep", "start_t": 0, "end_t": 1}])
    results = TrainingMachine(config).train()
    for record in results.rounds:
        assert record["genomes"]["lr"] == pytest.approx(grid)
        assert len(set(record["genomes"]["weight_decay"])) == 1  # only lr varies
    losses = results.final["member_val_losses"]
    assert results.final["best_member"] == min(range(4), key=losses.__getitem__)
    assert results.final["val_loss"] == pytest.approx(min(losses), rel=1e-5)
    assert all(p.optimizer["lr"] == pytest.approx(grid[results.final["best_member"]]) for p in results.schedule)


def test_export_follows_the_winning_lineage(three_phase_run):
    results, _ = three_phase_run
    schedule = results.schedule
    total = results.total_steps
    for record in results.rounds:
        coop_end = record["start_step"] + record["cooperative_steps"]
        for step in range(record["start_step"], record["end_step"]):
            phase = schedule.phase_at_step(step, total)
            lineage = 0 if step < coop_end else record["winner"]
            assert phase.optimizer["lr"] == record["genomes"]["lr"][lineage]
            assert phase.optimizer["betas/1"] == record["genomes"]["betas/1"][lineage]
            assert phase.data["batch_size"] == (16 * 4 if step < coop_end else 16)
            assert not phase.competition
    for record in (results.history[0], results.history[-1]):
        for step in range(record["start_step"], record["end_step"]):
            assert schedule.phase_at_step(step, total).optimizer == record["hyper"]


def test_export_from_a_plain_clan_history():
    history = [{"round": 0, "step": 10, "genomes": {g: [1e-3, 2e-3] if g == "lr" else [0.5, 0.5]
                                                    for g in ("lr", "weight_decay", "betas/0", "betas/1", "eps")},
                "winner": 1, "val_losses": [1.0, 0.5]}]
    schedule = export_schedule(history, 10, duty_cycle=0.2, batch_size=4, population_size=2)
    assert [(p.name, p.start_t, p.end_t, p.optimizer["lr"], p.data["batch_size"]) for p in schedule] == [
        ("clan/r0/coop", 0.0, 0.8, 1e-3, 8), ("clan/r0/compete", 0.8, 1.0, 2e-3, 4)]
    with pytest.raises(ValueError, match="export_schedule: the history has no 'cooperative_steps'; pass duty_cycle"):
        export_schedule(history, 10)
    for sizes in ({}, {"batch_size": 4}, {"population_size": 2}):
        with pytest.raises(ValueError, match="export_schedule: the history has no 'batch_size'/'population_size'; "
                                             "pass them"):
            export_schedule(history, 10, duty_cycle=0.2, **sizes)
    with pytest.raises(ValueError, match=r"export_schedule: the history covers steps \[0, 10\), but total_steps is 12"):
        export_schedule(history, 12, duty_cycle=0.2, batch_size=4, population_size=2)
    with pytest.raises(ValueError, match="export_schedule: the history is empty"):
        export_schedule([], 10)
    gap = [dict(history[0], start_step=2)]
    with pytest.raises(ValueError, match="export_schedule: the history has a gap or overlap at step 0"):
        export_schedule(gap, 10, duty_cycle=0.2, batch_size=4, population_size=2)
    for member in (2, -1, 1.5, "a"):
        with pytest.raises(ValueError, match=r"export_schedule: member must be an int in \[0, 2\), got "):
            export_schedule(history, 10, member=member, duty_cycle=0.2, batch_size=4, population_size=2)
    with pytest.raises(ValueError, match=r"export_schedule: population_size=3, but the history's rounds hold genomes "
                                         r"of \[2\] members"):
        export_schedule(history, 10, duty_cycle=0.2, batch_size=4, population_size=3)
    with pytest.raises(ValueError, match=r"export_schedule: duty_cycle must be a number in \(0, 1\], got 2.0"):
        export_schedule(history, 10, duty_cycle=2.0, batch_size=4, population_size=2)
    for not_history in ("history.json", history[0], 3):
        with pytest.raises(TypeError, match="export_schedule: history must be a list of history records"):
            export_schedule(not_history, 10)
    no_genes = [dict(history[0], genomes={"lr": [1e-3, 1e-3]})]
    with pytest.raises(ValueError, match="round 0 has no gene 'weight_decay'; the clan needs autobind"):
        export_schedule(no_genes, 10, duty_cycle=0.2, batch_size=4, population_size=2)


def test_replay_refuses_arguments_of_the_wrong_kind_by_name(three_phase_run):
    results, config = three_phase_run[0], tiny()
    with pytest.raises(TypeError, match="replay: schedule must be a PhaseSchedule .*, got list"):
        replay([1, 2], config)
    with pytest.raises(TypeError, match=r"replay: config must be a RunConfig or a dict of its tables .*, got str"):
        replay(results.schedule, "config.toml")
    with pytest.raises(TypeError, match="replay: callback must be callable, got int"):
        replay(results.schedule, config, callback=3)


def test_replay_follows_the_schedule_exactly(three_phase_run, tmp_path):
    results, _ = three_phase_run
    results.save(tmp_path, plots=False)
    schedule, config, clan = read_schedule(tmp_path / "schedule.json")
    assert schedule == results.schedule and config.total_steps == 120
    assert clan["val_loss"] == pytest.approx(results.final["val_loss"])
    out = replay(schedule, config, trace=True)
    assert len(out.trace) == len(out.losses) == 120
    for entry in out.trace:
        phase = schedule.phase_at_step(entry["step"], 120)
        assert entry["phase"] == phase.name
        assert entry["lr"] == phase.optimizer["lr"] and entry["eps"] == phase.optimizer["eps"]
        assert entry["betas"] == (phase.optimizer["betas/0"], phase.optimizer["betas/1"])
        assert entry["weight_decay"] == phase.optimizer["weight_decay"]
        assert entry["batch_size"] == phase.data["batch_size"]
    assert math.isfinite(out.final["val_loss"]) and out.final["val_accuracy"] > 0.5
    assert isinstance(out.model, nn.Module)


def test_replay_starts_from_the_clan_initial_weights():
    config = tiny(total_steps=1)
    schedule = PhaseSchedule.single("zero", optimizer={"lr": 1e-12, "weight_decay": 0.0},
                                    clan={"competition": False})
    out = replay(schedule, config)
    torch.manual_seed(config.seed)
    initial = get_task("digits-mlp").build_model(config.model, config.data)
    for a, b in zip(out.model.parameters(), initial.parameters()):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0)


def test_replay_errors(tmp_path):
    config = tiny(total_steps=2)
    schedule = PhaseSchedule.single("big", data={"batch_size": 100_000})
    with pytest.raises(ValueError, match=r"replay: phase 'big' asks for batch_size=100000, the training set has \d+"):
        replay(schedule, config)
    bad = tmp_path / "s.json"
    bad.write_text('{"phases": []}')
    with pytest.raises(ValueError, match="not a vmapclan schedule"):
        read_schedule(bad)
    bad.write_text("{")
    with pytest.raises(ValueError, match="s.json: not JSON"):
        read_schedule(bad)


def test_checkpoints(tmp_path):
    config = tiny(total_steps=40, checkpoint_every=1, schedule=[{"name": "clan", "start_t": 0, "end_t": 1}])
    machine = TrainingMachine(config, out_dir=tmp_path)
    machine.train()
    state = load_run_checkpoint(tmp_path / "checkpoint.pt")
    assert state["clan"]["time_step"] == 40 and state["clan"]["config"]["total_steps"] == 40
    assert len(state["clan"]["history"]) == 2 and len(state["machine"]["history"]) == 2
    assert (tmp_path / "metrics.jsonl").read_text().count('"event": "round"') == 2
    save_run_checkpoint(tmp_path / "again.pt", machine.clan, {"note": 1})
    assert load_run_checkpoint(tmp_path / "again.pt")["machine"] == {"note": 1}
    save_checkpoint({"format_version": 99}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt has format version 99, expected 3"):
        load_run_checkpoint(tmp_path / "other.pt")
    torch.save({"format_version": 1}, tmp_path / "old.pt")  # what format 1 wrote: no header, no hash
    with pytest.raises(ValueError, match=r"old.pt is a bare torch.save file: checkpoint format 1 \(no content hash\), "
                                         r"or no checkpoint at all; this vmapclan reads format 2, which save_checkpoint "
                                         r"writes \(a format 1 run cannot resume: start a new run\)"):
        load_run_checkpoint(tmp_path / "old.pt")


def test_machine_errors():
    with pytest.raises(ValueError, match="TrainingMachine: total_steps must be a positive int, got 0"):
        TrainingMachine(tiny(), 0)
    with pytest.raises(TypeError, match="TrainingMachine: config must be a RunConfig or a dict, got str"):
        TrainingMachine("digits.toml")
    with pytest.raises(ValueError, match="clan.round_length must be a positive int, got 0"):
        TrainingMachine({"clan": {"round_length": 0}})
    machine = TrainingMachine(tiny(total_steps=4, schedule=[{"name": "c", "start_t": 0, "end_t": 1,
                                                              "clan": {"competition": False}}]))
    with pytest.raises(ValueError, match="TrainingMachine.checkpoint: needs an out_dir and a started run"):
        machine.checkpoint()
    machine.train()
    with pytest.raises(RuntimeError, match="TrainingMachine.train: this machine has already run"):
        machine.train()


def test_total_steps_argument_overrides_the_config():
    machine = TrainingMachine(tiny(total_steps=500), 8)
    assert machine.total_steps == 8 and machine.config.total_steps == 8


def test_stdlib_chars_tiny_run_learns():
    config = RunConfig.from_dict({
        "task": "stdlib-chars", "total_steps": 40, "seed": 1,
        "model": {"d_model": 16, "n_layers": 1, "n_heads": 2},
        "data": {"batch_size": 4, "seq_len": 16, "max_chars": 20_000, "eval_samples": 16},
        "optimizer": {"lr": 1e-2},
        "clan": {"population_size": 2, "round_length": 10, "duty_cycle": 0.3},
    })
    results = TrainingMachine(config).train()
    # The default schedule: a search round over 10% of the run, then, as the run sees each of the
    # ~1000 training windows less than once (40 x 2 x 4 samples), one data-parallel model.
    assert [(r["kind"], r["phase"], r["start_step"], r["end_step"]) for r in results.history] == \
        [("round", "search", 0, 4), ("cooperative", "train", 4, 40)]
    assert results.history[1]["hyper"]["lr"] == results.rounds[0]["incumbent"]["lr"]
    assert results.final["val_loss"] < math.log(128)  # below a uniform guess over the vocabulary


def test_the_default_schedule_runs_clan_rounds_when_the_data_repeats():
    config = tiny(total_steps=60, schedule=[], clan={"population_size": 4, "round_length": 10})
    results = TrainingMachine(config).train()
    # 60 x 4 x 16 samples: more than one pass over digits' training images, so rounds follow the search.
    assert [(r["kind"], r["phase"], r["start_step"], r["end_step"]) for r in results.history] == \
        [("round", "search", 0, 6)] + [("round", "clan", s, s + 10) for s in range(6, 46, 10)] + \
        [("round", "clan", 46, 60)]


def test_the_default_schedule_competes_every_step_when_one_batch_is_a_large_share_of_the_data():
    # 4 members x 96 images read 384 of the 1438 training images a cooperative step: more than a
    # quarter, so the rounds after the search are all competition (each member at batch B).
    config = tiny(total_steps=40, schedule=[], data={"batch_size": 96},
                  clan={"population_size": 4, "round_length": 10, "duty_cycle": 0.25})
    machine = TrainingMachine(config)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="clan.loader")  # no plan to advise on: the machine chose it
        results = machine.train()
        # Nor for a config that names the phases itself, the data-free default among them.
        TrainingMachine(config.replace(total_steps=8, schedule=[phase.to_dict() for phase in default_schedule()])).train()
    assert [(p["name"], p.get("clan")) for p in machine.config.schedule.phases][1] == ("compete", {"duty_cycle": 1.0})
    assert [(r["kind"], r["phase"], r["start_step"], r["end_step"]) for r in results.history] == \
        [("round", "search", 0, 4)] + [("round", "compete", s, s + 10) for s in (4, 14)] + [("round", "compete", 24, 40)]
    assert all(r["cooperative_steps"] == 0 for r in results.rounds)
    # Under the share (3 x 96 = 288 images, 0.2), the rounds keep their cooperative steps.
    below = TrainingMachine(config.replace(clan={"population_size": 3}))
    below.prepare()
    assert [p.name for p in below.schedule] == ["search", "clan"]


def test_stdlib_corpus_is_deterministic_and_split_by_file():
    files = stdlib_files()
    assert files == sorted(files) and all(f.endswith(".py") and "site-packages" not in f for f in files)
    train, val = stdlib_corpus.__wrapped__(0.2, 20_000)
    train2, val2 = stdlib_corpus.__wrapped__(0.2, 20_000)
    assert torch.equal(train, train2) and torch.equal(val, val2)
    assert 15_000 <= len(train) <= 16_100 and 3_900 <= len(val) <= 4_100
    assert int(train.max()) < 128 and int(val.max()) < 128


def test_fused_rounds_match_the_imperative_loop():
    # Not bit-equal: the default FusedStep trains a cooperative step as one plain model on the
    # merged P x B batch, where the imperative loop runs member 0's weights under vmap and
    # averages the members' gradients: the same sums in another order. The competitive steps are
    # the loop's own arithmetic (autograd backward, batched update).
    config = tiny(total_steps=70)
    machine = TrainingMachine(config, fused=True)
    fused_run = machine.train()
    plain = TrainingMachine(config, fused=False).train()
    step = machine.fused_step
    assert (step.backward, step.update, step.one_model_form) == ("autograd", "batched", "batch")
    assert len(fused_run.rounds) == 2
    for a, b in zip(fused_run.history, plain.history, strict=True):
        assert a.get("winner") == b.get("winner") and a.get("genomes") == b.get("genomes")
        if "val_losses" in a:
            assert a["val_losses"] == pytest.approx(b["val_losses"], rel=1e-5)
    assert fused_run.final["val_loss"] == pytest.approx(plain.final["val_loss"], rel=1e-5)
    fused_weights, plain_weights = fused_run.best_model.state_dict(), plain.best_model.state_dict()
    assert fused_weights.keys() == plain_weights.keys()
    for name, value in plain_weights.items():
        torch.testing.assert_close(fused_weights[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_fused_rounds_with_the_vmap_backward_match_the_imperative_loop():
    # Not bit-equal, by construction: the vmap backward (grad_and_value under vmap) computes the
    # last Linear's weight gradient with another matmul than autograd over the vmapped forward
    # (the imperative loop's backward), which differs in the last bit of some entries from the
    # first step on. Selection, genes and the round records must still agree exactly here.
    config = tiny(total_steps=70)
    machine = TrainingMachine(config, fused={"backward": "vmap", "layout": "flat"})
    fused_run = machine.train()
    plain = TrainingMachine(config, fused=False).train()
    assert (machine.fused_step.backward, machine.fused_step.layout) == ("vmap", "flat")
    assert len(fused_run.rounds) == 2
    for a, b in zip(fused_run.rounds, plain.rounds, strict=True):
        assert (a["winner"], a["genomes"], a["incumbent"]) == (b["winner"], b["genomes"], b["incumbent"])
        assert a["val_losses"] == pytest.approx(b["val_losses"], rel=1e-6)
    assert fused_run.final["val_loss"] == pytest.approx(plain.final["val_loss"], rel=1e-6)


@pytest.mark.parametrize(("fused", "error", "match"), [
    ("yes", TypeError, "fused must be a bool or a dict of FusedStep options, got str"),
    ({"graph": True}, ValueError, r"unknown FusedStep options \['graph'\]"),
    ({"cuda_graph": True}, ValueError, "cuda_graph=True needs the clan on a CUDA device, it is on cpu"),
    ({"cuda_graph": "true"}, TypeError, "FusedStep: cuda_graph must be True or False, got 'true'"),
    ({"compile": "everything"}, ValueError, "compile must be one of"),
])
def test_fused_options_are_checked_before_training(fused, error, match):
    with pytest.raises(error, match=match):
        TrainingMachine(tiny(total_steps=70), fused=fused)


def test_truncation_exports_the_ancestry_of_the_best_member():
    """With truncation the members copy each other in many ways: each round's ``sources`` say who
    copied whom, and the schedule follows the best member back through them, not each round's winner."""
    config = tiny(total_steps=60, clan={"selection": "truncation", "duty_cycle": 1.0, "round_length": 10},
                  schedule=[{"name": "pbt", "start_t": 0, "end_t": 1}])
    results = TrainingMachine(config).train()
    assert len(results.rounds) == 6 and all(len(r["sources"]) == 4 for r in results.rounds)
    lineage, current = [], results.final["best_member"]
    for record in reversed(results.rounds):
        current = record["sources"][current]
        lineage.append(current)
    lineage.reverse()
    for record, member in zip(results.rounds, lineage):
        for step in range(record["start_step"], record["end_step"]):
            phase = results.schedule.phase_at_step(step, 60)
            assert phase.optimizer["lr"] == record["genomes"]["lr"][member] * record.get("competitive_lr_scale", 1.0)
            assert phase.data["batch_size"] == 16  # always competitive: B per step


def test_a_truncation_schedule_replays_each_members_own_training_exactly():
    """Retrained along its exported lineage on the same batches, a plain model ends with every member's weights."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 5, dtype=torch.float64), torch.randint(0, 3, (64,))
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    clan = Clan(model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01), population_size=4,
                autobind=["adamw"], total_steps=60, seed=3, selection="truncation", truncation_fraction=0.5,
                duty_cycle=1.0, round_length=10, lr_schedule="constant", warmup=0.0, competitive_lr="same")
    generator, batches = torch.Generator().manual_seed(1), []
    member = clan.round()
    while not clan.done:
        index = torch.randint(0, 64, (4, 8), generator=generator)
        batches.append(index)
        loss = member_loss(F.cross_entropy, member.model(x[index]), y[index])
        loss.sum().backward()
        member.optimizer.step()
        member.optimizer.zero_grad()
        member.step()
        if member.done:
            clan.step(torch.rand(4, generator=generator, dtype=torch.float64))
            member = clan.round()
    assert any(r["sources"] != [r["winner"]] * 4 and r["sources"] != [0, 1, 2, 3] for r in clan.history)
    for final in range(4):
        schedule = export_schedule(clan.history, 60, member=final, duty_cycle=1.0, batch_size=8, population_size=4)
        plain = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        plain.load_state_dict(start)
        optimizer = torch.optim.AdamW(plain.parameters())
        lineage, current = [], final  # the member that trained the final one's ancestor, round by round
        for record in reversed(clan.history):
            current = record["sources"][current]
            lineage.append(current)
        lineage.reverse()
        for step, index in enumerate(batches):
            settings = schedule.phase_at_step(step, 60).optimizer
            for group in optimizer.param_groups:
                group.update(lr=settings["lr"], weight_decay=settings["weight_decay"], eps=settings["eps"],
                             betas=(settings["betas/0"], settings["betas/1"]))
            rows = index[lineage[step // 10]]  # rounds of 10 steps: that member's own batch
            F.cross_entropy(plain(x[rows]), y[rows]).backward()
            optimizer.step()
            optimizer.zero_grad()
        got = clan.population.member_module(final)
        for name, tensor in plain.named_parameters():
            torch.testing.assert_close(got.get_parameter(name), tensor, rtol=1e-10, atol=1e-12, msg=f"{final} {name}")


def test_a_run_is_reproducible_from_its_config():
    config = tiny(total_steps=50)
    a, b = TrainingMachine(config).train(), TrainingMachine(config).train()
    assert a.history == b.history
    assert a.final["val_loss"] == b.final["val_loss"]
    c = TrainingMachine(config.replace(seed=1)).train()
    assert c.history != a.history


def test_a_cooperative_phase_becomes_the_divergence_restore_point():
    # The tiny run ends with a cooperative anneal: a divergence after it must not undo it.
    machine = TrainingMachine(tiny(total_steps=60))
    machine.train()
    good, population = machine.clan.restore_point.saved, machine.clan.population
    assert torch.equal(good["params"], population.flat[0])
    assert good["round"] == machine.clan.round_index


def test_a_checkpoint_whose_training_loss_mean_is_nan_resumes(tmp_path):
    """A member diverging in a competitive step makes the running mean NaN: a checkpoint there still resumes."""
    from runs import stop_at_step
    from vmapclan import load_checkpoint, save_checkpoint

    config = tiny(total_steps=40, log_every=7)
    stop_at_step(config, tmp_path, 23)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    state["machine"]["loss_sum"] = float("nan")
    save_checkpoint(state, tmp_path / "checkpoint.pt")
    TrainingMachine.resume(tmp_path).prepare()
    state["machine"]["loss_sum"] = float("inf")
    save_checkpoint(state, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"the checkpoint's machine/loss_sum must be a number, got inf"):
        TrainingMachine.resume(tmp_path).prepare()


SWEEP = {"task": "digits-mlp", "total_steps": 20, "seed": 4, "model": {"hidden": 8},
         "optimizer": {"lr": 1e-3, "weight_decay": 1e-2},
         "clan": {"population_size": 4, "round_length": 10, "duty_cycle": 1.0, "selection": "none",
                  "sweep": {"lr": {"range": [1e-4, 1e-2]}, "weight_decay": {"range": [1e-5, 1e-1], "scale": "log"}}}}


def test_a_config_sweep_draws_the_named_genes_and_holds_the_rest():
    machine = TrainingMachine(SWEEP)
    results = machine.train()
    first = results.rounds[0]["genomes"]
    assert all(1e-4 <= v <= 1e-2 for v in first["lr"]) and len(set(first["lr"])) == 4
    assert all(1e-5 <= v <= 1e-1 for v in first["weight_decay"]) and len(set(first["weight_decay"])) == 4
    assert first["betas/0"] == [0.9] * 4 and first["betas/1"] == [0.999] * 4 and first["eps"] == [1e-8] * 4
    assert (machine.clan.genes["weight_decay"].low, machine.clan.genes["weight_decay"].high) == (1e-5, 1e-1)
    assert results.rounds[1]["genomes"] == first  # a sweep's genes never mutate
    again = TrainingMachine(SWEEP).train().rounds[0]["genomes"]
    assert again == first  # drawn by the seed


@pytest.mark.parametrize("sweep, clan, message", [
    ({"lr": {"range": [1e-4, 1e-2]}}, {"selection": "winner", "duty_cycle": 0.25},
     r"clan.sweep needs clan.selection = 'none' \(a sweep\) or 'truncation' \(PBT\)"),
    ({"lr": {"range": [1e-2, 1e-4]}}, {}, r"clan.sweep.lr.range must have low < high, got \[0.01, 0.0001\]"),
    ({"lr": {"range": [0.0, 1e-2]}}, {}, r"clan.sweep.lr.range must be a number in \(0, inf\), got 0.0"),
    ({"lr": {"range": [1e-4, 1e-2], "scale": "cubic"}}, {}, r"clan.sweep.lr.scale must be 'log' or 'linear', "
                                                          r"got 'cubic'"),
    ({"lr": {"ranges": [1e-4, 1e-2]}}, {}, r"clan.sweep.lr: unknown key 'ranges'"),
    ({"momentum": {"range": [0.1, 0.9]}}, {}, r"clan.sweep: no gene 'momentum'; the run's genes are \['betas/0'"),
    ({"weight_decay": {"range": [1e-4, 1e-1]}}, {"optimizer_wd": 0.0},
     r"clan.sweep.weight_decay \(with the optimizer's 0.0\): Gene: a log-scale gene needs low > 0, got low=0.0"),
])
def test_a_bad_config_sweep_is_refused_by_name(sweep, clan, message):
    clan = dict(clan)
    optimizer = {"weight_decay": clan.pop("optimizer_wd")} if "optimizer_wd" in clan else {}
    config = {**SWEEP, "clan": {**SWEEP["clan"], **clan, "sweep": sweep}, "optimizer": {**SWEEP.get("optimizer", {}), **optimizer}}
    with pytest.raises(ValueError, match=message):
        TrainingMachine(config).prepare()


@pytest.mark.parametrize("genes, message", [
    ({"lr": {"low": 0.01, "high": 0.1}}, r"clan.genes.lr: Gene: init 0.001 is outside the bounds \[0.01, 0.1\]"),
    ({"lr": {"lo": 0.01}}, r"clan.genes.lr: Gene.__init__\(\) got an unexpected keyword argument 'lo'"),
    ({"betas/0": {"scale": "cubic"}}, r"clan.genes.betas/0: Gene: scale must be 'log', 'linear' or 'log1m', "
                                      r"got 'cubic'"),
])
def test_a_bad_gene_override_is_refused_by_its_config_name(genes, message):
    config = {"task": "digits-mlp", "total_steps": 20, "clan": {"population_size": 2, "genes": genes}}
    with pytest.raises(ValueError, match=message):
        TrainingMachine(config).prepare()
