"""The trainer: ``python -m paranet.train`` (or ``paranet-train``), single-process or under mpirun.

Every rank builds the same graph, reads its shard of each global batch from HDF5 and computes
gradients; one Allreduce per step averages them (``paranet.distributed``) and every rank
applies the same update. Only rank 0 prints and writes files.
"""
import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

from . import checkpoint
from .data import BatchReader, DataError, default_data_path, ensure_default_dataset
from .files import atomic_path
from .graph import GraphError, Session
from .models import MODELS
from .timeline import NoTimeline, Timeline, write_trace
from .train import AdamOptimizer, GradientDescentOptimizer, MomentumOptimizer

OPTIMIZERS = {"sgd": GradientDescentOptimizer, "momentum": MomentumOptimizer, "adam": AdamOptimizer}
# Defaults per model, measured to reach the README's accuracies (see `make accuracy`).
MODEL_DEFAULTS = {"mlp": {"epochs": 12, "lr": 1e-3}, "cnn": {"epochs": 6, "lr": 2e-3}}
SGD_LR = {"sgd": 0.1, "momentum": 0.02}


class Stop(Exception):
    """Training ends the same way on every rank (the condition was reduced across ranks)."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


def _env_rank():
    """This process's rank as the launcher set it, known before MPI starts (for quiet argparse)."""
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where there is none to show."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def build_parser():
    p = argparse.ArgumentParser(
        prog="paranet-train",
        description="Data-parallel MNIST training. Run under `mpirun -n P` for P ranks, or alone for one.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--data", type=Path, default=None, help="HDF5 dataset (made by `python -m paranet.data`); "
                   f"default: {default_data_path()}, built from the embedded MNIST on first use")
    p.add_argument("--model", choices=sorted(MODELS), default="mlp", help="mlp: 784-128-10; cnn: LeNet-style")
    p.add_argument("--epochs", type=int, default=None,
                   help="default: " + ", ".join(f"{m} {d['epochs']}" for m, d in MODEL_DEFAULTS.items()))
    p.add_argument("--batch-size", type=int, default=128, help="global batch size, split over the ranks")
    p.add_argument("--lr", type=float, default=None, help="learning rate; default: adam "
                   + ", ".join(f"{m} {d['lr']}" for m, d in MODEL_DEFAULTS.items())
                   + "; " + ", ".join(f"{o} {v}" for o, v in SGD_LR.items()))
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adam", help="the update rule (PyTorch's)")
    p.add_argument("--momentum", type=float, default=0.9, help="for --optimizer momentum")
    p.add_argument("--schedule", choices=["cosine", "constant"], default="cosine",
                   help="learning rate over the run: cosine decays it to 0 by the last step")
    p.add_argument("--seed", type=int, default=0, help="seeds the initial weights and the data order")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="parameters, activations and gradients")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in all (the lr schedule still spans --epochs)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="HDF5 checkpoint written every epoch and at the end; default: runs/<model>.ckpt.h5")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")
    p.add_argument("--metrics", type=Path, default=None, help="JSON file of results, written at the end")
    p.add_argument("--save-params", type=Path, default=None, help=".npz of the final parameters")
    p.add_argument("--check-replicas", type=int, default=0, metavar="N",
                   help="every N steps compare a parameter checksum across ranks (0: off)")
    p.add_argument("--prefetch", action="store_true",
                   help="read the next batch in a background thread; helps only when cores are spare "
                        "(a reader thread competes with the ranks otherwise: see bench/bench_data.py)")
    p.add_argument("--timeline", type=Path, default=None, metavar="TRACE.json",
                   help="write per-rank spans (read, forward, backward, allreduce, update) as a Chrome/Perfetto "
                        "trace of the first --timeline-steps steps")
    p.add_argument("--timeline-steps", type=int, default=200, help="steps recorded by --timeline")
    p.add_argument("--plot", type=Path, default=None, metavar="CURVES.png",
                   help="draw loss and accuracy curves per epoch (needs matplotlib)")
    p.add_argument("--allreduce", choices=["auto", "shm", "mpi"], default="auto",
                   help="how the ranks sum gradients: shm through memory shared by the ranks of each machine, "
                        "mpi by MPI_Allreduce, auto shm when every machine runs the same number (> 1) of ranks")
    p.add_argument("--eval-batch-size", type=int, default=1000, help="global batch for validation and test")
    return p


