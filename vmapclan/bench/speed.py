"""Speed benchmark: the vectorized step against a loop over P models and a hand-written ceiling.

For each model and population size P, in one process and on the same random data:

- **loop**: P separate ``nn.Module``\\ s, each with its own ``torch.optim.AdamW``, stepped one
  after another; every optimizer setting (for-loop, ``foreach``, ``fused``) is timed and the
  fastest is the baseline;
- **ceiling** (MLPs only): the same MLP written by hand with ``torch.baddbmm`` over weights
  stored member-major in one flat buffer, with the optimizer update :class:`~vmapclan.FusedStep`
  uses by default on the device -- what vmap and ``functional_call`` would cost if they cost
  nothing; on CUDA also **ceiling+cuda-graph**, the same step captured into a CUDA graph. The
  faster of the two is the baseline of ``x ceiling``;
- **imperative**: the ``Member`` loop of the README (vmapped forward, ``backward``,
  ``BatchedAdamW``);
- **fused**, **fused-flat**, **fused-batched**, **fused-vmap**, **fused-autograd**:
  :class:`~vmapclan.FusedStep` eager with its defaults, with the ``"flat"`` layout, with the
  batched (tensor-op) optimizer update, and with ``backward="vmap"`` / ``"autograd"``;
- **fused+compile-opt** / **fused+compile-step**: ``torch.compile`` of the update / the whole step;
- **fused+cuda-graph**, **fused-autograd+cuda-graph**, **fused+compile-opt+cuda-graph** (CUDA
  only): the step captured into a CUDA graph (the last with the compiled update inside).

The clan is a sweep (``duty_cycle=1``, no selection), so every step is competitive and every
member has its own hyperparameters, as in the harder half of a round. Times are medians of
several repetitions after warm-up. Peak memory is the rise of the process's peak RSS (CPU,
reset through ``/proc/self/clear_refs``) or of ``torch.cuda.max_memory_allocated`` (CUDA) while
the variant is built and run.

Run: ``python -m vmapclan.bench [--models digits-mlp] [--sizes 1 8 32] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MODELS", "BenchModel", "VARIANTS", "run_speed", "format_table", "main"]


@dataclasses.dataclass(frozen=True)
class BenchModel:
    """A benchmark model: how to build it, its batch, and its per-member loss.

    Attributes:
        name: Short name used on the command line.
        batch_size: Samples per member per step.
        mlp_dims: Layer widths for an MLP (``None`` for the transformer).
        seq_len: Context length of the character transformer.
    """

    name: str
    batch_size: int
    mlp_dims: tuple[int, ...] | None = None
    seq_len: int = 0

    def build(self) -> nn.Module:
        """A fresh model (seeded by the caller)."""
        if self.mlp_dims is not None:
            layers: list[nn.Module] = []
            for a, b in zip(self.mlp_dims[:-1], self.mlp_dims[1:]):
                layers += [nn.Linear(a, b), nn.ReLU()]
            return nn.Sequential(*layers[:-1])
        from ..tasks import CharTransformer

        # d_model 128, 5 blocks: about 1.03M parameters.
        return CharTransformer(vocab=128, d_model=128, n_layers=5, n_heads=4, max_len=self.seq_len)

    def data(self, p: int, device: torch.device, generator: torch.Generator):
        """Random ``(x, y)`` with the member dimension first, ``[P, B, ...]``."""
        b = self.batch_size
        if self.mlp_dims is None:
            idx = torch.randint(0, 128, (p, b, self.seq_len + 1), generator=generator)
            return idx[..., :-1].to(device), idx[..., 1:].to(device)
        x = torch.randn(p, b, self.mlp_dims[0], generator=generator)
        if self.mlp_dims[-1] == 1:
            y = torch.randn(p, b, 1, generator=generator)
        else:
            y = torch.randint(0, self.mlp_dims[-1], (p, b), generator=generator)
        return x.to(device), y.to(device)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """One member's mean loss: MSE for a single output, cross-entropy otherwise."""
        if self.mlp_dims is not None and self.mlp_dims[-1] == 1:
            return F.mse_loss(output, target)
        return F.cross_entropy(output.flatten(0, -2), target.flatten())

    def matmul_flops(self, p: int) -> float:
        """Forward + backward FLOPs of the weight matmuls for one step of P members (6 x weights x rows)."""
        if self.mlp_dims is not None:
            weights = sum(a * b for a, b in zip(self.mlp_dims[:-1], self.mlp_dims[1:]))
            return 6.0 * weights * self.batch_size * p
        d, layers, t = 128, 5, self.seq_len
        weights = layers * 12 * d * d + d * 128
        attention = layers * 2 * 2 * t * t * d  # q @ k^T and att @ v, per sequence
        return 3.0 * (2 * weights * t + attention) * self.batch_size * p


