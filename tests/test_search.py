"""A search phase: one all-competitive round whose challengers spread the lr in log around the incumbent.

- ``search_genome`` by hand: exact values, clipping to the gene's bounds, every other gene held
  at the incumbent's value, pinned errors;
- the schedule and the config refuse what a search phase cannot take;
- the machine runs a search phase as one round from the spread genomes, the winner's lr becomes
  the incumbent, the replay follows the winner, and a resume inside the search is exact.
"""

import math

import pytest
import torch

from vmapclan import BatchedAdamW, Gene, Phase, RunConfig, TrainingMachine, load_checkpoint, save_checkpoint
from vmapclan.genome import ADAMW_GENES, search_genome
from vmapclan.replay import replay
from vmapclan.schedule import lr_shape_at

from runs import assert_resumes_exactly, same_model, stop_at_step


def _incumbent(**values):
    return {name: torch.tensor(v, dtype=torch.float64) for name, v in values.items()}


def test_search_genome_by_hand():
    specs = {"lr": Gene(1e-6, 1.0, init=1e-3), "weight_decay": Gene(0.0, 1.0, init=0.01, scale="linear")}
    genome = search_genome(_incumbent(lr=1e-3, weight_decay=0.05), specs, 8, 10.0)
    # 7 challengers: 3 below (10^-1/3, 10^-2/3, 10^-1) and 4 above (10^1/4, ..., 10^1).
    want = [1e-3] + [1e-3 * 10 ** (-k / 3) for k in (1, 2, 3)] + [1e-3 * 10 ** (k / 4) for k in (1, 2, 3, 4)]
    assert genome["lr"].tolist() == pytest.approx(want, rel=1e-12)
    assert genome["lr"][0].item() == 1e-3  # the control, exactly the incumbent
    assert genome["weight_decay"].tolist() == [0.05] * 8
    assert search_genome(_incumbent(lr=1e-3, weight_decay=0.0), specs, 2, 4.0)["lr"].tolist() == \
        pytest.approx([1e-3, 4e-3], rel=1e-12)


def test_search_genome_clips_to_the_gene_bounds_and_keeps_dtypes():
    specs = {"lr": Gene(1e-4, 2e-3, init=1e-3), "num_grad_accum": Gene(1, 8, init=2, dtype="int", scale="linear")}
    genome = search_genome({"lr": torch.tensor(1e-3, dtype=torch.float64), "num_grad_accum": torch.tensor(2)}, specs, 5,
                           100.0)
    assert genome["lr"].tolist() == pytest.approx([1e-3, 1e-4, 1e-4, 2e-3, 2e-3], rel=1e-12)
    assert genome["num_grad_accum"].dtype == torch.long and genome["num_grad_accum"].tolist() == [2] * 5


@pytest.mark.parametrize("args, message", [
    (dict(population_size=1), "search_genome: population_size must be an int >= 2, got 1"),
    (dict(spread=1.0), "search_genome: spread must be a number above 1, got 1.0"),
    (dict(spread=True), "search_genome: spread must be a number above 1, got True"),
    (dict(gene="num_grad_accum"), r"search_genome: gene must be one of the float genes \['lr'\], got 'num_grad_accum'"),
])
def test_search_genome_refuses_bad_input(args, message):
    specs = {"lr": Gene(1e-4, 1e-1, init=1e-3), "num_grad_accum": Gene(1, 8, init=1, dtype="int", scale="linear")}
    kwargs = {"population_size": 4, "spread": 10.0, **args}
    with pytest.raises(ValueError, match=message):
        search_genome({"lr": torch.tensor(1e-3), "num_grad_accum": torch.tensor(1)}, specs, **kwargs)


@pytest.mark.parametrize("clan, message", [
    ({"search": 1}, r"Phase 's': clan.search must be a number in \(1, 1000\], got 1"),
    ({"search": "wide"}, r"Phase 's': clan.search must be a number in \(1, 1000\], got 'wide'"),
    ({"search": 10, "round_length": 5}, "Phase 's': clan.search is one round over the whole phase, all competition; "
                                        "it takes no clan.round_length"),
    ({"search": 10, "competition": False}, "Phase 's': clan.search is one round over the whole phase, all "
                                           "competition; it takes no clan.competition"),
])
def test_a_search_phase_refuses_what_it_cannot_take(clan, message):
    with pytest.raises(ValueError, match=message):
        Phase("s", 0.0, 0.5, clan=clan)


def test_a_search_needs_winner_selection():
    with pytest.raises(ValueError, match=r"schedule\[0\] \('s'\): clan.search needs clan.selection = 'winner' "
                                         r"\(the best of the spread becomes the incumbent\), got 'truncation'"):
        RunConfig.from_dict({"clan": {"selection": "truncation", "duty_cycle": 1.0},
                             "schedule": [{"name": "s", "start_t": 0, "end_t": 1, "clan": {"search": 10}}]})


def search_run(**clan) -> dict:
    return {"task": "digits-mlp", "total_steps": 40, "seed": 2, "model": {"hidden": 16},
            "data": {"batch_size": 8, "eval_samples": 64},
            "optimizer": {"lr": 2e-3, "lr_schedule": "cosine", "warmup": 0.1},
            "clan": {"population_size": 4, "round_length": 10, "duty_cycle": 0.2, **clan},
            "schedule": [{"name": "search", "start_t": 0.0, "end_t": 0.3, "clan": {"search": 10}},
                         {"name": "clan", "start_t": 0.3, "end_t": 0.8},
                         {"name": "anneal", "start_t": 0.8, "end_t": 1.0, "clan": {"competition": False}}]}


