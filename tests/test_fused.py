"""The fused step equals the imperative Member loop and a loop over separate models.

Everything runs in float64 so that "equal" can mean 1e-10, not "close enough in float32".
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vmapclan import Clan, FusedStep, member_loss
from vmapclan.step import BACKWARDS, LAYOUTS, resolve_backward

from plain_loop import train_step

import models

P = 4


def make_model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def make_data(n=400):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def make_clan(accumulate=False, duty_cycle=0.5, selection="winner", round_length=6, **kwargs):
    return models.adamw_clan(make_model(), lr=1e-2, weight_decay=0.05, accumulate=accumulate, population_size=P,
                             round_length=round_length, duty_cycle=duty_cycle, selection=selection, seed=3, **kwargs)


def imperative_step(member, x, y):
    loss = train_step(member, F.cross_entropy, x, y)
    return loss.detach()


def as_fused(losses, cooperative):
    """What FusedStep returns for the Member loop's ``[P]`` losses: in a cooperative step the members
    are one model, and every entry is its loss on the whole ``P x B`` batch."""
    return losses.mean().expand(P) if cooperative else losses


def fake_val(clan):
    """A deterministic validation loss that makes a member other than 0 win some rounds."""
    return clan.population.flat.detach().sum(1).sin()


def assert_same_state(a, b, tol=1e-10):
    a.sync_members()  # while cooperating only member 0's rows move; the raw buffers are compared here
    b.sync_members()
    pa, pb = a.population, b.population
    torch.testing.assert_close(pa.flat, pb.flat, atol=tol, rtol=0)
    torch.testing.assert_close(pa.grad_flat, pb.grad_flat, atol=tol, rtol=0)
    for sa, sb in zip(a.optimizer.adamw_state, b.optimizer.adamw_state):
        torch.testing.assert_close(sa, sb, atol=tol, rtol=0)
    assert (a.round_index, a.step_in_round, a.global_step) == (b.round_index, b.step_in_round, b.global_step)


def compare_runs(ref, fused, batches, loop, fused_step, rounds, *, loss_tol=1e-12, tol=1e-10,
                 val_tol: float | None = 1e-12) -> set:
    """Train ``ref`` by ``loop(member, batch)`` and ``fused`` by ``fused_step(batch)``, comparing after every step.

    ``batches`` yields ``(ref_batch, fused_batch)`` pairs. Losses (``loss_tol``) and every tensor of
    the state (``tol``) are compared after each step; after ``rounds`` rounds of selection on
    :func:`fake_val`, the winners, genomes, incumbents and (unless ``val_tol`` is None) the
    validation losses. Returns the phases the steps ran in.
    """
    member = ref.round()
    phases = set()
    for ref_batch, fused_batch in batches:
        phases.add(fused.phase)
        cooperative = fused.phase == "cooperative"
        ref_loss = as_fused(loop(member, ref_batch), cooperative)
        fused_loss = fused_step(fused_batch)
        assert fused_loss.shape == (P,)
        torch.testing.assert_close(fused_loss, ref_loss, atol=loss_tol, rtol=0)
        assert_same_state(ref, fused, tol=tol)
        if member.done:
            ref.step(fake_val(ref))
            fused.step(fake_val(fused))
            member = ref.round()
            if ref.round_index == rounds:
                break
    assert ref.round_index == rounds
    for a, b in zip(ref.history, fused.history, strict=True):
        assert (a["winner"], a["genomes"], a["incumbent"]) == (b["winner"], b["genomes"], b["incumbent"])
        if val_tol is not None:
            assert a["val_losses"] == pytest.approx(b["val_losses"], abs=val_tol)
    return phases


def run_both(fused_kwargs, accumulate, rounds=2, duty_cycle=0.5, selection="winner", **clan_kwargs):
    data = make_data()
    ref = make_clan(accumulate, duty_cycle, selection, **clan_kwargs)
    fused = make_clan(accumulate, duty_cycle, selection, **clan_kwargs)
    step = FusedStep(fused, F.cross_entropy, **fused_kwargs)

    def batches():
        for (xr, yr), (xf, yf) in zip(ref.loader(data, batch_size=8), fused.loader(data, batch_size=8)):
            torch.testing.assert_close(xr, xf, atol=0, rtol=0)
            yield (xr, yr), (xf, yf)

    return compare_runs(ref, fused, batches(), lambda member, batch: imperative_step(member, *batch),
                        lambda batch: step(*batch), rounds)


# Every way the gradients can be computed: each layout with the vmapped backward, and autograd's.
GRADIENTS = [{"layout": layout} for layout in LAYOUTS] + [{"backward": "autograd"}]
GRADIENT_IDS = [f"{layout}-vmap" for layout in LAYOUTS] + ["views-autograd"]
EXPLICIT_BACKWARDS = [b for b in BACKWARDS if b != "auto"]
assert {g.get("backward", "vmap") for g in GRADIENTS} == set(EXPLICIT_BACKWARDS)


@pytest.mark.parametrize("update", ["batched", "per-member"])
@pytest.mark.parametrize("gradients", GRADIENTS, ids=GRADIENT_IDS)
@pytest.mark.parametrize("accumulate", [False, True], ids=["plain", "accumulate"])
def test_fused_equals_imperative_across_phases_and_selection(gradients, accumulate, update):
    phases = run_both({**gradients, "update": update}, accumulate)
    assert phases == {"cooperative", "competitive"}


@pytest.mark.parametrize("backward", EXPLICIT_BACKWARDS)
@pytest.mark.parametrize("update", ["batched", "per-member"])
@pytest.mark.parametrize("accumulate", [False, True], ids=["plain", "accumulate"])
def test_fused_equals_imperative_with_gradient_clipping(update, accumulate, backward):
    run_both({"update": update, "backward": backward}, accumulate=accumulate, max_grad_norm=0.05)


def test_fused_step_defaults_follow_member_size_on_cpu():
    small = FusedStep(make_clan(), F.cross_entropy)  # 163 values per member
    assert (small.update, small.backward) == ("batched", "autograd")
    wide = nn.Sequential(nn.Linear(6, 1024), nn.Tanh(), nn.Linear(1024, 3)).double()  # 10243 values
    clan = Clan(wide, torch.optim.AdamW(wide.parameters()), population_size=3, round_length=6, duty_cycle=0.5)
    wide_step = FusedStep(clan, F.cross_entropy)
    assert (wide_step.update, wide_step.backward) == ("per-member", "autograd")
    compiled = FusedStep(clan, F.cross_entropy, compile="optimizer")
    assert (compiled.update, compiled.backward) == ("batched", "autograd")
    assert FusedStep(clan, F.cross_entropy, layout="flat").backward == "vmap"


@pytest.mark.parametrize("backward", EXPLICIT_BACKWARDS)
@pytest.mark.parametrize("update", ["batched", "per-member"])
def test_fused_accumulation_counts_differ_per_member(update, backward):
    """Competing members with their own num_grad_accum each update exactly when their own count is reached."""
    counts = [2, 1, 3, 4]  # in force in the competitive phase; the cooperative phase runs the incumbent's 2
    ref, fused = make_clan(accumulate=True, round_length=10), make_clan(accumulate=True, round_length=10)
    for clan in (ref, fused):
        clan.set_genome("num_grad_accum", counts)
    step = FusedStep(fused, F.cross_entropy, update=update, backward=backward)
    member = ref.round()
    pending, updates, ready_at = [0] * P, [0] * P, []  # what each member's own count predicts
    data = make_data()
    for (xr, yr), (xf, yf) in zip(ref.loader(data, batch_size=8), fused.loader(data, batch_size=8)):
        in_force = fused.optimizer.num_grad_accum.tolist()
        cooperative = fused.phase == "cooperative"
        assert in_force == ([2] * P if cooperative else counts)
        fused.sync_members()
        before = fused.population.flat.clone()
        torch.testing.assert_close(step(xf, yf), as_fused(imperative_step(member, xr, yr), cooperative),
                                   atol=1e-12, rtol=0)
        assert_same_state(ref, fused)
        ready = []
        for i in range(P):
            pending[i] += 1
            if pending[i] >= in_force[i]:
                pending[i], updates[i] = 0, updates[i] + 1
                ready.append(i)
        ready_at.append(ready)
        for clan in (ref, fused):
            state = clan.optimizer.adamw_state
            assert state.accum_count.tolist() == pending
            assert state.step.tolist() == updates
            # Pending micro-batches keep their gradient sum; a member that just updated starts from zero.
            assert (clan.population.grad_flat.abs().amax(1) > 0).tolist() == [n > 0 for n in pending]
        for i in range(P):  # weights move exactly for the members that were ready
            assert torch.equal(fused.population.flat[i], before[i]) == (i not in ready), (len(ready_at), i)
        if member.done:
            break
    everyone = list(range(P))
    # 5 cooperative steps at 2 (one micro-batch left pending), then 5 competitive steps at [2, 1, 3, 4].
    assert ready_at == [[], everyone, [], everyone, [], [0, 1], [1, 2], [0, 1, 3], [1], [0, 1, 2]]


@pytest.mark.parametrize("backward", EXPLICIT_BACKWARDS)
@pytest.mark.parametrize("update", ["batched", "per-member"])
def test_fused_equals_a_loop_over_separate_models(update, backward):
    """A sweep (always competitive, no selection) equals P plain models, each with torch.optim.AdamW."""
    lrs, wds, beta2s = [1e-3, 3e-3, 1e-2, 3e-2], [0.001, 0.01, 0.1, 0.3], [0.99, 0.999, 0.995, 0.9999]
    clan = make_clan(duty_cycle=1.0, selection=None, round_length=50)
    clan.set_genome("lr", lrs)
    clan.set_genome("weight_decay", wds)
    clan.set_genome("betas/1", beta2s)
    clan.set_genome("betas/0", [0.9] * P)  # construction mutated these too
    clan.set_genome("eps", [1e-8] * P)
    step = FusedStep(clan, F.cross_entropy, update=update, backward=backward)
    models = [make_model() for _ in range(P)]
    opts = [torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=wd, betas=(0.9, b2), eps=1e-8)
            for m, lr, wd, b2 in zip(models, lrs, wds, beta2s)]
    x, y = make_data(8 * 12)
    for i in range(12):
        xb, yb = x[8 * i:8 * i + 8], y[8 * i:8 * i + 8]
        losses = step(clan.population.share(xb), clan.population.share(yb))
        for k, (m, opt) in enumerate(zip(models, opts)):
            loss = F.cross_entropy(m(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            # Not 1e-12: the batched AdamW orders its float64 arithmetic differently from
            # torch.optim.AdamW, and Adam's 1/sqrt(v) amplifies the last-bit differences.
            torch.testing.assert_close(losses[k], loss.detach(), atol=1e-9, rtol=1e-9)
    for k, m in enumerate(models):
        for name, param in m.named_parameters():
            torch.testing.assert_close(clan.population.params[name][k], param, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize(("kwargs", "accumulate"), [({"compile": "optimizer"}, True), ({"compile": "step"}, False),
                                                    ({"compile": "optimizer", "backward": "autograd"}, False)])
def test_fused_compiled_equals_imperative(kwargs, accumulate):
    """Small compiled cases (compiling is slow), one round across the phase boundary."""
    run_both(kwargs, accumulate=accumulate, rounds=1)


def test_fused_compiled_update_with_gradient_clipping_equals_imperative():
    """Clipping with the compiled update (inductor could not compile the clip norm into the update)."""
    run_both({"compile": "optimizer"}, accumulate=True, rounds=1, max_grad_norm=0.05)


def test_fused_step_refuses_a_done_round():
    clan = make_clan(round_length=2, duty_cycle=0.5)
    step = FusedStep(clan, F.cross_entropy)
    x, y = make_data(8)
    for _ in range(2):
        step(clan.population.share(x), clan.population.share(y))
    with pytest.raises(RuntimeError, match=r"round 0 is done \(2 steps\); call clan.step"):
        step(clan.population.share(x), clan.population.share(y))


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"layout": "grouped"}, ValueError, "layout must be one of"),
    ({"compile": "all"}, ValueError, "compile must be one of"),
    ({"backward": "functional"}, ValueError, "backward must be one of"),
    ({"backward": "autograd", "layout": "flat"}, ValueError, "needs layout='views' and cannot compile the whole step"),
    ({"backward": "autograd", "compile": "step"}, ValueError, "got layout='views', compile='step'"),
    ({"num_inputs": -1}, ValueError, "num_inputs must be a non-negative int, got -1"),
    ({"cuda_graph": True}, ValueError, "cuda_graph=True needs the clan on a CUDA device, it is on cpu"),
    ({"update": "foreach"}, ValueError, "update must be one of"),
    ({"update": "per-member", "compile": "optimizer"}, ValueError, "update='per-member' reads the hyperparameters"),
])
def test_fused_step_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        FusedStep(make_clan(), F.cross_entropy, **kwargs)


def test_fused_step_needs_a_model_and_a_callable():
    with pytest.raises(ValueError, match="the clan has no model"):
        FusedStep(Clan(population_size=2, round_length=4, autobind=[], genome_config={"g": {"low": 0.1, "high": 1.0}}),
                  F.cross_entropy)
    with pytest.raises(TypeError, match="loss_fn must be callable, got str"):
        FusedStep(make_clan(), "cross_entropy")


@pytest.mark.parametrize("backward", EXPLICIT_BACKWARDS)
def test_fused_step_ignores_what_an_imperative_backward_left(backward):
    """Without accumulation a fused step starts from zero gradients, whatever grad_flat holds."""
    clean, dirty = make_clan(), make_clan()
    x, y = make_data(8)
    dirty.population.grad_flat.fill_(1.0)
    for clan in (clean, dirty):
        FusedStep(clan, F.cross_entropy, backward=backward)(clan.population.share(x), clan.population.share(y))
    assert_same_state(clean, dirty, tol=0)


@pytest.mark.parametrize("backward", EXPLICIT_BACKWARDS)
def test_fused_step_trains_under_no_grad(backward):
    plain, quiet = make_clan(), make_clan()
    x, y = make_data(8)
    losses = FusedStep(plain, F.cross_entropy, backward=backward)(plain.population.share(x), plain.population.share(y))
    with torch.no_grad():
        quiet_losses = FusedStep(quiet, F.cross_entropy, backward=backward)(quiet.population.share(x),
                                                                            quiet.population.share(y))
    torch.testing.assert_close(losses, quiet_losses, atol=0, rtol=0)
    assert_same_state(plain, quiet, tol=0)
    assert not torch.equal(plain.population.flat, make_clan().population.flat)  # it did train


def test_fused_step_inside_sync_context_leaves_the_context_in_force():
    """An autograd fused step must not switch off the cooperative check's flag of an open sync_context."""
    clan = make_clan()
    assert clan.phase == "cooperative"
    step = FusedStep(clan, F.cross_entropy, backward="autograd")
    x, y = make_data(8)
    xs, ys = clan.population.share(x), clan.population.share(y)
    member = clan.round()
    with member.sync_context():
        step(xs, ys)
        member_loss(F.cross_entropy, member.model(xs), ys).sum().backward()  # still inside: no error


