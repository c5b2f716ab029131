"""The fused training step: one vmapped forward and backward and one batched AdamW update per call.

The imperative loop (``member.model(x)``, ``member_loss``, ``backward`` inside
``sync_context()``, ``optimizer.step()``, ``zero_grad()``, ``member.step()``) runs several
Python-level calls per step. :class:`FusedStep` does the same step as one function of the
population's tensors:

1. the per-member loss through ``functional_call``, vmapped once over the member dimension,
   gives every member's loss, and its gradient comes either from ``torch.func.grad_and_value``
   under the same vmap or from one autograd backward over the stacked parameters
   (:data:`BACKWARDS`);
2. in the cooperative phase the gradients are averaged over members (as ``sync_context()``
   does);
3. AdamW updates ``flat[P, N]`` and the optimizer state in place, with the genes in force and
   gradient accumulation exactly as :class:`~vmapclan.BatchedAdamW` (it is the same update,
   :meth:`~vmapclan.BatchedAdamW.apply_`, run as PyTorch's fused AdamW kernel per member on CPU,
   or as batched tensor ops that can be compiled or captured);
4. the clan's round clock advances, as ``member.step()``.

Steps 2 and 3 are the gradient path every training loop shares (:mod:`vmapclan.gradients`).

A cooperative step of members that are copies of one model (the clan's cooperative phase, and
:meth:`~vmapclan.Clan.cooperate`) does one model's work instead (:data:`ONE_MODEL_FORMS`): the
forward and backward of member 0's weights over all ``P x B`` samples and one AdamW update of
member 0's row; the other members catch up when they are needed
(:meth:`~vmapclan.Clan.sync_members`).

Because that function only reads and writes tensors whose storage never moves (selection,
``load_state_dict`` and phase changes all copy in place), it can be compiled with
``torch.compile`` or, on CUDA, captured once into a CUDA graph and replayed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import optree
import torch
import torch.utils._pytree as pytree
from torch.func import functional_call, grad_and_value, vmap

from .checks import int_in
from .gradients import member_mean, reduce_gradients_, release_gradients_, share_pending_sums_
from .optim import UPDATES, adamw_update, resolve_update
from .population import vectorized_forward

__all__ = ["FusedStep", "check_options", "resolve_backward", "capture_cuda_graph", "LAYOUTS", "BACKWARDS",
           "COMPILE_MODES", "UPDATES", "ONE_MODEL_FORMS", "VMAP_BACKWARD_MIN_NUMEL"]

ONE_MODEL_FORMS = ("batch", "members")
"""How a cooperative step runs the members as one model. Both compute the documented objective,
the mean of the members' losses, each ``loss_fn`` of a member's own ``B`` samples; they differ
in how the forward runs.

- ``"batch"``: the plain module on the ``P x B`` samples as one batch (each batch tensor's member
  and batch dimensions merged), with the kernels a plain model gets; its output is cut back into
  the members' ``[P, B, ...]`` rows and ``loss_fn`` runs on each member's rows (vmapped). A loss
  that weighs its samples (targets padded with ``ignore_index``, a sum) means exactly what it
  means in the ``Member`` loop. With ``FusedStep(..., sample_mean_loss=True)`` (a loss declared
  a plain mean over samples) ``loss_fn`` runs once on the merged batch instead: the same value.
  Used for any model whose forward treats its samples apart.
- ``"members"``: every member's forward on its own shard under vmap, with member 0's weights not
  batched (``in_dims=None``: one matmul over all ``P x B`` rows) and per-member buffers. Used
  where the merged forward would differ: BatchNorm in training mode (per-member batch and running
  statistics), a forward that writes a buffer, mixes its batch's samples, cannot take the merged
  batch, or returns a tensor without the batch dimension first.

The form is found on the first one-model step (again for each combination of training modes),
by a probe on that batch that changes nothing: the merged forward in training mode must run,
leave every buffer bit for bit as it was and return only batch-first tensors; and in eval mode
(no dropout: the forward is deterministic) it must give the per-member forward's outputs, to
rounding, which a forward that mixes samples does not come near.
"""

LAYOUTS = ("views", "flat")
"""How the parameters enter the vmapped function.

- ``"views"``: one ``[P, *shape]`` view of ``flat`` per parameter; the per-parameter gradients
  are concatenated straight into the population's gradient buffer ``grad_flat``.
