"""The batched AdamW equals ``torch.optim.AdamW`` run separately for every member, in float64.

One table of hyperparameter sets runs through one harness (the optax / torch.optim habit), for
every implementation of the update: the functional :func:`adamw_step_`, its compiled form, and
the :class:`BatchedAdamW` class with PyTorch's per-member kernel and with the batched tensor-op
update; the other tests pin
gradient accumulation, ``zero_grad``, ``state_dict`` and a step worked out by hand.
"""

import copy
import math

import pytest
import torch
from torch import nn

from vmapclan import AdamWHyper, BatchedAdamW, PopulationModel, adamw_init, adamw_step_
from vmapclan.optim import group_scales
from vmapclan.optim import adamw_update

DTYPE = torch.float64
# float64 round-off of a few dozen elementwise steps; the batched and the per-member code order
# some operations differently (e.g. ``(g * (1 - b2)) * g`` against ``(1 - b2) * (g * g)``), so
# bit equality is not expected, but anything beyond a few ulps per step is a real difference.
RTOL, ATOL = 1e-12, 1e-14


def make_hyper(lr, weight_decay, beta1, beta2, eps) -> AdamWHyper:
    """``[P]`` float64 hyperparameters from per-member lists."""
    values = (lr, weight_decay, beta1, beta2, eps)
    return AdamWHyper(*(torch.tensor(v, dtype=torch.float64) for v in values))


def member_kwargs(hyper: AdamWHyper, i: int) -> dict:
    """Member ``i``'s hyperparameters as ``torch.optim.AdamW`` keyword arguments."""
    return {
        "lr": hyper.lr[i].item(),
        "weight_decay": hyper.weight_decay[i].item(),
        "betas": (hyper.beta1[i].item(), hyper.beta2[i].item()),
        "eps": hyper.eps[i].item(),
    }


def tiny_model() -> nn.Module:
    """Two parameters of different shapes, so flat offsets and per-parameter views both matter."""
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DTYPE)


# -- the table --------------------------------------------------------------------------------------
# Each case gives P members' hyperparameters (lists of length P) and optionally their
# accumulation counts. The members differ in every field the case is about.
P4 = dict(lr=[1e-3] * 4, weight_decay=[1e-2] * 4, beta1=[0.9] * 4, beta2=[0.999] * 4, eps=[1e-8] * 4)
ALL_DIFFERENT = dict(lr=[1e-2, 3e-3, 1e-1, 5e-4], weight_decay=[0.0, 0.3, 1e-2, 5e-2],
                     beta1=[0.8, 0.95, 0.0, 0.9], beta2=[0.99, 0.9, 0.95, 0.999], eps=[1e-6, 1e-10, 1e-8, 1e-4])
CASES = {
    "uniform": dict(P4),
    "lr": dict(P4, lr=[1e-4, 1e-3, 3e-2, 0.0]),
    "weight_decay_with_zero": dict(P4, weight_decay=[0.0, 1e-4, 0.1, 2.0]),
    "betas": dict(P4, beta1=[0.0, 0.5, 0.9, 0.99], beta2=[0.5, 0.9, 0.999, 0.9999]),
    "eps": dict(P4, eps=[1e-12, 1e-8, 1e-3, 1.0]),
    "all_different": dict(ALL_DIFFERENT),
    "one_member": dict(lr=[2e-2], weight_decay=[0.1], beta1=[0.7], beta2=[0.98], eps=[1e-7]),
    "accumulation": dict(P4, lr=[1e-2, 2e-3, 5e-2, 1e-3], weight_decay=[0.0, 0.1, 1e-2, 0.5],
                         num_grad_accum=[1, 2, 3, 5]),
    "accumulation_all_different": dict(ALL_DIFFERENT, num_grad_accum=[4, 1, 2, 3]),
    # The stream's gradient norms run from about 0.005 to 50, so some steps clip and some do not.
    "clipping": dict(ALL_DIFFERENT, max_grad_norm=1.0),
    "clipping_accumulation": dict(ALL_DIFFERENT, num_grad_accum=[2, 1, 3, 1], max_grad_norm=0.5),
    # Several param groups, one per parameter of tiny_model: (lr, weight decay) relative to the genes'.
    # The biases do not decay; the second layer trains at 0.3x the lr and decays twice as hard.
    "param_groups": dict(ALL_DIFFERENT, groups=[(1.0, 1.0), (1.0, 0.0), (0.3, 2.0), (0.3, 0.0)]),
    "param_groups_accumulation_clipping": dict(ALL_DIFFERENT, groups=[(1.0, 1.0), (2.0, 0.0), (0.5, 0.5), (1.0, 0.0)],
                                               num_grad_accum=[2, 1, 3, 1], max_grad_norm=0.5),
}
SIZES = [12, 4, 8, 2]  # tiny_model's parameters' value counts, in flat's column order
STEPS = 30  # calls of the optimizer (micro-batches when accumulating)


