"""Training through the Clan equals training plain models with ``torch.optim.AdamW``, in float64.

- Competitive training (``duty_cycle=1``, no selection): every member equals its own model
  trained alone with its own hyperparameters and accumulation count, on the same data.
- Cooperative training: the population equals one model trained data-parallel at batch P x B,
  and the members stay bit-identical, across a selection too.
- BatchNorm and Dropout models: per-member running statistics follow their references; dropout
  masks differ across members; evaluation is deterministic and matches per member.
"""

import functools
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from vmapclan import Clan, PopulationModel, member_loss

from plain_loop import train_step

import models

DTYPE = torch.float64
# Members run batched GEMMs here and the references plain ones, so results differ in the last
# bits (about 1e-16 absolute after tens of float64 steps); the bound leaves room for other BLAS
# builds while any real difference in the update (an lr, a beta, a missed step) is far above it.
RTOL, ATOL = 1e-11, 1e-13


mlp = functools.partial(models.mlp, 6, 8, 3, dtype=DTYPE, seed=0)  # 6 features, 3 classes


def classification_data(n: int, seed: int = 1) -> TensorDataset:
    """``n`` random float64 samples with labels from a fixed linear rule (learnable, not noise)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, dtype=DTYPE, generator=g)
    y = (x @ torch.randn(6, 3, dtype=DTYPE, generator=g)).argmax(1)
    return TensorDataset(x, y)


def adamw_kwargs(genome: dict, i: int) -> dict:
    """Member ``i``'s genes as ``torch.optim.AdamW`` keyword arguments."""
    return {
        "lr": genome["lr"][i].item(),
        "weight_decay": genome["weight_decay"][i].item(),
        "betas": (genome["betas/0"][i].item(), genome["betas/1"][i].item()),
        "eps": genome["eps"][i].item(),
    }


def set_group(optimizer: torch.optim.AdamW, kwargs: dict) -> None:
    """Put new AdamW hyperparameters into the optimizer's only param group."""
    optimizer.param_groups[0].update(kwargs)


def assert_member_equals(clan: Clan, i: int, reference: nn.Module, what: str, rtol=RTOL, atol=ATOL) -> None:
    """Member ``i``'s parameters and buffers equal ``reference``'s, name by name."""
    member = clan.population.member_module(i)
    want = dict(reference.named_parameters()) | dict(reference.named_buffers())
    got = dict(member.named_parameters()) | dict(member.named_buffers())
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name].detach(), want[name].detach(), rtol=rtol, atol=atol,
                                   msg=lambda m, name=name: f"{what}, member {i}, {name}: {m}")


def per_member_genes(clan: Clan, p: int) -> None:
    """Give every member different AdamW genes, all inside their bounds."""
    clan.set_genome("lr", torch.tensor([1e-2, 3e-3, 3e-2, 1e-3][:p], dtype=DTYPE))
    clan.set_genome("weight_decay", torch.tensor([1e-2, 1e-3, 0.3, 0.05][:p], dtype=DTYPE))
    clan.set_genome("betas/0", torch.tensor([0.9, 0.5, 0.95, 0.8][:p], dtype=DTYPE))
    clan.set_genome("betas/1", torch.tensor([0.999, 0.99, 0.9995, 0.995][:p], dtype=DTYPE))
    clan.set_genome("eps", torch.tensor([1e-8, 1e-6, 1e-10, 1e-7][:p], dtype=DTYPE))