@pytest.mark.parametrize(("options", "expected"), [
    ({}, "autograd"),
    ({"cuda_graph": True}, "vmap"),
    ({"compile": "step"}, "vmap"),
    ({"compile": "optimizer"}, "autograd"),
    ({"layout": "flat"}, "vmap"),
    ({"update": "per-member"}, "autograd"),
    ({"numel": (1 << 16) - 1}, "autograd"),
    ({"numel": 1 << 16}, "vmap"),  # large members apart: the vmap backward's gradients are what the update reads
    ({"numel": None}, "autograd"),  # the one-model step
])
def test_auto_backward_rule(options, expected):
    settings = {"layout": "views", "compile": None, "update": "batched", "cuda_graph": False, **options}
    assert resolve_backward("auto", **settings) == expected
    assert resolve_backward("vmap", **settings) == "vmap"


def test_large_members_apart_take_the_vmap_backward_and_one_model_autograd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256))  # 82k values a member
    clan = Clan(model, torch.optim.AdamW(model.parameters(), lr=1e-3), population_size=2, autobind=["adamw"])
    step = FusedStep(clan, F.mse_loss)
    assert step.backward == "vmap" and step._one_model_backward == "autograd"


def test_fused_step_needs_the_member_dimension():
    clan = make_clan()
    step = FusedStep(clan, F.cross_entropy)
    x, y = make_data(8)
    with pytest.raises(ValueError, match=r"member dimension first \(\[4, \.\.\.\]\), got \[8, 6\]"):
        step(x, clan.population.share(y))
    assert clan.step_in_round == 0  # nothing happened


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-only: CUDA graphs need a GPU")
@pytest.mark.parametrize("backward", EXPLICIT_BACKWARDS)
@pytest.mark.parametrize("accumulate", [False, True], ids=["plain", "accumulate"])
def test_cuda_graph_step_equals_eager_step(accumulate, backward):  # pragma: no cover - CUDA only
    def cuda_clan():
        model = make_model()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
        autobind = ["adamw", "gradient_accumulation"] if accumulate else ["adamw"]
        return Clan(model, optimizer, population_size=P, round_length=6, duty_cycle=0.5, autobind=autobind,
                    seed=3, device="cuda")

    eager, graphed = cuda_clan(), cuda_clan()
    steps = (FusedStep(eager, F.cross_entropy, backward=backward),
             FusedStep(graphed, F.cross_entropy, backward=backward, cuda_graph=True))
    data = make_data()
    for (xe, ye), (xg, yg) in zip(eager.loader(data, batch_size=8), graphed.loader(data, batch_size=8)):
        torch.testing.assert_close(steps[0](xe, ye), steps[1](xg, yg), atol=1e-10, rtol=0)
        assert_same_state(eager, graphed)
        if eager.round_done:
            eager.step(fake_val(eager))
            graphed.step(fake_val(graphed))
            if eager.round_index == 2:
                break
    assert eager.round_index == 2