class FunctionalRunner:
    """Drives :func:`adamw_step_` the way a training loop would: summed grads, reset when used."""

    adamw = staticmethod(adamw_step_)

    def __init__(self, init: torch.Tensor, hyper: AdamWHyper, accum: torch.Tensor | None,
                 max_grad_norm: float | None = None, scales=None):
        self.params = init.clone()
        self.state = adamw_init(self.params)
        self.hyper, self.accum, self.max_grad_norm = hyper, accum, max_grad_norm
        self.extra = {} if scales is None else {"scales": scales}
        self.grad_sum = torch.zeros_like(self.params)

    def step(self, grad: torch.Tensor) -> None:
        """Add one micro-batch gradient ``[P, N]`` and call the optimizer."""
        self.grad_sum += grad
        self.adamw(self.params, self.grad_sum, self.state, self.hyper, self.accum, self.max_grad_norm, **self.extra)
        # Members that just updated (count back to 0) start a fresh sum.
        self.grad_sum[self.state.accum_count == 0] = 0

    def flat_state(self):
        """``(params, exp_avg, exp_avg_sq, step)``, each member-major."""
        return self.params, self.state.exp_avg, self.state.exp_avg_sq, self.state.step


class ClassRunner:
    """Drives :class:`BatchedAdamW` as ``member.optimizer``: grads land in ``p.grad``, then step, zero_grad."""

    update = "per-member"  # PyTorch's fused kernel per member, the CPU default for members of 4096+ values

    def __init__(self, init: torch.Tensor, hyper: AdamWHyper, accum: torch.Tensor | None,
                 max_grad_norm: float | None = None, scales=None):
        self.population = PopulationModel(tiny_model(), init.shape[0])
        with torch.no_grad():
            self.population.flat.copy_(init)
        self.optimizer = BatchedAdamW(self.population, hyper, accum, max_grad_norm, update=self.update,
                                      scales=scales)

    def step(self, grad: torch.Tensor) -> None:
        """Accumulate one micro-batch gradient ``[P, N]`` into ``p.grad`` (as backward does), step, zero_grad."""
        offset = 0
        for leaf in self.population.parameters():
            n = leaf[0].numel()
            leaf.grad.add_(grad[:, offset:offset + n].view_as(leaf))
            offset += n
        self.optimizer.step()
        self.optimizer.zero_grad()

    def flat_state(self):
        """``(params, exp_avg, exp_avg_sq, step)``, each member-major."""
        s = self.optimizer.adamw_state
        return self.population.flat, s.exp_avg, s.exp_avg_sq, s.step


class BatchedClassRunner(ClassRunner):
    """:class:`ClassRunner` with the tensor-op update that accelerators use."""

    update = "batched"


class CompiledRunner(FunctionalRunner):
    """:class:`FunctionalRunner` with the elementwise half compiled (``FusedStep(compile="optimizer")``)."""

    adamw = staticmethod(adamw_update("batched", compile=True))