def make_sweep(model: nn.Module, p: int, round_length: int, autobind=("adamw",), seed: int = 3) -> Clan:
    """An always-competitive clan without selection: each member trains on its own genome."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2)
    return Clan(model, optimizer, population_size=p, round_length=round_length, duty_cycle=1.0,
                autobind=list(autobind), selection=None, init="independent", seed=seed)


def run_sweep_against_references(clan: Clan, dataset: TensorDataset, batch_size: int, steps: int,
                                 accum: list[int], loss_fn=F.cross_entropy) -> list[nn.Module]:
    """Train ``clan`` for ``steps`` micro-batches and P plain models alongside, comparing every step.

    Each reference is member ``i`` taken out as a plain module before training, with its own
    ``torch.optim.AdamW``; with ``accum[i] > 1`` it sums ``accum[i]`` micro-batch gradients,
    divides by the count and steps, as the library promises.

    Returns:
        The trained reference modules.
    """
    p = clan.population_size
    member = clan.round()
    genome = member.genome
    references = [clan.population.member_module(i) for i in range(p)]
    for ref in references:
        ref.train()
    ref_opts = [torch.optim.AdamW(r.parameters(), **adamw_kwargs(genome, i)) for i, r in enumerate(references)]
    pending = [0] * p
    loader = clan.loader(dataset, batch_size=batch_size)
    done = 0
    while done < steps:
        for x, y in loader:
            assert member.phase == "competitive"
            train_step(member, loss_fn, x, y)
            for i, (ref, opt) in enumerate(zip(references, ref_opts)):
                # Competitive phase: every member sees the same window.
                assert torch.equal(x[i], x[0]) and torch.equal(y[i], y[0])
                loss_fn(ref(x[i]), y[i]).backward()
                pending[i] += 1
                if pending[i] == accum[i]:
                    for w in ref.parameters():
                        w.grad /= accum[i]
                    opt.step()
                    opt.zero_grad()
                    pending[i] = 0
                assert_member_equals(clan, i, ref, f"step {done}")
            done += 1
            if member.done:
                # Validate in eval mode: a training-mode forward would move BatchNorm's running stats.
                member.model.eval()
                with torch.no_grad():
                    val = member_loss(loss_fn, member.model(x), y)
                member.model.train()
                clan.step(val)
                member = clan.round()
            if done == steps:
                break
    return references


@pytest.mark.parametrize(
    "autobind, accum",
    [(("adamw",), [1, 1, 1, 1]), (("adamw", "gradient_accumulation"), [1, 2, 3, 4])],
    ids=["adamw", "adamw+accumulation"],
)
def test_competitive_members_equal_separate_adamw_runs(autobind, accum):
    p = 4
    model = mlp()
    original = copy.deepcopy(model.state_dict())
    clan = make_sweep(model, p, round_length=8, autobind=autobind)
    per_member_genes(clan, p)
    if "gradient_accumulation" in autobind:
        clan.set_genome("num_grad_accum", torch.tensor(accum))
    # init="independent": the members really start apart, so a mix-up of members would show.
    starts = [clan.population.member_module(i).state_dict() for i in range(p)]
    assert not torch.equal(starts[0]["0.weight"], starts[1]["0.weight"])

    steps = 24  # three rounds; accumulation cycles of 3 and 4 cross round boundaries
    references = run_sweep_against_references(clan, classification_data(200), 8, steps, accum)

    assert clan.round_index == 3 and clan.history[-1]["winner"] in range(p)
    for i, ref in enumerate(references):
        moved = (ref[0].weight - starts[i]["0.weight"]).abs().max()
        assert moved > 1e-3, f"member {i} did not train"
        assert clan.optimizer.adamw_state.step[i].item() == steps // accum[i]
    # The user's model was copied, not trained in place.
    for name, t in model.state_dict().items():
        assert torch.equal(t, original[name])


@pytest.mark.parametrize("clear_grads", ["zero_grad", "set_to_none"])
def test_cooperative_phase_equals_data_parallel_adamw(clear_grads):
    """Cooperative steps are one model at batch P x B; a competitive step and selection keep it so.

    With ``clear_grads="set_to_none"`` the loop clears gradients the torch way, ``p.grad = None``
    before each backward, instead of ``optimizer.zero_grad()``; the averaging must still see them.
    """
    p, b, round_length = 4, 8, 25
    model = mlp()
    user_hyper = dict(lr=2e-2, weight_decay=0.05, betas=(0.85, 0.99), eps=1e-7)
    optimizer = torch.optim.AdamW(model.parameters(), **user_hyper)
    clan = Clan(model, optimizer, population_size=p, round_length=round_length, duty_cycle=0.05,
                autobind=["adamw"], seed=11)
    assert clan.cooperative_steps == round_length - 1
    dataset = classification_data(2 * round_length * p * b)  # two rounds fit in one epoch
    x_all, y_all = dataset.tensors

    reference = copy.deepcopy(model)
    ref_opt = torch.optim.AdamW(reference.parameters(), **user_hyper)
    # The loader's permutation comes from the clan's saved loader generator: reproduce it.
    perm_gen = torch.Generator()
    perm_gen.set_state(clan.state_dict()["loader"]["generator"])
    perm = torch.randperm(len(dataset), generator=perm_gen)
    position = 0

    def reference_step(index: torch.Tensor, hyper: dict) -> None:
        """One AdamW step of the reference on the mean loss over ``dataset[index]``."""
        set_group(ref_opt, hyper)
        ref_opt.zero_grad()
        F.cross_entropy(reference(x_all[index]), y_all[index]).backward()
        ref_opt.step()

    def assert_members_identical(what: str) -> None:
        flat = clan.member_state()["params"]  # every member's rows up to date
        assert all(torch.equal(flat[0], flat[i]) for i in range(1, p)), f"{what}: members differ"
        for name, t in clan.optimizer.state_dict().items():
            assert all(torch.equal(t[0], t[i]) for i in range(1, p)), f"{what}: optimizer {name} differs"

    def step_clearing_grads(x, y) -> None:
        """The user's loop body, clearing gradients the way this test case says."""
        if clear_grads == "set_to_none":
            for w in member.model.parameters():
                w.grad = None
        loss = member_loss(F.cross_entropy, member.model(x), y)
        with member.sync_context():
            loss.sum().backward()
        member.optimizer.step()
        if clear_grads == "zero_grad":
            member.optimizer.zero_grad()
        member.step()

    member = clan.round()
    loader = iter(clan.loader(dataset, batch_size=b))
    cooperative_steps = 0
    incumbent = user_hyper  # the user's AdamW seeds the incumbent genome
    for round_index in range(2):
        while member.phase == "cooperative":
            x, y = next(loader)
            index = perm[position:position + p * b]
            position += p * b
            # Member i's shard is the i-th block of B of the next P x B samples.
            assert torch.equal(x.reshape(p * b, -1), x_all[index]) and torch.equal(y.reshape(-1), y_all[index])
            step_clearing_grads(x, y)
            cooperative_steps += 1
            reference_step(index, incumbent)
            assert_members_identical(f"round {round_index} cooperative step")
            assert_member_equals(clan, 0, reference, f"round {round_index} cooperative step")

        # One competitive step: each member its own genome, all on one window of B samples.
        x, y = next(loader)
        window = perm[position:position + b]
        position += b
        assert torch.equal(x[p - 1], x_all[window]) and x.stride(0) == 0
        genomes = member.genome
        step_clearing_grads(x, y)
        assert member.done
        assert not torch.equal(clan.population.flat[0], clan.population.flat[1])  # they competed
        with torch.no_grad():
            val = member_loss(F.cross_entropy, member.model(member.share(x_all[:64])), member.share(y_all[:64]))
        record = clan.step(val)
        winner = record["winner"]
        # The reference takes the winner's path: its genome for the competitive step, at the genome's
        # lr over sqrt(P) (competitive_lr="sqrt": the genome's lr is what a P x B step applies).
        competed = adamw_kwargs(genomes, winner)
        reference_step(window, {**competed, "lr": competed["lr"] * p ** -0.5})
        assert_members_identical(f"after selection in round {round_index}")
        assert_member_equals(clan, 0, reference, f"after selection in round {round_index}")
        member = clan.round()
        # The winner's genome is the incumbent of the next cooperative phase.
        incumbent = adamw_kwargs(genomes, winner)
        assert adamw_kwargs(member.genome, p - 1) == incumbent
    assert cooperative_steps == 2 * (round_length - 1)
    # The run moved the weights a lot compared with the tolerance (the checks are not vacuous).
    assert (reference[0].weight - model[0].weight).abs().max() > 1e-2


