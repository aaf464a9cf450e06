"""Test helpers: run ``python -m paranet.train`` for real, alone or under the wheel's mpiexec."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MPIEXEC = BIN / "mpiexec"


def env(**extra):
    """The environment a rank runs in: this checkout importable, one BLAS thread per rank."""
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    e.update({k: str(v) for k, v in extra.items()})
    return e


def train_cmd(nprocs, *args):
    """The command line for ``nprocs`` ranks (None: a plain single process, no launcher)."""
    base = [sys.executable, "-m", "paranet.train", *map(str, args)]
    return base if nprocs is None else [str(MPIEXEC), "-n", str(nprocs), *base]


def run_train(nprocs, *args, timeout=120, extra_env=None, check=True):
    """Run the trainer to completion; returns the CompletedProcess (text output)."""
    proc = subprocess.run(train_cmd(nprocs, *args), cwd=REPO, env=env(**(extra_env or {})),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"trainer failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def load_params(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def max_abs_diff(a, b):
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
