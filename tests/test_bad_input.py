"""The catalogue of bad input: one row per mistake, each refused with a message that says what and why.

Each row builds what a user might build and must raise the named exception with the pinned
message. Nothing here may be accepted silently.
"""

import functools
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vmapclan import BatchedAdamW, Clan, DivergenceError, FusedStep, Gene, PopulationModel, TimeController, member_loss
from vmapclan.schedule import Phase, PhaseSchedule, lr_shape_at
from vmapclan.config import DataSpec
from vmapclan.tasks import get_task

import models

P = 3


mlp = functools.partial(models.mlp, 4, 8, 2, act="relu", dtype=torch.float32, seed=0)


def clan(model=None, optimizer=None, **kwargs):
    model = model if model is not None else mlp()
    optimizer = optimizer if optimizer is not None else torch.optim.AdamW(model.parameters())
    settings = dict(population_size=P, round_length=4, duty_cycle=0.5, autobind=["adamw"])
    settings.update(kwargs)
    return Clan(model, optimizer, **settings)


def at_round_end():
    c = clan()
    member = c.round()
    for _ in range(4):
        member.step()
    return c


def run_member_model_without_member_dim():
    clan().round().model(torch.randn(5, 4))


def run_loss_not_reduced():
    member = clan().round()
    member_loss(F.cross_entropy, member.model(torch.randn(P, 5, 4)), torch.zeros(P, 5, dtype=torch.long),
                reduction="none")


def run_target_without_member_dim():
    member = clan().round()
    member_loss(F.cross_entropy, member.model(torch.randn(P, 5, 4)), torch.zeros(5, dtype=torch.long))


def run_val_losses(value):
    return lambda: at_round_end().step(value)


def run_step_before_done():
    clan().step(torch.zeros(P))


def run_member_step_after_done():
    c = at_round_end()
    c.round().step()


def run_stale_member():
    c = at_round_end()
    stale = c.round()
    c.step(torch.arange(P, dtype=torch.float32))
    stale.step()


def run_backward_outside_sync():
    member = clan().round()
    member_loss(F.mse_loss, member.model(torch.randn(P, 5, 4)), torch.zeros(P, 5, 2)).sum().backward()


def run_all_diverged_raise():
    c = clan(on_divergence="raise")
    member = c.round()
    for _ in range(4):
        member.step()
    c.step(torch.tensor([float("nan"), float("inf"), -float("inf")]))


def run_dataset_too_small():
    clan().loader((torch.randn(10, 4), torch.zeros(10)), batch_size=4)  # one cooperative step needs 3 x 4


def run_mixed_dtypes():
    model = mlp()
    model[2].double()
    clan(model=model)


def run_mixed_devices():
    model = mlp()
    model[2].to("meta")
    Clan(model, torch.optim.AdamW(model.parameters()), population_size=P, round_length=4, duty_cycle=0.5)


def run_missing_params():
    model = mlp()
    clan(model=model, optimizer=torch.optim.AdamW(model[0].parameters()))


def run_two_param_groups():
    model = mlp()
    clan(model=model, optimizer=torch.optim.AdamW([{"params": model[0].parameters()},
                                                   {"params": model[2].parameters(), "betas": (0.5, 0.999)}]))


def run_load_other_model():
    clan(model=nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))).load_state_dict(clan().state_dict())


def genome_only(genes=None):
    return Clan(genome_config=genes or {"x": Gene(0.1, 1.0)}, population_size=P, round_length=4, duty_cycle=0.5)


def run_reconfigure_mid_round():
    c = clan()
    c.round().step()
    c.reconfigure(duty_cycle=1.0)


def run_load_model_checkpoint_into_genome_only_clan():
    source = clan()
    genome_only(source.genes).load_state_dict(source.state_dict())  # the same genes: only the model differs


def run_load_genome_only_checkpoint_into_model_clan():
    target = clan()
    target.load_state_dict(genome_only(target.genes).state_dict())


def run_schedule_with_gap():
    PhaseSchedule([Phase("warmup", 0.0, 0.3), Phase("main", 0.4, 1.0)])


def run_get_gene_unknown():
    clan().round().get_gene("learning_rate")


