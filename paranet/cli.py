"""The trainer: ``python -m paranet.train`` (or ``paranet-train``), single-process or under mpirun.

Every rank builds the same graph, reads its shard of each global batch from HDF5 and computes
gradients; one Allreduce per step averages them (``paranet.distributed``) and every rank
applies the same update. Only rank 0 prints and writes files.
"""
import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np

from . import checkpoint
from .data import DataError, default_data_path, ensure_default_dataset
from .data.prepare import default_dataset_origin
from .graph import GraphError
from .models import MODELS, ModelError, build_model, load_builder
from .train import AdamOptimizer, GradientDescentOptimizer, MomentumOptimizer
from .files import OutputError
from .trainer import RESUME_FIXED, Stop, Trainer, catch_sigterm, open_readers

OPTIMIZERS = {"sgd": GradientDescentOptimizer, "momentum": MomentumOptimizer, "adam": AdamOptimizer}
# Defaults per model, measured to reach the README's accuracies (see `make accuracy`).
MODEL_DEFAULTS = {"mlp": {"epochs": 12, "lr": 2e-3}, "cnn": {"epochs": 5, "lr": 3e-3}}
OWN_MODEL_DEFAULTS = {"epochs": 10, "lr": 1e-3}  # a --model pkg.module:function
SGD_LR = {"sgd": 0.1, "momentum": 0.02}
MAX_LR = 1e6  # a larger --lr overflows the first update (and 1e4 already diverges)


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
        description="Data-parallel training of a classifier on an HDF5 dataset (MNIST by default). "
                    "Run under `mpirun -n P` for P ranks, or alone for one.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--data", type=Path, default=None, help="HDF5 dataset (made by `python -m paranet.data`); "
                   f"default: {default_data_path()}, built on first use from the embedded MNIST of a source "
                   "checkout, else from a download")
    p.add_argument("--model", default="mlp", metavar="MODEL",
                   help="mlp (flattened samples, --hidden layers), cnn (LeNet-style, input channels from the "
                        "data), or your own builder: pkg.module:function or path/to/file.py:function, called "
                        "as function(sample_shape, num_classes[, rng=...]) and returning a paranet.Model")
    p.add_argument("--hidden", type=_int_list, default=None, metavar="N[,N...]",
                   help="hidden layer widths: mlp's fully connected layers (default 128), cnn's fc layer (128)")
    p.add_argument("--channels", type=_int_list, default=None, metavar="N[,N...]",
                   help="cnn: output channels of each conv 5x5 + pool 2 block (default 16,32)")
    p.add_argument("--epochs", type=int, default=None,
                   help="default: " + ", ".join(f"{m} {d['epochs']}" for m, d in MODEL_DEFAULTS.items())
                   + f", your own model {OWN_MODEL_DEFAULTS['epochs']}")
    p.add_argument("--batch-size", type=int, default=128, help="global batch size, split over the ranks")
    p.add_argument("--lr", type=float, default=None, help="learning rate; default: adam "
                   + ", ".join(f"{m} {d['lr']}" for m, d in MODEL_DEFAULTS.items())
                   + f", your own model {OWN_MODEL_DEFAULTS['lr']}; "
                   + ", ".join(f"{o} {v}" for o, v in SGD_LR.items()))
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
    p.add_argument("--resume", action="store_true",
                   help="continue from --checkpoint if it exists. The data (checked by its recorded identity) and "
                        + ", ".join("--" + f.replace("_", "-") for f in RESUME_FIXED)
                        + " must be as when it was written; the number of ranks and every other flag may change")
    p.add_argument("--checkpoint-every", type=_every, default=None, metavar="N|Mmin",
                   help="also write the checkpoint every N steps, or every M minutes (e.g. 500, 10min), "
                        "besides every epoch and on SIGTERM or SIGUSR1")
    p.add_argument("--keep", type=int, default=1, metavar="K",
                   help="keep the last K checkpoints: --checkpoint the newest, then CHECKPOINT.1 ... CHECKPOINT.<K-1>")
    p.add_argument("--stall-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="abort the job, naming the ranks that did not arrive, when ranks wait this long for each "
                        "other in a collective (a stopped or hung rank); 0: wait forever")
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
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="BLAS threads per rank; default: OMP_NUM_THREADS (or OPENBLAS_/MKL_NUM_THREADS) when set, "
                        "else the CPUs this rank may use, shared with the ranks of the machine whose CPUs overlap")
    p.add_argument("--csv", type=Path, default=None, metavar="LOG.csv", help="a CSV of the metrics, one row per epoch (rewritten whole, atomically, each epoch)")
    p.add_argument("--tensorboard", type=Path, default=None, metavar="DIR",
                   help="write TensorBoard event files (needs tensorboardX: pip install 'paranet[tensorboard]')")
    p.add_argument("--data-in-memory", choices=["auto", "on", "off"], default="auto",
                   help="hold the dataset in memory shared by the ranks of each machine, normalised in the "
                        "training dtype, so that a step's read is a view (one copy per machine); auto when it "
                        "takes at most a quarter of the available memory; off reads one hyperslab a rank "
                        "each step (for files larger than memory)")
    p.add_argument("--reproducible", nargs="?", const="ordered", default=None, choices=["ordered", "exact"],
                   help="the same bits at any number of ranks: the batch is cut into fixed micro-shards whose "
                        "gradients are added in a fixed order (ordered, the default) or exactly (exact: the correctly "
                        "rounded sum). Costs the MLP about a tenth (batch 1024) to a quarter (batch 128) of its "
                        "throughput with ordered, about half with exact; the CNN little. See the README's "
                        "'Bit-for-bit the same result at any number of ranks'")
    return p