class TorchReference:
    """P independent ``torch.optim.AdamW`` over one flat parameter each.

    Accumulated micro-batch gradients are averaged, then clipped with
    ``torch.nn.utils.clip_grad_norm_`` when ``max_grad_norm`` is given.
    """

    def __init__(self, init: torch.Tensor, hyper: AdamWHyper, accum: list[int] | None,
                 max_grad_norm: float | None = None, groups: list[tuple[float, float]] | None = None):
        p = init.shape[0]
        self.max_grad_norm = max_grad_norm
        self.params = [nn.Parameter(init[i].clone()) for i in range(p)]
        self.optimizers = [torch.optim.AdamW([w], **member_kwargs(hyper, i)) for i, w in enumerate(self.params)]
        self.groups = groups
        if groups is not None:  # one tensor per parameter, each in its own group of torch's AdamW
            self.pieces = [[nn.Parameter(t.clone()) for t in init[i].split(SIZES)] for i in range(p)]
            self.optimizers = []
            for i in range(p):
                kw = member_kwargs(hyper, i)
                self.optimizers.append(torch.optim.AdamW(
                    [{"params": [w], "lr": kw["lr"] * a, "weight_decay": kw["weight_decay"] * b}
                     for w, (a, b) in zip(self.pieces[i], groups)], betas=kw["betas"], eps=kw["eps"]))
        self.accum = accum or [1] * p
        self.pending = [0] * p

    def step(self, grad: torch.Tensor) -> list[bool]:
        """Feed one micro-batch ``grad[i]`` to every member; return which members updated."""
        if self.groups is not None:
            return self._step_groups(grad)
        updated = []
        for i, (w, opt) in enumerate(zip(self.params, self.optimizers)):
            w.grad = grad[i].clone() if w.grad is None else w.grad + grad[i]
            self.pending[i] += 1
            ready = self.pending[i] == self.accum[i]
            if ready:
                w.grad /= self.accum[i]
                if self.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_([w], self.max_grad_norm)
                opt.step()
                w.grad = None
                self.pending[i] = 0
            updated.append(ready)
        return updated

    def _step_groups(self, grad: torch.Tensor) -> list[bool]:
        updated = []
        for i, opt in enumerate(self.optimizers):
            for w, g in zip(self.pieces[i], grad[i].split(SIZES)):
                w.grad = g.clone() if w.grad is None else w.grad + g
            self.pending[i] += 1
            ready = self.pending[i] == self.accum[i]
            if ready:
                for w in self.pieces[i]:
                    w.grad /= self.accum[i]
                if self.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(self.pieces[i], self.max_grad_norm)
                opt.step()
                for w in self.pieces[i]:
                    w.grad = None
                self.pending[i] = 0
            updated.append(ready)
        return updated

    def member_state(self, i: int):
        """Member ``i``'s ``(param, exp_avg, exp_avg_sq, step)``, or zeros before its first update."""
        if self.groups is not None:
            states = [self.optimizers[i].state.get(w) for w in self.pieces[i]]
            w = torch.cat([t.detach() for t in self.pieces[i]])
            if not states[0]:
                zeros = torch.zeros_like(w)
                return w, zeros, zeros, torch.tensor(0.0, dtype=torch.float64)
            return (w, torch.cat([s["exp_avg"] for s in states]), torch.cat([s["exp_avg_sq"] for s in states]),
                    states[0]["step"].to(torch.float64))
        w = self.params[i]
        state = self.optimizers[i].state.get(w)
        if not state:
            zeros = torch.zeros_like(w)
            return w.detach(), zeros, zeros, torch.tensor(0.0, dtype=torch.float64)
        return w.detach(), state["exp_avg"], state["exp_avg_sq"], state["step"].to(torch.float64)