@pytest.mark.parametrize("competitive_lr", ["same", "sqrt"])
def test_a_search_phase_is_one_competitive_round_from_the_spread(competitive_lr, monkeypatch):
    seen = []  # every member's lr at every update, as the batched AdamW applies it
    apply_ = BatchedAdamW.apply_

    def spy(self, grads, *args, **kwargs):
        seen.append([v * (1.0 if self.lr_factor is None else self.lr_factor.item()) for v in self.hyper.lr.tolist()])
        return apply_(self, grads, *args, **kwargs)

    monkeypatch.setattr(BatchedAdamW, "apply_", spy)
    results = TrainingMachine(search_run(competitive_lr=competitive_lr)).train()
    search, second = results.rounds[0], results.rounds[1]
    assert (search["start_step"], search["end_step"], search["cooperative_steps"]) == (0, 12, 0)
    assert search["search"] == 10 and "search" not in second
    # The spread around the config's AdamW start, the incumbent before any selection.
    start = _incumbent(**{"lr": 2e-3, "weight_decay": 1e-2, "betas/0": 0.9, "betas/1": 0.999, "eps": 1e-8})
    want = search_genome(start, adamw_genes(2e-3), 4, 10.0)
    for name, values in search["genomes"].items():
        assert values == pytest.approx(want[name].tolist(), rel=1e-12), name
    assert search["genomes"]["lr"][0] == 2e-3 and len(set(search["genomes"]["lr"])) == 4
    winner = search["winner"]
    assert second["genomes"]["lr"][0] == search["genomes"]["lr"][winner]  # the next round's control
    share = 4 ** -0.5 if competitive_lr == "sqrt" else 1.0
    # Every member trained at its own spread lr through the search (the competitive share, the shape).
    for step in range(12):
        shape = lr_shape_at(step, 40, "cosine", 0.1)
        assert seen[step] == pytest.approx([lr * share * shape for lr in search["genomes"]["lr"]], rel=1e-12)
    # The replay follows the winner through the search.
    trace = replay(results.schedule, results.config, trace=True).trace
    for step in range(12):
        want_lr = search["genomes"]["lr"][winner] * share * lr_shape_at(step, 40, "cosine", 0.1)
        assert trace[step]["lr"] == pytest.approx(want_lr, rel=1e-12)
        assert trace[step]["batch_size"] == 8  # a competitive step: one member's batch
    assert trace[12]["batch_size"] == 4 * 8
    assert math.isfinite(results.final["val_loss"])


def adamw_genes(lr):
    """The autobound AdamW genes of a clan started from ``AdamW(lr=lr)`` (bounds follow the lr)."""
    from vmapclan.genome import autobind_genes

    optimizer = torch.optim.AdamW(torch.nn.Linear(1, 1).parameters(), lr=lr, weight_decay=1e-2)
    genes = autobind_genes(["adamw"], optimizer)
    assert set(genes) == set(ADAMW_GENES)
    return genes


def test_a_resume_inside_the_search_is_exact(tmp_path):
    assert_resumes_exactly(search_run(competitive_lr="sqrt"), tmp_path, stop_at=5)


DEFAULT = {"task": "digits-mlp", "seed": 1, "model": {"hidden": 16}, "data": {"batch_size": 8, "eval_samples": 64},
           "clan": {"population_size": 4, "round_length": 20}}


@pytest.mark.parametrize("total_steps, stop_at, phases", [
    (40, 2, ["search", "train"]),    # 40 x 4 x 8 samples: under one pass over digits' 1297 training images
    (40, 20, ["search", "train"]),
    (120, 7, ["search", "clan"]),    # more than one pass: clan rounds follow the search
    (120, 50, ["search", "clan"]),
])
def test_a_run_with_the_default_schedule_names_its_phases_and_resumes_exactly(tmp_path, total_steps, stop_at, phases):
    config = {**DEFAULT, "total_steps": total_steps}
    full, resumed = assert_resumes_exactly(config, tmp_path, stop_at)
    assert sorted({r["phase"] for r in full.history}, key=phases.index) == phases
    assert [p["name"] for p in full.config.schedule.phases] == phases  # the config names what the run got
    assert [p["name"] for p in RunConfig.from_toml(tmp_path / "config.toml").schedule.phases] == phases


def test_a_checkpoint_whose_config_names_no_phases_resumes_under_one_phase_of_rounds(tmp_path):
    """A checkpoint written before a run's config named its phases: the default then was one phase of
    clan rounds, and the run continues under it (not under today's default)."""
    old = {**DEFAULT, "total_steps": 40, "schedule": [{"name": "clan", "start_t": 0.0, "end_t": 1.0}]}
    full = TrainingMachine(old).train()
    stop_at_step(old, tmp_path, 25)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    state["machine"]["config"]["schedule"] = []
    save_checkpoint(state, tmp_path / "checkpoint.pt")
    (tmp_path / "config.toml").unlink()
    resumed = TrainingMachine.resume(tmp_path).train()
    assert repr(resumed.history) == repr(full.history) and same_model(resumed.best_model, full.best_model)


def test_independent_members_start_with_the_default_search():
    results = TrainingMachine({**DEFAULT, "total_steps": 40, "clan": {**DEFAULT["clan"], "init": "independent"}}).train()
    assert [r["phase"] for r in results.history] == ["search", "train"]
    assert math.isfinite(results.final["val_loss"])