def _clan_with(**settings):
    model = nn.Linear(3, 2)
    return Clan(model, torch.optim.AdamW(model.parameters(), **settings), population_size=4, autobind=["adamw"])


def _results():
    from vmapclan.record import TrainingResults

    return TrainingResults(config=None, total_steps=1, history=[], metrics=[], final={}, best_model=None,
                           schedule=None)


def _adamw():
    population = PopulationModel(nn.Linear(2, 1), 2)
    return BatchedAdamW.for_population(population, {"lr": 1e-3, "weight_decay": 0.0, "betas/0": 0.9, "betas/1": 0.999,
                                                    "eps": 1e-8})


CATALOGUE = [
    # (what the user did, how to do it, exception, message)
    ("data without the member dim", run_member_model_without_member_dim, ValueError,
     r"expected every tensor input to have the member dimension first \(\[3, \.\.\.\]\), got shape \[5, 4\]"),
    ("a loss not reduced per member", run_loss_not_reduced, ValueError,
     r"fn must reduce each member's batch to a scalar \(loss of shape \[3\]\), got \[3, 5\]"),
    ("a target without the member dim", run_target_without_member_dim, ValueError,
     r"target must have the member dimension first \(\[3, \.\.\.\]\), got shape \[5\]"),
    ("validation losses of the wrong shape", run_val_losses(torch.zeros(P + 1)), ValueError,
     r"val_losses must have shape \[3\] or \[3, K\] \(one loss per member, or K per member\), got \[4\]"),
    ("validation losses as a scalar", run_val_losses(torch.tensor(1.0)), ValueError,
     r"val_losses must have shape \[3\] or \[3, K\] \(one loss per member, or K per member\), got \[\]"),
    ("validation losses of a complex dtype", run_val_losses(torch.zeros(P, dtype=torch.complex64)), TypeError,
     r"val_losses must be real numbers, got dtype torch.complex64"),
    ("validation losses as booleans", run_val_losses(torch.zeros(P, dtype=torch.bool)), TypeError,
     r"val_losses must be real numbers, got dtype torch.bool"),
    ("validation losses as text", run_val_losses("low"), TypeError,
     r"val_losses must be a tensor of shape \[3\] or \[3, K\], got str"),
    ("duty_cycle of 0", lambda: clan(duty_cycle=0.0), ValueError, r"duty_cycle must be in \(0, 1\], got 0.0"),
    ("duty_cycle above 1", lambda: clan(duty_cycle=1.5), ValueError, r"duty_cycle must be in \(0, 1\], got 1.5"),
    ("duty_cycle as text", lambda: clan(duty_cycle="0.5"), ValueError, r"duty_cycle must be in \(0, 1\], got '0.5'"),
    ("a round too short for a cooperative step", lambda: clan(round_length=1), ValueError,
     r"round_length=1 with duty_cycle=0.5 leaves no cooperative step"),
    ("round_length of 0", lambda: clan(round_length=0), ValueError, r"round_length must be a positive int, got 0"),
    ("population_size below 2 with selection", lambda: clan(population_size=1), ValueError,
     r"selection='winner' needs population_size >= 2, got 1"),
    ("population_size of 0", lambda: clan(population_size=0), ValueError,
     r"population_size must be a positive int, got 0"),
    ("truncation with a cooperative phase", lambda: clan(selection="truncation"), ValueError,
     r"selection='truncation' keeps members that differ, so it needs duty_cycle=1.0"),
    ("an unknown selection", lambda: clan(selection="tournament"), ValueError,
     r"selection must be 'winner', 'truncation' or None, got 'tournament'"),
    ("SGD with autobind=['adamw']",
     lambda: clan(optimizer=torch.optim.SGD(mlp().parameters(), lr=0.1)), TypeError,
     r"the optimizer must be torch.optim.AdamW or torch.optim.Adam \(the population trains with a batched AdamW\), "
     r"got SGD"),
    ("Adam with L2 weight decay",
     lambda: (lambda m: clan(model=m, optimizer=torch.optim.Adam(m.parameters(), weight_decay=0.01)))(mlp()),
     ValueError, r"torch.optim.Adam\(weight_decay=0.01\) adds the decay to the gradient \(L2\), which the batched "
                 r"AdamW does not do; use torch.optim.AdamW"),
    ("autobind=['adamw'] without an optimizer", lambda: Clan(autobind=["adamw"]), ValueError,
     r"autobind=\['adamw'\] needs optimizer=torch.optim.AdamW\(...\), got None"),
    ("AdamW with amsgrad", lambda: (lambda m: clan(model=m, optimizer=torch.optim.AdamW(m.parameters(), amsgrad=True)))(mlp()),
     ValueError, r"AdamW\(amsgrad=True\) is not supported"),
    ("AdamW with maximize", lambda: (lambda m: clan(model=m, optimizer=torch.optim.AdamW(m.parameters(), maximize=True)))(mlp()),
     ValueError, r"AdamW\(maximize=True\) is not supported"),
    ("AdamW groups with different betas", run_two_param_groups, ValueError,
     r"every param group must have the first group's betas/0 \(0.9\), group 1 has 0.5"),
    ("parameters missing from the optimizer", run_missing_params, ValueError,
     r"parameters missing from the optimizer: \['2.weight', '2.bias'\]"),
    ("a model without its optimizer", lambda: Clan(mlp(), population_size=P), ValueError,
     r"a model needs its optimizer"),
    ("an optimizer without a model", lambda: Clan(None, torch.optim.AdamW(mlp().parameters())), ValueError,
     r"an optimizer was given without a model"),
    ("a model that is not a module", lambda: Clan(lambda x: x, torch.optim.AdamW(mlp().parameters())), TypeError,
     r"model must be an nn.Module, got function"),
    ("reversed gene bounds", lambda: Clan(genome_config={"dropout": {"low": 0.5, "high": 0.1}}), ValueError,
     r"Gene: bounds must satisfy low < high, got low=0.5, high=0.1"),
    ("empty gene bounds", lambda: Gene(0.1, 0.1), ValueError, r"Gene: bounds must satisfy low < high, got low=0.1, high=0.1"),
    ("a log gene reaching 0", lambda: Gene(0.0, 1.0), ValueError, r"Gene: a log-scale gene needs low > 0, got low=0.0"),
    ("a gene init out of bounds", lambda: Gene(1e-4, 1e-2, init=0.1), ValueError,
     r"Gene: init 0.1 is outside the bounds \[0.0001, 0.01\]"),
    ("a genome_config entry of the wrong type", lambda: Clan(genome_config={"dropout": 0.1}), TypeError,
     r"genome_config\['dropout'\] must be a Gene or a dict, got float"),
    ("an unknown field in a gene dict", lambda: Clan(genome_config={"dropout": {"low": 0.0, "high": 1.0, "sigma": 2}}),
     ValueError, r"genome_config\['dropout'\]: .*sigma"),
    ("an unknown autobind name", lambda: clan(autobind=["adamw", "momentum"]), ValueError,
     r"unknown autobind name 'momentum'; expected 'adamw' or 'gradient_accumulation'"),
    ("an unknown gene", run_get_gene_unknown, ValueError,
     r"unknown gene 'learning_rate'; the genes are \['betas/0', 'betas/1', 'eps', 'lr', 'weight_decay'\]"),
    ("a sweep value out of bounds", lambda: clan(duty_cycle=1.0, selection=None).set_genome("lr", [1.0, 1e-3, 1e-3]),
     ValueError, r"gene 'lr': values \[1.0, 0.001, 0.001\] leave the bounds"),
    ("a dataset smaller than one step's samples", run_dataset_too_small, ValueError,
     r"the dataset has 10 samples, fewer than one step needs \(12 = population_size x batch_size\)"),
    ("a batch_size of 0", lambda: clan().loader((torch.randn(10, 4),), batch_size=0), ValueError,
     r"batch_size must be a positive int, got 0"),
    ("clan.step before the round is done", run_step_before_done, RuntimeError,
     r"clan.step\(\) called at step 0 of 4 in round 0: the round is not done"),
    ("member.step after the round is done", run_member_step_after_done, RuntimeError,
     r"member.step\(\): round 0 is done \(4 steps\); call clan.step\(val_losses\)"),
    ("a stale member", run_stale_member, RuntimeError,
     r"stale member: it belongs to round 0 but the clan is in round 1"),
    ("backward outside sync_context while cooperating", run_backward_outside_sync, RuntimeError,
     r"backward ran outside member.sync_context\(\) in the cooperative phase"),
    ("every member diverged, with on_divergence='raise'", run_all_diverged_raise, DivergenceError,
     r"every member's validation loss is NaN or infinite in round 0: \[nan, inf, -inf\]"),
    ("parameters of mixed dtypes", run_mixed_dtypes, ValueError,
     r"all trainable parameters must share one floating dtype; 0.weight is torch.float32 but 2.weight is torch.float64"),
    ("parameters on mixed devices", run_mixed_devices, ValueError,
     r"all parameters must be on one device; 0.weight is on cpu but 2.weight is on meta"),
    ("BatchNorm with momentum=None", lambda: clan(model=nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, momentum=None))),
     ValueError, r"1 is a BatchNorm with momentum=None \(cumulative average\), which reads its batch count with .item\(\)"),
    ("a checkpoint of another model", run_load_other_model, ValueError, r"the checkpoint is of another model"),
    ("a phase schedule with a gap", run_schedule_with_gap, ValueError,
     r"gap between phase 'warmup' \(ends at t=0.3\) and"),
    ("a seed that is not an int", lambda: clan(seed=1.5), TypeError, r"seed must be an int, got float"),
    ("reconfigure in the middle of a round", run_reconfigure_mid_round, RuntimeError,
     r"Clan.reconfigure: only between rounds; round 0 is at step 1"),
    ("a checkpoint with a model into a genome-only clan", run_load_model_checkpoint_into_genome_only_clan, ValueError,
     r"Clan.load_state_dict: the checkpoint and this clan disagree on having a model"),
    ("a genome-only checkpoint into a clan with a model", run_load_genome_only_checkpoint_into_model_clan, ValueError,
     r"Clan.load_state_dict: the checkpoint and this clan disagree on having a model"),
    ("member.share of a list in a genome-only clan", lambda: genome_only().round().share([1.0, 2.0]), TypeError,
     r"member.share: expected a tensor, got list"),
    ("cuda_graph that is not a bool", lambda: FusedStep(clan(), F.cross_entropy, cuda_graph=1), TypeError,
     r"FusedStep: cuda_graph must be True or False, got 1"),
    ("cuda_graph given as text", lambda: FusedStep(clan(), F.cross_entropy, cuda_graph="yes"), TypeError,
     r"FusedStep: cuda_graph must be True or False, got 'yes'"),
    ("stdlib-chars with max_chars too small for seq_len",
     lambda: get_task("stdlib-chars").load(DataSpec(max_chars=1000, seq_len=500), 0), ValueError,
     r"data.max_chars=1000 is too small for data.seq_len=500 \(\d+ training and \d+ validation characters\)"),
    ("an unknown task", lambda: get_task("mnist"), ValueError,
     r"task 'mnist' is neither a built-in task \['digits-mlp', 'stdlib-chars'\] nor 'package.module:ClassName'"),
    ("loader tensors of different lengths",
     lambda: clan().loader((torch.randn(100, 4), torch.zeros(50, dtype=torch.long)), 4), ValueError,
     r"clan.loader: the tensors must hold the same number of samples \(their first dimension\), got \[\[100, 4\], \[50\]\]"),
    ("an AdamW lr of 0 to evolve", lambda: _clan_with(lr=0.0), ValueError,
     r"Clan: autobind=\['adamw'\] evolves the optimizer's lr by factors \(within lr / 100 and lr x 100\), so it must "
     r"be positive, got 0.0"),
    ("a checkpoint of a clan with other gene bounds",
     lambda: _clan_with(lr=1e-2, eps=1e-6).load_state_dict(_clan_with(lr=1e-2).state_dict()), ValueError,
     r"Clan.load_state_dict: the checkpoint's gene 'eps' has high 1e-06, this clan's 9.99+e-05$"),
    ("a table of no rows", lambda: _results().rounds_table(max_rows=0), ValueError,
     r"rounds_table: max_rows must be a positive int, got 0"),
    ("a population size that is not an int", lambda: PopulationModel(nn.Linear(2, 1), 2.7), ValueError,
     r"PopulationModel: population_size must be a positive int, got 2.7"),
    ("a population of none", lambda: PopulationModel(nn.Linear(2, 1), 0), ValueError,
     r"PopulationModel: population_size must be a positive int, got 0"),
    ("a clock state past its run", lambda: TimeController(10).load_state_dict({"total_steps": 10, "step": 50}),
     ValueError, r"TimeController.load_state_dict: step must be an int in \[0, 10\], got 50"),
    ("an lr shape misspelt", lambda: lr_shape_at(9, 10, "cosin"), ValueError,
     r"lr_shape_at: shape must be one of \['constant', 'cosine', 'wsd'\], got 'cosin'"),
    ("an lr shape read past the run", lambda: lr_shape_at(15, 10, "cosine"), ValueError,
     r"lr_shape_at: step must be an int in \[0, 10\), got 15"),
    ("optimizer moments given as a list", lambda: _adamw().load_state_dict({**_adamw().state_dict(), "exp_avg": [[0.0]]}),
     TypeError, r"BatchedAdamW.load_state_dict: 'exp_avg' must be a tensor, got list"),
    ("a negative step count in an optimizer state",
     lambda: _adamw().load_state_dict({**_adamw().state_dict(), "step": torch.full((2,), -5.0, dtype=torch.float64)}),
     ValueError, r"BatchedAdamW.load_state_dict: 'step' holds a negative count"),
    ("a step past the end of the run", lambda: PhaseSchedule.single("all").phase_at_step(10, 10), ValueError,
     r"PhaseSchedule.phase_at_step: step must be an int in \[0, 10\), got 10"),
    ("a negative step", lambda: PhaseSchedule.single("all").phase_at_step(-1, 10), ValueError,
     r"PhaseSchedule.phase_at_step: step must be an int in \[0, 10\), got -1"),
    ("a step that is not an int", lambda: PhaseSchedule.single("all").phase_at_step(2.0, 10), ValueError,
     r"PhaseSchedule.phase_at_step: step must be an int in \[0, 10\), got 2.0"),
    ("a FusedStep loss without reduction, cooperating",
     lambda: FusedStep(clan(), _unreduced)(torch.randn(P, 8, 4), torch.randint(0, 2, (P, 8))), ValueError,
     r"FusedStep: loss_fn must reduce each member's batch to a scalar \(losses of shape \[3\]\), got \[3, 8\]; "
     r"use a mean or sum reduction"),
    ("a FusedStep loss without reduction, competing",
     lambda: FusedStep(clan(duty_cycle=1.0, selection=None), _unreduced)(torch.randn(P, 8, 4),
                                                                        torch.randint(0, 2, (P, 8))),
     ValueError, r"FusedStep: loss_fn must reduce each member's batch to a scalar \(losses of shape \[3\]\), "
                 r"got \[3, 8\]"),
    ("a torch LSTM in the model", lambda: _recurrent_clan(nn.LSTM(4, 8, batch_first=True)), ValueError,
     r"PopulationModel: model.rnn is a torch.nn.LSTM, which has no vmap batching rule; use vmapclan.recurrent.LSTM "
     r"\(same weights and state dict\) or vmapclan.recurrent.vectorizable\(model\)"),
    ("a torch GRUCell in the model", lambda: _recurrent_clan(nn.GRUCell(4, 8)), ValueError,
     r"PopulationModel: model.rnn is a torch.nn.GRUCell, which vmap runs one member at a time"),
]


def _unreduced(output, target):
    return F.cross_entropy(output, target, reduction="none")


def _recurrent_clan(rnn):
    """A clan of a model holding ``rnn`` (refused: vmap cannot batch torch's recurrent layers)."""
    model = nn.Module()
    model.rnn = rnn
    return Clan(model, torch.optim.AdamW(model.parameters()), population_size=2, round_length=4)


@pytest.mark.parametrize("what,action,error,message", CATALOGUE, ids=[row[0] for row in CATALOGUE])
def test_bad_input_is_refused_clearly(what, action, error, message):
    with pytest.raises(error, match=message):
        action()


def test_catalogue_size():
    assert len(CATALOGUE) >= 45  # the closing note reports this number


def test_total_divergence_in_the_first_round_restores_the_initial_state():
    with pytest.warns(RuntimeWarning, match="restored the state of the start of round 0"):
        record = at_round_end().step(torch.full((P,), float("nan")))
    assert record["event"] == "diverged" and record["restored_round"] == 0
