"""The quality benchmark's tasks: each split into training, validation and test data of its own.

Every task here returns ``(train, val, test)`` from :meth:`~vmapclan.Task.split`, so nothing a
method decides on (selection, the search, keep-best, the choice among a sweep's or an oracle's
models) can read the data its final model is judged on. All data is available offline: it ships
with Python (the standard library's sources), with scikit-learn (digits, diabetes, breast cancer,
wine), or is drawn from a fixed random generator.

- ``digits-mlp``: scikit-learn's 8x8 digits (1797 images, 10 classes), an MLP; little data, many epochs.
- ``stdlib-chars``: next-character prediction on the standard library's sources with a small
  causal transformer; a corpus large enough that no run repeats a window.
- ``diabetes-mlp``: scikit-learn's diabetes regression (442 samples, 10 features), mean squared error.
- ``breast-cancer-mlp``: scikit-learn's breast cancer data (569 samples, 30 features, 2 classes).
- ``wine-mlp``: scikit-learn's wine data (178 samples, 13 features, 3 classes): very little data.
- ``iris-mlp``: scikit-learn's iris data (150 samples, 4 features, 3 classes): the least data,
  added after the defaults were chosen, to check them on.
- ``digits-cnn``: the digits as 1x8x8 images through a small convolutional network.
- ``sequence-gru``: a recurrent model (:class:`vmapclan.recurrent.GRU`, which batches under vmap)
  on synthetic token sequences whose target needs memory: ``(x[t] + x[t-3]) mod 8``, with 20% of
  the targets replaced by random tokens (a floor on the loss, and noise to overfit).
- ``teacher-regression``: a fixed random teacher MLP labels fresh Gaussian inputs (plus noise);
  the training set is larger than the samples a run reads, so no sample repeats.
- ``teacher-classification``: the same with 10 classes, labels drawn from the teacher's softmax.
- ``digits-finetune``: an MLP pre-trained on the digits 0-4 (inside :meth:`build_model`,
  deterministic from the run's seed) gets a fresh head and is fine-tuned on a few images of the
  digits 5-9.

The held-out part of each split is cut into validation and test data with ``data.test_fraction``
(the share of the held-out data that becomes the test split, as the machine itself does for a task
without one; default 0.5): it must be above 0 here.
"""

from __future__ import annotations

import abc
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DataSpec
from ..task import Task
from ..tasks import StdlibCharsTask, _digits, digits_mlp, stdlib_corpus

__all__ = ["BENCH_TASKS", "bench_task", "three_way", "DigitsHoldoutTask", "StdlibCharsHoldoutTask", "DiabetesTask",
           "BreastCancerTask", "WineTask", "IrisTask", "DigitsCNNTask", "SequenceTask", "TeacherRegressionTask",
           "TeacherClassificationTask", "DigitsFinetuneTask", "TEACHER_SEED"]

#: Seed of the teachers' weights: the same teacher for every run seed (a seed draws the samples).
TEACHER_SEED = 1234


def three_way(n: int, data: DataSpec, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample indices of the training, validation and test parts of ``n`` samples, drawn by ``seed``.

    A share ``data.val_fraction`` of the samples is held out, and ``data.test_fraction`` of those
    become the test split (the rest the validation split). Each part's indices are sorted.

    Args:
        n: Samples in all.
        data: The run's data settings.
        seed: The run's seed.

    Returns:
        ``(train, val, test)`` index tensors, disjoint and together ``range(n)``.

    Raises:
        ValueError: if ``data.test_fraction`` is 0, or a part would be empty.

    Example:
        >>> train, val, test = three_way(10, DataSpec(val_fraction=0.4), 0)
        >>> len(train), len(val), len(test)
        (6, 2, 2)
    """
    if not data.test_fraction > 0:
        raise ValueError(f"quality: the bench's tasks need data.test_fraction > 0 (the share of the held-out data "
                         f"that becomes the test split), got {data.test_fraction}")
    held = round(data.val_fraction * n)
    n_test = round(data.test_fraction * held)
    if not (1 <= n_test < held < n):
        raise ValueError(f"quality: {n} samples with data.val_fraction = {data.val_fraction} and data.test_fraction = "
                         f"{data.test_fraction} leave an empty training, validation or test part")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    test, val, train = order[:n_test], order[n_test:held], order[held:]
    return train.sort().values, val.sort().values, test.sort().values


def _standardised(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """``train`` and ``others`` standardised by ``train``'s mean and sd per column (constant columns kept)."""
    mean, std = train.mean(0), train.std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return [(t - mean) / std for t in (train, *others)]


def _mlp(inputs: int, hidden: int, outputs: int) -> nn.Module:
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, outputs))