class SmallCNN(nn.Module):
    """Conv -> BatchNorm -> ReLU -> Linear on 1x6x6 images.

    The conv has no bias: ahead of BatchNorm its true gradient is exactly zero, so it would only
    collect round-off, which Adam scales up to lr-sized steps of random sign in every member and
    reference alike, and running_mean would inherit the difference. Without it the comparison
    stays at round-off size.
    """

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4, momentum=0.2)
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        """``[B, 1, 6, 6]`` images to ``[B, 3]`` logits."""
        return self.head(F.relu(self.bn(self.conv(x))).flatten(1))


def image_data(n: int, seed: int = 2) -> TensorDataset:
    """``n`` random float64 6x6 images with labels from a fixed linear rule."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, dtype=DTYPE, generator=g) * 2 + 0.5  # BN has a mean and scale to track
    y = (x.flatten(1) @ torch.randn(36, 3, dtype=DTYPE, generator=g)).argmax(1)
    return TensorDataset(x, y)


def test_batchnorm_cnn_members_equal_separate_runs_with_running_stats():
    p = 3
    torch.manual_seed(0)
    clan = make_sweep(SmallCNN().to(DTYPE), p, round_length=10)
    per_member_genes(clan, p)
    assert set(clan.population.buffers) == {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}

    steps = 20
    references = run_sweep_against_references(clan, image_data(160), 8, steps, [1] * p)

    buffers = clan.population.buffers
    assert buffers["bn.num_batches_tracked"].tolist() == [steps] * p
    for i, ref in enumerate(references):
        # Running stats moved away from their (0, 1) start, and each member kept its own.
        assert (ref.bn.running_mean.abs() > 1e-2).any() and (ref.bn.running_var - 1).abs().max() > 1e-2
        torch.testing.assert_close(buffers["bn.running_mean"][i], ref.bn.running_mean, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(buffers["bn.running_var"][i], ref.bn.running_var, rtol=RTOL, atol=ATOL)
    assert not torch.allclose(buffers["bn.running_var"][0], buffers["bn.running_var"][1])

    # Evaluation uses the running stats: the vmapped eval forward equals each reference's.
    x = image_data(16, seed=9).tensors[0]
    clan.population.eval()
    with torch.no_grad():
        out = clan.population(clan.population.share(x))
        for i, ref in enumerate(references):
            torch.testing.assert_close(out[i], ref.eval()(x), rtol=RTOL, atol=ATOL)
    clan.population.train()


class DropoutMLP(nn.Module):
    """Linear -> ReLU -> Dropout -> Linear."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.fc1 = nn.Linear(6, 32)
        self.drop = nn.Dropout(p)
        self.fc2 = nn.Linear(32, 3)

    def forward(self, x):
        """``[B, 6]`` features to ``[B, 3]`` logits."""
        return self.fc2(self.drop(F.relu(self.fc1(x))))


