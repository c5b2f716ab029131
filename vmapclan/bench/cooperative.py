"""The cooperative step against one plain model at batch ``P x B``: what the clan's data-parallel phase costs.

In the cooperative phase the members are identical and train data-parallel at batch ``P x B``,
so its floor is one plain ``nn.Module`` trained at that batch with ``torch.optim.AdamW``. For
each model, in one process and on the same random data, timed in turns:

- **plain**: one model at batch ``P x B``, ``torch.optim.AdamW`` with ``foreach`` and with
  ``fused``; the faster is the baseline of every ratio;
- **fused**: :class:`~vmapclan.FusedStep` in the clan's cooperative phase (one model's work:
  member 0's weights over the merged batch, one AdamW update of one row), with the form it chose,
  its loss declared a plain mean over samples (``sample_mean_loss=True``: taken once on the
  merged batch, as the built-in tasks declare);
- **fused, loss per member**: the same with each member's loss taken on its own rows (the
  default, right for any loss: one vmap of the loss more);
- **member loop**: the README's ``Member`` loop in the cooperative phase;
- **fused, P copies** and **member loop, P copies**: the same steps with every member's copy
  forwarded and updated and the gradients averaged over the copies (what a cooperative step
  cost before the members were trained as one model, and what it still costs outside a
  cooperative phase with ``FusedStep.train_step(..., cooperative=True)``);
- **round**: a whole clan round of :data:`ROUND_LENGTH` steps at ``duty_cycle=0.15``
  (cooperative steps, competitive steps on one common window, selection) with ``FusedStep``,
  against the plain model for the same number of steps.

Peak memory is the rise of the process's peak while a fresh clan runs a few steps of the
variant (see :mod:`vmapclan.bench.speed`).

Run: ``python -m vmapclan.bench cooperative [--models mlp-128 ...] [--threads 1] [--reps 5]``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable

import torch

from .speed import BenchModel, _PeakMemory
from .zoo import _interleaved

__all__ = ["CASES", "ROUND_LENGTH", "run_cooperative", "format_cooperative", "main"]

CASES: dict[str, tuple[BenchModel, int]] = {
    # name: (model and per-member batch, population size)
    "mlp-128": (BenchModel("mlp-128", 32, (64, 128, 128, 10)), 8),
    "mlp-256": (BenchModel("mlp-256", 64, (64, 256, 256, 10)), 32),
    "mlp-1024": (BenchModel("mlp-1024", 128, (64, 1024, 1024, 10)), 8),
    "char-transformer": (BenchModel("char-transformer", 4, seq_len=128), 8),
}

ROUND_LENGTH = 40
"""Steps of the timed round: 34 cooperative and 6 competitive at ``duty_cycle=0.15``."""


def _clan(model, p: int, *, duty_cycle: float, round_length: int = 10**9):
    from .. import Clan

    m = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=1e-2)
    # selection=None with duty_cycle=1: the members never train as one model (the "P copies" rows).
    selection = "winner" if duty_cycle < 1 else None
    return Clan(m, optimizer, population_size=p, round_length=round_length, duty_cycle=duty_cycle,
                selection=selection, autobind=["adamw"])


def _plain_step(spec: BenchModel, model, x, y, setting: str) -> Callable[[], None]:
    m = copy.deepcopy(model)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=1e-2, **{setting: True})
    xs, ys = x.flatten(0, 1), y.flatten(0, 1)

    def step():
        loss = spec.loss(m(xs), ys)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _member_loop(spec: BenchModel, clan, x, y, *, advance: bool) -> Callable[[], None]:
    from .. import member_loss

    def step():
        member = clan.round()
        loss = member_loss(spec.loss, member.model(x), y)
        with clan.sync_context(cooperative=True):
            loss.sum().backward()
        member.optimizer.step()
        member.optimizer.zero_grad()
        if advance:
            member.step()

    return step


def _round(spec: BenchModel, model, p: int, x, y) -> Callable[[], None]:
    """One whole clan round with FusedStep: shards when cooperating, one common window when competing."""
    from ..step import FusedStep

    clan = _clan(model, p, duty_cycle=0.15, round_length=ROUND_LENGTH)
    step = FusedStep(clan, spec.loss, sample_mean_loss=True)
    common = (x[:1].expand_as(x), y[:1].expand_as(y))  # as the loader gives a competitive window

    def run_round():
        losses = None
        while not clan.round_done:
            losses = step(x, y) if clan.phase == "cooperative" else step(*common)
        clan.step(losses)

    return run_round


def _peak_mib(make: Callable[[], Callable[[], None]], device: torch.device, steps: int = 3) -> float:
    with _PeakMemory(device) as memory:
        run = make()
        for _ in range(steps):
            run()
        memory.held()
    return memory.peak_bytes / 2**20


def run_cooperative(names: list[str], reps: int = 5, warmup: int = 2, min_time: float = 0.2,
                    log: Callable[[str], None] = print) -> list[dict]:
    """Time each case's cooperative variants and a round against the plain model; one row per case and variant."""
    from ..step import FusedStep

    rows = []
    device = torch.device("cpu")
    for name in names:
        spec, p = CASES[name]
        torch.manual_seed(0)
        model = spec.build()
        x, y = spec.data(p, device, torch.Generator().manual_seed(1))
        one_model = FusedStep(_clan(model, p, duty_cycle=1e-9), spec.loss, sample_mean_loss=True)
        per_member = FusedStep(_clan(model, p, duty_cycle=1e-9), spec.loss)
        p_copies = FusedStep(_clan(model, p, duty_cycle=1.0), spec.loss)
        makers = {
            "plain foreach": lambda: _plain_step(spec, model, x, y, "foreach"),
            "plain fused": lambda: _plain_step(spec, model, x, y, "fused"),
            "fused": lambda: (lambda s=FusedStep(_clan(model, p, duty_cycle=1e-9), spec.loss, sample_mean_loss=True):
                              s(x, y)),
            "fused, loss per member": lambda: (lambda s=FusedStep(_clan(model, p, duty_cycle=1e-9), spec.loss): s(x, y)),
            "member loop": lambda: _member_loop(spec, _clan(model, p, duty_cycle=1e-9), x, y, advance=True),
            "fused, P copies": lambda: (lambda s=FusedStep(_clan(model, p, duty_cycle=1.0), spec.loss):
                                        s.train_step(x, y, cooperative=True)),
            "member loop, P copies": lambda: _member_loop(spec, _clan(model, p, duty_cycle=1.0), x, y, advance=False),
        }
        steps = {
            "plain foreach": makers["plain foreach"](),
            "plain fused": makers["plain fused"](),
            "fused": lambda: one_model(x, y),
            "fused, loss per member": lambda: per_member(x, y),
            "member loop": makers["member loop"](),
            "fused, P copies": lambda: p_copies.train_step(x, y, cooperative=True),
            "member loop, P copies": makers["member loop, P copies"](),
        }
        seconds = _interleaved(steps, reps, warmup, min_time)
        plain = min(seconds["plain foreach"], seconds["plain fused"])
        form = {"fused": one_model._form, "fused, loss per member": per_member._form, "fused, P copies": "P copies"}
        for label, t in seconds.items():
            peak = _peak_mib(makers[label], device)
            rows.append({"model": name, "P": p, "B": spec.batch_size, "variant": label, "ms": t * 1e3,
                         "x plain": t / plain, "form": form.get(label, ""), "peak_mib": peak})
            log(f"{name:<17} {label:<22} {t * 1e3:9.2f} ms  {t / plain:5.2f}x plain  peak {peak:7.1f} MiB")
        # A whole round against the plain model for the same steps.
        plain_setting = "foreach" if seconds["plain foreach"] <= seconds["plain fused"] else "fused"
        plain_step = _plain_step(spec, model, x, y, plain_setting)

        def plain_round():
            for _ in range(ROUND_LENGTH):
                plain_step()

        rounds = _interleaved({"round": _round(spec, model, p, x, y), "plain": plain_round}, reps, 1, min_time)
        ratio = rounds["round"] / rounds["plain"]
        rows.append({"model": name, "P": p, "B": spec.batch_size, "variant": f"round of {ROUND_LENGTH}, duty 0.15",
                     "ms": rounds["round"] * 1e3, "x plain": ratio, "form": "", "peak_mib": float("nan")})
        log(f"{name:<17} {'round':<22} {rounds['round'] * 1e3:9.2f} ms  {ratio:5.2f}x plain ({plain_setting})")
    return rows


def format_cooperative(rows: list[dict]) -> str:
    """A Markdown table of :func:`run_cooperative`'s rows."""
    lines = ["| model | P | B | variant | ms | x plain at P x B | form | peak MiB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = "" if r["peak_mib"] != r["peak_mib"] else f"{r['peak_mib']:.1f}"
        lines.append(f"| {r['model']} | {r['P']} | {r['B']} | {r['variant']} | {r['ms']:.2f} | {r['x plain']:.2f} "
                     f"| {r['form']} | {peak} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m vmapclan.bench cooperative``."""
    parser = argparse.ArgumentParser(prog="python -m vmapclan.bench cooperative",
                                     description="The cooperative step against one plain model at batch P x B.")
    parser.add_argument("--models", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=0.2)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run_cooperative(args.models, args.reps, min_time=args.min_time,
                           log=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_cooperative(rows))
    return 0