OUTPUTS = ("checkpoint", "metrics", "save_params", "timeline", "plot", "csv", "tensorboard")


def _every(text):
    """--checkpoint-every: '500' (steps) or '10min'/'10m' (minutes) -> ('steps', 500) / ('minutes', 10.0)."""
    t = text.strip().lower()
    for unit in ("minutes", "minute", "min", "m"):
        if t.endswith(unit):
            try:
                minutes = float(t[: -len(unit)])
            except ValueError:
                break
            if not (math.isfinite(minutes) and minutes > 0):
                break
            return ("minutes", minutes)
    else:
        if t.isdigit() and int(t) >= 1:
            return ("steps", int(t))
    raise argparse.ArgumentTypeError(f"expected N steps (>= 1) or M minutes (e.g. 10min), got {text!r}")


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
    if args.model not in MODELS and ":" not in args.model:
        parser.error(f"--model {args.model}: expected one of {', '.join(sorted(MODELS))}, "
                     f"pkg.module:function or path/to/file.py:function")
    defaults = MODEL_DEFAULTS.get(args.model, OWN_MODEL_DEFAULTS)
    if args.epochs is None:
        args.epochs = defaults["epochs"]
    if args.lr is None:
        args.lr = defaults["lr"] if args.optimizer == "adam" else SGD_LR[args.optimizer]
    if args.checkpoint is None:
        args.checkpoint = Path("runs") / f"{args.model.rpartition(':')[2] or 'model'}.ckpt.h5"
    for name in ("epochs", "batch_size", "eval_batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error(f"--max-steps must be >= 1, got {args.max_steps}")
    if not (math.isfinite(args.lr) and 0 < args.lr <= MAX_LR):
        parser.error(f"--lr must be a finite number in (0, {MAX_LR:g}], got {args.lr}")
    if not (math.isfinite(args.momentum) and 0 <= args.momentum < 1):
        parser.error(f"--momentum must be in [0, 1), got {args.momentum}")
    if not 0 <= args.seed < 2**64:
        parser.error(f"--seed must be in [0, 2**64), got {args.seed}")
    if args.timeline_steps < 1:
        parser.error(f"--timeline-steps must be >= 1, got {args.timeline_steps}")
    if args.check_replicas < 0:
        parser.error(f"--check-replicas must be >= 0 (0: off), got {args.check_replicas}")
    if args.keep < 1:
        parser.error(f"--keep must be >= 1, got {args.keep}")
    if not (math.isfinite(args.stall_timeout) and args.stall_timeout >= 0):
        parser.error(f"--stall-timeout must be a finite number of seconds >= 0 (0: off), got {args.stall_timeout}")
    _refuse_clashing_paths(parser, args)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.tensorboard is not None:
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            parser.error("--tensorboard needs tensorboardX: pip install tensorboardX (or pip install 'paranet[tensorboard]')")
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib: pip install matplotlib (or pip install 'paranet[plot]')")
    return args


def _refuse_clashing_paths(parser, args):
    """An output that names an input (--data), or two outputs that name the same file, would
    destroy one of them: refuse it before anything runs."""
    def same(a, b):
        try:
            if a.exists() and b.exists():
                return os.path.samefile(a, b)
        except OSError:
            pass
        return os.path.abspath(a) == os.path.abspath(b)

    data = args.data if args.data is not None else default_data_path()
    seen = [("data", Path(data))]
    for name in OUTPUTS:
        path = getattr(args, name, None)
        if path is None:
            continue
        for other, other_path in seen:
            if same(Path(path), other_path):
                parser.error(f"--{name.replace('_', '-')} {path} is the same file as --{other.replace('_', '-')}"
                             f"{'' if other != 'data' or args.data is not None else ' (the default data file)'}: "
                             f"it would be overwritten; choose another path")
        seen.append((name, Path(path)))


def make_optimizer(args, loss):
    if args.optimizer == "momentum":
        return MomentumOptimizer(args.lr, loss, momentum=args.momentum)
    return OPTIMIZERS[args.optimizer](args.lr, loss)


def flags_of(args):
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(vars(args).items())}


