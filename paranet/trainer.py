"""The training loop as a library: ``Trainer`` (and ``fit``) train a user's model on an HDF5 dataset,
data-parallel over the ranks of a World; ``python -m paranet.train`` is one of its users.

One step (``Trainer.step``): read this rank's shard of the global batch, forward and backward,
one weighted sum of the gradients over the ranks, the same update on every rank. Around it the
loop adds what a run needs: evaluation on the validation and test splits (each rank its shard,
the sums reduced), checkpoints and ``--resume``, SIGTERM (every rank stops after the same step),
the metrics JSON, the timeline, a progress bar and rank-0 logging, and callbacks
(``paranet.callbacks``) at each step and epoch.
"""
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

from . import checkpoint
from .data import BatchReader, DataError
from .files import OutputError, atomic_path, check_output, cleanup_stale
from .graph import Session
from .models import Model, ModelError, as_model
from .timeline import NoTimeline, Timeline, write_trace
from . import _early_sigterm, _record_sigterm  # a SIGTERM seen before a Trainer ran (paranet/__init__.py)


# Flags a resumed run must share with the checkpoint's run (when both record them): they fix what
# the recorded step means, the data order, the learning-rate curve, the model and its update.
RESUME_FIXED = ("model", "hidden", "channels", "batch_size", "seed", "dtype", "optimizer", "lr", "momentum",
                "schedule", "epochs", "reproducible")  # the sum too: ordered and exact give other bits
# The step's stop slot, summed over the ranks in the gradient buffer (float32 is exact below
# 2**24): each rank adds 1 for SIGTERM, CALLBACK_STOP when its callbacks asked to stop, and rank 0
# CHECKPOINT_NOW when a timed checkpoint is due. With P < 2048 ranks the three never mix:
# SIGTERMs < 4096, callback stops < 2048 * 4096 = 2**23, below which the 0.5 stays exact.
CALLBACK_STOP = 1 << 12
CHECKPOINT_NOW = 0.5


# The signals that stop training cleanly: the ranks finish the step, save the checkpoint, exit 0.
# SIGTERM is what schedulers send; SIGUSR1 is the one both MPICH's and Open MPI's mpiexec pass on
# to the ranks and let the job go on (Open MPI's mpiexec ends the job on SIGTERM: its ranks'
# clean stop is cut off, exit status 1).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def catch_sigterm():
    """Record a stop signal (STOP_SIGNALS) instead of dying from it, for the start-up before
    ``Trainer.fit`` (MPI, building the data and the model): ``fit`` then stops cleanly before
    the first step. The trainer's command line has it from its first line (paranet/__init__.py);
    ``cli.main`` calls this for a caller that runs it in-process."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _record_sigterm)


class Stop(Exception):
    """Training ends the same way on every rank (the condition was reduced across ranks);
    ``code`` is the exit status a command line should return (0, 1 or 2)."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


def open_readers(path, world, *, batch_size, eval_batch_size=1000, seed=0, dtype=np.float32, prefetch=False):
    """This rank's readers of a paranet HDF5 file: (train, val, test), val and test None where
    the file has no such split. Rank 0 opens its own first, so bad data is one line from it
    (Stop, exit 2) while the others wait, then the others open theirs."""
    path = Path(path)

    def open_all(splits):
        common = dict(rank=world.rank, size=world.size, dtype=dtype)
        eval_bs = max(eval_batch_size, world.size)
        train = BatchReader(path, "train", batch_size=batch_size, seed=seed, prefetch=prefetch, **common)
        return (train, *(BatchReader(path, s, batch_size=eval_bs, shuffle=False, prefetch=False, **common)
                         if s in splits else None for s in ("val", "test")))

    readers = splits = error = None
    if world.rank == 0:
        try:
            splits = _optional_splits(path)
            readers = open_all(splits)
        except DataError as e:
            error = str(e)
    splits, error = world.bcast_object((splits, error))
    if error:
        raise Stop(f"paranet: error: {error}", 2)
    return readers if world.rank == 0 else open_all(splits)


