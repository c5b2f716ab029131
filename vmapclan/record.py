"""The run's record: its history and metrics as they are made, and the run directory they end in.

:class:`RunLog` keeps a training run's records (one per round and cooperative stretch, the
training loss's running mean every ``log_every`` steps, the final metrics), appends each to
``metrics.jsonl`` as it is made and hands it to the caller's callback; its state travels in the
run's checkpoint. :class:`TrainingResults` is what a run returns, and writes the run directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from .checks import is_int, positive_int
from .config import RunConfig
from .replay import write_schedule
from .schedule import PhaseSchedule

__all__ = ["RunLog", "TrainingResults", "TIME_PARTS"]

#: Where a run's wall time goes (:meth:`RunLog.timing`): building it, the data-parallel
#: (cooperative) steps, the competitive steps (the search's included), scoring members and the
#: final evaluation, selection, and writing checkpoints; ``"other"`` is the rest.
TIME_PARTS = ("setup", "train", "compete", "evaluate", "select", "checkpoint", "other")


class RunLog:
    """A run's history and metrics records, written to ``out_dir/metrics.jsonl`` as they are made.

    Args:
        total_steps: The run's steps.
        log_every: Steps between training-loss records.
        device: Where the steps' losses are (their running sum stays there: no host sync per step).
        out_dir: The run directory, or ``None``.
        writes: Whether this process writes the run directory (rank 0).

    Attributes:
        history: One record per round and cooperative stretch, in time order.
        metrics: Every record: training-loss logs, rounds and stretches, the final record.
        best_val: The lowest validation loss of any round or stretch so far.
        seconds: Wall seconds spent in each of :data:`TIME_PARTS` (over every session of a
            resumed run).
        callback: Called with every record (and ``{"event": "step", ...}`` after every step).
    """

    def __init__(self, total_steps: int, log_every: int, device: torch.device, out_dir: Path | None = None,
                 writes: bool = True):
        self.total_steps, self.log_every = total_steps, log_every
        self.out_dir, self.writes = out_dir, writes and out_dir is not None
        self.history: list[dict] = []
        self.metrics: list[dict] = []
        self.best_val = math.inf
        self.callback: Callable[[dict], None] | None = None
        self._loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self._loss_count = 0
        self.seconds = dict.fromkeys(TIME_PARTS, 0.0)
        self._device = torch.device(device)
        self._part, self._since = None, 0.0

    @contextlib.contextmanager
    def timing(self, part: str):
        """Charge the wall time inside the block to ``part`` of :data:`TIME_PARTS` (an inner block's to its own).

        On CUDA the device is synchronised at each switch, so queued work is charged to the part
        that queued it.
        """
        outer = self._part
        self._switch(part)
        try:
            yield
        finally:
            self._switch(outer)

    def switch(self, part: str) -> None:
        """Inside a :meth:`timing` block, charge the time from now on to ``part`` (until the block ends or the next switch)."""
        if part != self._part:
            self._switch(part)

    def _switch(self, part: str | None) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        now = time.perf_counter()
        if self._part is not None:
            self.seconds[self._part] += now - self._since
        self._part, self._since = part, now

    def record(self, record: dict) -> None:
        """Add a metrics record: to :attr:`metrics`, to ``metrics.jsonl`` and to the callback."""
        self.metrics.append(record)
        if self.writes:
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.callback is not None and record["event"] != "step":
            self.callback(record)

    def add(self, record: dict, event: str) -> None:
        """Add a history record (a round's or stretch's), and its metrics record as ``event``."""
        self.history.append(record)
        self.saw_val(record.get("val_losses", [record.get("val_loss", math.nan)]))
        self.record({"event": event, **record})

    def saw_val(self, values) -> None:
        """Lower :attr:`best_val` to the least finite validation loss of ``values``."""
        self.best_val = min([self.best_val, *(v for v in values if math.isfinite(v))])

    def logs(self, step: int) -> bool:
        """Whether step ``step`` makes a training-loss record."""
        return step % self.log_every == 0 or step >= self.total_steps

    def step(self, loss: torch.Tensor, step: int, phase: str, round_index: int,
             lr: torch.Tensor | None = None) -> None:
        """After a step: its ``[P]`` losses into the running mean, a training-loss record every ``log_every``.

        ``lr``: member 0's lr in force at the step (a scalar tensor), recorded with the loss.
        """
        self._loss_sum += loss.mean().double()  # summed on device: no host sync per step
        self._loss_count += 1
        if self.logs(step):
            record = {"event": "train", "step": step, "t": step / self.total_steps, "phase": phase,
                      "loss": self._loss_sum.item() / self._loss_count}
            if lr is not None:
                record["lr"] = lr.item()
            self.record(record)
            self._loss_sum.zero_()
            self._loss_count = 0
        if self.callback is not None:
            self.callback({"event": "step", "step": step, "phase": phase, "round": round_index,
                           "best_val": self.best_val, "losses": loss})

    def rewrite(self) -> None:
        """Write ``metrics.jsonl`` anew from :attr:`metrics` (a resumed run's: later lines were lost work)."""
        if self.writes:
            (self.out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.metrics))

    def state_dict(self) -> dict:
        """``{"history", "metrics", "best_val", "loss_sum", "loss_count", "seconds"}`` as plain values."""
        return {"history": list(self.history), "metrics": list(self.metrics), "best_val": self.best_val,
                "loss_sum": self._loss_sum.item(), "loss_count": self._loss_count, "seconds": self.elapsed()}

    def elapsed(self) -> dict:
        """:attr:`seconds` up to now (the part in force charged its time so far), a copy."""
        if self._part is not None:
            self._switch(self._part)
        return dict(self.seconds)

    def check_state(self, saved: Mapping, step: int, who: str) -> None:
        """Refuse a saved log no run of these settings has at ``step``, naming the entry (``machine/...``)."""
        def refuse(name: str, expected: str, got) -> None:
            raise ValueError(f"{who}: the checkpoint's machine/{name} must be {expected}, got {got!r}")

        for name in ("history", "metrics"):
            records = saved.get(name)
            if not isinstance(records, list) or not all(isinstance(r, Mapping) for r in records):
                refuse(name, "a list of records", type(records).__name__)
        ends = [r.get("end_step") for r in saved["history"]]
        if not all(is_int(e) for e in ends) or ends != sorted(ends) or (ends and ends[-1] > step):
            refuse("history", f"records in step order ending by step {step}", ends)
        best_val = saved.get("best_val")
        if not isinstance(best_val, (int, float)) or isinstance(best_val, bool) or math.isnan(best_val):
            refuse("best_val", "a number", best_val)
        loss_sum = saved.get("loss_sum")  # NaN when a member diverged in the log's window: resumed as it is
        if not isinstance(loss_sum, (int, float)) or isinstance(loss_sum, bool) or math.isinf(loss_sum):
            refuse("loss_sum", "a number", loss_sum)
        seconds = saved.get("seconds", {})  # absent from checkpoints written before the run kept it
        if not isinstance(seconds, Mapping) or not set(seconds) <= set(TIME_PARTS) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in seconds.values()):
            refuse("seconds", f"a table of non-negative seconds with keys from {list(TIME_PARTS)}", seconds)
        expected = 0 if step == self.total_steps else step % self.log_every
        if saved.get("loss_count") != expected:
            refuse("loss_count", f"{expected} (steps since the last training-loss record at step {step})",
                   saved.get("loss_count"))

    def load_state_dict(self, saved: Mapping) -> None:
        """Take what :meth:`check_state` accepted."""
        self.history, self.metrics = list(saved["history"]), list(saved["metrics"])
        self.best_val = float(saved["best_val"])
        self._loss_sum.fill_(saved["loss_sum"])
        self._loss_count = saved["loss_count"]
        self.seconds = {**dict.fromkeys(TIME_PARTS, 0.0), **saved.get("seconds", {})}