def _int_list(text):
    """'256,128' -> [256, 128], for --hidden and --channels."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def build_callbacks(args):
    from .callbacks import CosineDecay, CSVLogger, TensorBoard

    callbacks = []
    if args.schedule == "cosine":
        callbacks.append(CosineDecay(args.lr))
    if args.csv:
        callbacks.append(CSVLogger(args.csv))
    if args.tensorboard:
        callbacks.append(TensorBoard(args.tensorboard))
    return callbacks


def run(args, world):
    """Build the model for the data, then train: the whole CLI after flag parsing."""
    data = prepare_data(args, world)
    train, val, test = open_readers(data, world, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
                                    seed=args.seed, dtype=args.dtype, prefetch=args.prefetch)
    sample_shape, num_classes = train.sample_shape, train.num_classes
    rng = np.random.default_rng(args.seed)  # draws the initial weights
    options = {}
    if args.model in MODELS:
        if args.hidden:
            options["hidden"] = args.hidden
        if args.channels and args.model == "cnn":
            options["channels"] = args.channels
    model = build_model(load_builder(args.model), sample_shape, num_classes, rng,
                        name=args.model if args.model in MODELS else None, **options)
    trainer = Trainer(
        model, train, make_optimizer(args, model.loss), val_data=val, test_data=test, world=world, batch_size=args.batch_size, epochs=args.epochs,
        seed=args.seed, dtype=args.dtype, eval_batch_size=args.eval_batch_size, max_steps=args.max_steps,
        checkpoint=args.checkpoint, resume=args.resume, metrics=args.metrics, save_params=args.save_params,
        timeline=args.timeline, timeline_steps=args.timeline_steps, check_replicas=args.check_replicas,
        callbacks=build_callbacks(args), prefetch=args.prefetch, flags=flags_of(args), plot=args.plot,
        reproducible=args.reproducible or False, data_in_memory=args.data_in_memory, keep=args.keep, stall_timeout=args.stall_timeout,
        checkpoint_every=args.checkpoint_every[1] if args.checkpoint_every and args.checkpoint_every[0] == "steps" else None,
        checkpoint_minutes=args.checkpoint_every[1] if args.checkpoint_every and args.checkpoint_every[0] == "minutes" else None,
    )
    trainer.fit()
    return 0


def prepare_data(args, world):
    """Resolve --data: rank 0 builds the default file on first use while the others wait."""
    error = None
    if world.rank == 0 and args.data is None:
        try:
            if not default_data_path().exists():
                print(f"paranet: first use: building {default_data_path()} from {default_dataset_origin()}", flush=True)
            args.data = ensure_default_dataset()
        except DataError as e:
            error = str(e)
    args.data, error = world.bcast_object((args.data, error))
    if error:
        raise Stop(f"paranet: error: {error}", 2)
    return args.data


def main(argv=None):
    catch_sigterm()  # first: a SIGTERM during start-up stops the run cleanly before its first step
    args = parse_args(argv)
    from .distributed import init

    try:
        world = init(allreduce=args.allreduce, threads=args.threads,
                     quiet=(DataError, GraphError, ModelError, checkpoint.CheckpointError, OutputError))
    except ValueError as e:  # --allreduce shm where it cannot work: every rank knows, rank 0 says it
        if _env_rank() == 0:
            print(f"paranet: error: {e}", file=sys.stderr, flush=True)
        return 2
    try:
        return run(args, world)
    except Stop as stop:
        if world.rank == 0:
            print(stop, file=sys.stderr if stop.code else sys.stdout, flush=True)
        return stop.code
    except ModelError as e:  # the same on every rank: rank 0 says it
        if world.rank == 0:
            print(f"paranet: error: {e}", file=sys.stderr, flush=True)
        return 2
    except (DataError, checkpoint.CheckpointError) as e:
        if not world.distributed:  # one process: a one-line error, no traceback
            print(f"paranet: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
