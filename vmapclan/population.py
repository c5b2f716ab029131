"""Stacking a module into P members and running them at once under ``torch.func.vmap``.

All trainable parameters of all members live in one member-major buffer ``flat[P, N]``; each
parameter is a view ``flat[:, offset:offset + n].view(P, *shape)`` and a leaf of autograd, and
its ``.grad`` is the matching view of a second buffer ``grad_flat[P, N]``. The optimizer,
gradient averaging and selection then work on two tensors instead of one per parameter.
Buffers (BatchNorm running statistics) and frozen parameters are stacked per name, ``[P, ...]``.

Member 0 is also an ordinary module (:attr:`PopulationModel.module`) whose parameters, gradients
and buffers are views of row 0 of that storage. While the members are identical (a cooperative
phase) the clan trains that one model on all the members' data, and the other rows catch up only
when something needs them (see :attr:`PopulationModel.one_model`).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import optree
import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.utils import _pytree as pytree

from .checks import positive_int
from .recurrent import unsupported_recurrent

__all__ = ["PopulationModel", "member_loss", "score_members", "additive_attention_mask", "check_growth",
           "stack_members", "check_fits"]

REACHED_LOG_LENGTH = 4096
"""Micro-batches of gradient accumulation whose reached parameters are remembered (see
:meth:`PopulationModel.unreached_in_windows`)."""

# The parameter views into ``flat`` are strided across members, so autograd notes once that
# ``.grad`` (a view of ``grad_flat`` with the same strides) is not dense. Accumulation into it is
# correct and in place, which is the point: gradients land directly in ``grad_flat``.
warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")


def _check_module(module: nn.Module) -> None:
    recurrent = unsupported_recurrent(module)
    if recurrent is not None:
        raise ValueError(f"PopulationModel: {recurrent}")
    for name, sub in module.named_modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.momentum is None and sub.track_running_stats:
            raise ValueError(
                f"PopulationModel: {name or 'the model'} is a BatchNorm with momentum=None (cumulative average), "
                "which reads its batch count with .item() and cannot run under vmap; set a momentum, e.g. 0.1"
            )


def _eager_attention(module: nn.Module) -> None:
    """Switch every Hugging Face ``transformers`` model inside ``module`` to eager attention, in place.

    Their SDPA path (the default) builds its mask with shortcuts that ask a tensor for a Python
    bool (``mask.all()``: "no padding, skip the mask"), which vmap cannot answer for every member
    at once. The eager path of a causal LM (GPT-2) has none; its numbers are SDPA's to float
    rounding. Recognised by duck typing, so ``transformers`` is not imported here.
    """
    for sub in module.modules():
        config = getattr(sub, "config", None)
        setter = getattr(sub, "set_attn_implementation", None)
        if callable(setter) and getattr(config, "_attn_implementation", "eager") not in ("eager", None):
            setter("eager")


_CONSTANTS = (bool, int, float, complex, str, bytes, type(None))


def _tensor_parts(output, dropped: dict):
    """The tensors of a member's ``output``, in a form vmap can return; what they came in is noted in ``dropped``.

    vmap returns tensors only. An output holding anything else (a ``transformers`` cache, a
    ``None``, an int) comes back as the tuple of its tensors, and ``dropped`` receives the
    pytree spec and the other leaves, for :func:`_rebuild` to put the output together again.
    """
    leaves, spec = pytree.tree_flatten(output)
    if all(isinstance(leaf, torch.Tensor) for leaf in leaves):
        return output
    dropped["spec"] = spec
    # The forward runs once for all members, so a Python constant is every member's value. Any
    # other object (a cache) holds vmap's internal batched tensors and must not leave the call.
    dropped["others"] = {i: leaf if isinstance(leaf, _CONSTANTS) else None
                         for i, leaf in enumerate(leaves) if not isinstance(leaf, torch.Tensor)}
    return tuple(leaf for leaf in leaves if isinstance(leaf, torch.Tensor))


def _rebuild(batched, dropped: dict):
    """Undo :func:`_tensor_parts`: the output in its own type, a non-constant leaf replaced by ``None``.

    A ``transformers`` ``ModelOutput`` leaves a ``None`` field out (its ``past_key_values``).
    """
    if not dropped:
        return batched
    tensors = iter(batched)
    others = dropped["others"]
    leaves = [others[i] if i in others else next(tensors) for i in range(len(others) + len(batched))]
    return pytree.tree_unflatten(leaves, dropped["spec"])


def _data_dependent_error(err: RuntimeError, module: nn.Module) -> RuntimeError:
    """A data-dependent-branch error from vmap, with the submodule and the line that branched, and the fix."""
    names = {id(m): name or type(module).__name__ for name, m in module.named_modules()}
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    where, owner, tb = None, None, err.__traceback__
    while tb is not None:  # outermost to innermost: keep the innermost module and non-torch line
        frame = tb.tb_frame
        if not frame.f_code.co_filename.startswith(torch_dir):
            where = f"{frame.f_code.co_name}() at {os.path.basename(frame.f_code.co_filename)}:{tb.tb_lineno}"
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, nn.Module) and id(candidate) in names:
            owner = f"{names[id(candidate)]} ({type(candidate).__name__})"
        tb = tb.tb_next
    return RuntimeError(
        f"member.model: {owner or 'the model'} branches on a tensor's values in {where or 'its forward'}, which vmap "
        "cannot batch (each member would need its own branch); write the branch with torch.where. A transformers "
        "model already runs with attn_implementation='eager' here; if its 2D attention_mask is what it checks "
        "(BERT's .all()), pass vmapclan.additive_attention_mask(attention_mask, dtype) instead"
    )


def additive_attention_mask(attention_mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A ``[..., B, T]`` 0/1 attention mask as the 4D additive mask ``[..., B, 1, 1, T]`` transformers takes as is.

    ``0`` where a token may be attended to, the dtype's minimum for padding. A bidirectional
    ``transformers`` model (BERT) checks a 2D mask for padding with ``mask.all()`` before building
    this itself, a branch on data that vmap cannot take; given the 4D mask it skips that check.

    Args:
        attention_mask: 1 (or True) for a token, 0 for padding; ``[P, B, T]`` for ``member.model``.
        dtype: The model's floating dtype.

    Returns:
        The additive mask, ``attention_mask.shape[:-1] + (1, 1, T)`` with the batch dimension kept.

    Example:
        >>> mask = torch.tensor([[[1, 1, 0]]])            # P = 1, B = 1, T = 3
        >>> additive_attention_mask(mask).shape
        torch.Size([1, 1, 1, 1, 3])
    """
    keep = attention_mask.to(dtype)[..., None, None, :]
    return (1 - keep) * torch.finfo(dtype).min