MODELS: dict[str, BenchModel] = {
    "tiny-mlp": BenchModel("tiny-mlp", 16, (8, 32, 32, 1)),
    "digits-mlp": BenchModel("digits-mlp", 64, (64, 256, 256, 10)),
    "wide-mlp": BenchModel("wide-mlp", 128, (256, 1024, 1024, 10)),
    "char-transformer": BenchModel("char-transformer", 4, seq_len=128),
}

VARIANTS = ("loop", "ceiling", "ceiling+cuda-graph", "imperative", "fused", "fused-flat", "fused-batched",
            "fused-vmap", "fused-autograd", "fused+compile-opt", "fused+compile-step", "fused+cuda-graph",
            "fused-autograd+cuda-graph", "fused+compile-opt+cuda-graph")


# -- memory ---------------------------------------------------------------------------------------
def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


class _PeakMemory:
    """Memory rise over a block: its peak, and what is still held at its end (before the block's
    own references go). CUDA allocator counts, or RSS on Linux CPU (else ``nan``)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes = self.held_bytes = math.nan

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._base = None
        try:
            # Give freed heap back to the OS, then reset the high-water mark to the current RSS,
            # so the peak below is this block's own.
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._base = _proc_status_kib("VmRSS") * 1024
        except (OSError, KeyError, AttributeError):
            pass
        return self

    def held(self) -> None:
        """Record what is held now (call it at the end of the block, while the variant still lives)."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.held_bytes = torch.cuda.memory_allocated(self.device) - self._base
        elif self._base is not None:
            self.held_bytes = _proc_status_kib("VmRSS") * 1024 - self._base

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._base is not None:
            self.peak_bytes = _proc_status_kib("VmHWM") * 1024 - self._base
        return False


# -- the variants: each returns a zero-argument step function --------------------------------------
def _sweep_clan(model: nn.Module, p: int, device: torch.device, generator: torch.Generator):
    from .. import Clan

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    # A sweep: every step competitive, every member with its own (mutated) hyperparameters.
    return Clan(model, optimizer, population_size=p, round_length=10**9, duty_cycle=1.0, selection=None,
                autobind=["adamw"], seed=int(torch.randint(2**31, (1,), generator=generator)), device=device)


