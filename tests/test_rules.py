"""The shared rules written once: the round rules, the gradient path, AdamW's implementations, lr_scale.

Each rule lives in one function; these tests pin it with hand-built cases, and check that every
caller (the clan, the machine, the replay) agrees with it.
"""

import math

import optree
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from vmapclan import Clan, FusedStep, Gene, RunConfig, TrainingMachine, replay
from vmapclan.gradients import member_mean, reduce_gradients_
from vmapclan.optim import AdamWHyper, adamw_init, adamw_kernel_step_, adamw_step_, keep_columns
from vmapclan.rounds import competitive_steps, phase_at, plan_rounds, round_problem
from vmapclan.schedule import phase_optimizer

from plain_loop import train_step


# -- the round rules ----------------------------------------------------------------------------
@pytest.mark.parametrize(("round_length", "duty_cycle", "expected"), [
    (100, 0.15, 15), (10, 0.01, 1), (10, 0.25, 3), (10, 0.35, 4), (4, 1.0, 4), (1, 1.0, 1), (7, 0.5, 4),
])
def test_competitive_steps_by_hand(round_length, duty_cycle, expected):
    assert competitive_steps(round_length, duty_cycle) == expected


def test_round_problem_names_the_settings():
    assert round_problem(10, 0.5) is None
    assert round_problem(1, 1.0) is None
    assert round_problem(2, 0.9) == ("round_length=2 with duty_cycle=0.9 leaves no cooperative step (2 competitive); "
                                     "use a longer round or duty_cycle=1.0")


@settings(max_examples=30, deadline=None)
@given(round_length=st.integers(2, 12), duty_cycle=st.sampled_from([0.1, 0.25, 0.5, 0.75, 1.0]))
def test_the_clan_clock_follows_phase_at(round_length, duty_cycle):
    """A genome-only clan's phase, step by step over two rounds, is the rule's; so is phase_ahead."""
    if round_problem(round_length, duty_cycle) is not None:
        return
    clan = Clan(population_size=2, round_length=round_length, duty_cycle=duty_cycle,
                genome_config={"x": Gene(0.0, 1.0, scale="linear")}, selection="winner" if duty_cycle < 1 else None)
    cooperative = round_length - competitive_steps(round_length, duty_cycle)
    expected = [phase_at(i, round_length, cooperative) for i in range(2 * round_length)]
    assert [clan.phase_ahead(i) for i in range(2 * round_length)] == expected
    seen = []
    for _ in range(2):
        member = clan.round()
        while not member.done:
            seen.append(member.phase)
            member.step()
        clan.step(torch.tensor([1.0, 2.0]))
    assert seen == expected


def test_plan_rounds_by_hand():
    assert plan_rounds(100, 30, 0.25) == ([30, 30, 40], 0)
    assert plan_rounds(20, 30, 0.25) == ([20], 0)
    assert plan_rounds(1, 30, 0.25) == ([], 1)
    assert plan_rounds(1, 30, 1.0) == ([1], 0)


# -- the gradient path --------------------------------------------------------------------------
def test_reduce_gradients_by_hand():
    buffer = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    step = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # Competing, no accumulation: this step's gradients as they are.
    assert reduce_gradients_(step, buffer, cooperative=False, accumulating=False) is step
    # Cooperating: the member mean, as a view when nothing needs keeping.
    mean = reduce_gradients_(step, buffer, cooperative=True, accumulating=False)
    assert torch.equal(mean, torch.tensor([[1.0, 0.0], [1.0, 0.0]])) and mean.stride(0) == 0
    # Accumulating: added to the pending sums in the buffer, then averaged there.
    out = reduce_gradients_(step, buffer, cooperative=True, accumulating=True)
    assert out is buffer
    assert torch.equal(buffer, torch.tensor([[3.0, 4.0], [3.0, 4.0]]))