def test_speed_benchmark_smoke(tmp_path, capsys):
    """`python -m vmapclan.bench --smoke` runs every CPU variant for a step and writes its JSON (no timing checked)."""
    import json

    from vmapclan.bench.__main__ import main
    from vmapclan.bench.speed import VARIANTS

    assert main(["--smoke", "--json", str(tmp_path / "speed.json")]) == 0
    result = json.loads((tmp_path / "speed.json").read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert not [r for r in rows.values() if "error" in r]
    expected = {v for v in VARIANTS if v != "loop" and not v.endswith("cuda-graph")}
    expected |= {"loop (for-loop)", "loop (foreach)", "loop (fused)"}
    assert set(rows) == expected
    assert all(r["steps_per_s"] > 0 and r["P"] == 2 for r in rows.values())
    assert sum(r["fastest_loop"] for r in rows.values()) == 1
    assert result["meta"]["torch"] == torch.__version__
    assert "| tiny-mlp | 2 | fused |" in capsys.readouterr().out


def test_bench_dispatches_quality(monkeypatch):
    import vmapclan.bench.quality as quality
    from vmapclan.bench.__main__ import main

    seen = []
    monkeypatch.setattr(quality, "main", lambda argv: seen.append(argv) or 0)
    assert main(["quality", "--size", "tiny"]) == 0
    assert seen == [["--size", "tiny"]]


@pytest.mark.parametrize("max_grad_norm", [None, 0.5])
def test_adamw_kernel_step_equals_adamw_step(max_grad_norm):
    """The per-member kernel form of the optimizer equals adamw_step_ in float64, counts and all."""
    from vmapclan import AdamWHyper, adamw_init, adamw_step_
    from vmapclan.optim import adamw_kernel_step_

    g = torch.Generator().manual_seed(4)
    params = torch.randn(4, 50, generator=g, dtype=torch.float64)
    hyper = AdamWHyper(*(torch.tensor(v, dtype=torch.float64) for v in (
        [1e-3, 1e-2, 3e-2, 1e-1], [0.0, 0.01, 0.1, 0.5], [0.9, 0.8, 0.95, 0.5], [0.999, 0.99, 0.9, 0.95],
        [1e-8, 1e-6, 1e-3, 1e-8])))
    accum = torch.tensor([1, 2, 3, 1])
    ref, ref_state = params.clone(), adamw_init(params)
    out, out_state = params.clone(), adamw_init(params)
    grads_ref, grads_out = torch.zeros_like(params), torch.zeros_like(params)
    for _ in range(7):
        grad = torch.randn(4, 50, generator=g, dtype=torch.float64)
        grads_ref += grad
        grads_out += grad
        adamw_step_(ref, grads_ref, ref_state, hyper, accum, max_grad_norm)
        adamw_kernel_step_(out, grads_out, out_state, hyper, accum, max_grad_norm)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
        for a, b in zip(out_state, ref_state):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
        grads_ref.masked_fill_((ref_state.accum_count == 0).view(-1, 1), 0)
        grads_out.masked_fill_((out_state.accum_count == 0).view(-1, 1), 0)
    assert ref_state.step.tolist() == [7.0, 3.0, 2.0, 7.0]


def test_fused_batchnorm_buffers_and_weights_follow_the_imperative_loop():
    """BatchNorm's running statistics update inside the vmapped grad exactly as in the Member loop."""
    def clan():
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3)).double()
        return Clan(model, torch.optim.AdamW(model.parameters(), lr=1e-2), population_size=P, round_length=6,
                    duty_cycle=0.5, autobind=["adamw"], seed=3)

    ref, fused = clan(), clan()
    step = FusedStep(fused, F.cross_entropy)
    member = ref.round()
    data = make_data()
    for (xr, yr), (xf, yf) in zip(ref.loader(data, batch_size=8), fused.loader(data, batch_size=8)):
        cooperative = fused.phase == "cooperative"
        torch.testing.assert_close(step(xf, yf), as_fused(imperative_step(member, xr, yr), cooperative),
                                   atol=1e-12, rtol=0)
        ref.sync_members()
        fused.sync_members()
        for name, buffer in ref.population.buffers.items():
            torch.testing.assert_close(fused.population.buffers[name], buffer, atol=1e-10, rtol=0)
        # Looser than elsewhere: the first Linear's bias has a zero true gradient before BatchNorm,
        # and Adam amplifies the rounding noise in it.
        torch.testing.assert_close(fused.population.flat, ref.population.flat, atol=1e-8, rtol=0)
        if member.done:
            break
    assert fused.population.buffers["1.num_batches_tracked"].tolist() == [6] * P


