"""Built-in tasks on data that ships with Python or scikit-learn (no downloads).

- ``digits-mlp``: scikit-learn's bundled 8x8 digits (1797 images, 10 classes) and an MLP.
- ``stdlib-chars``: next-character prediction on the CPython standard library's own ``.py``
  sources with a small causal transformer. The file list is sorted and shuffled with a fixed
  seed, so the corpus is the same on every run; files are split into train and validation by a
  hash of their path (a file is never in both), and the corpus is capped at
  ``data.max_chars`` characters so it loads in about a second.

A task gives the data, builds the model, and defines one member's loss; the same loss serves
the population (through :func:`vmapclan.member_loss`) and a plain model (the replay).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
import os
import random
import sysconfig
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from .population import PopulationModel, member_loss, score_members
from .specs import DataSpec, ModelSpec

__all__ = ["Task", "TaskData", "DigitsTask", "StdlibCharsTask", "CharTransformer", "get_task", "stdlib_corpus",
           "stdlib_files", "load_digits", "digits_mlp", "TASKS", "VOCAB"]

_EVAL_CHUNK = 256  # validation samples per forward pass: bounds memory for P members at once


@dataclasses.dataclass(frozen=True)
class TaskData:
    """A task's tensors.

    Attributes:
        train: ``(x, y)`` training tensors.
        val: ``(x, y)`` validation tensors (final metrics).
        eval: ``(x, y)``: the first ``data.eval_samples`` of a fixed shuffle of ``val``, used to score
            members at the end of every round.
    """

    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    eval: tuple[torch.Tensor, torch.Tensor]


class Task(abc.ABC):
    """A built-in task: data, model and one member's loss. Subclasses implement the three abstract hooks."""

    name: str = ""

    def load(self, data: DataSpec, seed: int) -> TaskData:
        """The train, validation and per-round evaluation tensors."""
        train, val = self._split(data, seed)
        n = len(val[0]) if data.eval_samples == 0 else min(data.eval_samples, len(val[0]))
        pick = torch.randperm(len(val[0]), generator=torch.Generator().manual_seed(seed + 1))[:n]
        return TaskData(train, val, (val[0][pick], val[1][pick]))

    @abc.abstractmethod
    def _split(self, data: DataSpec, seed: int):
        """``((x_train, y_train), (x_val, y_val))`` for ``data`` and ``seed``."""

    @abc.abstractmethod
    def build_model(self, model: ModelSpec, data: DataSpec) -> nn.Module:
        """A fresh model (initialised from torch's global generator: seed it first)."""

    @abc.abstractmethod
    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """One model's mean loss (a scalar); vmapped over members by :func:`vmapclan.member_loss`."""

    def accuracy(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Share of correct predictions (a scalar)."""
        return (output.argmax(-1) == target).float().mean()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
        """``{"loss", "accuracy"}`` of a plain model on ``(x, y)``, in eval mode, chunked.

        The model's training mode is restored afterwards.
        """
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        loss = correct = 0.0
        for i in range(0, len(x), _EVAL_CHUNK):
            xb, yb = x[i:i + _EVAL_CHUNK].to(device), y[i:i + _EVAL_CHUNK].to(device)
            out = model(xb)
            loss += self.loss(out, yb).item() * len(xb)
            correct += self.accuracy(out, yb).item() * len(xb)
        model.train(was_training)
        return {"loss": loss / len(x), "accuracy": correct / len(x)}

    def population_losses(self, population: PopulationModel, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Each member's mean loss on shared data ``(x, y)``: a ``[P]`` tensor (eval mode, chunked)."""
        chunks = [(x[i:i + _EVAL_CHUNK], y[i:i + _EVAL_CHUNK]) for i in range(0, len(x), _EVAL_CHUNK)]

        def losses_of(chunk, _index):
            xb, yb = population.share(chunk)
            return member_loss(self.loss, population(xb), yb)

        return score_members(population, chunks, losses_of, size_of=lambda chunk: len(chunk[0]),
                             who=f"{type(self).__name__}.loss")


class DigitsTask(Task):
    """scikit-learn's digits: 8x8 images scaled to [0, 1], 10 classes, an MLP 64 -> hidden -> hidden -> 10."""

    name = "digits-mlp"

    def _split(self, data: DataSpec, seed: int):
        return load_digits(data.val_fraction, seed)

    def build_model(self, model: ModelSpec, data: DataSpec) -> nn.Module:
        """The MLP (``model.hidden`` wide)."""
        return digits_mlp(model.hidden)

    def loss(self, output, target):
        """Cross-entropy."""
        return F.cross_entropy(output, target)


@functools.lru_cache(maxsize=1)
def _digits():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return torch.tensor(bunch.data, dtype=torch.float32) / 16.0, torch.tensor(bunch.target, dtype=torch.long)


def load_digits(val_fraction: float = 0.2, seed: int = 0):
    """scikit-learn's bundled digits as tensors, shuffled by ``seed`` and split into train and validation.

    Images are 64 floats in [0, 1] (pixel values / 16); labels are ``long`` in 0..9.

    Returns:
        ``((x_train, y_train), (x_val, y_val))``.

    Example:
        >>> (x, y), (x_val, y_val) = load_digits(0.2)
        >>> x.shape, x_val.shape
        (torch.Size([1438, 64]), torch.Size([359, 64]))
    """
    x, y = _digits()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = len(x) - max(1, round(val_fraction * len(x)))
    return (x[perm[:cut]], y[perm[:cut]]), (x[perm[cut:]], y[perm[cut:]])


def digits_mlp(hidden: int = 256) -> nn.Module:
    """The digits MLP: 64 -> hidden -> hidden -> 10 with ReLUs."""
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))