def _positive(settings: dict, names, task: str) -> dict:
    for name in names:
        value = settings[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"model.{name} must be a positive int for task {task!r}, got {value!r}")
    return settings


class _BenchTask(Task):
    """A bench task: positive-int model settings, and classification by cross-entropy."""

    #: The model settings that must be positive ints.
    positive: tuple[str, ...] = ()

    def model_settings(self, model) -> dict:
        """The settings with defaults; the sizes must be positive ints."""
        return _positive(super().model_settings(model), self.positive, self.reference)

    def loss(self, output, target):
        """Cross-entropy."""
        return F.cross_entropy(output, target)


class DigitsHoldoutTask(_BenchTask):
    """``digits-mlp`` with a test split of its own: the held-out images cut into validation and test halves.

    Model settings: ``hidden`` (128), the width of the MLP's two hidden layers.
    """

    data_reads = ("val_fraction",)  # three_way splits by it

    model_defaults = {"hidden": 128}
    positive = ("hidden",)

    def split(self, data, seed):
        """Images as 64 floats in [0, 1], parts by :func:`three_way`."""
        x, y = _digits()
        return tuple((x[i], y[i]) for i in three_way(len(x), data, seed))

    def build_model(self, model, data):
        """The digits MLP 64 - hidden - hidden - 10."""
        return digits_mlp(model["hidden"])


