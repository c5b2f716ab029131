"""A run's progress bar: steps, the phase and round, the last round's best validation loss, the training loss and the lr in force.

:class:`ProgressBar` is a :class:`~vmapclan.TrainingMachine` callback (``TrainingMachine(...,
progress=True)`` installs one; so does ``vmapclan train``). It reads only what the records
already carry, so it adds no host sync to a step: the training loss and the lr in force come
with the ``train`` records of every ``log_every`` steps, the validation loss with each round's
and stretch's record. It needs ``tqdm`` (in a notebook, its widget form); without it there is no
bar and the run is the same.
"""

from __future__ import annotations

import contextlib
import math

__all__ = ["ProgressBar", "showing_progress"]


class ProgressBar:
    """A tqdm bar fed by a training machine's events.

    Args:
        total: The run's steps.
        desc: The bar's label (the task's name).
        start: Steps already done (a resumed run).

    Example:
        >>> bar = ProgressBar(100, "digits")  # doctest: +SKIP
        >>> TrainingMachine(config, callback=bar).train(); bar.close()  # doctest: +SKIP
    """

    def __init__(self, total: int, desc: str = "", start: int = 0):
        try:
            from tqdm.auto import tqdm
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True)
        self.phase, self.round, self.val, self.loss, self.lr = "", 0, math.nan, math.nan, math.nan
        self._shown = None

    def __call__(self, event: dict) -> None:
        """Take one machine event: ``step`` moves the bar, ``train``, ``round`` and ``cooperative`` update its figures."""
        if self.bar is None:
            return
        kind = event["event"]
        if kind == "step":
            self.phase, self.round = event["phase"], event["round"]
            self.bar.update(event["step"] - self.bar.n)
        elif kind == "train":
            self.loss, self.lr = event["loss"], event.get("lr", math.nan)
        elif kind == "round":
            finite = [v for v in event["val_losses"] if math.isfinite(v)]
            self.val = min(finite) if finite else math.nan
        elif kind == "cooperative":
            self.val = event["val_loss"]
        else:
            return
        shown = (self.phase, self.round, self.val, self.loss, self.lr)
        if shown != self._shown:  # the postfix only when it changes: cheap per step
            self._shown = shown
            self.bar.set_postfix_str(f"phase={self.phase} round={self.round} val={_num(self.val)} "
                                     f"loss={_num(self.loss)} lr={_num(self.lr, '.2e')}")

    def close(self) -> None:
        """Close the bar (the line stays)."""
        if self.bar is not None:
            self.bar.close()


def _num(value: float, spec: str = ".4f") -> str:
    return "-" if not math.isfinite(value) else format(value, spec)


@contextlib.contextmanager
def showing_progress(log, total_steps: int, name: str, *, start: int = 0):
    """For the block's length, a :class:`ProgressBar` fed by the events of ``log`` (a run's
    :class:`~vmapclan.record.RunLog`) next to its callback; closed, and the callback put back, at the end."""
    bar, callback = ProgressBar(total_steps, name, start=start), log.callback

    def both(event):
        bar(event)
        if callback is not None:
            callback(event)

    log.callback = both
    try:
        yield
    finally:
        log.callback = callback
        bar.close()