- ``"flat"``: ``flat[P, N]`` itself, split into parameters inside the per-member function; the
  gradient comes back as one ``[P, N]`` tensor (autograd's backward of the split is a cat).
"""

BACKWARDS = ("auto", "vmap", "autograd")
"""How the gradients are computed.

- ``"auto"``: ``"autograd"`` (less per-op cost in the backward: measured faster eagerly for the
  models whose step is bound by host time, on CPU and CUDA, and on every model of the test zoo
  on CPU), except for members trained apart with :data:`VMAP_BACKWARD_MIN_NUMEL` values or more
  each (there the vmap backward's gradients come out as the update reads them, and autograd's
  cost a pass more over all of them), and ``"vmap"`` where ``"autograd"`` cannot go (``compile="step"``,
  ``layout="flat"``) and under a CUDA graph (where host time is gone and vmap measured up to 10%
  faster). For a model of a few large matmuls (the MLPs of the benchmark, on CPU and on CUDA)
  ``"vmap"`` is faster; for one of many small ops (an LSTM, GPT-2) it is much slower. The
  numbers are in ``BENCHMARKS.md``.
- ``"vmap"``: ``torch.func.grad_and_value`` of the per-member loss, vmapped: the backward runs
  under vmap too, and each step's gradients come back as new ``[P, *shape]`` tensors. With the
  per-member update and no accumulation the kernel reads them where they are (each member's
  row made dense), with no copy into ``grad_flat``. ``torch.func`` gives a parameter the loss
  does not reach a zero gradient, where autograd gives none and AdamW skips it; so the
  parameters the loss reaches are found by one autograd backward on the first step of each
  phase and combination of training modes, and taken as fixed until the next. A model whose
  Python code reaches other parameters from one step to the next within a phase (a layer
  skipped on some steps by a flag) needs ``"autograd"``.
- ``"autograd"``: the vmapped forward gives the ``[P]`` losses, and one ordinary autograd
  backward over the stacked parameters accumulates the gradients in place into ``grad_flat``
  (as the imperative loop does): fewer per-op costs in the backward and no second gradient
  buffer. Not with ``layout="flat"`` or ``compile="step"``.
"""

COMPILE_MODES = (None, "optimizer", "step")
"""``None`` (eager), ``"optimizer"`` (``torch.compile`` of the update) or ``"step"`` (of the whole step)."""

def check_options(device: torch.device | str, *, layout: str = "views", backward: str = "auto",
                  compile: str | None = None, update: str = "auto", cuda_graph: bool = False) -> None:
    """Check :class:`FusedStep`'s options for a population on ``device``, before any model exists.

    Raises:
        ValueError: for an unknown layout, backward, compile mode or update, or a combination
            that cannot work (see :class:`FusedStep`).
        TypeError: if ``cuda_graph`` is not a bool.
    """
    device = torch.device(device)
    if layout not in LAYOUTS:
        raise ValueError(f"FusedStep: layout must be one of {LAYOUTS}, got {layout!r}")
    if backward not in BACKWARDS:
        raise ValueError(f"FusedStep: backward must be one of {BACKWARDS}, got {backward!r}")
    if backward == "autograd" and (layout != "views" or compile == "step"):
        raise ValueError(
            f"FusedStep: backward='autograd' differentiates the stacked parameters themselves, so it needs "
            f"layout='views' and cannot compile the whole step; got layout={layout!r}, compile={compile!r}"
        )
    if compile not in COMPILE_MODES:
        raise ValueError(f"FusedStep: compile must be one of {COMPILE_MODES}, got {compile!r}")
    if update not in UPDATES:
        raise ValueError(f"FusedStep: update must be one of {UPDATES}, got {update!r}")
    if not isinstance(cuda_graph, bool):
        raise TypeError(f"FusedStep: cuda_graph must be True or False, got {cuda_graph!r}")
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"FusedStep: cuda_graph=True needs the clan on a CUDA device, it is on {device}")
    if cuda_graph and compile == "step":
        raise ValueError("FusedStep: cuda_graph=True captures the step itself; use compile=None or 'optimizer'")
    if update == "per-member" and (compile is not None or device.type != "cpu"):
        raise ValueError(
            f"FusedStep: update='per-member' reads the hyperparameters on the host every step, so it is CPU-only "
            f"and cannot be compiled; got device {device} and compile={compile!r}"
        )


#: Values per member from which ``backward="auto"`` trains members apart with the vmap backward:
#: measured on CPU (1 thread), the MLPs' competitive step took 0.7x (1.1M values a member) to 0.9x
#: (85k) the autograd backward's time, and 1.2x at 26k, where the host's per-op cost dominates.
VMAP_BACKWARD_MIN_NUMEL = 1 << 16


def resolve_backward(backward: str, *, layout: str, compile: str | None, update: str, cuda_graph: bool,
                     numel: int | None = None) -> str:
    """The backward ``"auto"`` stands for with these (checked) options; an explicit one is returned as is.

    See :data:`BACKWARDS` for the rule and why. ``update`` is the resolved update, not ``"auto"``
    (no choice depends on it today; it is taken so that callers need not know). ``numel``: the
    values of one member, for members trained apart (``None``: the one-model step's backward).
    """
    if backward != "auto":
        return backward
    vmap_only = cuda_graph or compile == "step" or layout != "views"
    large = numel is not None and numel >= VMAP_BACKWARD_MIN_NUMEL
    return "vmap" if vmap_only or large else "autograd"


def capture_cuda_graph(step: Callable[[], object], device: torch.device, *, warmup: int = 2,
                       after_warmup: Callable[[], None] | None = None) -> tuple[torch.cuda.CUDAGraph, object]:
    """Run ``step`` ``warmup`` times on a side stream, then capture one call of it on that stream.

    The warm-up keeps lazy initialisation (cuBLAS handles and workspaces, autograd's device
    thread, allocator pools) out of the capture. Two steps by default: PyTorch's whole-network
    capture example warms up several iterations, and with a single warm-up step a capture was
    once seen invalidated in this package's CUDA tests.

    Args:
        step: What to capture; every tensor it reads or writes must outlive the graph.
        device: The CUDA device.
        warmup: Eager calls before the capture.
        after_warmup: Called between the warm-up and the capture (e.g. to undo the warm-up).

    Returns:
        ``(graph, what the captured call returned)``: replaying the graph recomputes the latter in place.
    """
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream(device).wait_stream(stream)
    if after_warmup is not None:
        after_warmup()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        output = step()
    return graph, output


def _member_losses(losses: torch.Tensor, p: int) -> torch.Tensor:
    """``losses`` if it is one scalar per member (``[P]``), as ``member_loss`` requires; else a ValueError."""
    if losses.shape != (p,):
        raise ValueError(
            f"FusedStep: loss_fn must reduce each member's batch to a scalar (losses of shape [{p}]), "
            f"got {list(losses.shape)}; use a mean or sum reduction"
        )
    return losses


def _merged(tensors):
    """``tensors`` (a tuple, or a dict of keyword tensors) with each one's member and batch dimensions merged."""
    if isinstance(tensors, dict):
        return {n: t.flatten(0, 1) for n, t in tensors.items()}
    return tuple(t.flatten(0, 1) for t in tensors)


def _losses_of_rows(loss_fn: Callable, output, targets: tuple, p: int) -> torch.Tensor:
    """Every member's ``loss_fn`` on its own rows of a merged ``[P x B, ...]`` forward's ``output``: ``[P]``.

    The output's tensors are cut back to ``[P, B, ...]`` and vmapped over; anything else in it
    (a ``transformers`` cache object) reaches every member's ``loss_fn`` as it is.
    """
    leaves, spec = pytree.tree_flatten(output)
    where = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]

    def member(tensors, *member_targets):
        full = list(leaves)
        for i, t in zip(where, tensors):
            full[i] = t
        return loss_fn(pytree.tree_unflatten(full, spec), *member_targets)

    rows = [leaves[i].unflatten(0, (p, -1)) for i in where]
    return vmap(member, randomness="different")(rows, *targets)


def _output_tensors(output) -> list[torch.Tensor]:
    """The tensors of a model's output, the ones the two one-model forms must agree on.

    vmap can return tensors only: a ``transformers`` output also holds a cache object (GPT-2's
    ``past_key_values`` by default), which is left out.
    """
    return [leaf for leaf in pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor)]