def _loop_variant(spec: BenchModel, model: nn.Module, x, y, setting: str) -> Callable[[], None]:
    p = x.shape[0]
    import copy

    models = [copy.deepcopy(model) for _ in range(p)]
    kwargs = {"foreach": False} if setting == "for-loop" else {setting: True}
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=1e-2, **kwargs) for m in models]

    def step():
        for i, (m, opt) in enumerate(zip(models, opts)):
            loss = spec.loss(m(x[i]), y[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return step


def _ceiling_variant(spec: BenchModel, model: nn.Module, x, y) -> Callable[[], None]:
    from ..optim import AdamWHyper, adamw_init, adamw_update, resolve_update

    p, device = x.shape[0], x.device
    linears = [m for m in model if isinstance(m, nn.Linear)]
    sizes = [n for lin in linears for n in (lin.in_features * lin.out_features, lin.out_features)]
    flat = torch.cat([t.detach().reshape(1, -1) for lin in linears for t in (lin.weight.t(), lin.bias)], 1)
    flat = flat.to(device).repeat(p, 1)
    grads = torch.zeros_like(flat)
    state = adamw_init(flat)
    hyper = AdamWHyper(*(torch.full((p,), v, dtype=torch.float64, device=device)
                         for v in (1e-3, 1e-2, 0.9, 0.999, 1e-8)))
    # Weights as [P, in, out] and biases as [P, 1, out]: views of one flat buffer, ready for baddbmm.
    views = flat.split(sizes, 1)
    weights = [views[2 * i].view(p, lin.in_features, lin.out_features) for i, lin in enumerate(linears)]
    biases = [views[2 * i + 1].view(p, 1, lin.out_features) for i, lin in enumerate(linears)]
    leaves = [t for pair in zip(weights, biases) for t in pair]
    grad_views = grads.split(sizes, 1)
    # The same optimizer update FusedStep uses by default for this member size and device.
    update = adamw_update(resolve_update("auto", flat))
    rows = p * x.shape[1]

    def step():
        params = [t.detach().requires_grad_() for t in leaves]
        h = x
        for i in range(len(linears)):
            h = torch.baddbmm(params[2 * i + 1], h, params[2 * i])
            if i + 1 < len(linears):
                h = torch.relu(h)
        out = h.reshape(rows, -1)
        if spec.mlp_dims[-1] == 1:
            loss = F.mse_loss(out, y.reshape(rows, -1), reduction="sum") / x.shape[1]
        else:
            loss = F.cross_entropy(out, y.reshape(rows), reduction="sum") / x.shape[1]
        for view, g in zip(grad_views, torch.autograd.grad(loss, params)):
            view.copy_(g.reshape(p, -1))
        update(flat, grads, state, hyper)

    return step


def _graphed(step: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """``step`` captured into a CUDA graph (its tensors are persistent, so replays reuse them)."""
    from ..step import capture_cuda_graph

    graph, _ = capture_cuda_graph(step, device)

    def replay(step=step):  # the graph reads and writes step's tensors: keep them alive with it
        graph.replay()

    return replay


def _imperative_variant(loss_fn: Callable, clan, x, y) -> Callable[[], None]:
    """The ``Member`` loop's step (vmapped forward, ``backward`` in ``sync_context``, ``BatchedAdamW``)."""
    from .. import member_loss

    def step():
        member = clan.round()
        loss = member_loss(loss_fn, member.model(x), y)
        with member.sync_context():
            loss.sum().backward()
        member.optimizer.step()
        member.optimizer.zero_grad()
        member.step()

    return step


def _fused_variant(spec: BenchModel, clan, x, y, **kwargs) -> Callable[[], None]:
    from ..step import FusedStep

    fused = FusedStep(clan, spec.loss, **kwargs)
    return lambda: fused(x, y)


# -- timing ---------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_step(step: Callable[[], None], device: torch.device, warmup: int, reps: int, min_time: float) -> float:
    """Median seconds per step over ``reps`` repetitions, each at least ``min_time`` long."""
    for _ in range(warmup):
        step()
    _sync(device)
    k = 1
    if min_time > 0:  # one probe step sizes the repetitions
        start = time.perf_counter()
        step()
        _sync(device)
        k = max(1, math.ceil(min_time / max(time.perf_counter() - start, 1e-6)))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(k):
            step()
        _sync(device)
        times.append((time.perf_counter() - start) / k)
    return statistics.median(times)


def _state_bytes_per_member(model: nn.Module) -> int:
    """Parameters, gradients and two AdamW moments of one member, in bytes."""
    return 4 * sum(t.numel() * t.element_size() for t in model.parameters() if t.requires_grad)


def run_speed(models: list[str], sizes: list[int], variants: list[str] | None = None, *,
              device: str | torch.device = "cpu", warmup: int = 2, reps: int = 5, min_time: float = 0.2,
              autocast: str | None = None, seed: int = 0, log: Callable[[str], None] | None = None,
              on_result: Callable[[dict], None] | None = None) -> dict:
    """Time every variant on every model and population size.

    Args:
        models: Names from :data:`MODELS`.
        sizes: Population sizes P.
        variants: Names from :data:`VARIANTS` (default: all that apply to the device).
        device: Where to run.
        warmup: Untimed steps first (compilation and CUDA-graph capture happen here).
        reps: Timed repetitions; the median is reported.
        min_time: Each repetition runs enough steps to last at least this long (seconds).
        autocast: ``"bf16"`` to run the forward under ``torch.autocast`` in bfloat16.
        seed: Seeds the models and the data.
        log: Called with a line of progress for each timed variant.
        on_result: Called with the results so far after each (model, P), so that a long run
            that is cut short keeps what it measured.

    Returns:
        ``{"meta": {...}, "rows": [...]}``: one row per (model, P, variant) with ``step_s``,
        ``steps_per_s``, ``member_steps_per_s``, ``vs_loop``, ``vs_ceiling``, ``peak_bytes``,
        ``peak_bytes_per_member``, ``held_bytes_per_member``, ``state_bytes_per_member`` and ``tflops``.

    Raises:
        ValueError: for an unknown model or variant, or a CUDA-only variant off CUDA.
    """
    device = torch.device(device)
    for name in models:
        if name not in MODELS:
            raise ValueError(f"run_speed: unknown model {name!r}; the models are {sorted(MODELS)}")
    if variants is None:
        variants = [v for v in VARIANTS if not v.endswith("cuda-graph") or device.type == "cuda"]
    for name in variants:
        if name not in VARIANTS:
            raise ValueError(f"run_speed: unknown variant {name!r}; the variants are {list(VARIANTS)}")
        if name.endswith("cuda-graph") and device.type != "cuda":
            raise ValueError(f"run_speed: the {name} variant needs a CUDA device, got {device}")
    log = log or (lambda line: None)
    # Every (model, P) compiles the same functions again for new shapes; past dynamo's default
    # limit of 8 recompiles it would silently run them eagerly and time the wrong thing.
    import torch._dynamo.config as dynamo_config

    limit = max(64, 2 * len(models) * len(sizes) + 8)
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), limit))
    result = {"meta": _meta(device, autocast), "rows": []}
    for name in models:
        spec = MODELS[name]
        for p in sizes:
            result["rows"].extend(_run_one(spec, p, variants, device, warmup, reps, min_time, autocast, seed, log))
            result["meta"]["load_avg_end"] = list(os.getloadavg())
            if on_result is not None:
                on_result(result)
    return result