def _padding_rows_get_no_gradient(module, args, kwargs, output):
    """Forward hook: an ``nn.Embedding``'s output at ``padding_idx`` positions, cut from autograd.

    With batched weights, vmap's embedding rule looks every member up in one ``[P * V, D]``
    table, where ``padding_idx`` names member 0's padding row only: an autograd backward then
    gives the padding row of members 1.. a gradient, which torch never does. Detaching those
    positions gives every member's padding row exactly torch's zero gradient from this lookup,
    while a tied use of the same weight (an output head) still contributes its own. The values
    are unchanged.
    """
    if not isinstance(module, nn.Embedding) or module.padding_idx is None:
        return None
    index = args[0] if args else kwargs["input"]
    return torch.where((index == module.padding_idx).unsqueeze(-1), output.detach(), output)


@contextlib.contextmanager
def vectorized_forward(padding_rows: bool = True):
    """The context of every vmapped forward of a population: the modules made to batch correctly.

    Args:
        padding_rows: Install the ``padding_idx`` fix below (a global forward hook, which puts
            every module call on PyTorch's slower hook path: only for models that need it, see
            :attr:`PopulationModel.padding_rows`).

    - Attention goes to kernels that vmap can batch, forward and backward. Only the math kernel
      of ``scaled_dot_product_attention`` batches everywhere. On CPU the flash kernel and the
      fused ``TransformerEncoderLayer`` fast path have no batching rule, so vmap would silently
      fall back to a per-member loop. On CUDA (measured on an H100, torch 2.11) the flash and
      cuDNN kernels find no kernel for batched inputs, and the memory-efficient kernel's
      backward under vmap fails ("LSE is not correctly aligned"). The math kernel gives the
      same result, batched.
    - ``nn.Embedding(padding_idx=...)`` gives every member's padding row no gradient (see
      :func:`_padding_rows_get_no_gradient`).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    hook = (torch.nn.modules.module.register_module_forward_hook(_padding_rows_get_no_gradient, with_kwargs=True)
            if padding_rows else None)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        if hook is not None:
            hook.remove()
        torch.backends.mha.set_fastpath_enabled(previous)


class PopulationModel:
    """P copies of one module, stacked along a leading member dimension.

    Calling it runs every member's forward at once: each tensor argument must carry the member
    dimension first (``[P, B, ...]``; use :meth:`share` for data every member sees) and the
    output has it too. Dropout draws different masks per member (``randomness="different"``).

    Args:
        module: The model to copy. It is deep-copied and never modified.
        population_size: P.
        init: ``"copy"`` (every member starts from ``module``'s weights) or ``"independent"``
            (member 0 keeps ``module``'s weights, the others are re-initialised with each
            submodule's ``reset_parameters()`` under seeds drawn from ``generator``).
        generator: CPU generator for ``init="independent"``.
        device: Where the members live (default: the module's device).

    Attributes:
        module: Member 0 as an ordinary ``nn.Module``: its parameters, their ``.grad`` and its
            buffers are views of row 0 of the stacked storage (it is also the template every
            member's forward runs through). Not a copy: use :meth:`member_module` for one.
        one_model: Set by the clan while the members are identical (its cooperative phases):
            the forward runs every member's data through member 0's weights, unbatched (one
            model's work; per-member buffers and dropout masks as always), the optimizer updates
            member 0's row only, and the other members' rows of the parameters, gradients and
            optimizer state lag behind until :meth:`sync_rows` brings them up to date. Reading
            them through :meth:`parameters`, :meth:`named_parameters`, :attr:`params` or
            :meth:`member_module` does that first; the raw ``flat`` and ``grad_flat`` buffers
            show the lagging rows as they are.
        rows_stale: Whether rows 1.. lag behind row 0 (only ever while ``one_model`` is on).

    Note:
        An input whose first dimension happens to equal P cannot be told from a member batch:
        it is taken as one. Wrap data that every member should see in :meth:`share`.
    """

    def __init__(self, module: nn.Module, population_size: int, *, init: str = "copy",
                 generator: torch.Generator | None = None, device: torch.device | str | None = None):
        if not isinstance(module, nn.Module):
            raise TypeError(f"PopulationModel: expected an nn.Module, got {type(module).__name__}")
        if init not in ("copy", "independent"):
            raise ValueError(f"PopulationModel: init must be 'copy' or 'independent', got {init!r}")
        _check_module(module)
        self.population_size = p = positive_int(population_size, "PopulationModel: population_size")
        self.module = copy.deepcopy(module)
        _eager_attention(self.module)
        trainable = [(n, t) for n, t in self.module.named_parameters() if t.requires_grad]
        if not trainable:
            raise ValueError("PopulationModel: the model has no trainable parameters")
        first = trainable[0][1]
        device = torch.device(device) if device is not None else first.device
        for name, t in trainable:
            if t.dtype != first.dtype or not t.is_floating_point():
                raise ValueError(
                    f"PopulationModel: all trainable parameters must share one floating dtype; "
                    f"{trainable[0][0]} is {first.dtype} but {name} is {t.dtype}"
                )
            if t.device != first.device:
                raise ValueError(
                    f"PopulationModel: all parameters must be on one device; "
                    f"{trainable[0][0]} is on {first.device} but {name} is on {t.device}"
                )
        self.module.to(device)
        self.device, self.dtype = device, first.dtype
        #: Whether the model has an ``nn.Embedding`` with a ``padding_idx`` (see :func:`vectorized_forward`).
        self.padding_rows = any(isinstance(m, nn.Embedding) and m.padding_idx is not None
                                for m in self.module.modules())
        self.shapes = {n: t.shape for n, t in trainable}
        self.numel = sum(t.numel() for _, t in trainable)

        members = [self.module] * p
        if init == "independent":
            members = [self.module] + [_reinit(self.module, generator) for _ in range(p - 1)]

        self.flat = torch.empty(p, self.numel, dtype=self.dtype, device=device)
        self.grad_flat = torch.zeros_like(self.flat)
        self._params: dict[str, torch.Tensor] = {}
        self.columns: dict[str, slice] = {}  # each parameter's columns of flat and grad_flat
        self._start_grad_record()
        offset = 0
        for name, shape in self.shapes.items():
            n = shape.numel()
            with torch.no_grad():
                for i, m in enumerate(members):
                    self.flat[i, offset:offset + n].copy_(m.get_parameter(name).reshape(-1))
            leaf = self.flat[:, offset:offset + n].view(p, *shape).detach().requires_grad_()
            leaf.grad = self.grad_flat[:, offset:offset + n].view(p, *shape)
            leaf.register_post_accumulate_grad_hook(lambda _, name=name: self.note_grads((name,)))
            self._params[name] = leaf
            self.columns[name] = slice(offset, offset + n)
            offset += n
        # Buffers and frozen parameters: per member, not optimized.
        state = {n: b for n, b in self.module.named_buffers()}
        state.update((n, t) for n, t in self.module.named_parameters() if not t.requires_grad)
        self.buffers: dict[str, torch.Tensor] = {}
        for name in state:
            get = (lambda m, n=name: m.get_buffer(n)) if name in dict(self.module.named_buffers()) else (
                lambda m, n=name: m.get_parameter(n))
            self.buffers[name] = torch.stack([get(m).detach() for m in members]).to(device)
        self.one_model = False
        self.rows_stale = False
        # Member-major state kept beside the population's own (the optimizer's moments and counters):
        # part of member_state(), and kept in step with member 0's row by sync_rows().
        self._registered: dict[str, dict[str, torch.Tensor]] = {}
        #: Member 0's trainable parameters (the parameters of :attr:`module`), in ``flat``'s column order.
        self.module_params: dict[str, nn.Parameter] = self._alias_member_zero()
        self._grad_views = {n: t.grad for n, t in self._params.items()}
        self._module_grad_views = {n: t.grad for n, t in self.module_params.items()}

    def _alias_member_zero(self) -> dict[str, nn.Parameter]:
        """Make :attr:`module`'s tensors views of row 0 of the stacked storage; return its trainable parameters.

        Tied parameters (one tensor under several names, e.g. an embedding shared with the output
        head) stay tied: every name of the tensor gets the same new parameter.
        """
        def owners(named):  # id of each tensor -> every (submodule, attribute name) holding it
            found: dict[int, list] = {}
            for full, t in named:
                path, _, leaf = full.rpartition(".")
                found.setdefault(id(t), []).append((self.module.get_submodule(path), leaf))
            return found

        param_owners = owners(self.module.named_parameters(remove_duplicate=False))
        buffer_owners = owners(self.module.named_buffers(remove_duplicate=False))
        trainable: dict[str, nn.Parameter] = {}
        for name, columns in self.columns.items():
            old = self.module.get_parameter(name)
            new = nn.Parameter(self.flat[0, columns].view(self.shapes[name]))
            new.grad = self.grad_flat[0, columns].view(self.shapes[name])
            new.register_post_accumulate_grad_hook(lambda _, name=name: self._noted_one_model_grad(name))
            for owner, leaf in param_owners[id(old)]:
                owner._parameters[leaf] = new
            trainable[name] = new
        buffer_names = dict(self.module.named_buffers())
        for name, stacked in self.buffers.items():
            if name in buffer_names:
                for owner, leaf in buffer_owners[id(buffer_names[name])]:
                    owner._buffers[leaf] = stacked[0]
            else:  # a frozen parameter
                frozen = nn.Parameter(stacked[0], requires_grad=False)
                for owner, leaf in param_owners[id(self.module.get_parameter(name))]:
                    owner._parameters[leaf] = frozen
        return trainable

    def register_member_state(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Add ``{key: [P, ...]}`` tensors (an optimizer's moments and counters) to the member state as ``name``.

        They become part of :meth:`member_state`, so selection, the divergence restore point and
        the state dict move them with the weights, and :meth:`sync_rows` brings their rows up to
        date with member 0's.

        Raises:
            ValueError: if ``name`` is taken (a second optimizer over the same population).
        """
        if name in self._registered or name in ("params", "grads", "buffers"):
            raise ValueError(f"PopulationModel: the member state already has {name!r}; one optimizer per population "
                             "(a population's optimizer moments move with its members)")
        self._registered[name] = tensors

    def member_state(self, *, sync: bool = True) -> dict:
        """The member-major state as one pytree: every tensor with the member dimension first.

        ``{"params": flat, "grads": grad_flat, "buffers": {name: [P, ...]}, **registered}`` (with an
        optimizer: ``"optimizer": {name: [P, ...]}``), the live tensors themselves (not copies).

        Args:
            sync: Bring every member's rows up to date first (:meth:`sync_rows`); ``False`` for
                what reads member 0's row only or writes every row.
        """
        if sync:
            self.sync_rows()
        return {"params": self.flat, "grads": self.grad_flat, "buffers": self.buffers, **self._registered}

    def finite_members(self) -> torch.Tensor:
        """``bool[P]``: which members hold only finite values in every floating tensor of :meth:`member_state`."""
        finite = torch.ones(self.population_size, dtype=torch.bool, device=self.device)
        for leaf in optree.tree_leaves(self.member_state()):
            if leaf.is_floating_point():
                finite &= torch.isfinite(leaf.reshape(leaf.shape[0], -1)).all(1)
        return finite

    def identical(self) -> bool:
        """Whether every member holds member 0's weights and buffers, bit for bit (one host sync).

        True after a data-parallel stretch (trained as one model) or a winner selection, when
        scoring one member scores them all.
        """
        if self.population_size == 1:
            return True
        same = torch.ones((), dtype=torch.bool, device=self.device)
        tensors = list(self.buffers.values()) + ([] if self.one_model else [self.flat])
        for t in tensors:  # while training as one model, the other rows are member 0's by construction
            same &= (t[1:] == t[:1]).all()  # a NaN is unequal to itself: a diverged population is scored whole
        return bool(same)

    def sync_rows(self) -> None:
        """Bring every member's rows of the parameters, gradients and registered state up to date with member 0's.

        While the members train as one model (:attr:`one_model`) only member 0's rows move, and
        the others lag behind (:attr:`rows_stale`) until something needs them: reading the
        parameters here, :meth:`member_module`, the clan's competitive phase, selection and state
        dict. Buffers (BatchNorm statistics) are per member at all times and are not touched.
        """
        if not self.rows_stale:
            return
        state = self.member_state(sync=False)
        del state["buffers"]
        with torch.no_grad():
            for t in optree.tree_leaves(state):
                t[1:].copy_(t[:1].expand_as(t[1:]))
        self.rows_stale = False

    def check_member_state(self, saved: Mapping, who: str) -> dict:
        """Refuse a saved member state that is not this population's; return the tree to copy into it.

        ``saved`` holds ``"model"`` (``{"shapes", "params", "grads", "buffers"}``) and one entry per
        registered state (``"optimizer"``), with this population's rows. Every tensor's shape and
        dtype is checked before anything is copied, so a refused state leaves the population as it was.

        Args:
            saved: The saved tables.
            who: The caller, for the messages.

        Returns:
            A tree of :meth:`member_state`'s structure: ``tree_map(copy_, member_state(sync=False), it)``
            restores the state.

        Raises:
            ValueError: naming the first entry that differs.
        """
        model = saved.get("model")
        if not isinstance(model, Mapping) or not {"shapes", "params", "grads", "buffers"} <= set(model):
            raise ValueError(f"{who}: the checkpoint's model must be a table of shapes, params, grads and buffers, "
                             f"got {type(model).__name__!r}")
        shapes = {n: list(shape) for n, shape in self.shapes.items()}
        buffers = model["buffers"]
        if model["shapes"] != shapes or not isinstance(buffers, Mapping) or set(buffers) != set(self.buffers):
            raise ValueError(f"{who}: the checkpoint is of another model: parameters {model['shapes']} vs this "
                             f"model's {shapes}")
        tree = {"params": model["params"], "grads": model["grads"], "buffers": buffers,
                **{name: saved.get(name) for name in self._registered}}
        live = self.member_state(sync=False)
        for name, part in self._registered.items():
            if not isinstance(tree[name], Mapping) or set(tree[name]) != set(part):
                got = sorted(tree[name]) if isinstance(tree[name], Mapping) else tree[name]
                raise ValueError(f"{who}: the checkpoint's {name} entries are {got}, expected {sorted(part)}")
        if optree.tree_structure(tree) != optree.tree_structure(live):
            raise ValueError(f"{who}: the checkpoint's member state is not a table of this model's tensors")
        paths, targets, _ = optree.tree_flatten_with_path(live)
        for path, target, source in zip(paths, targets, optree.tree_leaves(tree)):
            if not isinstance(source, torch.Tensor) or source.shape != target.shape or source.dtype != target.dtype:
                got = f"{source.dtype} {list(source.shape)}" if isinstance(source, torch.Tensor) \
                    else type(source).__name__
                raise ValueError(f"{who}: the checkpoint's {'/'.join(map(str, path))} is {got}, "
                                 f"expected {target.dtype} {list(target.shape)}")
        return tree

    def _start_grad_record(self) -> None:
        """The record of which parameters the backwards reached (see :meth:`unused_columns`)."""
        # Names of the parameters that received a gradient since the gradients were last released,
        # and by the backwards since the last update (one micro-batch's): autograd's
        # post-accumulate hooks fill them in (note_grads).
        self.grad_seen: set[str] = set()
        self.grad_reached: set[str] = set()
        # With accumulation: each update's grad_reached, newest last, and whether one of them
        # missed a parameter (from then on the skipped parameters are found per member's window).
        self.reached_log: collections.deque[frozenset[str]] = collections.deque(maxlen=REACHED_LOG_LENGTH)
        self.partial_backwards = False
        self.warned_partial_accumulation = False  # on CUDA, where the windows are not followed (said once)

    def note_grads(self, names) -> None:
        """Record that a backward reached the parameters ``names`` (see :meth:`unused_columns`)."""
        names = tuple(names)  # read twice
        self.grad_seen.update(names)
        self.grad_reached.update(names)

    def _noted_one_model_grad(self, name: str) -> None:
        self.note_grads((name,))
        self.rows_stale = True  # member 0's gradient moved; the other rows did not

    # -- nn.Module-like surface -------------------------------------------------------------
    @property
    def training(self) -> bool:
        """Whether the members run in training mode."""
        return self.module.training

    def train(self, mode: bool = True) -> PopulationModel:
        """Set training mode for every member (as ``nn.Module.train``)."""
        self.module.train(mode)
        return self

    def eval(self) -> PopulationModel:
        """Set evaluation mode for every member (as ``nn.Module.eval``)."""
        return self.train(False)

    @property
    def params(self) -> dict[str, torch.Tensor]:
        """``{name: [P, *shape]}``: the stacked trainable parameters (every member's rows up to date)."""
        self.sync_rows()
        return self._params

    def parameters(self) -> Iterator[torch.Tensor]:
        """The stacked trainable parameters, each ``[P, *shape]`` (every member's rows up to date)."""
        return iter(self.params.values())

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, [P, *shape])`` for each trainable parameter (every member's rows up to date)."""
        return iter(self.params.items())

    def weight_term(self, fn: Callable[[dict[str, torch.Tensor]], torch.Tensor]) -> torch.Tensor:
        """The sum over the members of ``fn(weights)``: a term on the weights (a penalty) to add to ``loss.sum()``.

        ``fn`` takes one member's trainable parameters, ``{name: tensor}`` in the module's own
        shapes, and returns a scalar; it must be vmappable. Every member then trains on its own
        loss plus its own term, in either phase: while the members train as one model, the term
        is member 0's times P (each member holds those weights, and the cooperative average
        divides member 0's gradient by P); otherwise ``fn`` is vmapped over the stacked rows.

        Example:
            >>> pop = PopulationModel(nn.Linear(2, 1), population_size=3)
            >>> pop.weight_term(lambda w: (w["weight"] ** 2).sum()).shape
            torch.Size([])
        """
        if self.one_model:
            return fn(dict(self.module_params)) * self.population_size
        return vmap(fn)(dict(self.params)).sum()

    def share(self, data):
        """Give ``data`` (a tensor or pytree of tensors) a member dimension as a view.

        Every member sees the same values; no copy is made (an expanded view, stride 0).
        """
        def expand(t):
            if not isinstance(t, torch.Tensor):
                return t
            t = t.to(self.device)
            return t.unsqueeze(0).expand(self.population_size, *t.shape)

        return optree.tree_map(expand, data)

    def __call__(self, *args, **kwargs):
        """Run every member's forward. Tensor arguments, positional or keyword, must be ``[P, ...]``.

        The output comes back with the member dimension first on every tensor. Parts of it that
        are not tensors (a ``transformers`` cache, a ``None``, an int), which vmap cannot return,
        are dropped: a Python constant is put back as it is (one forward ran for all members), any
        other object becomes ``None``, and the output keeps its own type (a ``ModelOutput``
        leaves a ``None`` field out). A forward that branches on a tensor's values is refused
        with the submodule and the line that branched.

        With :attr:`one_model` on, every member's data goes through member 0's weights, which vmap
        does not batch (``in_dims=None``): one matmul over all ``P x B`` rows per layer, and the
        backward sums the members' gradients into member 0's (``sync_context`` averages them).

        Without gradients on CPU (scoring) the members run one after another instead, which is
        faster there (see :meth:`_each_member`); the result is the same, to rounding.
        """
        p = self.population_size
        leaves, spec = optree.tree_flatten((args, kwargs))
        in_dims = []
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                if leaf.dim() == 0 or leaf.shape[0] != p:
                    raise ValueError(
                        f"member.model: expected every tensor input to have the member dimension first "
                        f"([{p}, ...]), got shape {list(leaf.shape)}; use member.share(x) for data every member sees"
                    )
                in_dims.append(0)
            else:
                in_dims.append(None)
        module = self.module
        # A ``p.grad = None`` before this forward means "start from zero": the backward that
        # follows may go to member 0's parameters rather than to ``p``, so clear it now.
        self.restore_grad_views(before_forward=True)

        dropped: dict = {}

        def one_member(params, buffers, *flat_inputs):
            a, kw = optree.tree_unflatten(spec, list(flat_inputs))
            return _tensor_parts(functional_call(module, (params, buffers), a, kw), dropped)

        params, param_dim = (self.module_params, None) if self.one_model else (self._params, 0)
        if not torch.is_grad_enabled() and self.device.type == "cpu":
            return _rebuild(self._each_member(one_member, params, param_dim, in_dims, leaves), dropped)
        batched = vmap(one_member, in_dims=(param_dim, 0, *in_dims), randomness="different")
        with vectorized_forward(self.padding_rows):
            try:
                out = batched(params, self.buffers, *leaves)
            except RuntimeError as err:
                if "data-dependent control flow" not in str(err):
                    raise
                raise _data_dependent_error(err, module) from err
        return _rebuild(out, dropped)

    def _each_member(self, one_member: Callable, params: dict, param_dim: int | None, in_dims: list, leaves: list):
        """The forward without gradients on CPU: the members one after another, their outputs stacked.

        Measured on CPU (1 thread, torch 2.13) for scoring: 1.0x to 2.8x faster than the vmapped
        forward (a transformer of d_model 32 the most, attention keeping torch's fused kernel,
        which vmap cannot batch), and never slower on the MLPs, where vmap's batched matmuls
        over a shared input gain nothing. On CUDA the forward stays vmapped: one batched call
        there launches one set of kernels instead of P (not measured against this loop yet).
        """
        def row(tree, dim, i):
            return tree if dim is None else optree.tree_map(lambda t: t[i], tree)

        outputs = [one_member(row(params, param_dim, i), row(self.buffers, 0, i),
                              *(row(leaf, dim, i) for leaf, dim in zip(leaves, in_dims)))
                   for i in range(self.population_size)]
        return pytree.tree_map(lambda *parts: torch.stack(parts), outputs[0], *outputs[1:])

    # -- members as plain modules -----------------------------------------------------------
    def member_row(self, index: int) -> dict:
        """A copy of member ``index``'s weights and buffers: ``{"params": [N], "buffers": {name: tensor}}``.

        Read the rows up to date first (:meth:`sync_rows`) while the members train as one model.
        :meth:`member_module` builds a module back from it.
        """
        return {"params": self.flat[index].detach().clone(),
                "buffers": {name: b[index].detach().clone() for name, b in self.buffers.items()}}

    def member_module(self, index: int, *, row: dict | None = None) -> nn.Module:
        """A new plain ``nn.Module`` holding member ``index``'s current weights and buffers.

        Args:
            index: The member.
            row: Build it from this saved row instead (from :meth:`member_row`).
        """
        if not -self.population_size <= index < self.population_size:
            raise IndexError(f"member index {index} out of range for a population of {self.population_size}")
        if row is not None:
            module = self.member_module(index)
            with torch.no_grad():
                for name, shape in self.shapes.items():
                    module.get_parameter(name).copy_(row["params"][self.columns[name]].view(shape))
                buffer_names = dict(module.named_buffers())
                for name, value in row["buffers"].items():
                    (buffer_names[name] if name in buffer_names else module.get_parameter(name)).copy_(value)
            return module
        # A deep copy of ``module`` as is would copy the whole stacked storage its tensors view:
        # give each of them a fresh tensor of its own instead (the values are written below).
        memo = {id(t): nn.Parameter(torch.empty_like(t), requires_grad=t.requires_grad)
                for t in self.module.parameters()}
        memo.update((id(t), torch.empty_like(t)) for t in self.module.buffers())
        module = copy.deepcopy(self.module, memo)
        with torch.no_grad():
            for name, stacked in self.params.items():
                module.get_parameter(name).copy_(stacked[index])
            buffer_names = dict(module.named_buffers())
            for name, stacked in self.buffers.items():
                target = buffer_names[name] if name in buffer_names else module.get_parameter(name)
                target.copy_(stacked[index])
        return module

    def restore_grad_views(self, *, before_forward: bool = False) -> None:
        """Re-attach each parameter's ``.grad`` to ``grad_flat`` if user code replaced it.

        A ``p.grad = None`` (or a new tensor) from outside would otherwise make the optimizer
        read stale gradients. What the detached ``.grad`` held is added back into ``grad_flat``.
        The same holds for :attr:`module`'s parameters, whose ``.grad`` is row 0 of ``grad_flat``.

        While the members train as one model the backward lands in member 0's parameters, not
        in the stacked ones: a stacked parameter's ``p.grad = None`` clears the gradient only when
        seen before a forward (``before_forward``, the forward's own call), and is otherwise just
        re-attached, so that the gradient that backward left in row 0 is kept.
        """
        for leaves, views in ((self._params, self._grad_views), (self.module_params, self._module_grad_views)):
            stacked = leaves is self._params
            for name, leaf in leaves.items():
                view = views[name]
                if leaf.grad is not view:
                    stray = leaf.grad
                    if not (stacked and self.one_model and not before_forward):
                        view.zero_()
                    if stray is not None:
                        view.add_(stray)
                    leaf.grad = view

    def unreached_in_windows(self, accum_count: torch.Tensor, num_grad_accum: torch.Tensor) -> list | None:
        """With accumulation: for each member this update releases, the parameters no backward of its window reached.

        A member's window is its pending micro-batches (``accum_count``) and the current one.
        ``None`` (then :meth:`unused_columns` decides, from every parameter reached since the
        gradients were last released by all members, or since the clan was loaded) while every
        backward has reached every parameter, where nothing needs reading from the device, and on
        CUDA, where reading the counts would synchronise every step (it says so once, in a
        warning). Otherwise one host read of the counts,
        and ``[(rows, parameter indices)]``, the members grouped by what their windows missed.
        A window that reaches back before the log (a load, a growth, or more than
        :data:`REACHED_LOG_LENGTH` micro-batches) counts what was reached since the log began; one
        holding a micro-batch whose gradients no backward wrote counts every parameter as reached.
        """
        if self.grad_reached and len(self.grad_reached) < len(self.columns):  # this update's own backwards
            self.partial_backwards = True
        if not self.partial_backwards:
            return None
        if accum_count.is_cuda:
            if not self.warned_partial_accumulation:
                self.warned_partial_accumulation = True
                warnings.warn("gradient accumulation on CUDA: a backward did not reach every parameter; a parameter "
                              "that some earlier backward reached is updated (weight decay, moments) even in a "
                              "window where none did, unlike torch.optim.AdamW, which skips it (on CPU each window "
                              "is exact)", stacklevel=3)
            return None
        pending, targets = accum_count.tolist(), num_grad_accum.tolist()
        log, names = list(self.reached_log), list(self.columns)
        groups: dict[tuple[int, ...], list[int]] = {}
        for member, (count, target) in enumerate(zip(pending, targets)):
            window = [self.grad_reached, *log[max(len(log) - count, 0):]] if count else [self.grad_reached]
            if count + 1 < target or not all(window):
                continue
            reached = set().union(*window)
            missed = tuple(k for k, name in enumerate(names) if name not in reached)
            if missed:
                groups.setdefault(missed, []).append(member)
        return [(rows, list(missed)) for missed, rows in groups.items()]

    def unused_columns(self) -> list[slice]:
        """The columns of ``flat`` of every parameter the backwards since the last release did not reach.

        ``torch.optim.AdamW`` skips a parameter whose ``.grad`` is ``None`` (no weight decay, no
        moment update); the population's gradients are never ``None``, so the record of which
        parameters a backward reached (``grad_seen``, filled by autograd's post-accumulate hooks)
        stands in for it. Empty when every parameter was reached (the usual case, which costs
        nothing) and when no backward ran at all (gradients written into ``.grad`` by hand count
        as gradients).
        """
        if not self.grad_seen or len(self.grad_seen) == len(self.columns):
            return []
        return [c for name, c in self.columns.items() if name not in self.grad_seen]


def check_growth(before: nn.Module, after, who: str = "grow") -> None:
    """Refuse a grown model that does not keep every tensor of the model it grew from.

    Growth may add parameters and buffers; every existing one must stay, under its name, with
    its shape and dtype and trainable or not as before, so that its values and optimizer state
    carry over.

    Args:
        before: The model before growth.
        after: What the growth returned.
        who: Prefix for the error message.

    Raises:
        TypeError: if ``after`` is not an ``nn.Module``.
        ValueError: naming the first tensor that was removed or changed, or if nothing was added.

    Example:
        >>> check_growth(nn.Sequential(nn.Linear(2, 2)), nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
    """
    if not isinstance(after, nn.Module):
        raise TypeError(f"{who}: expected the grown nn.Module, got {type(after).__name__}")
    old = {**{n: (t, "buffer") for n, t in before.named_buffers()},
           **{n: (t, "trainable" if t.requires_grad else "frozen") for n, t in before.named_parameters()}}
    new = {**{n: (t, "buffer") for n, t in after.named_buffers()},
           **{n: (t, "trainable" if t.requires_grad else "frozen") for n, t in after.named_parameters()}}
    for name, (t, kind) in old.items():
        if name not in new:
            raise ValueError(f"{who}: the grown model has no {name!r}; growth may add parameters, not remove them")
        u, grown_kind = new[name]
        if (u.shape, u.dtype, grown_kind) != (t.shape, t.dtype, kind):
            raise ValueError(f"{who}: the grown model changed {name!r} from {kind} {t.dtype} {list(t.shape)} to "
                             f"{grown_kind} {u.dtype} {list(u.shape)}; growth may add parameters, not reshape them")
    if len(new) == len(old):
        raise ValueError(f"{who}: the grown model has no new parameter or buffer")


def stack_members(members: Sequence[nn.Module], *, device: torch.device | str | None = None) -> PopulationModel:
    """A population whose member ``i`` holds ``members[i]``'s weights and buffers (one architecture).

    How a population is rebuilt after growth (:meth:`vmapclan.Clan.grow`): each member grown on
    its own, then stacked again. ``members[0]`` is the template (deep-copied, as always).

    Args:
        members: P modules with the same parameter and buffer names and shapes.
        device: Where the members live (default: ``members[0]``'s device).

    Raises:
        ValueError: if the members' tensors differ in names or shapes.

    Example:
        >>> pop = stack_members([nn.Linear(2, 1), nn.Linear(2, 1)])
        >>> pop.population_size, pop.numel
        (2, 3)
    """
    template = {n: t.shape for n, t in [*members[0].named_parameters(), *members[0].named_buffers()]}
    for i, member in enumerate(members[1:], 1):
        shapes = {n: t.shape for n, t in [*member.named_parameters(), *member.named_buffers()]}
        if shapes != template:
            raise ValueError(f"stack_members: member {i}'s tensors differ from member 0's: "
                             f"{sorted(set(shapes.items()) ^ set(template.items()))[:4]}")
    population = PopulationModel(members[0], len(members), device=device)
    with torch.no_grad():
        for name, columns in population.columns.items():
            for i, member in enumerate(members[1:], 1):
                population.flat[i, columns].copy_(member.get_parameter(name).reshape(-1))
        for name, stacked in population.buffers.items():
            for i, member in enumerate(members[1:], 1):
                source = dict(member.named_buffers()).get(name)
                stacked[i].copy_(member.get_parameter(name) if source is None else source)
    return population


def _reinit(module: nn.Module, generator: torch.Generator | None) -> nn.Module:
    seed = int(torch.randint(2**62, (1,), generator=generator).item())
    fresh = copy.deepcopy(module)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Children before parents, as in construction: a parent's reset (nn.MultiheadAttention
        # zeroing out_proj.bias, nn.Transformer's xavier init) must have the last word. Some
        # modules only have the private ``_reset_parameters`` (nn.MultiheadAttention's in_proj);
        # skipping it would leave those weights identical across "independent" members.
        for sub in reversed(list(fresh.modules())):
            reset = getattr(sub, "reset_parameters", None) or getattr(sub, "_reset_parameters", None)
            if callable(reset):
                reset()
    return fresh


def member_loss(fn, output, target, *, key: str | Callable | None = None, **kwargs) -> torch.Tensor:
    """Each member's loss: ``fn(output[i], target[i], **kwargs)`` for every member ``i``, as ``[P]``.

    ``fn`` is an ordinary loss such as ``F.cross_entropy`` that reduces one member's batch to a
    scalar (its default mean reduction). It is vmapped over the member dimension, so both
    ``output`` and ``target`` must carry it (use ``member.share(y)`` for shared targets).

    Args:
        fn: ``fn(output, target, **kwargs) -> scalar``.
        output: ``[P, B, ...]``, or a pytree of such tensors (a tuple, list, dict or
            ``transformers`` ``ModelOutput``); its other leaves (a ``None``, an int, a cache
            object) reach ``fn`` as they are, the same for every member.
        target: ``[P, B, ...]`` (or a pytree of such tensors).
        key: What ``fn`` gets of the output: the name of an entry (``key="logits"``) or a
            function of the output (``key=lambda out: out.logits``); without it ``fn`` gets the
            whole output.
        **kwargs: Passed to ``fn`` unbatched (e.g. ``label_smoothing=0.1``).

    Returns:
        ``[P]``: one loss per member.

    Raises:
        ValueError: if the member dimensions disagree or ``fn`` does not reduce to a scalar.
        TypeError: for an output without a tensor torch's pytree reaches (a string, a dataclass).

    Example:
        >>> loss = member_loss(F.cross_entropy, member.model(x), y)  # doctest: +SKIP
        >>> loss.sum().backward()  # doctest: +SKIP
        >>> out = member.model(input_ids=ids, attention_mask=mask)  # a CausalLMOutput  # doctest: +SKIP
        >>> loss = member_loss(lm_loss, out, targets, key="logits")  # doctest: +SKIP
    """
    if key is not None:
        if callable(key):
            output = key(output)
        elif isinstance(output, Mapping) and key in output:
            output = output[key]
        else:
            keys = list(output.keys()) if isinstance(output, Mapping) else None
            raise KeyError(f"member_loss: key={key!r} is not in the output ({type(output).__name__}"
                           f"{f' with keys {keys}' if keys is not None else ''})")
    # torch's pytree opens what the population's forward returns, a ``transformers`` ModelOutput
    # included; its non-tensor leaves (a None, an int, a cache) reach ``fn`` as they are.
    out_leaves, out_spec = pytree.tree_flatten(output)
    where = [i for i, leaf in enumerate(out_leaves) if isinstance(leaf, torch.Tensor)]
    tgt_leaves = [t for t in pytree.tree_leaves(target) if isinstance(t, torch.Tensor)]
    if not where:
        raise TypeError(f"member_loss: output must hold a tensor with a member dimension, got "
                        f"{type(output).__name__}" + (" (a dataclass: return a tensor, tuple or dict of tensors, or "
                                                      "pass key=)" if dataclasses.is_dataclass(output) else ""))
    first = out_leaves[where[0]]
    p = first.shape[0] if first.dim() else None
    for what, leaves in (("output", [out_leaves[i] for i in where]), ("target", tgt_leaves)):
        for t in leaves:
            if t.dim() == 0 or t.shape[0] != p:
                raise ValueError(
                    f"member_loss: {what} must have the member dimension first ([{p}, ...]), "
                    f"got shape {list(t.shape)}"
                )

    def one(tensors, t):
        leaves = list(out_leaves)
        for i, value in zip(where, tensors):
            leaves[i] = value
        return fn(pytree.tree_unflatten(leaves, out_spec), t, **kwargs)

    loss = vmap(one, randomness="different")([out_leaves[i] for i in where], target)
    if not isinstance(loss, torch.Tensor) or loss.shape != (p,):
        shape = list(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(
            f"member_loss: fn must reduce each member's batch to a scalar (loss of shape [{p}]), got {shape}; "
            "use a mean or sum reduction"
        )
    return loss


def score_members(population: PopulationModel, batches: Iterable, losses_of: Callable, *,
                  size_of: Callable = len, who: str = "score_members", per_batch: bool = False,
                  width: int | None = None) -> torch.Tensor | None:
    """Every member's mean loss over ``batches``, for selection: a ``float64 [P]`` tensor.

    The one scoring loop of the package (the tasks' per-round evaluation and Lightning's
    callback): in eval mode and without gradients, each batch's ``[P]`` losses weighted by its
    size, so the result is the mean over samples. Every submodule's training mode is restored
    afterwards.

    Args:
        population: The members to score.
        batches: The validation batches.
        losses_of: ``losses_of(batch, index) -> [P]``: every member's mean loss on one batch.
        size_of: ``size_of(batch) -> int``: the samples in a batch (default ``len``).
        who: Names the caller in the error message.
        per_batch: Return each batch's losses instead, ``[P, number of batches]`` (paired
            values for :func:`vmapclan.selection.paired_winner`).
        width: ``losses_of`` returns ``[P, width]`` instead: several means per member (a loss
            and an accuracy), each averaged over samples; the result is ``[P, width]``.

    Returns:
        ``[P]`` mean losses (or ``[P, batches]``, or ``[P, width]``), or ``None`` when
        ``batches`` was empty.

    Raises:
        ValueError: if ``losses_of`` returns anything but a ``[P]`` (``[P, width]``) tensor.
    """
    p = population.population_size
    shape = (p,) if width is None else (p, width)
    modes = [m.training for m in population.module.modules()]
    population.eval()
    total, count, columns = None, 0, []
    try:
        with torch.no_grad():
            for index, batch in enumerate(batches):
                losses = losses_of(batch, index)
                if not isinstance(losses, torch.Tensor) or losses.shape != shape:
                    got = list(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
                    raise ValueError(f"{who} must return every member's loss, shape {list(shape)}, got {got}")
                if per_batch:
                    columns.append(losses.detach().to(torch.float64))
                    continue
                n = size_of(batch)
                weighted = losses.detach().to(torch.float64) * n
                total = weighted if total is None else total + weighted
                count += n
    finally:
        for module, mode in zip(population.module.modules(), modes):
            module.training = mode
    if per_batch:
        return torch.stack(columns, 1) if columns else None
    return None if total is None else total / count


def check_fits(population_size: int, model: nn.Module | None, genes: int, device: torch.device | None) -> None:
    """Refuse a population that cannot fit in the memory of its device, before allocating any of it.

    Raises:
        ValueError: naming the memory it needs and the device's.

    Each member holds its weights, gradients and two AdamW moments (about four copies of the
    model) and its genes; allocating far more than the device has would fail deep inside torch,
    or get the process killed by the operating system instead of raising.
    """
    values = sum(t.numel() * t.element_size() for t in model.state_dict().values()) * 4 if model is not None else 0
    need = population_size * (values + 8 * 3 * max(genes, 1))
    device = device if device is not None else (next(iter(model.parameters()), torch.empty(0)).device
                                                if model is not None else torch.device("cpu"))
    if device.type == "cuda":
        have = torch.cuda.get_device_properties(device).total_memory
    elif hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    else:
        return
    if need > have:
        raise ValueError(f"Clan: population_size={population_size} needs about {need / 2**30:.3g} GiB on {device}, "
                         f"more than its {have / 2**30:.3g} GiB")