def test_fused_step_with_two_model_inputs():
    """num_inputs=2: the first two batch tensors go to the model, the rest to the loss."""
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 3), nn.Linear(2, 3)

        def forward(self, x, z):
            return self.a(x) + self.b(z)

    def clan():
        torch.manual_seed(1)
        model = TwoInputs().double()
        return Clan(model, torch.optim.AdamW(model.parameters(), lr=1e-2), population_size=P, round_length=4,
                    duty_cycle=0.5, autobind=["adamw"], seed=3)

    ref, fused = clan(), clan()
    step = FusedStep(fused, F.cross_entropy, num_inputs=2)
    member = ref.round()
    g = torch.Generator().manual_seed(5)
    with pytest.raises(ValueError, match="expected at least 2 batch tensors, got 1"):
        step(torch.zeros(P, 8, 6, dtype=torch.float64))
    for _ in range(4):
        x = torch.randn(P, 8, 6, generator=g, dtype=torch.float64)
        z = torch.randn(P, 8, 2, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (P, 8), generator=g)
        cooperative = fused.phase == "cooperative"
        loss = train_step(member, F.cross_entropy, x, z, y)
        torch.testing.assert_close(step(x, z, y), as_fused(loss.detach(), cooperative), atol=1e-12, rtol=0)
        ref.sync_members()
        fused.sync_members()
        torch.testing.assert_close(fused.population.flat, ref.population.flat, atol=1e-10, rtol=0)
