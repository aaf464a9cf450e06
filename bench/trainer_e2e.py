"""``python -m bench.trainer_e2e``: the trainer end to end (``python -m paranet.train``, reading
HDF5 every step, with its bookkeeping) against a hand-written numpy + mpi4py loop that holds
MNIST in memory as float32, as a user sees them. MLP 784-128-10, plain SGD, constant rate.

Each case (ranks, global batch) runs the contenders in alternation, ``--repeats`` times, and
takes the median samples/s of each: the trainer's ``samples_per_second`` from ``--metrics``
(the epochs' training time, reading included, evaluation excluded), and the loop's own timing of
the same number of epochs (its per-epoch shuffle and row gather included). The trainer runs once
per ``--data-in-memory`` mode asked for.

The loop (``--loop``, run under mpiexec by the driver) is bench.engine's Baseline step fed by
``X[idx]`` gathers of a per-epoch permutation; it drops the last short batch (the trainer keeps
it), which favours the loop slightly.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
JSON_TAG = "E2E_JSON "


def hand_loop(args):
    """The hand-written loop, one rank of it: MNIST in memory, gather, step, Allreduce."""
    import h5py
    from mpi4py import MPI

    from bench.engine import Baseline

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    with h5py.File(args.data, "r") as f:
        mean, std = float(f.attrs["train_mean"]), float(f.attrs["train_std"])
        X = f["train/images"][()].reshape(-1, 784).astype(np.float32)
        labels = f["train/labels"][()]
    X *= np.float32(1 / (255 * std))
    X -= np.float32(mean / std)
    Y = np.eye(10, dtype=np.float32)[labels]
    n, b = len(X), args.batch
    counts = [b // size + (r < b % size) for r in range(size)]
    lo = sum(counts[:rank])
    rng = np.random.default_rng(0)
    init = {"W1": rng.normal(0, np.sqrt(2 / 784), (784, 128)), "b1": np.zeros(128),
            "W2": rng.normal(0, np.sqrt(2 / 128), (128, 10)), "b2": np.zeros(10)}
    loop = Baseline(init, counts[rank], args.lr, comm)
    comm.Barrier()
    t0 = time.perf_counter()
    samples = 0
    for epoch in range(args.epochs):
        perm = np.random.default_rng([0, epoch]).permutation(n)
        for s in range(n // b):
            idx = perm[s * b + lo:s * b + lo + counts[rank]]
            loop.step(X[idx], Y[idx])
            samples += b
    seconds = time.perf_counter() - t0
    if rank == 0:
        print(JSON_TAG + json.dumps({"samples_per_second": samples / seconds}), flush=True)


def env():
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return e


def run_trainer(args, ranks, batch, mode, tmp):
    metrics = Path(tmp) / f"m-{ranks}-{batch}-{mode}.json"
    cmd = [str(Path(args.python).parent / "mpiexec"), "-n", str(ranks), args.python, "-m", "paranet.train",
           "--data", str(args.data), "--optimizer", "sgd", "--lr", str(args.lr), "--schedule", "constant",
           "--epochs", str(args.epochs), "--batch-size", str(batch), "--eval-batch-size", "5000",
           "--checkpoint", str(Path(tmp) / "ck.h5"), "--metrics", str(metrics)]
    if mode != "default":
        cmd += ["--data-in-memory", mode]
    p = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return json.loads(metrics.read_text())["samples_per_second"]


def run_loop(args, ranks, batch):
    cmd = [str(Path(args.python).parent / "mpiexec"), "-n", str(ranks), args.python, "-m", "bench.trainer_e2e",
           "--loop", "--data", str(args.data), "--batch", str(batch), "--epochs", str(args.epochs), "--lr", str(args.lr)]
    p = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    for line in p.stdout.splitlines():
        if line.startswith(JSON_TAG) and p.returncode == 0:
            return json.loads(line[len(JSON_TAG):])["samples_per_second"]
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")


def measure(args):
    """{(ranks, batch): {contender: median samples/s}} with the ratios to the loop."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in args.procs:
            for batch in args.batches:
                runs = {"loop": []}
                runs.update({f"trainer/{m}": [] for m in args.modes})
                for _ in range(args.repeats):  # alternate, so that noise hits every contender alike
                    runs["loop"].append(run_loop(args, ranks, batch))
                    for m in args.modes:
                        runs[f"trainer/{m}"].append(run_trainer(args, ranks, batch, m, tmp))
                med = {k: statistics.median(v) for k, v in runs.items()}
                row = {"ranks": ranks, "batch": batch, "samples_per_second": med, "runs": runs,
                       "ratio_to_loop": {k: med[k] / med["loop"] for k in med if k != "loop"}}
                results.append(row)
                print(f"P={ranks} batch {batch:5d}  loop {med['loop']:>9,.0f}  " + "  ".join(
                    f"{k} {med[k]:>9,.0f} ({row['ratio_to_loop'][k]:.2f}x)" for k in med if k != "loop"), flush=True)
    return results


TARGET = 1.0  # the trainer (its default --data-in-memory) >= the hand-written loop


def targets(results):
    """Target rows for the suite's table: the trainer with --data-in-memory on (auto's choice
    for MNIST) against the loop, each case."""
    rows = []
    for row in results:
        ratio = row["ratio_to_loop"].get("trainer/on", row["ratio_to_loop"].get("trainer/default"))
        rows.append({"target": "13.1 trainer/hand-written loop", "ranks": row["ranks"], "batch": row["batch"],
                     "value": ratio, "want": TARGET, "result": "PASS" if ratio is not None and ratio >= TARGET else "FAIL"})
    return rows


def markdown(results):
    """The README's table of this benchmark, from its JSON."""
    modes = [k for k in results[0]["samples_per_second"] if k != "loop"] if results else []
    head = "| P | global batch | hand-written loop | " + " | ".join(f"{m} samples/s (ratio)" for m in modes) + " |"
    lines = [head, "|" + "---|" * (3 + len(modes))]
    for row in results:
        sps = row["samples_per_second"]
        lines.append(f"| {row['ranks']} | {row['batch']} | {sps['loop']:,.0f} | " + " | ".join(
            f"{sps[m]:,.0f} ({row['ratio_to_loop'][m]:.2f}x)" for m in modes) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.trainer_e2e", description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=None, help="MNIST HDF5 (default: the trainer's default file)")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batches", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--modes", nargs="+", default=["default"],
                   help="trainer --data-in-memory modes to run (default: the trainer's default)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--loop", action="store_true", help=argparse.SUPPRESS)  # one run of the hand-written loop
    p.add_argument("--batch", type=int, default=128, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def with_data(args):
    """args with --data resolved: the trainer's default MNIST file when none was given."""
    if args.data is None:
        from paranet.data import ensure_default_dataset

        args.data = ensure_default_dataset()
    return args


def run_measured(args, measure):
    """measure(args) on the resolved --data, its results written to --json if asked; returns them."""
    results = measure(with_data(args))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return results


def main(argv=None):
    args = parse_args(argv)
    if args.loop:
        return hand_loop(with_data(args))
    return run_measured(args, measure)


if __name__ == "__main__":
    main()