def gradient_stream(p: int, n: int, steps: int, seed: int) -> list[torch.Tensor]:
    """``steps`` random ``[P, N]`` gradients with scales from 1e-3 to 10 and some exact zeros."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        scale = 10 ** torch.empty(p, 1, dtype=DTYPE).uniform_(-3, 1, generator=g)
        grad = torch.randn(p, n, dtype=DTYPE, generator=g) * scale
        grad[:, 0] = 0.0  # a parameter that never gets a gradient: only weight decay moves it
        out.append(grad)
    return out


@pytest.mark.parametrize("runner_cls", [FunctionalRunner, CompiledRunner, ClassRunner, BatchedClassRunner],
                         ids=["adamw_step_", "adamw_step_-compiled", "BatchedAdamW", "BatchedAdamW-batched"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_torch_adamw_per_member(case, runner_cls):
    spec = dict(CASES[case])
    accum_list = spec.pop("num_grad_accum", None)
    max_grad_norm = spec.pop("max_grad_norm", None)
    groups = spec.pop("groups", None)
    hyper = make_hyper(**spec)
    p = hyper.lr.shape[0]
    n = sum(t.numel() for t in tiny_model().parameters())
    init = torch.randn(p, n, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    accum = None if accum_list is None else torch.tensor(accum_list, dtype=torch.long)

    scales = None if groups is None else group_scales(groups, SIZES, DTYPE)
    assert n == sum(SIZES)
    batched = runner_cls(init, hyper, accum, max_grad_norm, scales)
    reference = TorchReference(init, hyper, accum_list, max_grad_norm, groups)
    updates = torch.zeros(p, dtype=torch.long)
    for grad in gradient_stream(p, n, STEPS, seed=2):
        before = [t.clone() for t in batched.flat_state()]
        updated = reference.step(grad)
        batched.step(grad)
        after = batched.flat_state()
        for i in range(p):
            if updated[i]:
                updates[i] += 1
            else:
                # A member waiting for more micro-batches is left exactly as it was.
                for old, new in zip(before, after):
                    assert torch.equal(old[i], new[i]), f"member {i} changed while accumulating"
            ref = reference.member_state(i)
            for what, got, want in zip(("param", "exp_avg", "exp_avg_sq", "step"), after, ref):
                torch.testing.assert_close(got[i], want, rtol=RTOL, atol=ATOL,
                                           msg=lambda m, i=i, what=what: f"member {i} {what}: {m}")
    expected_updates = [STEPS // k for k in (accum_list or [1] * p)]
    assert updates.tolist() == expected_updates
    # The run moved every member with a non-zero lr (the comparison above is not vacuous).
    moved = (batched.flat_state()[0] - init).abs().amax(dim=1)
    assert bool((moved[hyper.lr > 0] > 1e-6).all())
    assert bool((moved[hyper.lr == 0] == 0).all())


def test_torch_adamw_reference_uses_its_documented_rule():
    """The harness's reference is the AdamW the docstring states (so the table checks that rule)."""
    hyper = make_hyper(lr=[0.05], weight_decay=[0.2], beta1=[0.8], beta2=[0.9], eps=[1e-3])
    init = torch.tensor([[0.7, -1.3]], dtype=DTYPE)
    reference = TorchReference(init, hyper, None)
    p, m, v = init[0].clone(), torch.zeros(2, dtype=DTYPE), torch.zeros(2, dtype=DTYPE)
    for t, grad in enumerate(gradient_stream(1, 2, 5, seed=3), start=1):
        reference.step(grad)
        g = grad[0]
        p = p * (1 - 0.05 * 0.2)
        m = 0.8 * m + 0.2 * g
        v = 0.9 * v + 0.1 * g * g
        p = p - 0.05 / (1 - 0.8**t) * m / (v.sqrt() / math.sqrt(1 - 0.9**t) + 1e-3)
        torch.testing.assert_close(reference.params[0].detach(), p, rtol=RTOL, atol=ATOL)


