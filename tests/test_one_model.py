"""Cooperative steps train one model: the same run as the old P-fold data-parallel training.

While the members are copies of one model (the cooperative phase, ``Clan.cooperate()``), the clan
runs every member's shard through member 0's weights, averages the gradient into member 0's row,
updates that row alone and lets rows 1.. lag until ``Clan.sync_members`` copies row 0 into them.
None of that may change a result. The reference everywhere is :class:`PFoldClan`, the same clan
with one-model training switched off, which is the P-fold path: every member forwarded, its
gradients averaged across the rows, every row updated.

Everything runs in float64 so that "equal" means 1e-10: the one-model and the P-fold paths run
other kernels (one matmul over P x B rows against a batched one, PyTorch's fused AdamW kernel on
one row against the batched update), so they agree to rounding, not bitwise; any real difference
(a missed average, a member left out, a stale row read) is orders of magnitude above 1e-10.
"""

import functools
import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vmapclan import Clan, FusedStep, member_loss
from vmapclan.cooperation import Cooperation

from plain_loop import train_step

import models

P, B = 4, 8
ROUND_LENGTH, DUTY_CYCLE = 6, 0.5  # 3 cooperative steps, then 3 competitive ones
TOL = 1e-10
ROUNDS = 4
# The round whose validation losses are all NaN: clan.step restores the round's start.
NAN_ROUND = 2
# (round, step in round) after which a run is saved and loaded into a fresh clan: mid-cooperation,
# in the round that will be restored, so the restore point must come through the checkpoint too.
SPLIT = (NAN_ROUND, 2)


class PFoldClan(Clan):
    """The clan with one-model training disabled: its ``cooperation.train_as_one`` always turns it off.

    That is exactly the path the clan took before one-model training existed (every member
    forwarded and updated, gradients averaged across the rows). A subclass rather than a
    monkeypatch of ``Cooperation`` so that the clan under test, built alongside, keeps the real method.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.disable(self)

    @staticmethod
    def disable(clan: Clan) -> Clan:
        """Turn ``clan``'s one-model training off for good."""
        cooperation = clan.cooperation
        cooperation.train_as_one = lambda on: Cooperation.train_as_one(cooperation, False)
        cooperation.train_as_one(False)
        return clan


# -- models ------------------------------------------------------------------------------------
mlp = functools.partial(models.mlp, 6, 16, 3, dtype=torch.float32)


def batchnorm_mlp() -> nn.Module:
    # No bias before BatchNorm: its true gradient is exactly zero, so it would collect only
    # rounding noise that Adam blows up to lr-sized steps differing between the two paths, and
    # the tolerance would have to be loosened for it. Without it 1e-10 holds everywhere.
    return nn.Sequential(nn.Linear(6, 16, bias=False), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3))


def dropout_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))


def batchnorm_dropout_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3),
                         nn.Linear(16, 3))


class Centered(nn.Module):
    """Subtracts the batch mean of its hidden units: a forward that couples the samples of a batch."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        return self.fc2(h - h.mean(0, keepdim=True))


class InputTracker(nn.Module):
    """Keeps a running mean of its inputs in a buffer (as an input normaliser would) but computes every
    sample alone: on the merged batch its outputs are right and its buffer update is not."""

    def __init__(self):
        super().__init__()
        self.net = mlp()
        self.register_buffer("seen", torch.zeros(6))

    def forward(self, x):
        if self.training:
            self.seen.mul_(0.9).add_(0.1 * x.detach().mean(0))
        return self.net(x)


MODELS = {"mlp": mlp, "batchnorm": batchnorm_mlp, "dropout": dropout_mlp, "batchnorm-dropout": batchnorm_dropout_mlp,
          "centered": Centered, "tracker": InputTracker}


def summed_cross_entropy(output, target):
    """A loss summed over the batch: on the merged P x B batch it would be P times a member's mean."""
    return F.cross_entropy(output, target, reduction="sum")


def make_clan(model="mlp", accumulate=False, *, p_fold=False, duty_cycle=DUTY_CYCLE, model_seed=1, seed=3) -> Clan:
    torch.manual_seed(model_seed)
    net = MODELS[model]().double()
    clan = models.adamw_clan(net, lr=1e-2, weight_decay=0.05, accumulate=accumulate, population_size=P,
                             round_length=ROUND_LENGTH, duty_cycle=duty_cycle, seed=seed)
    return PFoldClan.disable(clan) if p_fold else clan


def make_data(n=512):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64) * 2 + 0.5  # BatchNorm has a mean and scale to track
    return x, torch.randint(0, 3, (n,), generator=g)


def batches(clan, data):
    """The clan's loader, epoch after epoch (it continues from the clan's saved position)."""
    while True:
        yield from clan.loader(data, batch_size=B)


