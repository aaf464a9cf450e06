"""`make accuracy`: train the MLP and the CNN with their defaults at P ranks and check the README's
accuracies and the time to reach them (both runs, start-up included, under TARGET_SECONDS)."""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REQUIRED = {"mlp": 0.980, "cnn": 0.990}
TARGET_SECONDS = 30.0  # both models, wall time of the mpiexec runs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("-n", "--nprocs", type=int, default=2, help="ranks")
    p.add_argument("--models", nargs="+", default=sorted(REQUIRED), choices=sorted(REQUIRED))
    args = p.parse_args(argv)
    mpiexec = Path(sys.executable).parent / "mpiexec"
    env = dict(os.environ)  # the ranks decide their BLAS threads (one each when they share the cores)
    failed, total = [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            metrics = Path(tmp) / f"{model}.json"
            t0 = time.perf_counter()
            subprocess.run([str(mpiexec), "-n", str(args.nprocs), sys.executable, "-m", "paranet.train", "--model", model,
                            "--metrics", str(metrics), "--checkpoint", str(Path(tmp) / f"{model}.h5")], env=env, check=True)
            wall = time.perf_counter() - t0
            total += wall
            acc = json.loads(metrics.read_text())["test_accuracy"]
            ok = acc >= REQUIRED[model]
            failed += [] if ok else [model]
            print(f"accuracy: {model} test accuracy {100 * acc:.2f}% (required {100 * REQUIRED[model]:.1f}%) "
                  f"in {wall:.1f} s at P={args.nprocs}: {'PASS' if ok else 'FAIL'}", flush=True)
    if set(args.models) == set(REQUIRED):
        fast = total < TARGET_SECONDS
        print(f"accuracy: both models in {total:.1f} s (target < {TARGET_SECONDS:.0f} s): {'PASS' if fast else 'FAIL'}")
        failed += [] if fast else ["time"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