@dataclasses.dataclass
class TrainingResults:
    """What a :class:`TrainingMachine` run returns.

    Attributes:
        config: The run's config.
        total_steps: Steps run.
        history: One record per round (``kind="round"``: the clan's record, without its
            ``step`` (the run's one step counter is the time: ``start_step`` and ``end_step``),
            plus ``phase``, ``cooperative_steps``, ``batch_size``) and per cooperative
            stretch (``kind="cooperative"``: ``phase``, ``start_step``, ``end_step``, ``hyper``,
            ``batch_size``, ``val_loss``), in time order.
        metrics: Every metrics record (training-loss logs, rounds, the final record).
        final: ``val_loss`` and ``val_accuracy`` of the best model on the whole validation set,
            ``test_loss`` and ``test_accuracy`` of the same model on the test split (where the
            run has one), ``member_val_losses`` (every member, whole validation set),
            ``best_member``, ``seconds`` (the run's wall time), ``seconds_in`` (where it went:
            ``{part: seconds}`` over :data:`TIME_PARTS`), ``member_steps``; with ``clan.keep_best``, when the incumbent kept at an
            earlier step beats the last model, also ``kept_step`` (the step it was kept at) and
            ``last_val_loss`` (the last model's loss).
        best_model: A plain ``nn.Module`` with the best member's weights (or the kept incumbent's).
        schedule: The exported :class:`PhaseSchedule` the best model's lineage trained with.
        unread_data: The ``[data]`` fields the task does not read, which ``config.toml`` leaves
            out where they hold their default.
    """

    config: RunConfig
    total_steps: int
    history: list[dict]
    metrics: list[dict]
    final: dict
    best_model: nn.Module
    schedule: PhaseSchedule
    unread_data: tuple[str, ...] = ()

    @property
    def rounds(self) -> list[dict]:
        """The clan round records only."""
        return [r for r in self.history if r["kind"] == "round"]

    def rounds_table(self, max_rows: int | None = None) -> str:
        """A text table: one row per round or cooperative stretch (the last ``max_rows`` if given).

        Raises:
            ValueError: for ``max_rows`` that is not a positive int.
        """
        if max_rows is not None:
            positive_int(max_rows, "rounds_table: max_rows")
        head = f"{'phase':<12} {'round':>5} {'steps':>11} {'t_end':>6} {'winner':>6} {'best val':>9} " \
               f"{'lr':>9} {'wd':>9} {'beta1':>6} {'beta2':>7}"
        rows = [head, "-" * len(head)]
        records = self.history if max_rows is None else self.history[-max_rows:]
        if max_rows is not None and len(self.history) > max_rows:
            rows.append(f"... {len(self.history) - max_rows} earlier rows not shown")
        for r in records:
            if r["kind"] == "round":
                finite = [v for v in r["val_losses"] if math.isfinite(v)]
                winner = "div" if r["winner"] is None else str(r["winner"])  # every member diverged
                hyper, rnd, best = r["incumbent"], str(r["round"]), min(finite) if finite else math.nan
            else:
                hyper, rnd, winner, best = r["hyper"], "-", "-", r["val_loss"]
            steps = f"{r['start_step']}-{r['end_step']}"
            rows.append(f"{r['phase'][:12]:<12} {rnd:>5} {steps:>11} {r['end_step'] / self.total_steps:>6.3f} "
                        f"{winner:>6} {best:>9.4f} {hyper['lr']:>9.2e} {hyper['weight_decay']:>9.2e} "
                        f"{hyper['betas/0']:>6.3f} {hyper['betas/1']:>7.4f}")
        final = self.final
        test = f"  test loss {final['test_loss']:.4f}  test accuracy {final['test_accuracy']:.3f}" \
            if "test_loss" in final else ""
        rows.append(f"final: val loss {final['val_loss']:.4f}  val accuracy {final['val_accuracy']:.3f}{test}  "
                    f"({final['seconds']:.1f}s, {final['member_steps']} member-steps)")
        if final.get("diverged_members"):
            rows.append(f"diverged, not finite at the end: members {final['diverged_members']}")
        if "seconds_in" in final:
            rows.append("time: " + ", ".join(f"{final['seconds_in'][part]:.1f}s {part}" for part in TIME_PARTS
                                             if final["seconds_in"].get(part, 0) >= 0.05))
        return "\n".join(rows)

    def save(self, out_dir: str | os.PathLike, *, plots: bool = True) -> dict[str, Path]:
        """Write the run directory.

        Files: ``metrics.jsonl``, ``history.json``, ``schedule.json`` (the exported schedule with
        the config and the clan's final metrics, for ``vmapclan replay``), ``config.toml``,
        ``best_model.pt`` (the best model's ``state_dict``), and with ``plots`` the PNG plots
        ``genes.png``, ``val_losses.png`` and ``train_loss.png`` (needs matplotlib).

        Args:
            out_dir: The run directory (created if missing).
            plots: Whether to draw the plots.

        Returns:
            ``{name: path}`` of the files written.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = {}
        files["metrics"] = out / "metrics.jsonl"
        with open(files["metrics"], "w") as f:
            for record in self.metrics:
                f.write(json.dumps(record) + "\n")
        files["history"] = out / "history.json"
        files["history"].write_text(json.dumps(self.history, indent=1))
        files["schedule"] = out / "schedule.json"
        write_schedule(files["schedule"], self.schedule, self.config, self.total_steps,
                       clan={key: self.final[key] for key in ("val_loss", "val_accuracy", "test_loss", "test_accuracy",
                                                    "kept_step")
                             if key in self.final})
        files["config"] = out / "config.toml"
        world = f"# world_size = {self.final['world_size']}  (processes that trained this run)\n" \
            if "world_size" in self.final else ""
        files["config"].write_text(world + self.config.replace(total_steps=self.total_steps).to_toml(self.unread_data))
        files["best_model"] = out / "best_model.pt"
        buffer = io.BytesIO()
        torch.save(self.best_model.state_dict(), buffer)  # in memory: a full disk fails below with ENOSPC, not in torch
        files["best_model"].write_bytes(buffer.getbuffer())
        if plots:
            from .plots import save_plots

            files.update(save_plots(self, out))
        return files


