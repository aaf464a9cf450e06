"""``python -m bench.cnn_pieces``: the CNN trainer end to end with a rank's shard run in pieces of
at most ``Conv2DOp.chunk_rows`` rows (the default, 128) against the whole shard in one pass.

Both contenders are ``python -m paranet.train --model cnn`` under mpiexec, reading included; the
whole-shard one is the same program with ``Conv2DOp.chunk_rows = None`` (``--run --rows 0``).
Each case (ranks, global batch) alternates them ``--repeats`` times and reports the median of the
trainer's ``samples_per_second`` (training time only) and of the per-repeat ratios.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.trainer_e2e import REPO, env, run_measured


def run_trainer(args, ranks, batch, rows, tmp):
    metrics = Path(tmp) / f"m-{ranks}-{batch}-{rows}.json"
    cmd = [str(Path(args.python).parent / "mpiexec"), "-n", str(ranks), args.python, "-m", "bench.cnn_pieces",
           "--run", "--rows", str(rows), "--", "--model", "cnn", "--data", str(args.data), "--batch-size", str(batch),
           "--epochs", "1", "--max-steps", str(args.steps), "--checkpoint", str(Path(tmp) / "ck.h5"),
           "--metrics", str(metrics)]
    p = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return json.loads(metrics.read_text())["samples_per_second"]


def measure(args):
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in args.procs:
            for batch in args.batches:
                whole, pieces = [], []
                for _ in range(args.repeats):  # alternate, so that noise hits both alike
                    whole.append(run_trainer(args, ranks, batch, 0, tmp))
                    pieces.append(run_trainer(args, ranks, batch, args.rows, tmp))
                row = {"ranks": ranks, "batch": batch, "rows_per_rank": batch // ranks, "piece_rows": args.rows,
                       "whole": whole, "pieces": pieces, "whole_median": statistics.median(whole),
                       "pieces_median": statistics.median(pieces),
                       "ratio": statistics.median(p / w for p, w in zip(pieces, whole))}
                results.append(row)
                print(f"P={ranks} batch {batch:5d}  whole {row['whole_median']:>8,.0f}  pieces of <= {args.rows} "
                      f"{row['pieces_median']:>8,.0f} samples/s  ({row['ratio']:.2f}x)", flush=True)
    return {"steps": args.steps, "repeats": args.repeats, "cases": results}


def markdown(results):
    """The README's table of this benchmark, from its JSON."""
    rows = results["cases"][0]["piece_rows"] if results["cases"] else ""
    lines = [f"| P | global batch | rows a rank | whole shard samples/s | pieces of ≤ {rows} rows samples/s | "
             "pieces / whole (median of the paired runs) |", "|---|---|---|---|---|---|"]
    for row in results["cases"]:
        lines.append(f"| {row['ranks']} | {row['batch']} | {row['rows_per_rank']} | {row['whole_median']:,.0f} | "
                     f"{row['pieces_median']:,.0f} | {row['ratio']:.2f}x |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.cnn_pieces", description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=None, help="MNIST HDF5 (default: the trainer's default file)")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batches", type=int, nargs="+", default=[128, 256, 1024])
    p.add_argument("--steps", type=int, default=30, help="training steps a run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rows", type=int, default=128, help="Conv2DOp.chunk_rows of the pieces contender")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--run", action="store_true", help=argparse.SUPPRESS)  # one trainer run with --rows
    p.add_argument("trainer_args", nargs="*", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.run:
        from paranet.cli import main as train
        from paranet.nn.conv import Conv2DOp

        Conv2DOp.chunk_rows = args.rows or None
        return train(args.trainer_args)
    return run_measured(args, measure)


if __name__ == "__main__":
    code = main()
    sys.exit(code if isinstance(code, int) else 0)