def test_single_step_by_hand():
    """Two members, one parameter each, two steps, values worked out on paper.

    Member 0: lr=0.1, weight_decay=0.5, betas=(0.5, 0.75), eps=0, p=1.
      step 1, g=2: p = 1 * (1 - 0.05) = 0.95; m = 0.5*2 = 1; v = 0.25*4 = 1;
                   m_hat = 1/0.5 = 2; sqrt(v_hat) = sqrt(1/0.25) = 2; p = 0.95 - 0.1 * 2/2 = 0.85.
      step 2, g=1: p = 0.85 * 0.95 = 0.8075; m = 0.5 + 0.5 = 1; v = 0.75 + 0.25 = 1;
                   m_hat = 1/0.75 = 4/3; sqrt(v_hat) = sqrt(1/0.4375) = 4/sqrt(7);
                   p = 0.8075 - 0.1 * (4/3) / (4/sqrt(7)) = 0.8075 - 0.1 * sqrt(7)/3.
    Member 1: lr=0.5, weight_decay=0, betas=(0, 0), eps=1, p=-2 (sign-like steps):
      step 1, g=2: p = -2 - 0.5 * 2/(2+1) = -7/3;  step 2, g=1: p = -7/3 - 0.5 * 1/(1+1) = -31/12.
    """
    hyper = make_hyper(lr=[0.1, 0.5], weight_decay=[0.5, 0.0], beta1=[0.5, 0.0], beta2=[0.75, 0.0], eps=[0.0, 1.0])
    params = torch.tensor([[1.0], [-2.0]], dtype=DTYPE)
    state = adamw_init(params)

    adamw_step_(params, torch.tensor([[2.0], [2.0]], dtype=DTYPE), state, hyper)
    torch.testing.assert_close(params, torch.tensor([[0.85], [-7 / 3]], dtype=DTYPE), rtol=0, atol=1e-15)
    torch.testing.assert_close(state.exp_avg, torch.tensor([[1.0], [2.0]], dtype=DTYPE), rtol=0, atol=1e-15)
    torch.testing.assert_close(state.exp_avg_sq, torch.tensor([[1.0], [4.0]], dtype=DTYPE), rtol=0, atol=1e-15)
    assert state.step.tolist() == [1.0, 1.0]

    adamw_step_(params, torch.tensor([[1.0], [1.0]], dtype=DTYPE), state, hyper)
    expected = torch.tensor([[0.8075 - 0.1 * math.sqrt(7) / 3], [-31 / 12]], dtype=DTYPE)
    torch.testing.assert_close(params, expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(state.exp_avg, torch.tensor([[1.0], [1.0]], dtype=DTYPE), rtol=0, atol=1e-15)
    torch.testing.assert_close(state.exp_avg_sq, torch.tensor([[1.0], [1.0]], dtype=DTYPE), rtol=0, atol=1e-15)
    assert state.step.tolist() == [2.0, 2.0]


def test_accumulation_averages_micro_batches_by_hand():
    """With num_grad_accum=[1, 3] member 1 updates once, on the mean of its three gradients."""
    hyper = make_hyper(lr=[0.1, 0.1], weight_decay=[0.0, 0.0], beta1=[0.0, 0.0], beta2=[0.0, 0.0], eps=[1.0, 1.0])
    params = torch.zeros(2, 1, dtype=DTYPE)
    state = adamw_init(params)
    accum = torch.tensor([1, 3])
    grad_sum = torch.zeros(2, 1, dtype=DTYPE)
    for g in (3.0, 6.0, 9.0):
        grad_sum += g
        adamw_step_(params, grad_sum, state, hyper, accum)
        grad_sum[state.accum_count == 0] = 0
    # betas = 0: each update is -lr * g / (|g| + eps).
    # Member 0 updates three times: 3/4, 6/7, 9/10. Member 1 once, with g = (3+6+9)/3 = 6: 6/7.
    expected = torch.tensor([[-0.1 * (3 / 4 + 6 / 7 + 9 / 10)], [-0.1 * 6 / 7]], dtype=DTYPE)
    torch.testing.assert_close(params, expected, rtol=0, atol=1e-15)
    assert state.step.tolist() == [3.0, 1.0]
    assert state.accum_count.tolist() == [0, 0]


def backward_into(population: PopulationModel, x: torch.Tensor, scale: float = 1.0) -> None:
    """One real backward of ``scale * sum(model(x)**2)`` per member into the stacked ``.grad``."""
    loss = population(x).pow(2).sum() * scale
    loss.backward()


def test_zero_grad_with_accumulation_keeps_pending_members():
    p = 3
    population = PopulationModel(tiny_model(), p, init="independent", generator=torch.Generator().manual_seed(0))
    hyper = make_hyper(lr=[1e-2] * p, weight_decay=[0.0] * p, beta1=[0.9] * p, beta2=[0.999] * p, eps=[1e-8] * p)
    optimizer = BatchedAdamW(population, hyper, torch.tensor([1, 2, 3]))
    x = torch.randn(p, 5, 3, dtype=DTYPE)

    backward_into(population, x)
    first = population.grad_flat.clone()
    assert bool((first.abs().sum(1) > 0).all())
    optimizer.step()  # member 0 updates; members 1 and 2 hold one pending micro-batch
    optimizer.zero_grad()
    assert torch.equal(population.grad_flat[0], torch.zeros_like(first[0]))
    assert torch.equal(population.grad_flat[1:], first[1:])

    backward_into(population, x)
    second = population.grad_flat.clone()
    optimizer.step()  # member 1 reaches 2 and updates; member 2 holds two
    optimizer.zero_grad()
    assert torch.equal(population.grad_flat[:2], torch.zeros_like(second[:2]))
    assert torch.equal(population.grad_flat[2], second[2])
    assert optimizer.adamw_state.accum_count.tolist() == [0, 0, 2]

    # Without accumulation zero_grad clears everything; set_to_none is ignored so the buffer is reused.
    other = PopulationModel(tiny_model(), p, init="independent", generator=torch.Generator().manual_seed(0))
    plain = BatchedAdamW(other, hyper)  # one optimizer per population: its moments are part of the member state
    backward_into(other, x)
    grads_before = [leaf.grad for leaf in other.parameters()]
    plain.zero_grad(set_to_none=True)
    assert torch.equal(other.grad_flat, torch.zeros_like(second))
    assert all(leaf.grad is g for leaf, g in zip(other.parameters(), grads_before))


def test_grad_set_to_none_does_not_leave_stale_gradients():
    """``p.grad = None`` between steps (a torch habit) must not make step() read the old buffer."""
    p = 2
    module = tiny_model()
    hyper = make_hyper(lr=[1e-2, 3e-2], weight_decay=[0.1, 0.0], beta1=[0.9, 0.8], beta2=[0.999, 0.99],
                       eps=[1e-8, 1e-6])
    population = PopulationModel(module, p, init="independent", generator=torch.Generator().manual_seed(0))
    optimizer = BatchedAdamW(population, hyper)
    references = [population.member_module(i) for i in range(p)]
    ref_opts = [torch.optim.AdamW(m.parameters(), **member_kwargs(hyper, i)) for i, m in enumerate(references)]
    data = torch.randn(3, p, 4, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(5))

    for step, x in enumerate(data):
        if step > 0:
            # The user clears the grads themselves instead of calling optimizer.zero_grad().
            for leaf in population.parameters():
                leaf.grad = None
        backward_into(population, x)
        optimizer.step()
        for i, (ref, opt) in enumerate(zip(references, ref_opts)):
            opt.zero_grad()
            ref(x[i]).pow(2).sum().backward()
            opt.step()
            got = population.member_module(i)
            for (name, want), have in zip(ref.named_parameters(), got.parameters()):
                torch.testing.assert_close(have, want.detach(), rtol=RTOL, atol=ATOL,
                                           msg=lambda m, i=i, name=name: f"step {step} member {i} {name}: {m}")
        # The gradients are back in the shared buffer, where the next backward accumulates.
        for leaf in population.parameters():
            assert leaf.grad.untyped_storage().data_ptr() == population.grad_flat.untyped_storage().data_ptr()

    # Set to None and step without a backward: no gradient at all, not the last one again.
    for leaf in population.parameters():
        leaf.grad = None
    optimizer.zero_grad()
    assert torch.equal(population.grad_flat, torch.zeros_like(population.grad_flat))


def test_state_dict_round_trip_continues_identically():
    p = 3
    hyper = make_hyper(**{k: v[:p] for k, v in ALL_DIFFERENT.items()})
    accum = torch.tensor([1, 2, 3])
    init = torch.randn(p, sum(t.numel() for t in tiny_model().parameters()), dtype=DTYPE)
    grads = gradient_stream(p, init.shape[1], 12, seed=7)

    first = ClassRunner(init, hyper, accum.clone())
    for grad in grads[:5]:
        first.step(grad)
    saved = first.optimizer.state_dict()
    assert set(saved) == {"step", "exp_avg", "exp_avg_sq", "accum_count", "skipped"}
    # The saved tensors are copies: training on does not change the checkpoint.
    snapshot = copy.deepcopy(saved)

    second = ClassRunner(first.population.flat.detach(), hyper, accum.clone())
    second.optimizer.load_state_dict(saved)
    with torch.no_grad():  # partial accumulation sums are the model's, not the optimizer's
        second.population.grad_flat.copy_(first.population.grad_flat)
    for grad in grads[5:]:
        first.step(grad)
        second.step(grad)
    for name in snapshot:
        assert torch.equal(saved[name], snapshot[name])
    for a, b in zip(first.flat_state(), second.flat_state()):
        assert torch.equal(a, b)
    assert torch.equal(first.optimizer.adamw_state.accum_count, second.optimizer.adamw_state.accum_count)


def test_load_state_dict_errors():
    p = 2
    hyper = make_hyper(lr=[1e-3] * p, weight_decay=[0.0] * p, beta1=[0.9] * p, beta2=[0.999] * p, eps=[1e-8] * p)
    optimizer = BatchedAdamW(PopulationModel(tiny_model(), p), hyper)
    good = optimizer.state_dict()
    n = good["exp_avg"].shape[1]
    current = optimizer.state_dict()
    good = {k: v + 1 for k, v in good.items()}  # distinguishable from the live state

    missing = {k: v for k, v in good.items() if k != "exp_avg_sq"}
    with pytest.raises(ValueError, match=r"BatchedAdamW.load_state_dict: missing 'exp_avg_sq'"):
        optimizer.load_state_dict(missing)

    wrong = dict(good, exp_avg=torch.zeros(p + 1, n, dtype=DTYPE))
    with pytest.raises(ValueError, match=rf"'exp_avg' has shape \[{p + 1}, {n}\], expected \[{p}, {n}\]"):
        optimizer.load_state_dict(wrong)

    wrong_step = dict(good, step=torch.zeros(p + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match=rf"'step' has shape \[{p + 1}\], expected \[{p}\]"):
        optimizer.load_state_dict(wrong_step)

    # A refused checkpoint leaves the optimizer as it was, not half loaded.
    for name, t in optimizer.state_dict().items():
        assert torch.equal(t, current[name]), name
    optimizer.load_state_dict(good)
    for name, t in optimizer.state_dict().items():
        assert torch.equal(t, good[name]), name


def test_update_modes():
    def population():  # one optimizer per population
        return PopulationModel(tiny_model(), 2)

    hyper = make_hyper([1e-3, 1e-2], [0.0, 0.1], [0.9, 0.8], [0.999, 0.99], [1e-8, 1e-6])
    assert BatchedAdamW(population(), hyper).update == "batched"  # small members: the tensor-op update
    assert BatchedAdamW(population(), hyper, update="per-member").update == "per-member"
    wide = PopulationModel(nn.Linear(64, 64), 2)  # 4160 values per member: PyTorch's fused kernel
    assert BatchedAdamW(wide, hyper).update == "per-member"
    with pytest.raises(ValueError, match=r"BatchedAdamW: update must be one of \('auto', 'batched', 'per-member'\), got 'fast'"):
        BatchedAdamW(population(), hyper, update="fast")