VOCAB = 128  # ASCII codes; other characters are read as "?"


def stdlib_files() -> list[str]:
    """Relative paths of the standard library's ``.py`` files (no site-packages), sorted.

    Returns:
        Paths relative to ``sysconfig.get_paths()["stdlib"]``.
    """
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in ("site-packages", "__pycache__"))
        for name in files:
            if name.endswith(".py"):
                found.append(os.path.relpath(os.path.join(directory, name), root))
    return sorted(found)


@functools.lru_cache(maxsize=4)
def stdlib_corpus(val_fraction: float, max_chars: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and validation token streams (``uint8``, ASCII codes) from the standard library's sources.

    Files go to validation when a CRC32 of their path falls in the lowest ``val_fraction`` of its
    range, so the split is by file and does not depend on which files a Python install has. The
    sorted list is shuffled with a fixed seed (a spread of modules rather than the alphabet's
    start) and read until each side holds its share of ``max_chars``.

    Args:
        val_fraction: Share of files (and of the character budget) for validation, in (0, 1).
        max_chars: Characters read in all.

    Returns:
        ``(train_tokens, val_tokens)``.

    Raises:
        RuntimeError: if no standard library sources are found.
    """
    files = stdlib_files()
    if not files:
        raise RuntimeError(f"stdlib-chars: no .py files under {sysconfig.get_paths()['stdlib']!r}")
    random.Random(0).shuffle(files)
    root = sysconfig.get_paths()["stdlib"]
    budget = {False: int(max_chars * (1 - val_fraction)), True: max(1, int(max_chars * val_fraction))}
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    have = {False: 0, True: 0}
    for rel in files:
        is_val = zlib.crc32(rel.encode()) / 2**32 < val_fraction
        if have[is_val] >= budget[is_val]:
            if all(have[k] >= budget[k] for k in budget):
                break
            continue
        with open(os.path.join(root, rel), encoding="utf-8", errors="replace") as f:
            text = f.read(budget[is_val] - have[is_val])
        data = text.encode("ascii", errors="replace")  # non-ASCII characters become '?'
        parts[is_val].append(data + b"\n")
        have[is_val] += len(data) + 1
    out = []
    for is_val in (False, True):
        blob = b"".join(parts[is_val])
        out.append(torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone())
    return out[0], out[1]


class StdlibCharsTask(Task):
    """Next-character prediction on the standard library's sources with a small causal transformer."""

    name = "stdlib-chars"

    def _split(self, data: DataSpec, seed: int):
        train, val = stdlib_corpus(data.val_fraction, data.max_chars)

        def windows(tokens):
            # Windows of seq_len + 1 that overlap by one character: inputs and next-char targets.
            chunks = tokens.long().unfold(0, data.seq_len + 1, data.seq_len)
            return chunks[:, :-1].contiguous(), chunks[:, 1:].contiguous()

        if len(val) < data.seq_len + 1 or len(train) < data.seq_len + 1:
            raise ValueError(
                f"data.max_chars={data.max_chars} is too small for data.seq_len={data.seq_len} "
                f"({len(train)} training and {len(val)} validation characters)"
            )
        return windows(train), windows(val)

    def build_model(self, model: ModelSpec, data: DataSpec) -> nn.Module:
        """A :class:`CharTransformer` sized by ``model`` for ``data.seq_len``."""
        return CharTransformer(VOCAB, model.d_model, model.n_layers, model.n_heads, data.seq_len, model.dropout)

    def loss(self, output, target):
        """Cross-entropy over every position."""
        return F.cross_entropy(output.flatten(0, -2), target.flatten())


class _Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a GELU MLP."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                             dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(att.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.mlp(self.ln2(x)))


class CharTransformer(nn.Module):
    """A small causal character transformer: token and position embeddings, blocks, a linear head.

    Args:
        vocab: Number of token ids.
        d_model: Width.
        n_layers: Blocks.
        n_heads: Attention heads.
        max_len: Longest sequence.
        dropout: Dropout probability.

    Example:
        >>> CharTransformer(128, 32, 1, 4, 16)(torch.zeros(2, 16, dtype=torch.long)).shape
        torch.Size([2, 16, 128])
    """

    def __init__(self, vocab: int, d_model: int, n_layers: int, n_heads: int, max_len: int, dropout: float = 0.0):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.blocks = nn.Sequential(*[_Block(d_model, n_heads, dropout) for _ in range(n_layers)])
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        with torch.no_grad():  # GPT-2 style small init keeps the first losses near log(vocab)
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    m.weight.normal_(0.0, 0.02)
            for block in self.blocks:
                block.proj.weight.mul_(1 / math.sqrt(2 * n_layers))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, vocab]`` for token ids ``[B, T]``."""
        positions = torch.arange(idx.shape[-1], device=idx.device)
        return self.head(self.ln(self.blocks(self.tok(idx) + self.pos(positions))))


TASKS: dict[str, Task] = {"digits-mlp": DigitsTask(), "stdlib-chars": StdlibCharsTask()}


def get_task(name: str) -> Task:
    """The built-in task called ``name``.

    Raises:
        ValueError: for an unknown name.
    """
    if name not in TASKS:
        raise ValueError(f"get_task: unknown task {name!r}; the tasks are {sorted(TASKS)}")
    return TASKS[name]