def _run_one(spec, p, variants, device, warmup, reps, min_time, autocast, seed, log) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = spec.build().to(device)
    x, y = spec.data(p, device, generator)
    state_bytes = _state_bytes_per_member(model)
    results, errors = {}, {}
    loop_settings = ["for-loop", "foreach", "fused"]
    for variant in variants:
        if variant.startswith("ceiling") and spec.mlp_dims is None:
            continue
        for setting in loop_settings if variant == "loop" else [None]:
            label = f"loop ({setting})" if variant == "loop" else variant
            try:
                seconds, peak, held = _measure(spec, p, variant, setting, model, x, y, device, generator, warmup,
                                               reps, min_time, autocast)
            except Exception as err:  # noqa: BLE001 - one failing variant must not lose the others' numbers
                errors[label] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]
                log(f"{spec.name:17s} P={p:<4d} {label:20s} FAILED {errors[label]}")
                continue
            results[label] = (seconds, peak, held)
            log(f"{spec.name:17s} P={p:<4d} {label:20s} {1 / seconds:9.2f} steps/s  load {os.getloadavg()[0]:.2f}")

    loops = {k: v for k, v in results.items() if k.startswith("loop")}
    best_loop = min(loops, key=lambda k: loops[k][0]) if loops else None
    loop_s = loops[best_loop][0] if loops else math.nan
    ceilings = [v[0] for k, v in results.items() if k.startswith("ceiling")]
    ceiling_s = min(ceilings) if ceilings else math.nan
    rows = []
    for label, (seconds, peak, held) in results.items():
        rows.append({
            "model": spec.name, "P": p, "variant": label, "step_s": seconds, "steps_per_s": 1 / seconds,
            "member_steps_per_s": p / seconds, "vs_loop": loop_s / seconds, "vs_ceiling": ceiling_s / seconds,
            "fastest_loop": label == best_loop, "peak_bytes": peak, "peak_bytes_per_member": peak / p,
            "held_bytes_per_member": held / p,
            "state_bytes_per_member": state_bytes, "tflops": spec.matmul_flops(p) / seconds / 1e12,
            "load_avg": os.getloadavg()[0],
        })
    for label, error in errors.items():
        rows.append({"model": spec.name, "P": p, "variant": label, "error": error, "load_avg": os.getloadavg()[0]})
    return rows