def _optional_splits(path):
    """Which of val and test the file holds (present but empty: the reader names it)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return {s for s in ("val", "test") if s in f}
    except (OSError, ValueError):
        return set()  # the train reader names what is wrong


class Trainer:
    """Trains ``model`` on ``data`` with ``optimizer``, data-parallel over ``world``.

    Args:
        model: a ``paranet.Model`` (input and label placeholders, output, loss).
        data: an HDF5 file in paranet's format (``python -m paranet.data``), or a
            ``BatchReader`` of the training split made for this rank (then ``val_data`` and
            ``test_data`` are readers too, or None).
        optimizer: any paranet optimizer; it is wrapped in a ``DistributedOptimizer``.
        world: the World (default: the one ``paranet.distributed.init()`` made).
        batch_size: the global batch, split over the ranks.
        epochs: passes over the training split; ``max_steps`` stops earlier.
        seed: the data order (with the epoch); the model's initial weights are the builder's.
        dtype: the training dtype (the Session's).
        eval_batch_size: the global batch of evaluation.
        checkpoint: an HDF5 checkpoint written every epoch and at the end (None: none).
        resume: continue from ``checkpoint`` when it exists.
        metrics: a JSON file of results written by rank 0 at the end.
        save_params: an .npz of the final parameters written by rank 0.
        timeline: a Chrome/Perfetto trace of the first ``timeline_steps`` steps.
        check_replicas: every N steps compare a parameter digest across ranks (0: off).
        callbacks: ``paranet.callbacks.Callback`` objects, called on every rank in order.
        progress: rank 0's tqdm bar (default: when stdout is a terminal).
        verbose: rank 0 prints the header and a line per epoch.
        prefetch: read the next batch in a background thread.
        flags: a dict recorded in checkpoints and metrics (the command line's).
        reproducible: passed to the DistributedOptimizer (bit-identical results at any P):
            True or "ordered", or "exact".
        checkpoint_every: also write the checkpoint every this many steps.
        checkpoint_minutes: also write it when this many minutes passed since the last one
            (rank 0's clock decides; the request travels in the next step's gradient sum).
        keep: keep the last ``keep`` checkpoints (``checkpoint``, ``checkpoint.1``, ...).
        stall_timeout: seconds ranks may wait for each other in a gradient sum or barrier
            before the job is aborted naming the ranks that did not arrive (exit status 3);
            None or 0: wait forever.

    A run holds a lock on its checkpoint (``paranet.checkpoint.RunLock``): a second run on the
    same checkpoint is refused. Every output is checked to be writable before training starts.
    """

    def __init__(self, model, data, optimizer, *, world=None, batch_size=128, epochs=1, seed=0,
                 dtype=np.float32, eval_batch_size=1000, max_steps=None, checkpoint=None, resume=False,
                 metrics=None, save_params=None, timeline=None, timeline_steps=200, check_replicas=0,
                 callbacks=(), progress=None, verbose=True, prefetch=False, flags=None, plot=None,
                 reproducible=False, val_data=None, test_data=None, checkpoint_every=None,
                 checkpoint_minutes=None, keep=1, stall_timeout=600.0, data_in_memory="auto",
                 memory_budget=None):
        from .distributed import DistributedOptimizer, default_world

        self.world = world if world is not None else default_world()
        w = self.world
        self.model = as_model(model)
        self.data, self.val_data, self.test_data = data, val_data, test_data
        self.batch_size, self.epochs, self.seed = int(batch_size), int(epochs), int(seed)
        self.eval_batch_size, self.max_steps = int(eval_batch_size), max_steps
        if data_in_memory not in ("auto", "on", "off"):
            raise ValueError(f"data_in_memory: expected auto, on or off, got {data_in_memory!r}")
        self.data_in_memory, self.memory_budget = data_in_memory, memory_budget
        self.staged_bytes = 0  # the data held in memory on each machine (0: read from HDF5 each step)
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.resume_requested = bool(resume)
        self.metrics_path = None if metrics is None else Path(metrics)
        self.save_params_path = None if save_params is None else Path(save_params)
        self.plot_path = None if plot is None else Path(plot)
        self.timeline_path, self.timeline_steps = timeline, int(timeline_steps)
        self.check_replicas = int(check_replicas)
        self.checkpoint_every = None if not checkpoint_every else int(checkpoint_every)
        self.checkpoint_seconds = None if not checkpoint_minutes else 60.0 * float(checkpoint_minutes)
        self.keep = int(keep)
        self.stall_timeout = float(stall_timeout) if stall_timeout else None
        self.callbacks = list(callbacks)
        self.verbose = bool(verbose)
        self.progress = (w.rank == 0 and sys.stdout.isatty()) if progress is None else (bool(progress) and w.rank == 0)
        self.prefetch = bool(prefetch)
        self.flags = dict(flags or {})
        self.dtype = np.dtype(dtype)
        self.log = print if (w.rank == 0 and self.verbose) else (lambda *a, **k: None)

        self.session = Session(self.dtype, check_finite=True)
        self.params = self.session.parameters(self.model.loss)
        if isinstance(optimizer, DistributedOptimizer):
            self.optimizer = optimizer
        else:
            self.optimizer = DistributedOptimizer(optimizer, w, reproducible=reproducible)
        self.optimizer.broadcast_state(self.params)  # every replica starts from rank 0's weights
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.history = []
        self.epoch_sums = [0.0, 0.0, 0.0]  # the current epoch's loss sum, correct, count so far (checkpointed)
        self.stop_training = False  # set by a callback: every rank stops (see Callback)
        self.stop_requested = False  # SIGTERM or SIGUSR1: checkpoint and stop after the current step
        self.stop_signal = "SIGTERM"  # its name, for the last line (SIGTERM when only another rank saw one)
        self._stop_after_step = False  # a callback's request, travelling in the next step's sum
        self.fault = _parse_fault(os.environ.get("PARANET_FAULT"), w.rank)
        self.recording = Timeline(w.rank) if timeline else None
        self.timeline = self.optimizer.timeline = self.recording or NoTimeline()
        self.train_reader = self.val_reader = self.test_reader = None
        self._checkpoint_request = False  # rank 0: --checkpoint-every minutes is due
        self._piece_sum = None  # the step's gradient sum over pieces of the shard (_forward_backward)
        self._last_save = time.monotonic()
        self._lock = None
        self._watchdog = None
        for cb in self.callbacks:
            cb.set_trainer(self)
        if self.fault and self.fault["step"] < 0:  # test hook: a fault during start-up
            _inject(self.fault, self.params)

    # -- data --------------------------------------------------------------------------

    def open_data(self):
        """This rank's readers (``open_readers`` for a file, the caller's own otherwise), cut
        into micro-shards under ``reproducible`` and staged in memory under ``data_in_memory``."""
        if isinstance(self.data, BatchReader):
            self.train_reader, self.val_reader, self.test_reader = self.data, self.val_data, self.test_data
        else:
            self.train_reader, self.val_reader, self.test_reader = open_readers(
                self.data, self.world, batch_size=self.batch_size, eval_batch_size=self.eval_batch_size,
                seed=self.seed, dtype=self.dtype, prefetch=self.prefetch)
        r = self.train_reader  # the model must take these samples and labels (as the CLI checks)
        if hasattr(r, "sample_shape") and hasattr(r, "num_classes"):
            try:
                self.model.check_data(r.sample_shape, r.num_classes)
            except ModelError as e:
                where = f" ({r.path})" if getattr(r, "path", None) else ""
                raise ModelError(f"{e}{where}") from None
        self._micro_shard_readers()
        self._stage_data()
        # uint8 images scaled by finite constants are finite by construction, and the reader
        # checks float features: skip the per-feed NaN/inf pass (a diverging loss is caught
        # after the gradient sum)
        self.session.check_finite = False

    def _stage_data(self):
        """``data_in_memory``: hold every split in memory shared by the ranks of each machine,
        normalised in the training dtype, so that a step's read is a view. "auto" does it when
        the copy fits the budget on every machine: ``memory_budget`` bytes, by default a quarter
        of the memory available and at most 80% of the free shared memory (/dev/shm)."""
        w = self.world
        readers = [r for r in (self.train_reader, self.val_reader, self.test_reader) if r is not None]
        if self.data_in_memory == "off" or not all(hasattr(r, "stage") for r in readers):
            return
        need = sum(r.staged_bytes() for r in readers)
        budget = self.memory_budget if self.memory_budget is not None else _memory_available() // 4
        if self.data_in_memory == "on":
            budget = float("inf")
        shm = w.shared_memory_free() if w.distributed else None
        fits = need <= budget and (shm is None or need <= 0.8 * shm)
        fits_everywhere = w.allreduce(int(fits)) == w.size  # every machine agrees, or none stages
        if not fits_everywhere:
            if self.data_in_memory == "on":
                raise Stop(f"paranet: error: --data-in-memory on: the data takes {need / 1e6:,.0f} MB, more than "
                           f"the shared memory free on some machine (/dev/shm); use auto or off", 2)
            return
        for r in readers:
            r.stage(w.shared_array)
        self.staged_bytes = need

    def _micro_shard_readers(self):
        """reproducible: every reader hands this rank whole micro-shards (paranet.reproducible)."""
        if self.optimizer.reproducible:
            for reader in (self.train_reader, self.val_reader, self.test_reader):
                if reader is not None:
                    reader.micro_shards = True

    @property
    def steps_per_epoch(self):
        return self.train_reader.steps_per_epoch

    # -- one step ----------------------------------------------------------------------

    def step(self, batch):
        """Forward, backward and the averaged update on this rank's shard; returns StepSums
        (global count, loss sum, correct count, stop) of the step."""
        m, params, tl = self.model, self.params, self.timeline
        if self.optimizer.reproducible:
            return self._reproducible_step(batch)
        if batch.n_local:
            loss_sum, correct = self._forward_backward(self.session.plan(m.loss), batch.x, batch.y)
        else:  # a short last batch left this rank without samples: it joins with weight zero
            loss_sum, correct = 0.0, 0
        if self.fault and self.fault["at"] == "step" and self.fault["step"] == self.global_step:
            _inject(self.fault, params)
        stop = self._stop_slot()  # summed over the ranks with the gradients
        return self.optimizer.reduce_and_apply(params, batch.n_local, loss_sum, correct, stop, total=batch.n_global)

    def _forward_backward(self, plan, x, y):
        """Forward and backward on this rank's rows, the gradient of their mean loss left in the
        parameters' ``grad``; returns (loss sum, correct count). A plan with ``chunk_rows``
        (one with a Conv2D) runs more rows than that in nearly equal pieces, whose gradients are
        added weighted by their rows: the same gradient, its temporaries kept in cache."""
        m, tl, n = self.model, self.timeline, len(y)
        bounds = piece_bounds(n, plan.chunk_rows)
        if len(bounds) == 2:
            with tl.span("forward"):
                self.session.forward(plan, {m.x: m.input(x), m.y: y})
            with tl.span("backward"):
                self.session.backward(plan)
            return float(m.loss.value) * n, _correct(m.output.value, y)
        grads = self.params.grads
        if self._piece_sum is None or self._piece_sum.shape != grads.shape:
            self._piece_sum = np.empty_like(grads)
        total, loss_sum, correct = self._piece_sum, 0.0, 0
        for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
            with tl.span("forward"):
                self.session.forward(plan, {m.x: m.input(x[a:b]), m.y: y[a:b]})
            with tl.span("backward"):
                self.session.backward(plan)
            loss_sum += float(m.loss.value) * (b - a)
            correct += _correct(m.output.value, y[a:b])
            if i == 0:
                np.multiply(grads, b - a, out=total)
            else:
                grads *= b - a
                total += grads
        np.divide(total, n, out=grads)
        return loss_sum, correct

    def _reproducible_step(self, batch):
        """step() with reproducible: forward and backward per micro-shard inside the optimizer,
        the gradients summed in a way the rank count does not change (paranet.reproducible)."""
        from .reproducible import ExactSumError

        m, y = self.model, batch.y
        if self.fault and self.fault["at"] == "step" and self.fault["step"] == self.global_step:
            _inject(self.fault, self.params)
        stop = self._stop_slot()  # as step() sends it
        try:
            with self.timeline.span("forward"):  # forward, backward and the sum, micro-shard by micro-shard
                return self.optimizer.reproducible_step(
                    self.session, self.session.plan(m.loss), {m.x: m.input(batch.x), m.y: y}, batch.n_global,
                    metric=lambda rows: _correct(m.output.value, y[rows]), stop=stop)
        except ExactSumError as e:
            raise Stop(f"paranet: {e}", 1) from None

    def batches(self):
        """This epoch's batches from the current step on, their reading timed on the timeline."""
        it = iter(self.train_reader.epoch(self.epoch, self.step_in_epoch))
        while True:
            with self.timeline.span("read"):
                batch = next(it, None)
            if batch is None:
                return
            yield batch

    def evaluate(self, reader):
        """(mean loss, accuracy) over a whole split, each rank evaluating its shard."""
        m = self.model
        if self.optimizer.reproducible:  # per micro-shard, the loss sums added with math.fsum (paranet.reproducible)
            count, loss_sum, correct = self.optimizer.micro_steps().evaluate(
                self.session, m.loss, reader.epoch(0), lambda b, rows: {m.x: m.input(b.x[rows]), m.y: b.y[rows]},
                metric=lambda b, rows: _correct(m.output.value, b.y[rows]), allreduce=self.world.allreduce)
            return float(loss_sum / count), float(correct / count)
        sums = np.zeros(3)  # loss sum, correct, count
        rows = self.session.plan(m.loss).chunk_rows
        for batch in reader.epoch(0):
            bounds = piece_bounds(batch.n_local, rows)  # in pieces, as the step (a Conv2D)
            for a, b in zip(bounds, bounds[1:]):
                x, y = batch.x[a:b], batch.y[a:b]  # views
                loss = self.session.run(m.loss, {m.x: m.input(x), m.y: y})
                sums += (loss * (b - a), _correct(m.output.value, y), b - a)
        self.world.allreduce_sum(sums)
        return float(sums[0] / sums[2]), float(sums[1] / sums[2])  # plain floats in the metrics, not np.float64

    # -- checkpoints -------------------------------------------------------------------

    def save_checkpoint(self):
        """Rank 0 writes the checkpoint (with the data's identity and the epoch's partial sums);
        every rank learns whether it worked. A failed write is one line, the old file intact."""
        if self.checkpoint is None:
            return
        self._watchdog_context(f"checkpoint after step {self.global_step}")
        if self.fault and self.fault["at"] == "checkpoint" and self.fault["step"] == self.global_step:
            _inject(self.fault, self.params)
        self.verify_data()
        error = None
        if self.world.rank == 0:
            identity = getattr(self.train_reader, "identity", None)
            try:
                checkpoint.save(
                    self.checkpoint, self.params, self.optimizer, epoch=self.epoch, step_in_epoch=self.step_in_epoch,
                    global_step=self.global_step, world_size=self.world.size, seed=self.seed, flags=self.flags,
                    history=self.history, keep=self.keep, epoch_sums=list(self.epoch_sums),
                    data=identity() if identity is not None else None,
                )
            except OutputError as e:
                error = str(e)
            self._last_save = time.monotonic()
        error = self.world.bcast_object(error)  # also the barrier: nobody runs ahead of the write
        if error:
            raise Stop(f"paranet: error: {error}", 1)

    def verify_data(self):
        """Stop every rank, before anything is written, when the data file was replaced,
        truncated or rewritten since it was opened (each rank checks its own readers; the first
        error any rank found is everybody's). Reads check it too, after every read."""
        error = None
        try:
            for reader in (self.train_reader, self.val_reader, self.test_reader):
                if reader is not None and hasattr(reader, "verify_unchanged"):
                    reader.verify_unchanged()
        except DataError as e:
            error = str(e)
        errors = self.world.gather_object(error)
        first = self.world.bcast_object(next((e for e in errors if e), None) if self.world.rank == 0 else None)
        if first:
            raise Stop(f"paranet: error: {first}; stopped before writing anything from it", 2)

    def resume(self):
        """Load the checkpoint on every rank (it lives on shared storage); rank 0's verdict on
        it is everybody's, so a bad one is one line (exit 2)."""
        path = self.checkpoint
        if path is None or not path.exists():
            self.log(f"paranet: --resume: no checkpoint at {path} yet, starting fresh")
            return
        error = attrs = None
        try:
            attrs = checkpoint.load(path, self.params, self.optimizer)
            self._check_resumable(path, attrs)
        except checkpoint.CheckpointError as e:
            error = str(e)
        first = self.world.bcast_object(error)
        if first:
            raise Stop(f"paranet: error: {first}", 2)
        if error:  # rank 0 could read it, this rank could not: storage not shared?
            raise checkpoint.CheckpointError(error)
        self.epoch, self.step_in_epoch, self.global_step = attrs["epoch"], attrs["step_in_epoch"], attrs["global_step"]
        self.history = attrs["history"]
        sums = attrs.get("epoch_sums")
        if isinstance(sums, list) and len(sums) == 3 and self.step_in_epoch > 0:
            self.epoch_sums = [float(v) for v in sums]
        self.log(f"paranet: resumed from {path} at epoch {self.epoch + 1}, step {self.global_step} "
                 f"(written by {attrs['world_size']} rank{'s' if attrs['world_size'] != 1 else ''})")

    def _check_resumable(self, path, attrs):
        """Refuse a checkpoint written for other data or with flags that change what its step means."""
        saved = attrs["flags"]
        for flag in RESUME_FIXED:
            if flag in self.flags and flag in saved and saved[flag] != self.flags[flag]:
                shown = lambda v: "off" if v is None else v  # noqa: E731  (--reproducible not given)
                raise checkpoint.CheckpointError(
                    f"{path}: written with --{flag.replace('_', '-')} {shown(saved[flag])}, this run has "
                    f"{shown(self.flags[flag])} (it may not change on --resume)")
        recorded, identity = attrs.get("data"), getattr(self.train_reader, "identity", None)
        if recorded and identity is not None:
            from .data.reader import identity_mismatch

            current = identity()
            why = identity_mismatch(recorded, current)
            if why:
                raise checkpoint.CheckpointError(
                    f"{path}: written for the data {recorded.get('path')}, this run has {current.get('path')}, "
                    f"which differs ({why}); resume with the same data, or start a new checkpoint")

    def check_outputs(self):
        """Rank 0 checks before any work that every output file can be written (not a folder,
        its folder writable, room for a checkpoint); otherwise one line and Stop (exit 2)."""
        error = None
        if self.world.rank == 0:
            outputs = [("--checkpoint", self.checkpoint, 3 * self.params.values.nbytes),
                       ("--metrics", self.metrics_path, 0), ("--save-params", self.save_params_path, 0),
                       ("--timeline", self.timeline_path, 0), ("--plot", self.plot_path, 0)]
            try:
                for flag, path, need in outputs:
                    if path is not None:
                        check_output(path, flag, need_bytes=need)
            except OutputError as e:
                error = str(e)
        error = self.world.bcast_object(error)
        if error:
            raise Stop(f"paranet: error: {error}", 2)

    def _take_lock(self):
        """Rank 0 holds the checkpoint's RunLock for the run and removes the temporary files an
        earlier run killed mid-write left; a second run on the same checkpoint stops here."""
        if self.checkpoint is None:
            return
        error = None
        if self.world.rank == 0:
            try:
                self._lock = checkpoint.RunLock(self.checkpoint).acquire()
            except (checkpoint.RunLockError, OSError) as e:
                error = f"--checkpoint {e}" if isinstance(e, checkpoint.RunLockError) else \
                    f"--checkpoint {self.checkpoint}: cannot lock it ({e})"
            else:
                for stale in cleanup_stale(self.checkpoint, started=time.time()):
                    self.log(f"paranet: removed {stale}, left by an interrupted checkpoint write")
        error = self.world.bcast_object(error)
        if error:
            raise Stop(f"paranet: error: {error}", 2)

    def _start_watchdog(self):
        """With several ranks and a stall timeout, abort the job when ranks wait longer than
        that for each other in a gradient sum or barrier (``paranet.watchdog``); collective."""
        if self.stall_timeout and self.world.distributed:
            from .watchdog import Watchdog

            self._watchdog = self.world.watchdog = Watchdog(self.world, self.stall_timeout)

    def _stop_watchdog(self, collective=True):
        if self._watchdog is not None:
            self.world.watchdog = None
            self._watchdog.close(free=collective)
            self._watchdog = None

    def _watchdog_context(self, where):
        if self._watchdog is not None:
            self._watchdog.step, self._watchdog.context = None, where

    def _release_lock(self):
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # -- the loop ----------------------------------------------------------------------

    def describe(self):
        """The header rank 0 prints: world, data, model, optimizer and how the batch is split."""
        w, r = self.world, self.train_reader
        opt = self.optimizer.optimizer
        blas = f"; {w.blas.describe()}" if getattr(w, "blas", None) is not None else ""
        counts = f"{r.num_samples:,} train"
        for name, reader in (("val", self.val_reader), ("test", self.test_reader)):
            counts += f", {reader.num_samples:,} {name}" if reader is not None else f", no {name}"
        shape = getattr(r, "sample_shape", None)
        data = f"{self.data if not isinstance(self.data, BatchReader) else r.path} ({counts}"
        data += f"; samples {_shape(shape)}, {r.num_classes} classes)" if shape is not None else ")"
        if self.staged_bytes:
            where = "shared by the ranks of each machine" if w.distributed else "of this process"
            data += f"\n         held in memory {where}: {_size(self.staged_bytes)}, normalised in {self.dtype.name}"
        else:
            data += "\n         read from HDF5 every step (one hyperslab a rank)"
        return (f"paranet: world size {w.size}, {w.library}; {w.describe_allreduce()}{blas}\n"
                f"  data   {data}\n"
                f"  model  {self.model.name}, {self.params.size:,} parameters, {self.dtype.name}\n"
                f"  train  {self.flags.get('optimizer') or type(opt).__name__} lr {opt.learning_rate:g}, global batch {self.batch_size} "
                f"({self._split_text()}), "
                f"{self.epochs} epoch{'s' if self.epochs != 1 else ''} of {r.steps_per_epoch} step{'s' if r.steps_per_epoch != 1 else ''}")

    def _split_text(self):
        """How a global batch is cut over the ranks, for the header."""
        w, b = self.world, self.batch_size
        if self.optimizer.reproducible:
            from .reproducible import micro_size, num_micro_shards

            m = micro_size(b)
            k = num_micro_shards(b, m)
            idle = f", {w.size - k} rank{'s' if w.size - k != 1 else ''} idle" if k < w.size else ""
            return (f"--reproducible {self.optimizer.reproducible_sum}: {k} micro-shard{'s' if k != 1 else ''} of {m} rows "
                    f"over {w.size} rank{'s' if w.size != 1 else ''}{idle}")
        return f"{b // w.size}{'+' if b % w.size else ''} per rank"

    def fit(self):
        """Train; returns the metrics dict (the same on every rank). Raises Stop when the run
        ends early for a reason every rank agrees on (SIGTERM, bad data, divergence)."""
        previous = {sig: signal.signal(sig, self._on_sigterm) for sig in STOP_SIGNALS}
        if _early_sigterm[0]:  # it came during start-up: stop before the first step
            self.stop_requested, self.stop_signal = True, _early_sigterm[0]
            _early_sigterm[0] = False
        try:
            self.check_outputs()
            self._take_lock()
            if self.train_reader is None:
                self.open_data()
            if self.resume_requested:
                self.resume()
            self._start_watchdog()
            self.log(self.describe(), flush=True)
            metrics = self._loop()
        except Stop:  # every rank stops here alike (a rank-0-only Stop comes after the last collective)
            self._stop_watchdog()
            raise
        except BaseException:  # this rank alone, maybe: no collective here (the abort hook ends the job)
            self._stop_watchdog(collective=False)
            raise
        else:
            self._stop_watchdog()
            return metrics
        finally:
            self._release_lock()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _loop(self):
        w = self.world
        steps_per_epoch = self.train_reader.steps_per_epoch
        t_start = time.perf_counter()
        samples_total, busy_total = 0, 0.0
        comm_start = self.optimizer.comm_seconds
        from .callbacks import Callback

        begin_hooks = [cb for cb in self.callbacks if type(cb).on_step_begin is not Callback.on_step_begin]
        end_hooks = [cb for cb in self.callbacks if type(cb).on_step_end is not Callback.on_step_end]
        self._call("on_train_begin", {})
        if w.allreduce(int(self.stop_requested)):  # SIGTERM during start-up, on any rank
            self.save_checkpoint()
            raise Stop(f"paranet: stopped by {self.stop_signal} before step {self.global_step + 1}"
                       + (f"; checkpoint saved to {self.checkpoint} (continue with --resume)" if self.checkpoint else ""), 0)
        if self.max_steps is not None and self.global_step >= self.max_steps:
            self.log(f"paranet: step {self.global_step} already reached --max-steps {self.max_steps}: no step to run")
        while self.epoch < self.epochs and not (self.max_steps is not None and self.global_step >= self.max_steps):
            if self.step_in_epoch >= steps_per_epoch:
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
                continue
            if self.history and self.history[-1].get("epoch") == self.epoch + 1:
                self.history.pop()  # a --max-steps cut recorded this epoch in part: it is recorded again whole
            self._call("on_epoch_begin", self.epoch, {})
            bar = self._bar(steps_per_epoch)
            sums, comm0, t0 = self.epoch_sums, self.optimizer.comm_seconds, time.perf_counter()
            resumed_count = sums[2]  # samples of this epoch counted before a resume
            ended_early = stopping = False
            for batch in self.batches():
                for cb in begin_hooks:
                    cb.on_step_begin(self.global_step, None)
                if self._watchdog is not None:
                    self._watchdog.step = self.global_step + 1  # named if the step's sum stalls
                count, loss_sum, correct, stop = self.step(batch)
                self.global_step += 1
                if self.recording is not None and self.global_step == self.timeline_steps:
                    self.timeline = self.optimizer.timeline = NoTimeline()
                self.step_in_epoch += 1
                if not math.isfinite(loss_sum):
                    raise Stop(f"paranet: non-finite training loss ({loss_sum / max(count, 1)}) at step "
                               f"{self.global_step} (epoch {self.epoch + 1}); lower --lr", 1)
                sums[0] += loss_sum
                sums[1] += correct
                sums[2] += count
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{sums[0] / sums[2]:.4f}", refresh=False)
                if self.check_replicas and self.global_step % self.check_replicas == 0:
                    self._check_replicas()
                if stop % CALLBACK_STOP >= 1:  # SIGTERM reached some rank
                    if self.step_in_epoch < steps_per_epoch:
                        self._close_bar(bar)
                        self.save_checkpoint()
                        raise Stop(self._sigterm_message(), 0)
                    stopping = True  # the epoch's last step: record the epoch first
                    break
                if stop >= CALLBACK_STOP:  # a callback's request, agreed through this step's sum
                    ended_early = True
                    break
                if self._checkpoint_due(stop, steps_per_epoch):
                    self.save_checkpoint()
                if end_hooks:
                    logs = {"loss": loss_sum / max(count, 1), "accuracy": correct / max(count, 1), "samples": count,
                            "learning_rate": self.optimizer.learning_rate}
                    for cb in end_hooks:
                        cb.on_step_end(self.global_step, logs)
                    self._stop_after_step = self.stop_training
                if self.max_steps is not None and self.global_step >= self.max_steps:
                    break
            self._close_bar(bar)
            seconds = time.perf_counter() - t0
            comm = self.optimizer.comm_seconds - comm0
            samples_total += sums[2] - resumed_count
            busy_total += seconds
            record = {
                "epoch": self.epoch + 1, "steps": self.global_step, "train_loss": sums[0] / max(sums[2], 1),
                "train_accuracy": sums[1] / max(sums[2], 1),
                "samples_per_second": (sums[2] - resumed_count) / seconds if seconds else 0.0, "comm_share": comm / seconds if seconds else 0.0,
            }
            if self.val_reader is not None:
                self._watchdog_context(f"validation after step {self.global_step}")
                record["val_loss"], record["val_accuracy"] = self.evaluate(self.val_reader)
            self.history.append(record)
            if self.step_in_epoch >= steps_per_epoch:
                self.epoch_sums = [0.0, 0.0, 0.0]
            val = (f"  val loss {record['val_loss']:.4f}  val acc {100 * record['val_accuracy']:6.2f}%"
                   if "val_loss" in record else "")
            comm = f"  comm {100 * record['comm_share']:4.1f}%" if self.world.size > 1 else ""  # one process: none
            part = f" ({self.step_in_epoch}/{steps_per_epoch} steps)" if self.step_in_epoch < steps_per_epoch else ""
            self.log(f"epoch {record['epoch']:>3}/{self.epochs}{part}  train loss {record['train_loss']:.4f}{val}  "
                     f"{record['samples_per_second']:>9,.0f} samples/s{comm}", flush=True)
            if self.step_in_epoch >= steps_per_epoch:
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
            self._call("on_epoch_end", record["epoch"] - 1, dict(record))
            # a callback's stop at the end of an epoch: agreed by every rank before acting on it
            self.stop_training = bool(w.allreduce(int(self.stop_training or ended_early)))
            done = self.max_steps is not None and self.global_step >= self.max_steps
            self.save_checkpoint()
            if stopping:
                raise Stop(self._sigterm_message(), 0)
            if done or self.stop_training:
                break
        if self.check_replicas:
            self._check_replicas()
        test_loss = test_acc = None
        if self.test_reader is not None:
            self._watchdog_context(f"test evaluation after step {self.global_step}")
            test_loss, test_acc = self.evaluate(self.test_reader)
        wall = time.perf_counter() - t_start
        if test_loss is not None:
            self.log(f"test loss {test_loss:.4f}  test accuracy {100 * test_acc:.2f}%  "
                     f"({self.global_step} steps, {wall:.1f} s)", flush=True)
        else:
            self.log(f"done: {self.global_step} steps, {wall:.1f} s", flush=True)
        if self.timeline_path:
            events = w.gather_object(self.recording.events)
            if w.rank == 0:
                write_trace(self.timeline_path, events, w.size)
        comm = self.optimizer.comm_seconds - comm_start
        metrics = {
            "completed": True, "test_accuracy": test_acc, "test_loss": test_loss, "history": self.history,
            "samples_per_second": samples_total / busy_total if busy_total else 0.0, "wall_seconds": wall,
            "comm_seconds": comm, "comm_share": comm / busy_total if busy_total else 0.0, "world_size": w.size,
            "mpi_library": w.library, "steps": self.global_step, "parameters": int(self.params.size),
            "flags": self.flags, "stopped_early": bool(self.stop_training),
            "data_in_memory_bytes": int(self.staged_bytes),
        }
        if w.rank == 0:
            try:
                if self.plot_path:
                    plot_curves(self.plot_path, self.history)
                if self.metrics_path:
                    write_json_atomic(self.metrics_path, metrics)
                if self.save_params_path:
                    save_params_npz(self.save_params_path, self.params)
            except OutputError as e:  # the other ranks are done: rank 0 alone says it, exit 1
                raise Stop(f"paranet: error: {e}", 1) from None
        self._call("on_train_end", metrics)
        return metrics

    def _call(self, hook, *args):
        for cb in self.callbacks:
            getattr(cb, hook)(*args)

    def _check_replicas(self):
        from .distributed import replicas_agree

        if not replicas_agree(self.params, self.world):
            raise Stop(f"paranet: replicas diverged at step {self.global_step}: parameter checksums differ across ranks", 1)

    def _stop_slot(self):
        """This rank's entry in the step's stop slot: 1 for SIGTERM, CALLBACK_STOP when its
        callbacks asked to stop, CHECKPOINT_NOW (rank 0 only) when a timed checkpoint is due."""
        if self.checkpoint_seconds is not None and self.world.rank == 0:
            self._checkpoint_request = time.monotonic() - self._last_save >= self.checkpoint_seconds
        return (float(self.stop_requested) + CALLBACK_STOP * self._stop_after_step
                + CHECKPOINT_NOW * self._checkpoint_request)

    def _checkpoint_due(self, stop, steps_per_epoch):
        """Whether --checkpoint-every asks for a checkpoint after this step (the same answer on
        every rank). The end of an epoch and of the run write one anyway."""
        if self.checkpoint is None or self.step_in_epoch >= steps_per_epoch:
            return False
        if self.max_steps is not None and self.global_step >= self.max_steps:
            return False
        if self.checkpoint_every and self.global_step % self.checkpoint_every == 0:
            return True
        return self.checkpoint_seconds is not None and stop % 1 >= CHECKPOINT_NOW / 2  # rank 0 asked

    def _sigterm_message(self):
        return (f"paranet: stopped by {self.stop_signal} after step {self.global_step}"
                + (f"; checkpoint saved to {self.checkpoint} (continue with --resume)" if self.checkpoint else ""))

    def _on_sigterm(self, signum, frame):
        self.stop_requested = True  # honoured after the current step, on every rank at once
        self.stop_signal = signal.Signals(signum).name

    def _bar(self, total):
        if not self.progress:
            return None
        from tqdm import tqdm

        return tqdm(total=total, initial=self.step_in_epoch, desc=f"epoch {self.epoch + 1}/{self.epochs}",
                    leave=False, dynamic_ncols=True, file=sys.stdout)

    @staticmethod
    def _close_bar(bar):
        if bar is not None:
            bar.close()


def fit(model, data, optimizer, **kwargs):
    """Train ``model`` on ``data`` with ``optimizer``; ``Trainer(...).fit()`` in one call.

    ``kwargs`` are Trainer's keyword arguments (batch_size, epochs, max_steps, seed, dtype,
    checkpoint, resume, callbacks, reproducible, ...): ``help(paranet.Trainer)`` has each one.
    Returns the metrics dict (test loss and accuracy, per-epoch history, throughput)."""
    return Trainer(model, data, optimizer, **kwargs).fit()


def piece_bounds(n, rows):
    """Bounds of the nearly equal pieces, at most ``rows`` rows each, that n rows are cut into:
    [0, n] in one piece when ``rows`` is None or n <= rows; [] when n is 0."""
    if n == 0:
        return []
    pieces = 1 if not rows or n <= rows else -(-n // rows)
    return [n * i // pieces for i in range(pieces + 1)]


def _memory_available():
    """MemAvailable of this machine in bytes (Linux), else a conservative 1 GiB."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 30


def _size(nbytes):
    """Bytes for people: 222 MB, 96 kB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.0f} {unit}"
    return f"{nbytes} bytes"


def _shape(shape):
    return "x".join(str(d) for d in shape) if shape else "scalars"


def _correct(output, one_hot):
    """How many rows of ``output`` put their maximum on the labelled class."""
    return int(np.count_nonzero(output.argmax(axis=1) == one_hot.argmax(axis=1)))


def write_json_atomic(path, obj):
    checkpoint.atomic_write_text(path, json.dumps(obj, indent=2))


def save_params_npz(path, params):
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **{name: var.value for name, var in params.named()})


def plot_curves(path, history):
    """Loss and accuracy per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax2.plot(epochs, [100 * h["train_accuracy"] for h in history], "o-", label="train")
    if history and "val_loss" in history[0]:
        ax1.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
        ax2.plot(epochs, [100 * h["val_accuracy"] for h in history], "o-", label="validation")
    ax1.set(xlabel="epoch", ylabel="loss", yscale="log", title="loss")
    ax2.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def _parse_fault(spec, rank):
    """Test hook: PARANET_FAULT='rank=R,step=S,kind=raise|perturb|sigterm|sigstop[,at=step|checkpoint]'
    breaks rank R in step S (0-based), or as it starts the checkpoint after S steps (S = -1: at start-up)."""
    if not spec:
        return None
    fault = dict(part.split("=", 1) for part in spec.split(","))
    if int(fault.get("rank", 0)) != rank:
        return None
    return {"step": int(fault.get("step", 0)), "kind": fault.get("kind", "raise"), "at": fault.get("at", "step")}


def _inject(fault, params):
    if fault["kind"] == "perturb":
        params.values[0] += 1e-3  # this replica now differs from the others
    elif fault["kind"] == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)  # this rank alone is signalled
    elif fault["kind"] == "sigstop":
        os.kill(os.getpid(), signal.SIGSTOP)  # this rank stops dead, as a hung one would
    else:
        raise RuntimeError(f"injected fault at step {fault['step']} (PARANET_FAULT)")


__all__ = ["Model", "Stop", "Trainer", "fit"]