class StdlibCharsHoldoutTask(StdlibCharsTask):
    """``stdlib-chars`` with a test split of its own.

    The corpus is split by file into training and held-out characters (see
    :func:`vmapclan.tasks.stdlib_corpus`); the held-out stream is cut at the share
    ``1 - data.test_fraction`` into the validation and the test streams, so the two hold
    different files but for the one file that straddles the cut.
    """

    name = ""

    def streams(self, data: DataSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The training, validation and test character streams (``uint8`` ASCII codes).

        Raises:
            ValueError: if ``data.test_fraction`` is 0.
        """
        if not data.test_fraction > 0:
            raise ValueError(f"quality: the bench's tasks need data.test_fraction > 0, got {data.test_fraction}")
        train, held = stdlib_corpus(data.val_fraction, data.max_chars)
        cut = round((1 - data.test_fraction) * len(held))
        return train, held[:cut], held[cut:]

    def split(self, data, seed):
        """Windows of ``data.seq_len`` characters and their next characters from each of :meth:`streams`."""
        parts = self.streams(data)
        if min(len(p) for p in parts) < data.seq_len + 1:
            raise ValueError(f"data.max_chars={data.max_chars} is too small for data.seq_len={data.seq_len} "
                             f"({', '.join(str(len(p)) for p in parts)} training, validation and test characters)")

        def windows(tokens):
            # Windows of seq_len + 1 that overlap by one character: inputs and next-character targets.
            chunks = tokens.long().unfold(0, data.seq_len + 1, data.seq_len)
            return chunks[:, :-1].contiguous(), chunks[:, 1:].contiguous()

        return tuple(windows(p) for p in parts)


@functools.lru_cache(maxsize=4)
def _sklearn(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    import sklearn.datasets

    x, y = getattr(sklearn.datasets, name)(return_X_y=True)
    return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y)


class DiabetesTask(_BenchTask):
    """Regression on scikit-learn's bundled diabetes data (442 samples, 10 features), MSE on standardised targets.

    Model settings: ``hidden`` (64), the width of a two-hidden-layer MLP.
    """

    data_reads = ("val_fraction",)  # three_way splits by it

    model_defaults = {"hidden": 64}
    positive = ("hidden",)

    def split(self, data, seed):
        """Parts by :func:`three_way`, features and target standardised on the training part."""
        x, y = _sklearn("load_diabetes")
        y = y.float().unsqueeze(1)
        train, val, test = three_way(len(x), data, seed)
        xs = _standardised(x[train], x[val], x[test])
        ys = _standardised(y[train], y[val], y[test])
        return tuple(zip(xs, ys))

    def build_model(self, model, data):
        """An MLP 10 - hidden - hidden - 1."""
        return _mlp(10, model["hidden"], 1)

    def loss(self, output, target):
        """Mean squared error."""
        return F.mse_loss(output, target)


class _TabularTask(_BenchTask):
    """A scikit-learn classification data set, features standardised on the training part, an MLP."""

    data_reads = ("val_fraction",)  # three_way splits by it

    loader: str = ""
    model_defaults = {"hidden": 32}
    positive = ("hidden",)

    def split(self, data, seed):
        """Parts by :func:`three_way`, features standardised on the training part."""
        x, y = _sklearn(self.loader)
        y = y.long()
        train, val, test = three_way(len(x), data, seed)
        return tuple(zip(_standardised(x[train], x[val], x[test]), (y[train], y[val], y[test])))

    def build_model(self, model, data):
        """An MLP features - hidden - hidden - classes."""
        x, y = _sklearn(self.loader)
        return _mlp(x.shape[1], model["hidden"], int(y.max()) + 1)


class BreastCancerTask(_TabularTask):
    """scikit-learn's breast cancer data: 569 samples, 30 features, 2 classes.

    Model settings: ``hidden`` (32).
    """

    loader = "load_breast_cancer"


class WineTask(_TabularTask):
    """scikit-learn's wine data: 178 samples, 13 features, 3 classes.

    Model settings: ``hidden`` (32).
    """

    loader = "load_wine"


class IrisTask(_TabularTask):
    """scikit-learn's iris data: 150 samples, 4 features, 3 classes.

    Model settings: ``hidden`` (32).
    """

    loader = "load_iris"


class _DigitsCNN(nn.Module):
    """Two 3x3 convolutions (the second after a 2x2 max-pool) and a linear head, on 1x8x8 digits."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.head = nn.Linear(2 * channels * 16, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        return self.head(F.relu(self.conv2(x)).flatten(1))


class DigitsCNNTask(_BenchTask):
    """The digits as 1x8x8 images (the parts of :class:`DigitsHoldoutTask`) through a small CNN.

    Model settings: ``channels`` (8), the first convolution's channels (the second has twice as many).
    """

    data_reads = ("val_fraction",)  # three_way splits by it

    model_defaults = {"channels": 8}
    positive = ("channels",)

    def split(self, data, seed):
        """The digits' parts by :func:`three_way`, the images shaped ``[1, 8, 8]``."""
        x, y = _digits()
        x = x.view(-1, 1, 8, 8)
        return tuple((x[i], y[i]) for i in three_way(len(x), data, seed))

    def build_model(self, model, data):
        """The CNN."""
        return _DigitsCNN(model["channels"])


class _SequenceModel(nn.Module):
    """Embedding, one vmap-ready recurrent layer (batch first), a linear head at every position."""

    def __init__(self, cell: str, vocab: int, embedding: int, hidden: int):
        super().__init__()
        from ..recurrent import GRU, LSTM

        self.embed = nn.Embedding(vocab, embedding)
        self.rnn = (GRU if cell == "gru" else LSTM)(embedding, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, idx):
        h, _ = self.rnn(self.embed(idx))
        # The head sees [B * T, hidden]: under vmap a 3-D input to a member's Linear would copy its
        # weight once per sequence (matmul's broadcasting).
        return self.head(h.reshape(-1, h.shape[-1])).view(*h.shape[:-1], -1)


class SequenceTask(Task):
    """Synthetic sequences for a recurrent model: predict ``(x[t] + x[t - lag]) mod vocab`` at every position.

    Inputs are uniform random tokens (a position before the first ``lag`` adds 0); a share
    ``data.noise`` of the targets is replaced by uniform random tokens, so the best possible
    loss is the entropy of that noise, and a model that memorises its training sequences
    overfits. The sequences of the three parts are drawn by the run's seed.

    Model settings: ``cell`` (``"gru"`` or ``"lstm"``: :mod:`vmapclan.recurrent`'s layers, which
    batch under vmap), ``embedding`` (16), ``hidden`` (48).
    Data settings: ``vocab`` (8), ``lag`` (3), ``noise`` (0.2), ``samples`` (3000 sequences in
    all, split by ``data.val_fraction`` and ``data.test_fraction``); ``data.seq_len`` is the
    sequences' length.
    """

    data_reads = ("val_fraction", "seq_len")  # three_way splits by the first; the second is the length

    model_defaults = {"cell": "gru", "embedding": 16, "hidden": 48}
    data_defaults = {"vocab": 8, "lag": 3, "noise": 0.2, "samples": 3000}

    def model_settings(self, model) -> dict:
        """The settings with defaults; ``cell`` must be ``"gru"`` or ``"lstm"``, the sizes positive ints."""
        settings = _positive(super().model_settings(model), ("embedding", "hidden"), self.reference)
        if settings["cell"] not in ("gru", "lstm"):
            raise ValueError(f"model.cell must be 'gru' or 'lstm', got {settings['cell']!r}")
        return settings

    def split(self, data, seed):
        """``samples`` sequences of ``data.seq_len`` tokens and their targets, parts by :func:`three_way`."""
        if not 0 <= data.noise < 1 or not 1 <= data.lag < data.seq_len or data.vocab < 2:
            raise ValueError(f"quality: sequence data needs 0 <= noise < 1, 1 <= lag < seq_len and vocab >= 2, got "
                             f"noise={data.noise}, lag={data.lag}, seq_len={data.seq_len}, vocab={data.vocab}")
        g = torch.Generator().manual_seed(50_000 + seed)
        x = torch.randint(data.vocab, (data.samples, data.seq_len), generator=g)
        past = torch.zeros_like(x)
        past[:, data.lag:] = x[:, :-data.lag]
        y = (x + past) % data.vocab
        noisy = torch.rand(x.shape, generator=g) < data.noise
        y = torch.where(noisy, torch.randint(data.vocab, x.shape, generator=g), y)
        return tuple((x[i], y[i]) for i in three_way(data.samples, data, seed))

    def build_model(self, model, data):
        """The recurrent sequence model."""
        return _SequenceModel(model["cell"], data.vocab, model["embedding"], model["hidden"])

    def loss(self, output, target):
        """Cross-entropy over every position."""
        return F.cross_entropy(output.flatten(0, -2), target.flatten())

    def accuracy(self, output, target):
        """Share of positions predicted right."""
        return (output.argmax(-1) == target).float().mean()


@functools.lru_cache(maxsize=2)
def _teacher(inputs: int, hidden: int, outputs: int) -> nn.Module:
    """The fixed random teacher: an MLP with tanh, weights from :data:`TEACHER_SEED`.

    The hidden layers' weights are N(0, (2 / fan_in)^2): large enough that the tanh saturates
    and a linear model leaves about a quarter of the target's variance unexplained (with
    N(0, 1/fan_in) it leaves a tenth: too easy a teacher). The output layer's are N(0, 1/fan_in).
    """
    g = torch.Generator().manual_seed(TEACHER_SEED)
    teacher = nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                            nn.Linear(hidden, outputs))
    with torch.no_grad():
        for index, layer in enumerate(teacher):
            if isinstance(layer, nn.Linear):
                gain = 1.0 if index == len(teacher) - 1 else 2.0
                layer.weight.copy_(gain * torch.randn(layer.weight.shape, generator=g) / math.sqrt(layer.in_features))
                layer.bias.copy_(0.1 * torch.randn(layer.bias.shape, generator=g))
    return teacher.requires_grad_(False)