def _measure(spec, p, variant, setting, model, x, y, device, generator, warmup, reps, min_time, autocast):
    """Build one variant and time it; returns (seconds per step, peak bytes)."""
    with _PeakMemory(device) as mem:
        if variant == "loop":
            step = _loop_variant(spec, model, x, y, setting)
        elif variant.startswith("ceiling"):
            step = _ceiling_variant(spec, model, x, y)
        else:
            clan = _sweep_clan(model, p, device, generator)
            if variant == "imperative":
                step = _imperative_variant(spec.loss, clan, x, y)
            else:
                kwargs = {
                    "fused": {}, "fused-flat": {"layout": "flat"}, "fused-batched": {"update": "batched"},
                    "fused-vmap": {"backward": "vmap"}, "fused-autograd": {"backward": "autograd"},
                    "fused+compile-opt": {"compile": "optimizer"}, "fused+compile-step": {"compile": "step"},
                    "fused+cuda-graph": {"cuda_graph": True},
                    "fused-autograd+cuda-graph": {"backward": "autograd", "cuda_graph": True},
                    "fused+compile-opt+cuda-graph": {"compile": "optimizer", "cuda_graph": True},
                }[variant]
                step = _fused_variant(spec, clan, x, y, **kwargs)
        step = _autocast(step, device, autocast)
        if variant == "ceiling+cuda-graph":
            step = _graphed(step, device)
        seconds = _time_step(step, device, warmup, reps, min_time)
        mem.held()
        del step
    return seconds, mem.peak_bytes, mem.held_bytes


def _autocast(step: Callable[[], None], device: torch.device, autocast: str | None) -> Callable[[], None]:
    """``step`` run under bf16 autocast when asked (the cast cache off: a CUDA graph must not keep it)."""
    if autocast != "bf16":
        return step

    def autocast_step():
        with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False):
            step()

    return autocast_step