def parse_args(argv=None):
    """Parse and complete the flags; only rank 0 prints a usage error (every rank exits 2)."""
    parser = build_parser()
    if _env_rank() == 0:
        return _parse(parser, argv)
    saved, sys.stderr = sys.stderr, open(os.devnull, "w")
    try:
        return _parse(parser, argv)
    finally:
        sys.stderr.close()
        sys.stderr = saved


def _parse(parser, argv):
    args = parser.parse_args(argv)
    defaults = MODEL_DEFAULTS[args.model]
    if args.epochs is None:
        args.epochs = defaults["epochs"]
    if args.lr is None:
        args.lr = defaults["lr"] if args.optimizer == "adam" else SGD_LR[args.optimizer]
    if args.checkpoint is None:
        args.checkpoint = Path("runs") / f"{args.model}.ckpt.h5"
    for name in ("epochs", "batch_size", "eval_batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error(f"--max-steps must be >= 1, got {args.max_steps}")
    if not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib: pip install matplotlib (or pip install 'paranet[plot]')")
    return args


def make_optimizer(args, loss):
    if args.optimizer == "momentum":
        return MomentumOptimizer(args.lr, loss, momentum=args.momentum)
    return OPTIMIZERS[args.optimizer](args.lr, loss)


def flags_of(args):
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(vars(args).items())}


def write_json_atomic(path, obj):
    checkpoint.atomic_write_text(path, json.dumps(obj, indent=2))


def save_params_npz(path, params):
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **{name: var.value for name, var in params.named()})