def test_sync_context_keeps_the_averaged_gradient_in_grad():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    clan = Clan(model, torch.optim.AdamW(model.parameters()), population_size=3, round_length=10, duty_cycle=0.1)
    member = clan.round()
    x = torch.randn(3, 4, 3)
    loss = member.model(x).pow(2).mean((1, 2))
    with member.sync_context():
        loss.sum().backward()
    grads = torch.cat([p.grad.flatten(1) for p in member.model.parameters()], dim=1)  # [P, N], rows up to date
    torch.testing.assert_close(grads, member_mean(grads), rtol=0, atol=0)
    assert grads.abs().sum() > 0


# -- AdamW: one rule, every implementation ------------------------------------------------------
def _hyper(p):
    return AdamWHyper(torch.linspace(1e-3, 1e-2, p, dtype=torch.float64), torch.linspace(0, 0.1, p, dtype=torch.float64),
                      torch.full((p,), 0.9, dtype=torch.float64), torch.linspace(0.99, 0.999, p, dtype=torch.float64),
                      torch.full((p,), 1e-8, dtype=torch.float64))


def test_the_kernel_reads_a_gradient_in_any_layout():
    """A gradient whose rows are not dense (vmap returns such, e.g. a position embedding's) is
    updated as a dense one: the per-member kernel is handed the layout it needs."""
    p, n = 3, 5000
    g = torch.Generator().manual_seed(0)
    params = torch.randn(p, n, generator=g, dtype=torch.float64)
    transposed = torch.randn(n, p, generator=g, dtype=torch.float64).t()  # [P, N], rows strided by P
    assert not transposed[0].is_contiguous()
    out = {}
    for name, step, grads in (("batched", adamw_step_, transposed.contiguous()), ("kernel", adamw_kernel_step_, transposed)):
        x, state = params.clone(), adamw_init(params)
        for _ in range(3):
            step(x, grads, state, _hyper(p))
        out[name] = (x, state.exp_avg, state.exp_avg_sq)
    for a, b in zip(out["batched"], out["kernel"]):
        torch.testing.assert_close(a, b, atol=1e-15, rtol=1e-12)


def test_keep_columns_undoes_writes_to_those_columns_only():
    t = torch.arange(12.0).view(2, 6)
    with keep_columns([t], [slice(1, 3)]):
        t.mul_(-1)
    assert torch.equal(t, torch.tensor([[-0.0, 1, 2, -3, -4, -5], [-6, 7, 8, -9, -10, -11]]))


class _WithUnusedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 3)
        self.unused = nn.Linear(4, 3)

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("path", ["loop", "fused-vmap", "fused-autograd"])
def test_a_parameter_without_gradient_is_left_exactly_as_it_was(path):
    """As torch.optim.AdamW skips a parameter whose .grad is None: no weight decay, no moments."""
    torch.manual_seed(0)
    model = _WithUnusedHead()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
    clan = Clan(model, optimizer, population_size=2, round_length=10, duty_cycle=0.1)
    before = {n: t.detach().clone() for n, t in clan.population.params.items()}
    step = FusedStep(clan, F.cross_entropy, backward=path.split("-")[1]) if path != "loop" else None
    member = clan.round()
    for _ in range(3):
        x, y = torch.randn(2, 8, 4), torch.randint(0, 3, (2, 8))
        step(x, y) if step else train_step(member, F.cross_entropy, x, y)
    params, columns = clan.population.params, clan.population.columns
    for name in ("unused.weight", "unused.bias"):
        assert torch.equal(params[name], before[name])
        assert torch.count_nonzero(clan.optimizer.adamw_state.exp_avg[:, columns[name]]) == 0
    assert not torch.equal(params["body.weight"], before["body.weight"])


# -- lr_scale: one meaning ----------------------------------------------------------------------
def test_phase_optimizer_by_hand():
    incumbent = {"lr": 2e-3, "weight_decay": 0.1, "betas/0": 0.9, "betas/1": 0.99, "eps": 1e-8}
    assert phase_optimizer({"lr_scale": 0.5}, incumbent) == {**incumbent, "lr": 1e-3}
    assert phase_optimizer({"lr": 5e-4, "eps": 1e-6}, incumbent) == {**incumbent, "lr": 5e-4, "eps": 1e-6}
    assert phase_optimizer({}, incumbent) == incumbent