def shards(seed=5):
    """One cooperative batch: P disjoint shards of B samples, ``[P, B, ...]``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(P, B, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (P, B), generator=g)


# -- steps ---------------------------------------------------------------------------------------
PATHS = ["loop", "fused", "fused-vmap"]


def make_stepper(clan, path, loss_fn=F.cross_entropy):
    """``step(x, y) -> [P] losses``: the Member loop of plain_loop.py, or FusedStep (default, or backward='vmap')."""
    if path == "loop":
        return lambda x, y: train_step(clan.round(), loss_fn, x, y).detach()
    if path == "loop-weight-term":
        return lambda x, y: penalised_step(clan.round(), loss_fn, x, y)
    return FusedStep(clan, loss_fn, **({"backward": "vmap"} if path == "fused-vmap" else {}))


def fake_val(clan):
    """A deterministic validation loss that makes a member other than 0 win some rounds."""
    return clan.population.flat.detach().sum(1).sin()


def member_state_now(clan) -> dict:
    """What ``clan.member_state()`` returns now, without its side effect of bringing rows 1.. up to date.

    Calling ``member_state()`` after every step would sync the rows after every step, and so hide
    a missing sync at a place that needs one (the start of the competitive phase, selection, the
    state dict). Rows lag only while the members train as one model: once they train apart the
    raw rows must be the truth.
    """
    pop = clan.population
    assert pop.one_model or not pop.rows_stale, "rows lag behind row 0 while the members train apart"
    lagging = pop.one_model and pop.rows_stale
    tree = clan.population.member_state(sync=False)

    def rows(t):
        return t[:1].expand_as(t).clone() if lagging else t.clone()

    return {"params": rows(tree["params"]), "grads": rows(tree["grads"]),
            "buffers": {n: b.clone() for n, b in tree["buffers"].items()},  # per member at all times
            "optimizer": {n: rows(t) for n, t in tree["optimizer"].items()}}


def flatten(state: dict, prefix="") -> dict:
    out = {}
    for k, v in state.items():
        out.update(flatten(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def assert_same_state(got: dict, want: dict, tol: float, what: str) -> None:
    got, want = flatten(got), flatten(want)
    assert got.keys() == want.keys()
    for name, w in want.items():
        g = got[name]
        if tol == 0 or not w.is_floating_point():
            assert torch.equal(g, w), f"{what}: {name} differs"
        else:
            torch.testing.assert_close(g, w, atol=tol, rtol=0, msg=lambda m, name=name: f"{what}: {name}: {m}")


def train(model, path, accumulate=False, *, p_fold=False, split=None, rounds=ROUNDS):
    """Train from ``torch.manual_seed(11)`` (dropout draws from it) for ``rounds`` rounds; record every step.

    Rounds end with :func:`fake_val`'s selection, except round :data:`NAN_ROUND`, whose validation
    losses are all NaN (the clan restores that round's start, with a RuntimeWarning). With
    ``split``, the run is saved after that step and continues in a fresh clan (other initial
    weights and seed, so anything the checkpoint failed to carry would show) loaded from it.

    Returns:
        ``(clan, records)``: the final clan and, after every step and every ``clan.step``, the
        phase, whether the members trained as one model, the ``[P]`` losses, the member state
        (:func:`member_state_now`) and the genomes.
    """
    data = make_data()
    clan = make_clan(model, accumulate, p_fold=p_fold)
    step, stream = make_stepper(clan, path), batches(clan, data)
    torch.manual_seed(11)
    records, resumed = [], False

    def record(phase, one_model, losses):
        records.append({"at": (clan.round_index, clan.step_in_round), "phase": phase, "one_model": one_model,
                        "losses": losses, "state": member_state_now(clan),
                        "genomes": {n: v.clone() for n, v in clan.genomes.items()}})

    while clan.round_index < rounds:
        phase, one_model = clan.phase, clan.population.one_model
        x, y = next(stream)
        record(phase, one_model, step(x, y))
        if split == (clan.round_index, clan.step_in_round):
            assert clan.phase == "cooperative" and (p_fold or clan.population.rows_stale)  # mid-cooperation
            state = clan.state_dict()
            resumed = True
            clan = make_clan(model, accumulate, p_fold=p_fold, model_seed=7, seed=99)
            clan.load_state_dict(state)
            step, stream = make_stepper(clan, path), batches(clan, data)
        if clan.round_done:
            if clan.round_index == NAN_ROUND:
                with pytest.warns(RuntimeWarning, match=f"diverged in round {NAN_ROUND}; restored the state"):
                    clan.step(torch.full((P,), float("nan")))
            else:
                clan.step(fake_val(clan))
            record("selection", clan.population.one_model, None)
    assert resumed == (split is not None)
    return clan, records


def assert_same_runs(got, want, tol: float, *, fused_losses: bool = False) -> None:
    """Two runs of :func:`train` agree record by record, and in their history, to ``tol`` (0: bitwise).

    With ``fused_losses``, ``want`` is a P-fold FusedStep run: its cooperative steps return every
    member's loss, where one model's step returns the model's loss on the whole P x B batch, their mean.
    """
    (clan, records), (ref, ref_records) = got, want
    assert len(records) == len(ref_records) == ROUNDS * (ROUND_LENGTH + 1)
    for r, w in zip(records, ref_records):
        what = f"after step {r['at']} ({r['phase']})"
        assert (r["at"], r["phase"]) == (w["at"], w["phase"])
        if r["losses"] is not None:
            want_losses = w["losses"]
            if fused_losses and r["phase"] == "cooperative":
                want_losses = want_losses.mean().expand(P)
            assert_same_state({"losses": r["losses"]}, {"losses": want_losses}, tol, what)
        assert_same_state(r["state"], w["state"], tol, what)
        for name, genes in w["genomes"].items():
            assert torch.equal(r["genomes"][name], genes), f"{what}: genome {name} differs"
    assert len(clan.history) == len(ref.history) == ROUNDS
    for a, b in zip(clan.history, ref.history):
        assert {k: v for k, v in a.items() if k != "val_losses"} == {k: v for k, v in b.items() if k != "val_losses"}
        assert a["val_losses"] == pytest.approx(b["val_losses"], abs=tol, rel=0, nan_ok=True)
    # The real member_state() (which syncs) says what member_state_now() said.
    assert_same_state(clan.member_state(), records[-1]["state"], 0, "member_state()")


# -- 1. the same run as the P-fold path ----------------------------------------------------------
@pytest.mark.parametrize("accumulate", [False, True], ids=["plain", "accumulate"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("model", ["mlp", "batchnorm", "dropout"])
def test_one_model_training_equals_the_p_fold_path(model, path, accumulate):
    """Four rounds: phase changes, selections a challenger wins, a diverged round restored, a resume.

    After every step the member state (parameters, gradients, buffers, AdamW moments and counters
    of every member), the genomes and the losses equal the P-fold reference's, and the history
    too. BatchNorm's running statistics are per member in both (each member normalises its own
    shard); dropout draws every member's mask from the same generator in both.
    """
    reference = train(model, path, accumulate, p_fold=True)
    run = train(model, path, accumulate, split=SPLIT)
    # Each run is what it claims: one model while cooperating (and at the start of every round,
    # after selection), members apart while competing; the reference never trains as one.
    assert [r["one_model"] for r in run[1]] == [r["phase"] in ("cooperative", "selection") for r in run[1]]
    assert not any(r["one_model"] for r in reference[1])
    # The scenario is what it claims: a challenger won a round, and round NAN_ROUND was restored.
    history = reference[0].history
    assert any(h["winner"] not in (None, 0) for h in history)
    assert history[NAN_ROUND]["event"] == "diverged" and history[NAN_ROUND]["restored_round"] == NAN_ROUND
    assert_same_runs(run, reference, TOL, fused_losses=path != "loop")
    # The model's peculiarity really was exercised.
    first_competitive = next(r for r in run[1] if r["phase"] == "competitive")  # identical members, one window
    masks_differ = not torch.equal(first_competitive["losses"], first_competitive["losses"][:1].expand(P))
    assert masks_differ == (model == "dropout")
    if model == "batchnorm":  # every member's running statistics follow its own shard
        running = next(r for r in run[1] if r["phase"] == "cooperative")["state"]["buffers"]["1.running_mean"]
        assert not torch.equal(running[0], running[1])


# -- 2. resume ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("path", "model"), [("loop", "dropout"), ("fused", "dropout"),
                                             ("fused", "batchnorm-dropout")])
def test_resume_in_the_middle_of_cooperation_is_bitwise(path, model):
    """Saved mid-cooperation (rows 1.. lagging, a micro-batch pending, dropout's generator mid-run)
    and loaded into a fresh clan, the run goes on bit for bit as the uninterrupted one, through the
    restore of that round, phase changes and selection ("batch" and "members" forms for FusedStep)."""
    whole = train(model, path, accumulate=True)
    at_split = next(r for r in whole[1] if r["at"] == SPLIT)["state"]
    assert at_split["optimizer"]["accum_count"].tolist() == [1] * P and at_split["grads"].abs().max() > 0
    resumed = train(model, path, accumulate=True, split=SPLIT)
    assert_same_runs(resumed, whole, 0)


# -- 3. the form of FusedStep's one-model step ---------------------------------------------------
FORMS = [("mlp", F.cross_entropy, "batch"), ("dropout", F.cross_entropy, "batch"),
         ("batchnorm", F.cross_entropy, "members"), ("mlp", summed_cross_entropy, "batch"),
         ("centered", F.cross_entropy, "members"), ("tracker", F.cross_entropy, "members")]
FORM_IDS = ["mlp", "dropout", "batchnorm", "summed-loss", "batch-coupling", "buffer-update"]


@pytest.mark.parametrize("backward", ["autograd", "vmap"])
@pytest.mark.parametrize(("model", "loss_fn", "form"), FORMS, ids=FORM_IDS)
def test_form_choice_and_its_steps_equal_the_p_fold_path(model, loss_fn, form, backward):
    """The merged P x B forward is run only where it treats the samples as the members' forwards do.

    A plain model, dropout included (the merged batch draws the members' masks), runs as one batch,
    whatever its loss (each member's loss is taken on its own rows: a summed loss means what it
    means per member); BatchNorm in training (per-member statistics), a forward mixing its samples
    and one that writes a buffer (the merged batch would write member 0's row alone) need the
    members form.
    Either way the cooperative steps equal the P-fold path, so a wrong choice would show here too.
    """
    runs = {}
    for p_fold in (True, False):
        clan = make_clan(model, p_fold=p_fold)
        step = FusedStep(clan, loss_fn, backward=backward)
        torch.manual_seed(11)
        losses = [step(*shards(seed)) for seed in (5, 6)]
        assert clan.phase == "cooperative"
        runs[p_fold] = step, losses, member_state_now(clan)
    step, losses, state = runs[False]
    ref_step, ref_losses, ref_state = runs[True]
    assert step.one_model_form == form
    assert ref_step.one_model_form is None  # the P-fold path never runs one model
    for got, want in zip(losses, ref_losses):
        torch.testing.assert_close(got, want.mean().expand(P), atol=TOL, rtol=0)
    assert_same_state(state, ref_state, TOL, f"{form} form")


@pytest.mark.parametrize(("model", "form"), [("dropout", "batch"), ("batchnorm-dropout", "members")])
def test_the_form_probe_leaves_no_trace(model, form):
    """The probe runs both forms on the first batch: neither may draw from the generator dropout
    uses, move BatchNorm's statistics, or touch weights, gradients or optimizer state."""
    x, y = shards()
    clan = make_clan(model)
    step = FusedStep(clan, F.cross_entropy)
    torch.manual_seed(11)
    rng, before = torch.get_rng_state(), member_state_now(clan)
    assert step._batch_form_matches({}, (x, y)) == (form == "batch")
    assert torch.equal(torch.get_rng_state(), rng)
    assert_same_state(member_state_now(clan), before, 0, "after the probe")

    # A first step (the probe, then the chosen form) is bit for bit the chosen form's step alone.
    results = []
    for probe in (True, False):
        clan = make_clan(model)
        step = FusedStep(clan, F.cross_entropy)
        if not probe:
            step._form = form  # chosen already: no probe runs
        torch.manual_seed(11)
        losses = step(x, y)
        assert step.one_model_form == form
        results.append((losses, member_state_now(clan), torch.get_rng_state()))
    (losses, state, after), (want_losses, want_state, want_after) = results
    assert torch.equal(losses, want_losses) and torch.equal(after, want_after)
    assert_same_state(state, want_state, 0, "probed step")
    assert not torch.equal(after, rng)  # the step itself drew dropout masks


# -- 4. one model's work: rows 1.. lag and catch up ----------------------------------------------
def raw_rows(clan) -> dict:
    """The raw member-major tensors (no sync), cloned."""
    state = clan.optimizer.adamw_state._asdict()
    return {"params": clan.population.flat.clone(), "grads": clan.population.grad_flat.clone(),
            **{n: t.clone() for n, t in state.items()}}


def assert_rows_equal(clan, what):
    for name, t in raw_rows(clan).items():
        assert torch.equal(t, t[:1].expand_as(t)), f"{what}: rows of {name} differ"


@pytest.mark.parametrize("path", PATHS)
def test_rows_lag_while_cooperating_and_catch_up(path):
    """With accumulation (2 micro-batches), so that gradients, moments and counters all move in row 0."""
    clan = make_clan(accumulate=True)
    pop = clan.population
    step, stream = make_stepper(clan, path), batches(clan, make_data())
    assert pop.one_model and not pop.rows_stale
    start = raw_rows(clan)
    assert_rows_equal(clan, "at the start")

    step(*next(stream))  # micro-batch 1 of 2: a gradient pending in row 0, no update yet
    now = raw_rows(clan)
    assert pop.rows_stale
    assert now["grads"][0].abs().max() > 0 and now["accum_count"].tolist() == [1, 0, 0, 0]
    assert torch.equal(now["params"], start["params"])
    for name, t in now.items():
        assert torch.equal(t[1:], start[name][1:]), f"row 1.. of {name} moved"

    clan.sync_members()
    assert not pop.rows_stale
    assert_rows_equal(clan, "after sync_members()")
    synced = raw_rows(clan)
    assert torch.equal(synced["grads"][P - 1], now["grads"][0]) and synced["accum_count"].tolist() == [1] * P

    step(*next(stream))  # micro-batch 2 of 2: member 0's update, alone
    now = raw_rows(clan)
    assert pop.rows_stale
    assert not torch.equal(now["params"][0], synced["params"][0])
    assert now["step"].tolist() == [1, 0, 0, 0] and now["accum_count"].tolist() == [0, 1, 1, 1]
    assert now["grads"][0].abs().max() == 0  # released after the update
    for name, t in now.items():
        assert torch.equal(t[1:], synced[name][1:]), f"row 1.. of {name} moved"

    step(*next(stream))  # the last cooperative step: the competitive phase starts with every row equal
    assert clan.phase == "competitive" and not pop.one_model and not pop.rows_stale
    assert_rows_equal(clan, "at the start of the competitive phase")
    now = raw_rows(clan)
    assert now["step"].tolist() == [1] * P and now["accum_count"].tolist() == [1] * P


def test_zero_grad_and_the_one_model_steps_clear_row_0_only():
    """Rows 1.. of the gradient are not work of one model's step: ``zero_grad()``, and FusedStep's
    own start from zero, leave what they hold (here the gradient a sync copied there)."""
    clan = make_clan(duty_cycle=0.2)  # 5 cooperative steps
    steps = [FusedStep(clan, F.cross_entropy, backward=backward) for backward in ("autograd", "vmap")]
    # The vmap backward's first call finds the parameters the loss reaches, once, through the
    # stacked parameters (which brings the rows up to date): done before the rows are watched.
    steps[1](*shards(4))
    member = clan.round()
    x, y = shards()
    loss = member_loss(F.cross_entropy, member.model(x), y)
    with member.sync_context():
        loss.sum().backward()
    clan.sync_members()
    grads = clan.population.grad_flat.clone()
    assert grads.abs().amax(1).min() > 0  # every row holds the gradient
    member.optimizer.step()
    member.optimizer.zero_grad()
    member.step()
    for step in [*steps, None]:
        assert clan.population.rows_stale
        assert clan.population.grad_flat[0].abs().max() == 0
        assert torch.equal(clan.population.grad_flat[1:], grads[1:])
        if step is not None:
            step(*shards(6))
    assert clan.phase == "cooperative" and clan.population.one_model


READERS = {  # each reader of every member's rows, and what it read, which must be row 0's values
    "state_dict": (lambda clan: clan.state_dict()["model"]["params"], "params"),
    "member_state": (lambda clan: clan.member_state()["params"], "params"),
    "best_model": (lambda clan: torch.cat([w.detach().reshape(-1) for w in clan.best_model().parameters()]),
                   "params"),
    "parameters": (lambda clan: torch.cat([w.detach().reshape(P, -1) for w in clan.population.parameters()], 1),
                   "params"),
    "named_parameters": (lambda clan: torch.cat([w.detach().reshape(P, -1)
                                                 for _, w in clan.population.named_parameters()], 1), "params"),
    "params": (lambda clan: torch.cat([w.detach().reshape(P, -1) for w in clan.population.params.values()], 1),
               "params"),
    "member_module": (lambda clan: torch.cat([w.detach().reshape(-1)
                                              for w in clan.population.member_module(P - 1).parameters()]), "params"),
    "optimizer.state_dict": (lambda clan: clan.optimizer.state_dict()["exp_avg"], "exp_avg"),
}


@pytest.mark.parametrize("reader", READERS)
def test_what_reads_every_member_brings_the_rows_up_to_date(reader):
    """Every public reader of all members' rows first brings rows 1.. up to date (and says so,
    ``rows_stale`` off), so no caller ever sees a lagging row; the members still train as one."""
    read, name = READERS[reader]
    clan = make_clan()
    train_step(clan.round(), F.cross_entropy, *shards())
    assert clan.population.rows_stale
    row = raw_rows(clan)[name][0]
    assert not torch.equal(clan.population.flat[P - 1], clan.population.flat[0])  # rows 1.. lag
    value = read(clan)
    assert torch.equal(value, row.expand_as(value))
    assert clan.population.one_model and not clan.population.rows_stale  # still one model, rows now current
    assert_rows_equal(clan, f"after {reader}")


# -- 5. errors, and p.grad = None ----------------------------------------------------------------
def penalised_backward(clan, x, y) -> None:
    """A backward of the members' losses plus a weight penalty on ``member.model.parameters()``."""
    member = clan.round()
    loss = member_loss(F.cross_entropy, member.model(x), y).sum()
    penalty = sum(w.pow(2).sum() for w in member.model.parameters())  # the stacked [P, ...] tensors
    with member.sync_context():
        (loss + 1e-3 * penalty).backward()


def test_a_backward_into_the_stacked_parameters_while_one_model_raises():
    """A penalty on ``member.model.parameters()`` would reach rows the one-model step does not
    train; it is refused. The same backward is fine while the members train apart."""
    x, y = shards()
    clan = make_clan()
    assert clan.population.one_model
    with pytest.raises(RuntimeError, match=r"a backward reached the stacked \[P, \.\.\.\] parameters while the "
                                           r"members train as one model"):
        penalised_backward(clan, x, y)
    apart = make_clan(duty_cycle=1.0)
    assert apart.phase == "competitive" and not apart.population.one_model
    penalised_backward(apart, x, y)
    assert (apart.population.grad_flat.abs().amax(1) > 0).all()


def l2(weights):
    return 1e-2 * sum((w ** 2).sum() for w in weights.values())


def penalised_step(member, loss_fn, x, y) -> torch.Tensor:
    """The plain loop's step with ``l2`` of every member's weights added by ``member.model.weight_term``."""
    losses = member_loss(loss_fn, member.model(x), y)
    with member.sync_context():
        (losses.sum() + member.model.weight_term(l2)).backward()
    member.optimizer.step()
    member.optimizer.zero_grad()
    member.step()
    return losses.detach()


@pytest.mark.parametrize("accumulate", [False, True], ids=["plain", "accumulate"])
def test_a_weight_term_trains_one_model_as_the_p_fold_path(accumulate):
    """The loop with a weight term: one model (member 0's term times P) equals the P-fold path (the
    term vmapped over the rows), step by step, through phase changes, selections, a restored
    round, a resume and gradient accumulation."""
    reference = train("mlp", "loop-weight-term", accumulate, p_fold=True)
    run = train("mlp", "loop-weight-term", accumulate, split=SPLIT)
    assert_same_runs(run, reference, TOL)
    plain = train("mlp", "loop", accumulate, p_fold=True)
    assert not torch.equal(plain[0].population.flat, reference[0].population.flat)  # the term did train


@pytest.mark.parametrize("together", [True, False], ids=["one model", "apart"])
def test_a_weight_term_gives_every_member_its_own_term_in_either_phase(together):
    """``member.model.weight_term(fn)`` added to ``loss.sum()``: each member's gradient is that of
    its own loss plus ``fn`` of its own weights, while the members train as one model (member 0's
    term times P, averaged with the losses) and while they train apart (vmapped over the rows).
    Against a plain copy of the model, per shard, in float64. The term taken from member 0's
    module instead would be P times too weak together and reach member 0 alone apart."""
    x, y = shards()
    clan = make_clan(duty_cycle=DUTY_CYCLE if together else 1.0)
    assert clan.population.one_model == together
    reference = clan.population.member_module(0)
    member = clan.round()
    loss = member_loss(F.cross_entropy, member.model(x), y).sum() + member.model.weight_term(l2)
    with member.sync_context():
        loss.backward()
    names = [n for n, _ in reference.named_parameters()]
    for p in range(P):
        want = torch.autograd.grad(F.cross_entropy(reference(x[p]), y[p]) + l2(dict(reference.named_parameters())),
                                   list(reference.parameters()))
        if together:  # one model: the members' mean, in member 0's gradient
            mean = want if p == 0 else [m + w for m, w in zip(mean, want)]
            continue
        for name, g in zip(names, want):
            torch.testing.assert_close(member.model.params[name].grad[p], g, rtol=1e-12, atol=1e-14)
    if together:
        got = dict(member.model.module.named_parameters())
        for name, g in zip(names, mean):
            torch.testing.assert_close(got[name].grad, g / P, rtol=1e-12, atol=1e-14)


def test_fused_train_step_apart_while_one_model_raises():
    """Training copies of one model apart would make them differ while rows 1.. are not even
    current: refused, in the cooperative phase and in ``cooperate()``, before anything changes."""
    x, y = shards()
    for cooperating in ("phase", "cooperate"):  # the clan's cooperative phase; cooperate() in a competitive one
        clan = make_clan(duty_cycle=DUTY_CYCLE if cooperating == "phase" else 1.0)
        step = FusedStep(clan, F.cross_entropy)
        before = member_state_now(clan)
        with contextlib.nullcontext() if cooperating == "phase" else clan.cooperate():
            assert clan.population.one_model
            with pytest.raises(RuntimeError, match=r"FusedStep.train_step: cooperative=False while the members "
                                                   r"train as one model"):
                step.train_step(x, y, cooperative=False)
        assert_same_state(member_state_now(clan), before, 0, "after the refused step")
        assert clan.step_in_round == 0
    step.train_step(x, y, cooperative=False)  # a competitive-phase clan outside cooperate(): allowed
    assert not torch.equal(clan.population.flat, before["params"])


@pytest.mark.parametrize("duty_cycle", [DUTY_CYCLE, 1.0], ids=["cooperative", "competitive"])
def test_cooperate_in_the_middle_of_a_round_raises(duty_cycle):
    """Mid-round the members may differ (competing), so training them as one model is refused;
    the clan's own one-model state is left as it was."""
    clan = make_clan(duty_cycle=duty_cycle)
    FusedStep(clan, F.cross_entropy)(*shards())
    one_model = clan.population.one_model
    assert one_model == (duty_cycle != 1.0)
    with pytest.raises(RuntimeError, match=r"Clan.cooperate: only between rounds, where the members are copies of "
                                           r"one; round 0 is at step 1"):
        with clan.cooperate():
            pass
    assert clan.population.one_model == one_model


@pytest.mark.parametrize("which", ["stacked", "member 0"])
def test_grad_set_to_none_before_the_forward_starts_from_zero(which):
    """test_equivalence's ``set_to_none`` loop while one model trains: ``w.grad = None`` on the
    stacked parameters (or on member 0's, ``member.model.module``) instead of ``zero_grad()``, with
    junk left in the gradient buffer. The forward that follows must start from zero: the run
    equals one that calls ``zero_grad()``, bit for bit."""
    clean, dirty = make_clan(), make_clan()
    start = clean.member_state()["params"].clone()
    for seed in (5, 6):
        x, y = shards(seed)
        train_step(clean.round(), F.cross_entropy, x, y)
        member = dirty.round()
        dirty.population.grad_flat.fill_(1.0)  # what a stray backward could have left
        module = member.model if which == "stacked" else member.model.module
        for w in module.parameters():
            w.grad = None
        loss = member_loss(F.cross_entropy, member.model(x), y)
        with member.sync_context():
            loss.sum().backward()
        member.optimizer.step()
        member.step()
        assert dirty.population.one_model
    got, want = dirty.member_state(), clean.member_state()
    del got["grads"], want["grads"]  # the clean loop zeroed its gradient after the update, the other did not
    assert_same_state(got, want, 0, "p.grad = None")
    assert (want["params"] - start).abs().max() > 1e-3  # it trained


# -- 6. Clan.cooperate() between rounds ------------------------------------------------------------
@pytest.mark.parametrize("accumulate", [False, True], ids=["plain", "accumulate"])
def test_cooperate_between_rounds_trains_one_model_as_the_p_fold_path(accumulate):
    """A classic PBT clan (``duty_cycle=1.0``: competitive from step 0) cooperating between rounds,
    as the training machine's warmup does: one model inside, equal to the P-fold data-parallel
    step; outside again, every row current and the members training apart."""
    runs = {}
    for p_fold in (True, False):
        clan = make_clan(accumulate=accumulate, duty_cycle=1.0, p_fold=p_fold)
        pop = clan.population
        assert clan.phase == "competitive" and not pop.one_model
        fused = FusedStep(clan, F.cross_entropy)
        # As the machine does: the same hyperparameters for every member while they cooperate (and
        # the same accumulation count, or the P-fold members would update at different steps).
        with torch.no_grad():
            for t in clan.optimizer.hyper:
                t.fill_(t[0].item())
            if accumulate:
                clan.optimizer.num_grad_accum.fill_(2)
        trace = []
        with clan.cooperate():
            assert pop.one_model == (not p_fold)
            member = clan.round()
            for seed in (5, 6):  # the Member loop, outside the round clock
                x, y = shards(seed)
                loss = member_loss(F.cross_entropy, member.model(x), y)
                with clan.sync_context(cooperative=True):
                    loss.sum().backward()
                member.optimizer.step()
                member.optimizer.zero_grad()
                trace.append((loss.detach(), member_state_now(clan)))
            for seed in (7, 8):
                losses = fused.train_step(*shards(seed), cooperative=True)
                # One model's loss on the P x B batch, broadcast: the P-fold members' mean.
                trace.append((losses.mean().expand(P) if p_fold else losses, member_state_now(clan)))
        assert not pop.one_model and not pop.rows_stale
        assert_rows_equal(clan, "on leaving cooperate()")
        assert clan.phase == "competitive" and clan.step_in_round == 0
        clan.reconfigure()  # the genomes back in the optimizer, as the machine does after its phase
        trace.append((fused(*shards(9)), member_state_now(clan)))
        assert not torch.equal(pop.flat[0], pop.flat[1])  # competing: apart
        runs[p_fold] = trace
    assert len(runs[False]) == len(runs[True]) == 5
    for k, ((losses, state), (want_losses, want_state)) in enumerate(zip(runs[False], runs[True])):
        torch.testing.assert_close(losses, want_losses, atol=TOL, rtol=0)
        assert_same_state(state, want_state, TOL, f"step {k}")


# -- 7. regressions -------------------------------------------------------------------------------
def test_grad_set_to_none_between_forward_and_backward_keeps_the_gradient():
    """``w.grad = None`` on the stacked parameters after the forward: the backward that follows lands
    in member 0's parameters, and the update must still use it (the P-fold path does)."""
    runs = {}
    for p_fold in (True, False):
        clan = make_clan(p_fold=p_fold)
        member = clan.round()
        x, y = shards()
        loss = member_loss(F.cross_entropy, member.model(x), y)
        for w in clan.population._params.values():  # the stacked leaves, without syncing the rows
            w.grad = None
        with member.sync_context():
            loss.sum().backward()
        member.optimizer.step()
        runs[p_fold] = clan.member_state()["params"].clone()
    assert_same_state({"params": runs[False]}, {"params": runs[True]}, TOL, "grad = None after the forward")


def test_the_form_is_found_again_when_the_training_mode_changes():
    """A first cooperative step in eval mode must not fix the form for training mode: BatchNorm
    couples a batch's samples in training mode only."""
    clan, ref = make_clan("batchnorm"), make_clan("batchnorm", p_fold=True)
    steps = [FusedStep(c, F.cross_entropy) for c in (clan, ref)]
    for training in (False, True):
        for c, step in zip((clan, ref), steps):
            c.population.train(training)
            step(*shards(5 if training else 6))
    assert steps[0]._forms == {(False,) * 5: "batch", (True,) * 5: "members"}
    assert_same_state(member_state_now(clan), member_state_now(ref), TOL, "eval step, then a training step")


def test_member_sync_context_inside_cooperate_averages_in_a_competitive_phase():
    """Inside ``clan.cooperate()`` the members are one model whatever the round's phase, so
    ``member.sync_context()`` averages there as ``clan.sync_context(cooperative=True)`` does."""
    grads = []
    for explicit in (False, True):
        clan = make_clan(duty_cycle=1.0)
        assert clan.phase == "competitive"
        with clan.cooperate():
            member = clan.round()
            x, y = shards()
            loss = member_loss(F.cross_entropy, member.model(x), y)
            with clan.sync_context(cooperative=True) if explicit else member.sync_context():
                loss.sum().backward()
            grads.append(clan.population.grad_flat[0].clone())
    torch.testing.assert_close(grads[0], grads[1], atol=0, rtol=0)


def test_the_loader_gives_disjoint_shards_inside_cooperate_after_an_all_competitive_round():
    """Inside ``clan.cooperate()`` a step is cooperative whatever the round's phase: the loader gives
    P disjoint shards of B samples (one batch of P x B), not one window of B copied to every member.
    A cooperative anneal after a classic PBT phase (``duty_cycle=1``) once trained on the copies."""
    clan = make_clan(duty_cycle=1.0)
    x = torch.arange(64, dtype=torch.float64).unsqueeze(1)
    loader = clan.loader((x, torch.zeros(64, dtype=torch.long)), batch_size=B)
    assert clan.phase == "competitive" and not clan.cooperating
    shared, _ = next(iter(loader))
    assert all(torch.equal(shared[0], shared[i]) for i in range(P))  # competing: one common window
    with clan.cooperate():
        assert clan.cooperating
        xb, _ = next(iter(loader))
    assert not clan.cooperating
    assert xb.shape == (P, B, 1)
    seen = xb.flatten().tolist()
    assert len(set(seen)) == P * B and not set(seen) & set(shared[0].flatten().tolist())


def test_the_loader_inside_cooperate_refuses_data_smaller_than_one_cooperative_step():
    clan = make_clan(duty_cycle=1.0)  # all competition: the loader's own check asks for B samples only
    loader = clan.loader(make_data(P * B - 1), batch_size=B)
    with clan.cooperate(), pytest.raises(ValueError, match=r"clan.loader: the dataset has 31 samples, fewer than "
                                                           r"one cooperative step needs \(32 = population_size x "
                                                           r"batch_size\)"):
        next(iter(loader))


# -- 5. the objective: the mean of the members' losses, whatever the loss weighs ------------------
class TinyLM(nn.Module):
    def __init__(self, dropout: float):
        super().__init__()
        self.embed, self.drop, self.head = nn.Embedding(11, 8), nn.Dropout(dropout), nn.Linear(8, 11)

    def forward(self, tokens):
        return self.head(self.drop(self.embed(tokens)))


def lm_loss(logits, targets):
    """Next-token cross-entropy over the positions that are not padding: a token-weighted mean."""
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=-100)


def padded_lm_batch():
    """``[P, B, T]`` tokens and targets; member i's targets are padding after ``T - 2 i`` positions."""
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, 11, (P, B, 8), generator=g)
    targets = torch.randint(0, 11, (P, B, 8), generator=g)
    for i in range(P):
        targets[i, :, 8 - 2 * i:] = -100
    return tokens, targets


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("backward", ["autograd", "vmap"])
def test_the_cooperative_step_minimises_the_mean_of_the_members_losses(dropout, backward):
    """With padded targets the loss of the merged batch would weigh members by their tokens; the
    step's loss is the mean of the members' own means (the Member loop's objective), with and
    without dropout (from the same random state, the merged forward draws the reference's masks)."""
    tokens, targets = padded_lm_batch()
    torch.manual_seed(1)
    net = TinyLM(dropout)
    clan = models.adamw_clan(net, lr=1e-2, population_size=P, round_length=ROUND_LENGTH, duty_cycle=DUTY_CYCLE, seed=3)
    reference = clan.population.member_module(0).train()
    step = FusedStep(clan, lm_loss, backward=backward)
    torch.manual_seed(7)
    losses = step(tokens, targets)
    assert step.one_model_form == "batch"
    torch.manual_seed(7)
    logits = reference(tokens.flatten(0, 1)).unflatten(0, (P, B))
    members = torch.stack([lm_loss(logits[i], targets[i]) for i in range(P)])
    merged = lm_loss(logits.flatten(0, 1), targets.flatten(0, 1))
    assert abs(merged - members.mean()) > 1e-2  # the two objectives differ on this batch
    torch.testing.assert_close(losses, members.mean().detach().expand(P), rtol=1e-6, atol=0)


def test_a_loss_declared_a_sample_mean_is_taken_once_on_the_merged_batch():
    """``sample_mean_loss=True``: the same objective for a plain mean (the same step to rounding),
    computed once on the merged batch; it is a declaration, so a weighted loss declared so takes
    the merged batch's token-weighted mean (which is why it is never the default)."""
    x, y = shards()
    runs = []
    for declared in (False, True):
        clan = make_clan()
        step = FusedStep(clan, F.cross_entropy, sample_mean_loss=declared)
        torch.manual_seed(11)
        runs.append((step(x, y), member_state_now(clan), step.one_model_form))
    (a, state_a, form_a), (b, state_b, form_b) = runs
    assert form_a == form_b == "batch"
    torch.testing.assert_close(a, b, atol=TOL, rtol=0)
    assert_same_state(state_a, state_b, TOL, "declared sample mean")
    tokens, targets = padded_lm_batch()
    torch.manual_seed(1)
    clan = models.adamw_clan(TinyLM(0.0), lr=1e-2, population_size=P, round_length=ROUND_LENGTH,
                             duty_cycle=DUTY_CYCLE, seed=3)
    logits = clan.population.member_module(0)(tokens.flatten(0, 1))
    losses = FusedStep(clan, lm_loss, sample_mean_loss=True)(tokens, targets)
    torch.testing.assert_close(losses, lm_loss(logits, targets.flatten(0, 1)).detach().expand(P), rtol=1e-6, atol=0)
    with pytest.raises(TypeError, match=r"FusedStep: sample_mean_loss must be a bool, got str"):
        FusedStep(clan, lm_loss, sample_mean_loss="yes")