def test_dropout_masks_differ_across_members_and_eval_matches():
    p, rate = 4, 0.5
    x = classification_data(64, seed=4).tensors[0]

    # Read the masks through the population's own forward: with the dropout layer last, a
    # training output is the eval output with units zeroed (the mask) or scaled by 1/(1-rate).
    probe = PopulationModel(nn.Sequential(nn.Linear(6, 32), nn.Dropout(rate)).to(DTYPE), p)  # identical members
    with torch.no_grad():
        dropped = probe(probe.share(x))
        full = probe.eval()(probe.share(x))
    probe.train()
    kept = dropped != 0
    torch.testing.assert_close(dropped[kept], full[kept] / (1 - rate), rtol=1e-15, atol=0)
    for i in range(p):
        for j in range(i + 1, p):
            assert not torch.equal(kept[i], kept[j]), f"members {i} and {j} drew the same dropout mask"
    keep_rate = kept.double().mean().item()
    assert 0.4 < keep_rate < 0.6

    model = DropoutMLP(rate).to(DTYPE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    # init="copy": identical members, so any difference in a training forward is the masks.
    clan = Clan(model, optimizer, population_size=p, round_length=6, duty_cycle=1.0, autobind=["adamw"],
                selection=None, seed=5)
    population = clan.population

    # The full vmapped forward in training mode also differs between identical members.
    with torch.no_grad():
        train_out = population(population.share(x))
    assert not torch.equal(train_out[0], train_out[1])
    # Same global seed, same masks: dropout under vmap is reproducible.
    torch.manual_seed(123)
    with torch.no_grad():
        first = population(population.share(x))
    torch.manual_seed(123)
    with torch.no_grad():
        second = population(population.share(x))
    assert torch.equal(first, second)

    # Train with dropout on, then evaluation is deterministic and matches every member alone.
    member = clan.round()
    for x_b, y_b in clan.loader(classification_data(64), batch_size=8):
        train_step(member, F.cross_entropy, x_b, y_b)
        if member.done:
            break
    assert torch.isfinite(population.flat).all()
    assert not torch.equal(population.flat[0], population.flat[1])  # different masks, different paths
    population.eval()
    with torch.no_grad():
        eval_out = population(population.share(x))
        assert torch.equal(eval_out, population(population.share(x)))
        for i in range(p):
            # Batched and single GEMMs may differ in the last bits, so a round-off tolerance.
            torch.testing.assert_close(eval_out[i], population.member_module(i).eval()(x), rtol=1e-12, atol=1e-14)
    population.train()