class Trainer:
    """One rank's training loop; ``world`` decides who talks to whom."""

    def __init__(self, args, world):
        self.args, self.world = args, world
        self.log = print if world.rank == 0 else (lambda *a, **k: None)
        self.dtype = np.dtype(args.dtype)
        self.rng = np.random.default_rng(args.seed)  # draws the initial weights
        self.model = MODELS[args.model](self.rng)
        # the reader's images are uint8 scaled by finite constants: finite by construction, so
        # the per-feed NaN/inf pass is skipped (a diverging loss is caught after the Allreduce)
        self.session = Session(self.dtype, check_finite=False)
        self.params = self.session.parameters(self.model.loss)
        from .distributed import DistributedOptimizer, broadcast_parameters

        self.optimizer = DistributedOptimizer(make_optimizer(args, self.model.loss), world)
        broadcast_parameters(self.params, world)  # every replica starts from rank 0's weights
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.history = []
        self.stop_requested = False
        self.fault = _parse_fault(os.environ.get("PARANET_FAULT"), world.rank)
        self.recording = Timeline(world.rank) if args.timeline else None
        self.timeline = self.optimizer.timeline = self.recording or NoTimeline()

    # -- data --------------------------------------------------------------------------

    def open_readers(self, data):
        a, w = self.args, self.world
        common = dict(rank=w.rank, size=w.size, dtype=self.dtype)
        self.train_reader = BatchReader(data, "train", batch_size=a.batch_size, seed=a.seed, prefetch=a.prefetch, **common)
        eval_bs = max(a.eval_batch_size, w.size)
        self.val_reader = BatchReader(data, "val", batch_size=eval_bs, shuffle=False, prefetch=False, **common)
        self.test_reader = BatchReader(data, "test", batch_size=eval_bs, shuffle=False, prefetch=False, **common)

    # -- one step ----------------------------------------------------------------------

    def learning_rate(self):
        """The rate for the step about to run: a function of the global step only, so resumable."""
        a = self.args
        if a.schedule == "constant":
            return a.lr
        total = a.epochs * self.train_reader.steps_per_epoch  # --max-steps cuts a run short, not the schedule
        return a.lr * 0.5 * (1 + math.cos(math.pi * min(self.global_step, total) / total))

    def step(self, batch):
        """Forward, backward and the averaged update on this rank's shard; returns global sums."""
        m, params, tl = self.model, self.params, self.timeline
        self.optimizer.optimizer.learning_rate = self.learning_rate()
        if batch.n_local:
            plan = self.session.plan(m.loss)
            with tl.span("forward"):
                self.session.forward(plan, {m.x: m.input(batch.x), m.y: batch.y})
            with tl.span("backward"):
                self.session.backward(plan)
            correct = _correct(m.probs.value, batch.y)
            loss_sum = float(m.loss.value) * batch.n_local
        else:  # a final tiny batch left this rank without samples: it contributes nothing
            params.grads[...] = 0
            loss_sum, correct = 0.0, 0
        if self.fault and self.fault.get("step") == self.global_step:
            _inject(self.fault, params)
        return self.optimizer.apply_gradients(params, batch.n_local, loss_sum, correct, self.stop_requested,
                                              total=batch.n_global)

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
        sums = np.zeros(3)  # loss sum, correct, count
        for batch in reader.epoch(0):
            if batch.n_local:
                loss = self.session.run(m.loss, {m.x: m.input(batch.x), m.y: batch.y})
                sums += (loss * batch.n_local, _correct(m.probs.value, batch.y), batch.n_local)
        self.world.allreduce_sum(sums)
        return sums[0] / sums[2], sums[1] / sums[2]

    # -- checkpoints -------------------------------------------------------------------

    def save_checkpoint(self):
        if self.world.rank == 0:
            checkpoint.save(
                self.args.checkpoint, self.params, self.optimizer, epoch=self.epoch, step_in_epoch=self.step_in_epoch,
                global_step=self.global_step, world_size=self.world.size, seed=self.args.seed, flags=flags_of(self.args),
                rng_state=self.rng.bit_generator.state, history=self.history,
            )
        self.world.barrier()

    def resume(self):
        """Load --checkpoint on every rank (it lives on shared storage)."""
        path = self.args.checkpoint
        if not path.exists():
            self.log(f"paranet: --resume: no checkpoint at {path} yet, starting fresh")
            return
        attrs = checkpoint.load(path, self.params, self.optimizer)
        saved = attrs["flags"]
        for flag in ("model", "batch_size", "seed", "dtype", "optimizer"):
            if saved.get(flag) != getattr(self.args, flag):
                raise checkpoint.CheckpointError(
                    f"{path}: written with --{flag.replace('_', '-')} {saved.get(flag)}, this run has {getattr(self.args, flag)}")
        self.epoch, self.step_in_epoch, self.global_step = attrs["epoch"], attrs["step_in_epoch"], attrs["global_step"]
        self.history = attrs["history"]
        self.rng.bit_generator.state = attrs["rng"]
        self.log(f"paranet: resumed from {path} at epoch {self.epoch + 1}, step {self.global_step} "
                 f"(written by {attrs['world_size']} rank{'s' if attrs['world_size'] != 1 else ''})")

    # -- the loop ----------------------------------------------------------------------

    def run(self):
        a, w = self.args, self.world
        signal.signal(signal.SIGTERM, self._on_sigterm)
        steps_per_epoch = self.train_reader.steps_per_epoch
        t_start = time.perf_counter()
        samples_total, busy_total = 0, 0.0
        comm_start = self.optimizer.comm_seconds
        while self.epoch < a.epochs:
            if self.step_in_epoch >= steps_per_epoch:
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
                continue
            bar = self._bar(steps_per_epoch)
            sums, comm0, t0 = np.zeros(3), self.optimizer.comm_seconds, time.perf_counter()
            for batch in self.batches():
                count, loss_sum, correct, stop = self.step(batch)
                self.global_step += 1
                if self.recording is not None and self.global_step == self.args.timeline_steps:
                    self.timeline = self.optimizer.timeline = NoTimeline()
                self.step_in_epoch += 1
                if not math.isfinite(loss_sum):
                    raise Stop(f"paranet: non-finite training loss ({loss_sum / count}) at step {self.global_step} "
                               f"(epoch {self.epoch + 1}); lower --lr", 1)
                sums += (loss_sum, correct, count)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{sums[0] / sums[2]:.4f}", refresh=False)
                if a.check_replicas and self.global_step % a.check_replicas == 0:
                    self._check_replicas()
                if stop:
                    self._close_bar(bar)
                    self.save_checkpoint()
                    raise Stop(f"paranet: stopped by SIGTERM after step {self.global_step}; "
                               f"checkpoint saved to {a.checkpoint} (continue with --resume)", 0)
                if a.max_steps is not None and self.global_step >= a.max_steps:
                    break
            self._close_bar(bar)
            seconds = time.perf_counter() - t0
            comm = self.optimizer.comm_seconds - comm0
            samples_total += sums[2]
            busy_total += seconds
            val_loss, val_acc = self.evaluate(self.val_reader)
            record = {
                "epoch": self.epoch + 1, "steps": self.global_step, "train_loss": sums[0] / max(sums[2], 1),
                "train_accuracy": sums[1] / max(sums[2], 1), "val_loss": val_loss, "val_accuracy": val_acc,
                "samples_per_second": sums[2] / seconds if seconds else 0.0, "comm_share": comm / seconds if seconds else 0.0,
            }
            self.history.append(record)
            self.log(f"epoch {record['epoch']:>3}/{a.epochs}  train loss {record['train_loss']:.4f}  "
                     f"val loss {val_loss:.4f}  val acc {100 * val_acc:6.2f}%  "
                     f"{record['samples_per_second']:>9,.0f} samples/s  comm {100 * record['comm_share']:4.1f}%", flush=True)
            if self.step_in_epoch >= steps_per_epoch:
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
            done = a.max_steps is not None and self.global_step >= a.max_steps
            self.save_checkpoint()
            if done:
                break
        if a.check_replicas:
            self._check_replicas()
        test_loss, test_acc = self.evaluate(self.test_reader)
        wall = time.perf_counter() - t_start
        self.log(f"test loss {test_loss:.4f}  test accuracy {100 * test_acc:.2f}%  "
                 f"({self.global_step} steps, {wall:.1f} s)", flush=True)
        if a.timeline:
            events = w.gather_object(self.recording.events)
            if w.rank == 0:
                write_trace(a.timeline, events, w.size)
        if w.rank == 0:
            if a.plot:
                plot_curves(a.plot, self.history)
            comm = self.optimizer.comm_seconds - comm_start
            metrics = {
                "completed": True, "test_accuracy": test_acc, "test_loss": test_loss, "history": self.history,
                "samples_per_second": samples_total / busy_total if busy_total else 0.0, "wall_seconds": wall,
                "comm_seconds": comm, "comm_share": comm / busy_total if busy_total else 0.0, "world_size": w.size,
                "mpi_library": w.library, "steps": self.global_step, "parameters": int(self.params.size),
                "flags": flags_of(a),
            }
            if a.metrics:
                write_json_atomic(a.metrics, metrics)
            if a.save_params:
                save_params_npz(a.save_params, self.params)
        return 0

    def _check_replicas(self):
        from .distributed import replicas_agree

        if not replicas_agree(self.params, self.world):
            raise Stop(f"paranet: replicas diverged at step {self.global_step}: parameter checksums differ across ranks", 1)

    def _on_sigterm(self, signum, frame):
        self.stop_requested = True  # honoured after the current step, on every rank at once

    def _bar(self, total):
        if self.world.rank != 0 or not sys.stdout.isatty():
            return None
        from tqdm import tqdm

        return tqdm(total=total, initial=self.step_in_epoch, desc=f"epoch {self.epoch + 1}/{self.args.epochs}",
                    leave=False, dynamic_ncols=True, file=sys.stdout)

    @staticmethod
    def _close_bar(bar):
        if bar is not None:
            bar.close()