def _matmul_peak_tflops(device: torch.device, dtype: torch.dtype, n: int = 8192, reps: int = 10) -> float:
    """TFLOP/s of one large square matmul on random data: the device's practical peak for ``dtype``."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def _meta(device: torch.device, autocast: str | None) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    peak = {}
    if device.type == "cuda":
        dtype = torch.bfloat16 if autocast == "bf16" else torch.float32
        peak = {"matmul_peak_dtype": str(dtype).removeprefix("torch."),
                "matmul_peak_tflops": _matmul_peak_tflops(device, dtype)}
    return {"device": str(device), "device_name": name, "torch": torch.__version__, **peak,
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "load_avg": list(os.getloadavg()),
            "autocast": autocast, "python": platform.python_version(),
            "time_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


# -- output ---------------------------------------------------------------------------------------
def format_table(result: dict) -> str:
    """The results as a Markdown table with a header line naming the device, torch and load.

    Args:
        result: What :func:`run_speed` returned.

    Returns:
        The table as a string.
    """
    meta = result["meta"]
    load = ", ".join(f"{v:.2f}" for v in meta["load_avg"])
    if "load_avg_end" in meta:
        load += "; at end: " + ", ".join(f"{v:.2f}" for v in meta["load_avg_end"])
    lines = [
        f"device: {meta['device_name']} ({meta['device']}, {meta['threads']} threads)  torch {meta['torch']}  "
        f"autocast: {meta['autocast'] or 'off'}  load average (1, 5, 15 min) at start: {load}  ({meta['time_utc']})"
        + (f"  matmul peak ({meta['matmul_peak_dtype']}, 8192^3): {meta['matmul_peak_tflops']:.0f} TFLOP/s"
           if "matmul_peak_tflops" in meta else ""),
        "",
        "| model | P | variant | steps/s | member-steps/s | x loop | x ceiling | peak MiB | peak MiB/member "
        "| held MiB/member | state MiB/member | TFLOP/s | load |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def num(v, fmt):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['P']} | {r['variant']} | failed: {r['error']} |" + " |" * 9)
            continue
        variant = r["variant"] + (" *" if r["fastest_loop"] else "")
        lines.append(
            f"| {r['model']} | {r['P']} | {variant} | {num(r['steps_per_s'], '.1f')} | "
            f"{num(r['member_steps_per_s'], '.0f')} | {num(r['vs_loop'], '.2f')} | {num(r['vs_ceiling'], '.2f')} | "
            f"{num(r['peak_bytes'] / 2**20, '.1f')} | {num(r['peak_bytes_per_member'] / 2**20, '.2f')} | "
            f"{num(r['held_bytes_per_member'] / 2**20, '.2f')} | "
            f"{num(r['state_bytes_per_member'] / 2**20, '.3f')} | {num(r['tflops'], '.3f')} | {r['load_avg']:.2f} |"
        )
    lines.append("")
    lines.append("`*` the fastest loop setting, the baseline of `x loop`; `x ceiling` against the faster of the "
                 "hand-written baddbmm MLP's variants; peak = the most allocated while the variant was built and run (CUDA-graph "
                 "capture included), held = what it still held after its timed steps; TFLOP/s counts the weight "
                 "matmuls only; state = parameters + gradients + two AdamW moments.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m vmapclan.bench`` (the speed benchmark).

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        0 on success.
    """
    parser = argparse.ArgumentParser(prog="python -m vmapclan.bench",
                                     description="Speed: vmapclan's step against a loop over P models and a "
                                                 "hand-written ceiling (`python -m vmapclan.bench quality ...` for "
                                                 "the quality benchmark).")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=None,
                        help="models (default: all four)")
    parser.add_argument("--sizes", nargs="+", type=int, default=None,
                        help="population sizes P (default: 1 8 32 on CPU, 1 8 64 256 on CUDA)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=None, help="variants (default: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions, median reported (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per repetition at least (default 0.2)")
    parser.add_argument("--autocast", choices=["bf16"], help="run the forward under bf16 autocast")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--smoke", action="store_true",
                        help="exactly one step of each variant on the tiny MLP at P=2, no warm-up (for CI)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.smoke:
        models, sizes, reps, warmup, min_time = ["tiny-mlp"], [2], 1, 0, 0.0
    else:
        models = args.models or list(MODELS)
        sizes = args.sizes or ([1, 8, 64, 256] if device.type == "cuda" else [1, 8, 32])
        reps, warmup, min_time = args.reps, args.warmup, args.min_time

    def save(result):
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))

    result = run_speed(models, sizes, args.variants, device=device, warmup=warmup, reps=reps, min_time=min_time,
                       autocast=args.autocast, log=lambda line: print(line, file=sys.stderr, flush=True),
                       on_result=save)
    print(format_table(result))
    return 0