class _TeacherTask(Task):
    """Fresh Gaussian inputs labelled by a fixed random teacher; the training part is ``train_samples`` long.

    Model settings: ``hidden`` (64), the width of the student MLP's two hidden layers.
    Data settings: ``features`` (16), ``train_samples`` (the training part: set it above
    ``total_steps x P x B`` so that no sample repeats), ``holdout_samples`` (4096: the validation
    and test parts together, cut by ``data.test_fraction``).
    """

    model_defaults = {"hidden": 64}
    data_defaults = {"features": 16, "train_samples": 65_536, "holdout_samples": 4096}
    #: The teacher's width and outputs.
    teacher_hidden, outputs = 32, 1
    #: A seed offset per task, so the two teachers' tasks draw different inputs.
    stream = 0

    def model_settings(self, model) -> dict:
        """The settings with defaults; ``hidden`` must be a positive int."""
        return _positive(super().model_settings(model), ("hidden",), self.reference)

    def split(self, data, seed):
        """``train_samples`` training and ``holdout_samples`` held-out samples, drawn by ``seed``."""
        if not data.test_fraction > 0:
            raise ValueError(f"quality: the bench's tasks need data.test_fraction > 0, got {data.test_fraction}")
        n_test = round(data.test_fraction * data.holdout_samples)
        if data.train_samples < 1 or not 1 <= n_test < data.holdout_samples:
            raise ValueError(f"quality: train_samples={data.train_samples} and holdout_samples="
                             f"{data.holdout_samples} leave an empty training, validation or test part")
        x, y = self._draw(data.features, data.train_samples + data.holdout_samples, seed)
        cuts = [data.train_samples, data.train_samples + data.holdout_samples - n_test]
        return tuple(zip(x.tensor_split(cuts), y.tensor_split(cuts)))

    def _draw(self, features: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` fresh inputs and their targets (:meth:`_targets` of the teacher's output), from the task's own stream."""
        g = torch.Generator().manual_seed(60_000 + 1000 * self.stream + seed)
        x = torch.randn(n, features, generator=g)
        with torch.no_grad():
            out = _teacher(features, self.teacher_hidden, self.outputs)(x)
        return x, self._targets(x, out, g)

    @abc.abstractmethod
    def _targets(self, x: torch.Tensor, out: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """The targets of inputs ``x`` from the teacher's output ``out`` on them, their noise drawn from ``g``."""

    def build_model(self, model, data):
        """The student MLP features - hidden - hidden - outputs."""
        return _mlp(data.features, model["hidden"], self.outputs)


class TeacherRegressionTask(_TeacherTask):
    """Regression on a fixed random teacher MLP's output (scaled to unit variance) plus noise of sd 0.3.

    The best possible mean squared error is the noise's variance, 0.09.
    """

    stream = 1
    noise = 0.3

    def _targets(self, x, out, g):
        # Unit variance by the teacher's own scale on a fixed reference draw, the same for every seed.
        reference = torch.randn(8192, x.shape[1], generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            ref = _teacher(x.shape[1], self.teacher_hidden, self.outputs)(reference)
        y = (out - ref.mean()) / ref.std()
        return y + self.noise * torch.randn(y.shape, generator=g)

    def loss(self, output, target):
        """Mean squared error."""
        return F.mse_loss(output, target)


class TeacherClassificationTask(_TeacherTask):
    """10 classes drawn from the softmax of a fixed random teacher MLP's logits (times 3).

    Labels are sampled, not the teacher's argmax: the best possible loss is the teacher's mean
    entropy, and no model reaches accuracy 1.
    """

    stream = 2
    outputs = 10
    temperature = 3.0

    def _targets(self, x, out, g):
        return torch.multinomial((self.temperature * out).softmax(-1), 1, generator=g).squeeze(1)

    def loss(self, output, target):
        """Cross-entropy."""
        return F.cross_entropy(output, target)


_PRETRAINED: dict[tuple, dict] = {}  # the pre-trained bodies by (hidden, steps, key): every method of a seed reuses one


def _pretrained_body(hidden: int, steps: int, key: int) -> dict:
    """The state dict of an MLP body (64 - hidden - hidden) pre-trained on the digits 0-4, from ``key``."""
    found = _PRETRAINED.get((hidden, steps, key))
    if found is not None:
        return found
    x, y = _digits()
    keep = y < 5
    x, y = x[keep], y[keep]
    # Its own random state: the pre-training depends on the key alone, and leaves the caller's generator as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(key)
        net = _mlp(64, hidden, 5)
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(key)
        for _ in range(steps):
            i = torch.randint(len(x), (64,), generator=g)
            loss = F.cross_entropy(net(x[i]), y[i])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    body = {k: v.detach().clone() for k, v in net.state_dict().items() if not k.startswith("4.")}
    if len(_PRETRAINED) > 16:
        _PRETRAINED.clear()
    _PRETRAINED[(hidden, steps, key)] = body
    return body


class DigitsFinetuneTask(_BenchTask):
    """A model pre-trained on the digits 0-4, fine-tuned with a fresh head on a few images of the digits 5-9.

    :meth:`build_model` pre-trains the MLP body (``pretrain_steps`` AdamW steps at batch 64 on
    every image of 0-4), from a key drawn from torch's global generator: the machine seeds it
    with the run's seed first, so the pre-trained model is the seed's, the same for every method.
    The fine-tuning data holds only the digits 5-9 (labels 0-4): ``shots`` training images per
    class, drawn by the seed; the rest are held out (validation and test by ``data.test_fraction``).

    Model settings: ``hidden`` (64), ``pretrain_steps`` (300).
    Data settings: ``shots`` (30).
    """

    model_defaults = {"hidden": 64, "pretrain_steps": 300}
    data_defaults = {"shots": 30}
    positive = ("hidden", "pretrain_steps")

    def split(self, data, seed):
        """``shots`` images per digit of 5-9 for training, the others held out."""
        if not data.test_fraction > 0:
            raise ValueError(f"quality: the bench's tasks need data.test_fraction > 0, got {data.test_fraction}")
        x, y = _digits()
        keep = y >= 5
        x, y = x[keep], y[keep] - 5
        g = torch.Generator().manual_seed(70_000 + seed)
        train, held = [], []
        for label in range(5):
            members = (y == label).nonzero().squeeze(1)
            members = members[torch.randperm(len(members), generator=g)]
            if not 1 <= data.shots < len(members) - 1:
                raise ValueError(f"quality: data.shots must be in [1, {len(members) - 2}], got {data.shots}")
            train.append(members[:data.shots])
            held.append(members[data.shots:])
        held = torch.cat(held)
        held = held[torch.randperm(len(held), generator=g)]
        n_test = max(1, round(data.test_fraction * len(held)))
        parts = torch.cat(train).sort().values, held[n_test:].sort().values, held[:n_test].sort().values
        return tuple((x[i], y[i]) for i in parts)

    def build_model(self, model, data):
        """The pre-trained body with a fresh 5-way head (initialised from torch's global generator)."""
        key = int(torch.randint(2**62, ()).item())
        net = _mlp(64, model["hidden"], 5)
        net.load_state_dict(_pretrained_body(model["hidden"], model["pretrain_steps"], key), strict=False)
        return net


#: The bench's tasks by name.
BENCH_TASKS: dict[str, type[Task]] = {
    "digits-mlp": DigitsHoldoutTask,
    "stdlib-chars": StdlibCharsHoldoutTask,
    "diabetes-mlp": DiabetesTask,
    "breast-cancer-mlp": BreastCancerTask,
    "wine-mlp": WineTask,
    "iris-mlp": IrisTask,
    "digits-cnn": DigitsCNNTask,
    "sequence-gru": SequenceTask,
    "teacher-regression": TeacherRegressionTask,
    "teacher-classification": TeacherClassificationTask,
    "digits-finetune": DigitsFinetuneTask,
}


def bench_task(name: str) -> Task:
    """A fresh instance of the bench's task ``name``.

    Args:
        name: One of :data:`BENCH_TASKS`.

    Raises:
        ValueError: for an unknown name.

    Example:
        >>> type(bench_task("wine-mlp")).__name__
        'WineTask'
    """
    if name not in BENCH_TASKS:
        raise ValueError(f"quality: unknown task {name!r}; expected one of {list(BENCH_TASKS)}")
    return BENCH_TASKS[name]()