def test_a_hand_written_schedule_with_lr_scale_replays_as_the_machine_trained():
    """The machine's cooperative phases and the replay read a phase's optimizer table the same way."""
    config = RunConfig.from_dict({
        "task": "digits-mlp", "total_steps": 30, "seed": 0, "model": {"hidden": 16},
        "data": {"batch_size": 8, "eval_samples": 64},
        "optimizer": {"lr": 2e-3, "weight_decay": 0.02, "lr_schedule": "constant", "warmup": 0.0},
        "clan": {"population_size": 2, "round_length": 10, "duty_cycle": 0.2},
        "schedule": [
            {"name": "warmup", "start_t": 0.0, "end_t": 0.3, "optimizer": {"lr": 1e-3},
             "clan": {"competition": False}},
            {"name": "main", "start_t": 0.3, "end_t": 0.7, "optimizer": {"weight_decay": 0.1},
             "clan": {"competition": False}},
            {"name": "anneal", "start_t": 0.7, "end_t": 1.0, "optimizer": {"lr_scale": 0.25},
             "clan": {"competition": False}},
        ],
    })
    results = TrainingMachine(config).train()
    trace = replay(config.schedule.to_schedule(), config, trace=True).trace
    for record in results.history:
        assert record["kind"] == "cooperative"
        for step in trace[record["start_step"]:record["end_step"]]:
            hyper = record["hyper"]
            assert (step["lr"], step["weight_decay"], step["eps"]) == (hyper["lr"], hyper["weight_decay"], hyper["eps"])
            assert step["betas"] == (hyper["betas/0"], hyper["betas/1"])
    lrs = [r["hyper"]["lr"] for r in results.history]
    assert lrs == [1e-3, 2e-3, 2e-3 * 0.25]
    assert math.isclose(results.history[1]["hyper"]["weight_decay"], 0.1)


# -- the member state: one pytree ---------------------------------------------------------------
def _trained_clan(seed):
    torch.manual_seed(seed)
    model = nn.Linear(3, 2)
    clan = Clan(model, torch.optim.AdamW(model.parameters()), population_size=2, round_length=4, duty_cycle=0.5,
                autobind=["adamw"], seed=seed)
    member = clan.round()
    for _ in range(3):
        train_step(member, F.cross_entropy, torch.randn(2, 4, 3), torch.randint(0, 2, (2, 4)))
    return clan


def _by_path(tree) -> dict:
    """``{path: tensor}`` of a pytree's leaves (the live tensors)."""
    paths, leaves, _ = optree.tree_flatten_with_path(tree)
    return dict(zip(paths, leaves))


def test_selection_moves_every_member_tensor_of_the_tree():
    clan = _trained_clan(0)
    train_step(clan.round(), F.cross_entropy, torch.randn(2, 4, 3), torch.randint(0, 2, (2, 4)))  # competitive
    before = {path: t.detach().clone() for path, t in _by_path(clan.member_state()).items()}
    assert any(not torch.equal(t[0], t[1]) for t in before.values())  # the members differ
    clan.step(torch.tensor([2.0, 1.0]))  # member 1 wins
    for path, t in _by_path(clan.member_state()).items():
        assert torch.equal(t[0], before[path][1]) and torch.equal(t[1], before[path][1]), path


@pytest.mark.parametrize(("edit", "match"), [
    (lambda s: s["optimizer"].update(exp_avg=s["optimizer"]["exp_avg"][:, :-1]),
     r"the checkpoint's optimizer/exp_avg is torch.float32 \[2, 7\], expected torch.float32 \[2, 8\]"),
    (lambda s: s["optimizer"].pop("accum_count"), r"the checkpoint's optimizer entries are"),
    (lambda s: s["genomes"]["lr"].fill_(1e9), r"lr"),
])
def test_a_refused_state_leaves_the_clan_as_it_was(edit, match):
    clan, other = _trained_clan(0), _trained_clan(1)
    state = other.state_dict()
    edit(state)
    before = {path: t.detach().clone() for path, t in _by_path(clan.member_state()).items()}
    with pytest.raises(ValueError, match=match):
        clan.load_state_dict(state)
    for path, t in _by_path(clan.member_state()).items():
        assert torch.equal(t, before[path]), path
