"""Callbacks: user code called by the Trainer at each step and each epoch, as Keras and Horovod
callbacks are; ``CosineDecay``, ``LearningRateScheduler``, ``EarlyStopping``, ``CSVLogger`` and
``TensorBoard`` ship here.

Every rank calls every callback with the same ``logs`` (metrics already reduced over the
ranks), so a decision taken from them, like early stopping, is the same everywhere. Callbacks
that write files do it on rank 0 only (``self.is_chief``).

Stopping: a callback sets ``self.trainer.stop_training = True``. From ``on_epoch_end`` every rank
stops after that epoch (the request is agreed over the ranks first); from ``on_step_end`` the
request travels in the next step's gradient sum and every rank stops after that step.
"""
import csv
import io
import math
from pathlib import Path

from .files import atomic_path


class Callback:
    """Base class: override the hooks you need. ``self.trainer`` is the Trainer."""

    trainer = None

    def set_trainer(self, trainer):
        self.trainer = trainer

    @property
    def is_chief(self):
        """True on the rank that writes files (rank 0)."""
        return self.trainer is None or self.trainer.world.rank == 0

    def on_train_begin(self, logs):
        """Before the first step."""

    def on_epoch_begin(self, epoch, logs):
        """Before the first step of ``epoch`` (0-based)."""

    def on_step_begin(self, step, logs):
        """Before global step ``step`` (0-based): e.g. set the learning rate. (The step hooks
        are called only on callbacks that override them: the others cost nothing a step.)"""

    def on_step_end(self, step, logs):
        """After ``step`` steps; logs: loss, accuracy (this step's, over all ranks), samples, learning_rate."""

    def on_epoch_end(self, epoch, logs):
        """After ``epoch`` (0-based); logs: the epoch's record (train and val loss and accuracy, ...)."""

    def on_train_end(self, logs):
        """After the test evaluation; logs: the run's metrics."""


class LearningRateScheduler(Callback):
    """Sets the learning rate before every step to ``schedule(step)``, a function of the global
    step only (so a resumed run continues the same curve)."""

    def __init__(self, schedule):
        self.schedule = schedule

    def on_step_begin(self, step, logs):
        self.trainer.optimizer.learning_rate = self.schedule(step)


class CosineDecay(LearningRateScheduler):
    """lr * (1 + cos(pi * step / total)) / 2: from ``lr`` to 0 over the run's ``epochs`` (a
    ``max_steps`` cut does not stretch it), or over ``total_steps`` when given."""

    def __init__(self, lr, total_steps=None):
        super().__init__(self._rate)
        self.lr, self.total_steps = lr, total_steps

    def on_train_begin(self, logs):
        if self.total_steps is None:
            self.total_steps = self.trainer.epochs * self.trainer.steps_per_epoch

    def _rate(self, step):
        total = max(self.total_steps, 1)
        return self.lr * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


class EarlyStopping(Callback):
    """Stops training when ``monitor`` (an epoch log, e.g. val_loss) has not improved by more
    than ``min_delta`` for ``patience`` epochs. ``mode``: "min" or "max"."""

    def __init__(self, monitor="val_loss", patience=3, min_delta=0.0, mode="min"):
        self.monitor, self.patience, self.min_delta, self.mode = monitor, patience, min_delta, mode
        self.best, self.wait, self.stopped_epoch = None, 0, None

    def on_epoch_end(self, epoch, logs):
        value = logs.get(self.monitor)
        if value is None:
            raise KeyError(f"EarlyStopping: no {self.monitor!r} in the epoch's logs (have {sorted(logs)})")
        better = (self.best is None or (value < self.best - self.min_delta if self.mode == "min"
                                        else value > self.best + self.min_delta))
        if better:
            self.best, self.wait = value, 0
        else:
            self.wait += 1
            if self.wait >= self.patience:
                self.stopped_epoch = epoch
                self.trainer.stop_training = True


class CSVLogger(Callback):
    """One CSV row per epoch (the epoch's logs), rewritten atomically by rank 0 each epoch, so the
    file is always whole; a resumed run keeps the rows of the epochs before it."""

    def __init__(self, path):
        self.path = Path(path)

    def on_epoch_end(self, epoch, logs):
        if not self.is_chief:
            return
        rows = list(self.trainer.history)
        keys = list(dict.fromkeys(k for row in rows for k in row))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=keys, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        with atomic_path(self.path) as tmp:
            tmp.write_text(text.getvalue())


class TensorBoard(Callback):
    """Scalars for TensorBoard, written by rank 0 through tensorboardX (an optional extra:
    ``pip install 'paranet[tensorboard]'``): per step the loss and learning rate every
    ``every`` steps, per epoch every number in the epoch's logs, at the end the test results."""

    def __init__(self, logdir, every=10):
        self.logdir, self.every = Path(logdir), int(every)
        self.writer = None

    def on_train_begin(self, logs):
        if self.is_chief:
            try:
                from tensorboardX import SummaryWriter
            except ImportError as e:
                raise ImportError("TensorBoard needs tensorboardX: pip install tensorboardX "
                                  "(or pip install 'paranet[tensorboard]')") from e
            self.writer = SummaryWriter(str(self.logdir))

    def on_step_end(self, step, logs):
        if self.writer is not None and step % self.every == 0:
            self.writer.add_scalar("step/loss", logs["loss"], step)
            self.writer.add_scalar("step/learning_rate", logs["learning_rate"], step)

    def on_epoch_end(self, epoch, logs):
        if self.writer is not None:
            for key, value in logs.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"epoch/{key}", value, epoch + 1)
            self.writer.flush()

    def on_train_end(self, logs):
        if self.writer is not None:
            for key in ("test_loss", "test_accuracy"):
                if logs.get(key) is not None:
                    self.writer.add_scalar(f"test/{key[5:]}", logs[key], logs["steps"])
            self.writer.close()
            self.writer = None


__all__ = ["Callback", "CosineDecay", "CSVLogger", "EarlyStopping", "LearningRateScheduler", "TensorBoard"]