def _correct(probs, one_hot):
    """How many rows of ``probs`` put their maximum on the labelled class."""
    return int(np.count_nonzero(probs.argmax(axis=1) == one_hot.argmax(axis=1)))


def plot_curves(path, history):
    """Loss and accuracy per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax1.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    ax1.set(xlabel="epoch", ylabel="loss", yscale="log", title="loss")
    ax2.plot(epochs, [100 * h["train_accuracy"] for h in history], "o-", label="train")
    ax2.plot(epochs, [100 * h["val_accuracy"] for h in history], "o-", label="validation")
    ax2.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def _parse_fault(spec, rank):
    """Test hook: PARANET_FAULT='rank=R,step=S,kind=raise|perturb|sigterm' breaks rank R at step S."""
    if not spec:
        return None
    fault = dict(part.split("=", 1) for part in spec.split(","))
    if int(fault.get("rank", 0)) != rank:
        return None
    return {"step": int(fault.get("step", 0)), "kind": fault.get("kind", "raise")}


def _inject(fault, params):
    if fault["kind"] == "perturb":
        params.values[0] += 1e-3  # this replica now differs from the others
    elif fault["kind"] == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)  # this rank alone is signalled
    else:
        raise RuntimeError(f"injected fault at step {fault['step']} (PARANET_FAULT)")


def _limit_blas_threads(world):
    """One BLAS thread per rank when ranks share the machine's cores."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(max(1, (os.cpu_count() or 1) // world.local_size))