def _close(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Whether two computations of one value agree to their dtype's rounding (shapes may differ by a merged dim)."""
    if ours.numel() != theirs.numel() or ours.dtype != theirs.dtype:
        return False
    ours = ours.reshape(theirs.shape)
    if not theirs.is_floating_point():
        return torch.equal(ours, theirs)
    tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(theirs.dtype, 1e-2)
    scale = max(1.0, theirs.abs().max().item()) if theirs.numel() else 1.0
    return torch.allclose(ours, theirs, rtol=tol, atol=tol * scale)


class FusedStep:
    """One training step of the whole clan as a single vmapped function call.

    ``step(x, y)`` is the body of the imperative ``Member`` loop::

        loss = member_loss(loss_fn, member.model(x), y)
        with member.sync_context():
            loss.sum().backward()
        member.optimizer.step()
        member.optimizer.zero_grad()
        member.step()

    computed as one vmapped forward and backward (see :data:`BACKWARDS`) followed by the batched
    AdamW update in place. It respects the phase (gradients averaged over members when
    cooperating), the genes in force and gradient accumulation as that loop does (the same
    numbers to float rounding), advances the clan's round clock, and returns the per-member
    losses ``[P]`` without a host synchronisation. It computes gradients also when called under
    ``torch.no_grad()``.

    A cooperative step of the clan (its cooperative phase, or :meth:`~vmapclan.Clan.cooperate`)
    trains the identical members as the one model they are (:data:`ONE_MODEL_FORMS`): one
    forward and backward of member 0's weights over all ``P x B`` samples and one AdamW update of
    member 0's row, whatever ``layout`` and ``update`` say about the members trained apart.

    Args:
        clan: The :class:`~vmapclan.Clan` to train (it must have a model).
        loss_fn: ``loss_fn(output, *targets) -> scalar`` for *one* member, e.g.
            ``F.cross_entropy``; ``output`` is the model's output for that member.
        num_inputs: How many leading batch tensors go to the model; the rest go to ``loss_fn``.
            0 when every model input is a keyword tensor (``step(y, input_ids=ids)``).
        layout: One of :data:`LAYOUTS` (default ``"views"``, the fastest measured on CPU).
        backward: One of :data:`BACKWARDS` (default ``"auto"``).
        compile: One of :data:`COMPILE_MODES`. ``"optimizer"`` compiles the elementwise part of
            the batched update (one loop instead of about ten passes over ``[P, N]``); ``"step"``
            also compiles the vmapped forward and backward, which removes most per-op overhead
            (the win for small models). The first call of each phase and shape compiles.
        update: One of :data:`UPDATES`: how the optimizer update runs (default ``"auto"``:
            :func:`~vmapclan.optim.resolve_update`'s choice: the batched tensor update when
            compiling, PyTorch's fused AdamW kernel per member on CPU for members of 4096 values
            or more, the batched update for smaller ones and on CUDA). Both give the same result
            to float rounding.
        cuda_graph: On CUDA, capture each phase's step into a CUDA graph on first use and replay
            it. Inputs are copied into static buffers; the shapes must stay the same (a new
            shape captures a new graph). Compatible with ``compile="optimizer"``.
        sample_mean_loss: Declare that ``loss_fn`` is a mean over its batch's samples, each
            weighted alike (``F.cross_entropy`` or ``F.mse_loss`` at their default reduction,
            without ``ignore_index`` padding or class weights): the ``"batch"`` one-model form
            then takes it once on the merged ``P x B`` batch, the same objective at less cost
            (the per-member losses' vmap costs about 0.25 ms a step on CPU). Default ``False``:
            each member's loss on its own rows, right for any loss. The step never guesses it
            from the data: a loss that weighs samples can agree with the mean on one batch and
            not on the next.

    Note:
        Use it instead of, not together with, the imperative loop within a step: without gradient
        accumulation a fused step starts from zero gradients (as after ``zero_grad()``) and does
        not read what an imperative ``backward`` left in ``grad_flat``. Between steps the two
        can alternate freely; they share every tensor.

    Raises:
        ValueError: for a genome-only clan, an unknown layout, backward, compile mode or update,
            ``backward="autograd"`` with ``layout="flat"`` or ``compile="step"``,
            ``update="per-member"`` off CPU or compiled, ``cuda_graph`` off CUDA or with
            ``compile="step"``, or ``num_inputs < 0``.
        TypeError: if ``loss_fn`` is not callable or ``cuda_graph`` is not a bool.

    Example:
        >>> step = FusedStep(clan, F.cross_entropy)  # doctest: +SKIP
        >>> for x, y in loader:  # doctest: +SKIP
        ...     losses = step(x, y)           # [P], no host sync
        ...     if clan.round_done:
        ...         clan.step(validate())

        Keyword tensors go to the model as keywords, each ``[P, B, ...]`` like the positional
        ones; with ``num_inputs=0`` every positional tensor goes to ``loss_fn``:

        >>> step = FusedStep(clan, lambda out, y: lm_loss(out.logits, y), num_inputs=0)  # doctest: +SKIP
        >>> losses = step(targets, input_ids=ids, attention_mask=mask)  # doctest: +SKIP
    """

    def __init__(self, clan, loss_fn: Callable, *, num_inputs: int = 1, layout: str = "views",
                 backward: str = "auto", compile: str | None = None, update: str = "auto",
                 cuda_graph: bool = False, sample_mean_loss: bool = False):
        if clan.population is None:
            raise ValueError("FusedStep: the clan has no model (a genome-only clan); there is nothing to train")
        if not callable(loss_fn):
            raise TypeError(f"FusedStep: loss_fn must be callable, got {type(loss_fn).__name__}")
        int_in(num_inputs, "FusedStep: num_inputs", 0, expected="a non-negative int")
        population = clan.population
        if cuda_graph is True and clan.group is not None:
            raise ValueError("FusedStep: cuda_graph=True is not supported for a clan across ranks (its collectives are not "
                             "captured in a CUDA graph); use cuda_graph=False")
        check_options(population.device, layout=layout, backward=backward, compile=compile, update=update,
                      cuda_graph=cuda_graph)
        if not isinstance(sample_mean_loss, bool):
            raise TypeError(f"FusedStep: sample_mean_loss must be a bool, got {type(sample_mean_loss).__name__}")
        self.clan, self.loss_fn, self.num_inputs = clan, loss_fn, num_inputs
        self.sample_mean_loss = sample_mean_loss
        update = resolve_update(update, population.flat, compile=compile is not None)
        options = {"layout": layout, "compile": compile, "update": update, "cuda_graph": cuda_graph}
        # The one-model step runs one model's backward, where autograd's lower per-op cost wins
        # whatever the size; members trained apart take the vmap backward from a size on.
        self._one_model_backward = resolve_backward(backward, **options)
        backward = resolve_backward(backward, **options, numel=population.numel)
        self.layout, self.backward, self.compile, self.update = layout, backward, compile, update
        self.cuda_graph = cuda_graph
        self._population = population
        self._optimizer = clan.optimizer
        self._adamw = adamw_update(update, compile=compile is not None)
        p = population.population_size
        self._names = list(population.shapes)
        self._shapes = [population.shapes[n] for n in self._names]
        self._sizes = [s.numel() for s in self._shapes]
        # Detached aliases of the population's storage: selection and load_state_dict copy into
        # these same tensors, so views made once stay valid (and a CUDA graph's addresses too).
        self._flat = population.flat.detach()
        self._views = {n: v.view(p, *s) for n, v, s in
                       zip(self._names, self._flat.split(self._sizes, 1), self._shapes)}
        self._grad_rows = list(population.grad_flat.split(self._sizes, 1))
        self._used: set[str] | None = None  # parameters the loss reaches, for the phase and modes in force
        self._used_by: dict[tuple, set[str]] = {}  # found by _find_used for each (phase, training modes)

        module, k = population.module, num_inputs
        names, shapes, sizes = self._names, self._shapes, self._sizes

        # ``kwargs`` is the dict of the model's keyword tensors: one pytree argument, so vmap's
        # in_dims 0 batches each of its tensors as it does the positional ones.
        def member_loss(params, buffers, kwargs, *batch):
            return loss_fn(functional_call(module, (params, buffers), batch[:k], kwargs), *batch[k:])

        def member_loss_flat(flat, buffers, kwargs, *batch):
            params = {n: v.view(s) for n, v, s in zip(names, flat.split(sizes), shapes)}
            return member_loss(params, buffers, kwargs, *batch)

        per_member = member_loss if layout == "views" else member_loss_flat
        self._grad_and_value = vmap(grad_and_value(per_member), randomness="different")
        self._losses = vmap(member_loss, randomness="different")
        self._leaves = list(population.params.values())
        # One model's step: member 0's parameters (views of flat's row 0) as autograd leaves, and
        # as plain views for the functional backward.
        self._module_leaves = list(population.module_params.values())
        self._module_views = {n: v[0] for n, v in self._views.items()}
        self._one_model_adamw = adamw_update(resolve_update(update, population.flat[:1], compile=compile is not None),
                                             compile=compile is not None)
        self._form: str | None = None  # the one of ONE_MODEL_FORMS the last one-model step took
        self._forms: dict[tuple, str] = {}  # the form found for each combination of training modes

        self._define_one_model(member_loss, compile == "step")
        # Compiling "the step" compiles the gradient computation and the elementwise update; the
        # few [P]-sized factor computations between them stay eager (see adamw_factors_).
        if backward == "autograd":
            self._gradients = self._autograd_gradients
        elif compile == "step":
            self._gradients = torch.compile(self._vmap_gradients, dynamic=False)
        else:
            self._gradients = self._vmap_gradients
        self._graphs: dict = {}

    def _define_one_model(self, member_loss: Callable, compiled: bool) -> None:
        """The functions of a one-model step (:data:`ONE_MODEL_FORMS`): each form's loss and its gradient."""
        population, module, k, loss_fn = self._population, self._population.module, self.num_inputs, self.loss_fn

        def merged_output(params, kwargs, *inputs):  # params=None: the module's own, member 0's (no functional_call)
            inputs, kwargs = _merged(inputs), _merged(kwargs)
            return module(*inputs, **kwargs) if params is None else functional_call(module, params, inputs, kwargs)

        def batch_loss(params, kwargs, *batch):  # the merged forward, then each member's loss on its own rows
            output = merged_output(params, kwargs, *batch[:k])
            if self.sample_mean_loss:  # declared: the merged batch's mean is the members' mean
                return loss_fn(output, *_merged(batch[k:]))
            return _member_losses(_losses_of_rows(loss_fn, output, batch[k:], population.population_size),
                                  population.population_size).mean()

        # Member 0's weights not batched (in_dims None); the buffers, keyword and batch tensors are.
        def shared_losses(params, buffers, kwargs, *batch):  # every member's loss
            return vmap(member_loss, in_dims=(None, 0, 0) + (0,) * len(batch), randomness="different")(
                params, buffers, kwargs, *batch)

        def members_mean_loss(params, buffers, kwargs, *batch):
            return _member_losses(shared_losses(params, buffers, kwargs, *batch), population.population_size).mean()

        def shared_outputs(params, buffers, kwargs, *batch):  # (outputs, losses) per member, for choosing the form
            def one(params, buffers, kwargs, *batch):
                output = functional_call(module, (params, buffers), batch[:k], kwargs)
                return _output_tensors(output), loss_fn(output, *batch[k:])
            return vmap(one, in_dims=(None, 0, 0) + (0,) * len(batch), randomness="different")(
                params, buffers, kwargs, *batch)

        self._shared_outputs, self._merged_output = shared_outputs, merged_output
        self._one_model_losses = {"batch": batch_loss, "members": members_mean_loss}
        self._one_model_grads = {"batch": grad_and_value(batch_loss), "members": grad_and_value(members_mean_loss)}
        if compiled:
            self._one_model_grads = {f: torch.compile(g, dynamic=False) for f, g in self._one_model_grads.items()}

    @property
    def one_model_form(self) -> str | None:
        """The :data:`ONE_MODEL_FORMS` entry the last one-model step took (``None`` before the first)."""
        return self._form

    # -- the step -------------------------------------------------------------------------------
    def _eager_step(self, cooperative: bool, kwargs: dict, *batch: torch.Tensor) -> torch.Tensor:
        """Gradients, then the shared gradient path and update; returns the ``[P]`` losses.

        ``kwargs`` holds the model's keyword tensors (``[P, B, ...]`` each), ``batch`` the positional ones.
        """
        pop, opt = self._population, self._optimizer
        if pop.one_model:
            return self._one_model_step(kwargs, *batch)
        accumulating = opt.num_grad_accum is not None
        if self.backward == "vmap":
            self._find_used(kwargs, batch)
        grads, losses = self._gradients(kwargs, *batch)
        if grads is None:  # the autograd backward accumulated into grad_flat (its hooks noted what it reached)
            grads = pop.grad_flat
        elif isinstance(grads, list):  # the vmap backward's, one per parameter
            leaves = [g if n in self._used else None for n, g in zip(self._names, grads)]  # None: AdamW skips it
            if self.update == "per-member" and not accumulating:
                # The kernel reads each gradient where the backward left it: no copy into grad_flat.
                leaves = [None if g is None else member_mean(g, self.clan.group) if cooperative else g for g in leaves]
                opt.apply_(leaves, self._adamw, sizes=self._sizes)
                return losses.detach()
            pop.note_grads(n for n, g in zip(self._names, leaves) if g is not None)
            self._into_grad_flat(leaves, accumulating)
            grads = pop.grad_flat
        else:  # the flat layout's [P, N] gradients
            pop.note_grads(self._used)
        opt.apply_(reduce_gradients_(grads, pop.grad_flat, cooperative=cooperative, accumulating=accumulating,
                                     group=self.clan.group), self._adamw)
        if accumulating or grads is pop.grad_flat:
            release_gradients_(pop, opt.adamw_state.accum_count if accumulating else None)
        return losses.detach()

    def _one_model_step(self, kwargs: dict, *batch: torch.Tensor) -> torch.Tensor:
        """A cooperative step of members that are copies of member 0: one model's work at batch ``P x B``.

        The gradient of the mean loss over all members' samples lands in member 0's row of
        ``grad_flat`` (added to it when accumulating) and AdamW updates member 0's row alone.
        In a clan across ranks, that row is summed over the ranks (one all-reduce of ``N``
        values), each rank's mean weighing ``1 / W``.
        """
        pop, opt = self._population, self._optimizer
        accumulating = opt.num_grad_accum is not None
        form = self._form  # chosen by train_step for this call, before it picked the forward's context
        group = self.clan.group
        if self._one_model_backward == "autograd":
            if not accumulating:
                release_gradients_(pop)  # start from zero, whatever an imperative backward left there
            elif group is not None:
                share_pending_sums_(pop.grad_flat[0], group)  # the all-reduce below adds every rank's copy of them
            with self.clan.sync_context(cooperative=False), torch.enable_grad():  # the mean needs no averaging
                if form == "batch":
                    loss = self._one_model_losses["batch"](None, kwargs, *batch)
                else:
                    loss = self._one_model_losses["members"](self._module_params, pop.buffers, kwargs, *batch)
                torch.autograd.backward(loss if group is None else loss / group.world_size, inputs=self._module_leaves)
            if group is not None:
                group.all_reduce_(pop.grad_flat[0], "the cooperative gradient all-reduce")
        else:
            self._find_used(kwargs, batch)
            args = (self._module_views,) if form == "batch" else (self._module_views, pop.buffers)
            grads, loss = self._one_model_grads[form](*args, kwargs, *batch)
            row = pop.grad_flat[0]
            flat = torch.cat([grads[n].reshape(-1) if n in self._used else row.new_zeros(size)
                              for n, size in zip(self._names, self._sizes)])
            if group is not None:  # this rank's mean -> the mean over every rank's members
                group.all_reduce_(flat, "the cooperative gradient all-reduce").div_(group.world_size)
            row.add_(flat) if accumulating else row.copy_(flat)
            pop.note_grads(self._used)
        row = pop.grad_flat[:1]  # already the members' mean, and with accumulation the pending sum
        opt.apply_(reduce_gradients_(row, row, cooperative=False, accumulating=accumulating), self._one_model_adamw)
        release_gradients_(pop, opt.adamw_state.accum_count if accumulating else None)
        return loss.detach().expand(pop.population_size)

    def _choose_form(self, kwargs: dict, batch: tuple[torch.Tensor, ...]) -> str:
        """The one-model form for this model and loss (see :data:`ONE_MODEL_FORMS`), found on the first call."""
        # The answer depends on the modules' training modes (BatchNorm couples samples in
        # training mode only): found again for every combination of them.
        modes = self._training_modes()
        form = self._forms.get(modes)
        if form is None:
            form = self._forms[modes] = "batch" if self._batch_form_matches(kwargs, batch) else "members"
        self._form = form
        return form

    def _batch_form_matches(self, kwargs: dict, batch: tuple[torch.Tensor, ...]) -> bool:
        """Whether the ``"batch"`` form's merged forward treats the samples as the members' forwards do.

        In training mode the merged forward must run, leave the buffers as they were (BatchNorm's
        running statistics would move) and return only tensors with the ``P x B`` samples first;
        in eval mode its outputs must equal the per-member forward's to rounding (a forward that
        mixes its samples, BatchNorm in training mode among them, does not). Both run on copies
        of the buffers and from a forked random state, so nothing of the run changes.
        """
        pop, k = self._population, self.num_inputs
        first = (*batch[:k], *kwargs.values())[0]
        n = first.shape[0] * first.shape[1]  # the merged batch's samples
        devices = [pop.device] if pop.device.type == "cuda" else []
        modes = [(m, m.training) for m in pop.module.modules()]
        saved = {name: b.clone() for name, b in pop.module.named_buffers()}
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                try:  # a model that cannot take the merged batch (a fixed batch size, say) keeps the other form
                    merged = self._merged_output(self._module_views, kwargs, *batch[:k])
                except (RuntimeError, ValueError, TypeError, IndexError):
                    return False
                if any(not torch.equal(b, saved[name]) for name, b in pop.module.named_buffers()):
                    return False
                if any(t.dim() == 0 or t.shape[0] != n for t in _output_tensors(merged)):
                    return False
                pop.module.eval()
                merged = _output_tensors(self._merged_output(self._module_views, kwargs, *batch[:k]))
                buffers = {name: b.clone() for name, b in pop.buffers.items()}
                with vectorized_forward(pop.padding_rows):
                    outputs, _ = self._shared_outputs(self._module_views, buffers, kwargs, *batch)
                return len(merged) == len(outputs) and all(_close(a, b) for a, b in zip(merged, outputs))
        finally:
            for module, training in modes:
                module.training = training
            with torch.no_grad():
                for name, b in pop.module.named_buffers():
                    b.copy_(saved[name])

    def _into_grad_flat(self, leaves: list, accumulating: bool) -> None:
        """Write (or, accumulating, add) the per-parameter gradients into ``grad_flat``; ``None`` is zero."""
        rows = self._grad_rows
        if accumulating:
            for row, g in zip(rows, leaves):
                if g is not None:
                    row.add_(g.reshape(row.shape))  # partial sums of accumulation live in grad_flat
            return
        # Concatenate straight into grad_flat: no extra [P, N] buffer, and the update zeroes it
        # afterwards, which is the state zero_grad() leaves.
        torch.cat([row.new_zeros(row.shape) if g is None else g.reshape(row.shape) for row, g in zip(rows, leaves)],
                  dim=1, out=self._population.grad_flat)

    def _training_modes(self) -> tuple[bool, ...]:
        return tuple(m.training for m in self._population.module.modules())

    def _used_key(self) -> tuple:
        """What the parameters a loss reaches may change with: the plan's phase and the modules' training modes."""
        stretch = self.clan.stretch
        return None if stretch is None else stretch.index, self._training_modes()

    def _find_used(self, kwargs: dict, batch: tuple[torch.Tensor, ...]) -> None:
        """Find which parameters the loss reaches: ``torch.func.grad`` gives the others zeros.

        Autograd leaves a parameter that the loss never reaches without gradient, and AdamW
        skips it; ``torch.func.grad`` returns zeros for it instead. So on the first call of each
        phase and combination of training modes (a phase may switch a branch of the model on or
        off, and so may ``model.eval()``) one autograd backward of the vmapped loss (buffers and
        random state untouched) finds the parameters that get a gradient; later calls reuse the
        answer (see :data:`BACKWARDS`).
        """
        key = self._used_key()
        self._used = self._used_by.get(key)
        if self._used is not None:
            return
        pop = self._population
        devices = [pop.device] if pop.device.type == "cuda" else []
        # Its own vmapped forward's context: the merged-batch step that may call this runs outside it.
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), vectorized_forward(pop.padding_rows):
            buffers = {n: b.clone() for n, b in pop.buffers.items()}  # BatchNorm would update its statistics
            losses = self._losses(pop.params, buffers, kwargs, *batch)
            grads = torch.autograd.grad(losses.sum(), self._leaves, allow_unused=True)
        self._used = self._used_by[key] = {n for n, g in zip(self._names, grads) if g is not None}

    def _vmap_gradients(self, kwargs: dict, *batch: torch.Tensor) -> tuple:
        """Every member's gradients (``[P, N]`` for the flat layout, else one ``[P, ...]`` per parameter) and losses."""
        pop = self._population
        if self.layout == "flat":
            return self._grad_and_value(self._flat, pop.buffers, kwargs, *batch)
        grads, losses = self._grad_and_value(self._views, pop.buffers, kwargs, *batch)
        return [grads[n] for n in self._names], losses

    @property
    def _module_params(self) -> dict[str, torch.Tensor]:
        return self._population.module_params

    def _autograd_gradients(self, kwargs: dict, *batch: torch.Tensor) -> tuple[None, torch.Tensor]:
        """The losses ``[P]`` of the vmapped forward, and their gradients accumulated into ``grad_flat``.

        The imperative loop's own backward (AccumulateGrad into each parameter's ``.grad``, a view
        of ``grad_flat``), so this step does the loop's work without its Python calls. For small
        members the flat rows it leaves are what the update reads fastest; for large ones the
        pass that adds the gradients into the strided views costs more than the vmap backward
        (see :data:`VMAP_BACKWARD_MIN_NUMEL`).
        """
        pop = self._population
        if self._optimizer.num_grad_accum is None:
            # Without accumulation the step starts from zero, whatever an imperative backward
            # left there (the vmap backward overwrites grad_flat instead).
            release_gradients_(pop)
        # The update averages a cooperative step's gradients itself (reduce_gradients_), so the
        # backward runs in a context that averages nothing but satisfies the clan's check.
        with self.clan.sync_context(cooperative=False), torch.enable_grad():
            losses = _member_losses(self._losses(pop.params, pop.buffers, kwargs, *batch), pop.population_size)
            torch.autograd.backward(losses.sum(), inputs=self._leaves)
        return None, losses

    def __call__(self, *batch: torch.Tensor, **model_kwargs: torch.Tensor) -> torch.Tensor:
        """Train every member one step on ``batch`` in the clan's current phase and advance the round clock.

        Args:
            *batch: Tensors with the member dimension first, ``[P, B, ...]`` (as the clan's
                loader yields them): the first ``num_inputs`` go to the model, the rest to
                ``loss_fn``.
            **model_kwargs: Tensors that go to the model as keywords (``attention_mask=``),
                each with the member dimension first, ``[P, B, ...]``, like ``batch``.

        Returns:
            ``[P]``: each member's loss on its batch, before the update. In a cooperative step,
            where the members are one model, every entry is that model's loss on the whole
            ``P x B`` batch (the mean of the members' losses).

        Raises:
            RuntimeError: if the round is done (call ``clan.step`` first).
            ValueError: for a tensor (positional or keyword) without the member dimension, or too
                few tensors.
        """
        clan = self.clan
        if clan.round_done:
            raise RuntimeError(
                f"FusedStep: round {clan.round_index} is done ({clan.round_length} steps); "
                "call clan.step(val_losses) before the next step"
            )
        losses = self.train_step(*batch, cooperative=clan.cooperating, **model_kwargs)
        clan.advance()
        return losses

    def train_step(self, *batch: torch.Tensor, cooperative: bool, **model_kwargs: torch.Tensor) -> torch.Tensor:
        """Train every member one step on ``batch``, without touching the round clock.

        The step :meth:`__call__` runs, with the phase given instead of read off the clan, and
        no step counted: for steps inside :meth:`~vmapclan.Clan.cooperate` (``cooperative=True``)
        or any loop that keeps its own count.

        Args:
            *batch: As for :meth:`__call__`.
            cooperative: Average the gradients over the members (identical members trained
                data-parallel), or train each member on its own.
            **model_kwargs: As for :meth:`__call__`.

        Returns:
            ``[P]``: as for :meth:`__call__`.

        Raises:
            RuntimeError: for ``cooperative=False`` while the members train as one model, or
                after the clan rebuilt its population (:meth:`~vmapclan.Clan.grow`).
            ValueError: for a tensor (positional or keyword) without the member dimension, too few
                tensors, or no model input at all.
        """
        pop = self._population
        if self.clan.population is not pop:
            raise RuntimeError("FusedStep: the clan's population was rebuilt (Clan.grow) after this step was made; "
                               "make a new FusedStep")
        p = pop.population_size
        if len(batch) < self.num_inputs:
            raise ValueError(f"FusedStep: expected at least {self.num_inputs} batch tensors, got {len(batch)}")
        if self.num_inputs == 0 and not model_kwargs:
            raise ValueError("FusedStep: num_inputs=0 passes the model keyword tensors only, and none were given")
        for t in (*batch, *model_kwargs.values()):
            if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != p:
                shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(
                    f"FusedStep: expected every batch tensor to have the member dimension first ([{p}, ...]), "
                    f"got {shape}; use member.share(t) for data every member sees"
                )
        if pop.one_model and not cooperative:
            raise RuntimeError(
                "FusedStep.train_step: cooperative=False while the members train as one model (the clan's "
                "cooperative phase, or Clan.cooperate()); training them apart there would make copies differ"
            )
        pop.restore_grad_views(before_forward=True)
        # The merged-batch form runs the plain module, with the kernels a plain model gets; the
        # vmapped forms need the ones vmap can batch.
        plain = pop.one_model and self._choose_form(model_kwargs, batch) == "batch"
        with contextlib.nullcontext() if plain else vectorized_forward(pop.padding_rows):
            if self.cuda_graph:
                return self._replay(cooperative, model_kwargs, batch)
            return self._eager_step(cooperative, model_kwargs, *batch)

    # -- CUDA graphs ----------------------------------------------------------------------------
    def _mutable_state(self) -> list[torch.Tensor]:
        return optree.tree_leaves(self.clan.member_state())

    def _replay(self, cooperative: bool, kwargs: dict, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        # A graph replays one set of input addresses, shapes and dtypes: another keyword name,
        # shape or dtype needs its own capture (the names sorted: the call's order does not matter).
        # What the update does is fixed at capture too: the frozen parameters and the per-parameter counts.
        # The modules' training modes too (dropout and BatchNorm are captured as they ran), and the
        # phase, which the parameters the loss reaches are found for (see _find_used).
        key = (cooperative, self._population.one_model, self._optimizer.frozen, self._optimizer.lagging,
               self._used_key(),
               tuple((tuple(t.shape), t.dtype) for t in batch),
               tuple((n, tuple(t.shape), t.dtype) for n, t in sorted(kwargs.items())))
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(cooperative, kwargs, batch)
        graph, static_kwargs, static_batch, static_losses = entry
        for dst, src in zip(static_batch, batch):
            dst.copy_(src, non_blocking=True)
        for name, dst in static_kwargs.items():
            dst.copy_(kwargs[name], non_blocking=True)
        graph.replay()
        return static_losses.clone()

    def _capture(self, cooperative: bool, kwargs: dict, batch: tuple[torch.Tensor, ...]):
        """Capture one phase's step; the warm-up it needs is undone so no step is lost or doubled."""
        device = self._population.device

        def static(t):  # a buffer the graph reads, which every replay refills
            return torch.empty_like(t, memory_format=torch.contiguous_format, device=device).copy_(t)

        static_batch = [static(t) for t in batch]
        static_kwargs = {n: static(t) for n, t in kwargs.items()}
        saved = [t.clone() for t in self._mutable_state()]
        rng = torch.cuda.get_rng_state(device)

        def undo_warmup():
            with torch.no_grad():
                for dst, src in zip(self._mutable_state(), saved):
                    dst.copy_(src)
            torch.cuda.set_rng_state(rng, device)
            saved.clear()  # free the copies before the capture

        graph, static_losses = capture_cuda_graph(lambda: self._eager_step(cooperative, static_kwargs, *static_batch),
                                                  device, after_warmup=undo_warmup)
        return graph, static_kwargs, static_batch, static_losses
