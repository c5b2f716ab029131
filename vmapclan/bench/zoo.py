"""FusedStep's ``auto`` choices against the ``Member`` loop on models beyond MLPs.

For each model, in one process and on the same random data, a sweep clan (every step
competitive, every member with its own hyperparameters) is stepped with: the imperative
``Member`` loop (``member.model``, ``member_loss``, ``backward``, ``BatchedAdamW``), and
:class:`~vmapclan.FusedStep` with its defaults and with each update and backward it accepts.
The variants are timed in turns, a block of steps each per repetition. The table gives
milliseconds per step (medians) and each variant's time over the loop's: the default should
never be above 1.

Models: a CNN with BatchNorm and Dropout, a causal character transformer with learned position
embeddings, an LSTM written from ``nn.Linear`` cells, and (when ``transformers`` is installed) a
tiny GPT-2 built from a config.

Run: ``python -m vmapclan.bench zoo [--population 8] [--threads 1] [--reps 5]``.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .speed import _imperative_variant

__all__ = ["ZOO", "run_zoo", "main"]


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(0.1), nn.Linear(128, 10))

    def forward(self, x):
        return self.net(x)


class _LinearLSTM(nn.Module):
    """An LSTM from ``nn.Linear`` gates (``nn.LSTM`` has no batching rule under vmap)."""

    def __init__(self, vocab=64, hidden=64):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.gates = nn.Linear(2 * hidden, 4 * hidden)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, idx):
        x = self.embed(idx)
        h = c = x.new_zeros(x.shape[0], x.shape[-1])
        outs = []
        for t in range(x.shape[1]):
            i, f, g, o = self.gates(torch.cat([x[:, t], h], -1)).chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outs.append(h)
        return self.head(torch.stack(outs, 1))


class _Logits(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx):
        return self.model(input_ids=idx, use_cache=False).logits


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4, attn_implementation="eager")
    return _Logits(GPT2LMHeadModel(config))


def _char_transformer() -> nn.Module:
    from ..tasks import CharTransformer

    return CharTransformer(vocab=128, d_model=64, n_layers=2, n_heads=4, max_len=64)


def _tokens(vocab: int, seq: int) -> Callable:
    def data(p, b, g):
        idx = torch.randint(0, vocab, (p, b, seq + 1), generator=g)
        return idx[..., :-1], idx[..., 1:]

    return data


def _images(p, b, g):
    return torch.randn(p, b, 1, 8, 8, generator=g), torch.randint(0, 10, (p, b), generator=g)


def _sequence_loss(output, target):
    return F.cross_entropy(output.flatten(0, -2), target.flatten())


ZOO: dict[str, tuple[Callable[[], nn.Module], Callable, Callable, int]] = {
    # name: (build, data(p, b, generator), per-member loss, batch size)
    "cnn-batchnorm": (_ConvNet, _images, F.cross_entropy, 32),
    "char-transformer": (_char_transformer, _tokens(128, 64), _sequence_loss, 8),
    "linear-lstm": (_LinearLSTM, _tokens(64, 32), _sequence_loss, 8),
    "gpt2-tiny": (_gpt2, _tokens(128, 64), _sequence_loss, 8),
}


def _variants(clan) -> dict[str, dict]:
    from ..step import check_options

    variants = {"fused (default)": {}}
    for update in ("batched", "per-member"):
        for backward in ("vmap", "autograd"):
            try:
                check_options(clan.device, update=update, backward=backward)
            except ValueError:
                continue
            variants[f"fused {update}/{backward}"] = {"update": update, "backward": backward}
    return variants


def _interleaved(steps: dict[str, Callable[[], object]], reps: int, warmup: int, min_time: float) -> dict[str, float]:
    """Median seconds per step of each step function, timed in turns (one block each per repetition).

    Turns rather than one variant after the other: on a shared machine the speed drifts over
    seconds, and taking turns spreads that drift over every variant alike.
    """
    blocks = {}
    for label, step in steps.items():
        for _ in range(warmup):
            step()
        start = time.perf_counter()
        step()
        blocks[label] = max(1, math.ceil(min_time / max(time.perf_counter() - start, 1e-6)))
    times: dict[str, list[float]] = {label: [] for label in steps}
    for _ in range(reps):
        for label, step in steps.items():
            start = time.perf_counter()
            for _ in range(blocks[label]):
                step()
            times[label].append((time.perf_counter() - start) / blocks[label])
    return {label: statistics.median(t) for label, t in times.items()}


def run_zoo(names: list[str], population: int = 8, reps: int = 5, warmup: int = 2, min_time: float = 0.2,
            log: Callable[[str], None] = print) -> list[dict]:
    """Time the Member loop and FusedStep's variants on each zoo model; one row per model and variant."""
    from .. import Clan, FusedStep

    rows = []
    for name in names:
        build, data, loss_fn, batch = ZOO[name]
        try:
            torch.manual_seed(0)
            model = build()
        except ImportError as err:
            log(f"{name}: skipped ({err})")
            continue
        x, y = data(population, batch, torch.Generator().manual_seed(1))

        def fresh_clan():
            m = copy.deepcopy(model)
            return Clan(m, torch.optim.AdamW(m.parameters(), lr=1e-3), population_size=population,
                        round_length=10**9, duty_cycle=1.0, selection=None, autobind=["adamw"])

        loop_clan = fresh_clan()
        steps = {"member loop": _imperative_variant(loss_fn, loop_clan, x, y)}
        choices = {"member loop": ""}
        for label, options in _variants(loop_clan).items():
            fused = FusedStep(fresh_clan(), loss_fn, **options)
            steps[label] = lambda fused=fused: fused(x, y)
            choices[label] = f"{fused.update}/{fused.backward}"
        seconds = _interleaved(steps, reps, warmup, min_time)
        loop = seconds["member loop"]
        for label, t in seconds.items():
            rows.append({"model": name, "variant": label, "ms": t * 1e3, "x loop": t / loop, "choice": choices[label]})
            log(f"{name:<17} {label:<26} {t * 1e3:8.2f} ms  ({t / loop:.2f}x loop)")
    return rows


def format_zoo(rows: list[dict]) -> str:
    """A Markdown table of :func:`run_zoo`'s rows."""
    lines = ["| model | variant | ms/step | x member loop | update/backward |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['variant']} | {r['ms']:.2f} | {r['x loop']:.2f} | {r['choice']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m vmapclan.bench zoo``."""
    parser = argparse.ArgumentParser(prog="python -m vmapclan.bench zoo",
                                     description="FusedStep's auto choices against the Member loop on a zoo of models.")
    parser.add_argument("--models", nargs="+", choices=sorted(ZOO), default=list(ZOO))
    parser.add_argument("--population", type=int, default=8)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=0.2)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run_zoo(args.models, args.population, args.reps, min_time=args.min_time,
                   log=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_zoo(rows))
    return 0