def prepare_data(args, world):
    """Resolve --data (rank 0 builds the default file while the others wait) and validate it
    on rank 0 first, so that bad data gives one error line, not one per rank."""
    error = None
    if world.rank == 0:
        try:
            if args.data is None:
                if not default_data_path().exists():
                    print(f"paranet: first use: building {default_data_path()} from the embedded MNIST", flush=True)
                args.data = ensure_default_dataset()
            BatchReader(args.data, "train", rank=0, size=world.size, batch_size=args.batch_size, prefetch=False).close()
        except DataError as e:
            error = str(e)
    args.data, error = world.bcast_object((args.data, error))
    if error:
        raise Stop(f"paranet: error: {error}", 2)
    return args.data


def main(argv=None):
    args = parse_args(argv)
    from .distributed import World, install_abort_hook

    try:
        world = World(allreduce=args.allreduce)
    except ValueError as e:  # --allreduce shm where it cannot work: every rank knows, rank 0 says it
        if _env_rank() == 0:
            print(f"paranet: error: {e}", file=sys.stderr, flush=True)
        return 2
    install_abort_hook(world, quiet=(DataError, GraphError, checkpoint.CheckpointError))
    _limit_blas_threads(world)
    try:
        data = prepare_data(args, world)
        trainer = Trainer(args, world)
        if args.resume:
            trainer.resume()
        trainer.open_readers(data)
        r = trainer.train_reader
        trainer.log(
            f"paranet: world size {world.size}, {world.library}; {world.describe_allreduce()}\n"
            f"  data   {data} ({r.num_samples:,} train, {trainer.val_reader.num_samples:,} val, "
            f"{trainer.test_reader.num_samples:,} test)\n"
            f"  model  {args.model}, {trainer.params.size:,} parameters, {args.dtype}\n"
            f"  train  {args.optimizer} lr {args.lr:g}, global batch {args.batch_size} "
            f"({args.batch_size // world.size}{'+' if args.batch_size % world.size else ''} per rank), "
            f"{args.epochs} epochs of {r.steps_per_epoch} steps", flush=True)
        return trainer.run()
    except Stop as stop:
        if world.rank == 0:
            print(stop, file=sys.stderr if stop.code else sys.stdout, flush=True)
        return stop.code
    except (DataError, checkpoint.CheckpointError) as e:
        if not world.distributed:  # one process: a one-line error, no traceback
            print(f"paranet: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
