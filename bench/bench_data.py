"""Benchmark of paranet.data: per-rank peak memory vs dataset and batch size; read time vs an MLP step.

Run:  python bench/bench_data.py        (or via `python -m bench` once wired in)

Each case runs in its own subprocess (OMP_NUM_THREADS=1, as one of P ranks sharing a
machine), so peak resident memory (VmHWM) of one case never mixes with another's.

1. Memory: rank 0 of 4 iterates one full epoch of a synthetic file of MNIST's size and
   of ten times MNIST's size, at global batch 128 and 8192. The peak above the process's
   baseline (numpy + h5py imported, file open) should follow the batch size, not the file.
2. Speed: on MNIST, rank 0 of 4 at global batch 128 (32 rows a rank), the time to get one
   rank's share of a batch, against one training step of a numpy 784-128-10 MLP
   (forward + backward + SGD, float32) on those 32 rows: raw reads (no prefetch), and the
   time the step loop waits on the prefetching reader, plus the whole loop's overhead.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MNIST_ROWS = 60000


def vm_hwm_kib():
    """Peak resident set size of this process so far, in KiB (VmHWM from /proc, else getrusage)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def write_synthetic(path, rows, seed=0, block=60000):
    """Write a valid paranet file of `rows` random training rows, in blocks (bounded memory)."""
    import h5py
    import numpy as np
    from paranet.data.prepare import FORMAT_VERSION
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        im = f.create_dataset("train/images", (rows, 28, 28), np.uint8)  # contiguous, as prepare_mnist
        lab = f.create_dataset("train/labels", (rows,), np.uint8)
        for a in range(0, rows, block):
            b = min(rows, a + block)
            im[a:b] = rng.integers(0, 256, (b - a, 28, 28), np.uint8)
            lab[a:b] = rng.integers(0, 10, b - a, np.uint8)
        f.attrs.update({"train_mean": 0.5, "train_std": 0.29, "num_classes": 10, "format_version": FORMAT_VERSION})
    return path


# -- cases, each run in a fresh subprocess ---------------------------------------------------

def case_memory(path, batch_size, size=4):
    """Iterate one epoch as rank 0 of `size`; return baseline and peak VmHWM (KiB)."""
    import numpy as np  # noqa: F401  (part of the baseline)
    from paranet.data import BatchReader
    with BatchReader(path, "train", rank=0, size=size, batch_size=batch_size, prefetch=True) as r:
        base = vm_hwm_kib()
        n = 0
        for b in r.epoch(0):
            n += b.n_local
        return {"baseline_kib": base, "peak_kib": vm_hwm_kib(), "rows": n, "rows_in_file": r.num_samples}


class MLP:
    """A plain numpy 784-128-10 ReLU/softmax MLP, the stand-in for one training step."""

    def __init__(self, rng):
        import numpy as np
        self.w1 = (rng.standard_normal((784, 128)) * 0.05).astype(np.float32)
        self.b1 = np.zeros(128, np.float32)
        self.w2 = (rng.standard_normal((128, 10)) * 0.05).astype(np.float32)
        self.b2 = np.zeros(10, np.float32)

    def step(self, x, y, lr=0.1):
        """One forward + backward + SGD update on x (n, 784), one-hot y (n, 10)."""
        import numpy as np
        n = len(x)
        h = x @ self.w1 + self.b1                  # h: (n, 128)
        a = np.maximum(h, 0)
        z = a @ self.w2 + self.b2                  # z: (n, 10)
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        loss = -np.log(p[y.astype(bool)] + 1e-12).mean()
        dz = (p - y) / n                           # dL/dz of softmax cross-entropy
        dw2, db2 = a.T @ dz, dz.sum(axis=0)
        dh = (dz @ self.w2.T) * (h > 0)
        dw1, db1 = x.T @ dh, dh.sum(axis=0)
        for w, g in ((self.w1, dw1), (self.b1, db1), (self.w2, dw2), (self.b2, db2)):
            w -= lr * g
        return loss


def case_speed(path, batch_size=128, size=4, epochs=2):
    """Time one MLP step, raw shard reads, and the wait on a prefetching reader (rank 0 of size)."""
    import numpy as np
    from paranet.data import BatchReader
    mlp = MLP(np.random.default_rng(0))
    with BatchReader(path, "train", rank=0, size=size, batch_size=batch_size, prefetch=False) as r:
        steps = r.steps_per_epoch
        sample = next(iter(r.epoch(0)))
        x0, y0 = sample.x.reshape(len(sample.x), -1), sample.y
        for _ in range(200):
            mlp.step(x0, y0)
        t = time.perf_counter()
        for _ in range(2000):
            mlp.step(x0, y0)
        t_step = (time.perf_counter() - t) / 2000
        list(r.epoch(1))  # warm the page cache
        t = time.perf_counter()
        for e in range(epochs):
            for b in r.epoch(e):
                pass
        t_read = (time.perf_counter() - t) / (epochs * steps)
    res = {"rows_per_rank": int(len(x0)), "t_step_us": t_step * 1e6, "t_read_us": t_read * 1e6}
    for prefetch in (False, True):  # the training loop itself: wait for a batch, then step
        name = "prefetch" if prefetch else "no_prefetch"
        with BatchReader(path, "train", rank=0, size=size, batch_size=batch_size, prefetch=prefetch) as r:
            waits, n = 0.0, 0
            t_all = time.perf_counter()
            for e in range(epochs):
                it = iter(r.epoch(e))
                while True:
                    t = time.perf_counter()
                    b = next(it, None)
                    waits += time.perf_counter() - t
                    if b is None:
                        break
                    mlp.step(b.x.reshape(b.n_local, -1), b.y)
                    n += 1
            res[f"t_wait_{name}_us"] = waits / n * 1e6
            res[f"t_loop_{name}_us"] = (time.perf_counter() - t_all) / n * 1e6
    return res


def run_case(kind, *args, timeout=600):
    """Run one case in a fresh interpreter with one BLAS thread; return its result dict."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--case", kind, *map(str, args)],
                       env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"bench case {kind} {args} failed:\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None):
    """Run the data benchmark, print a table and return the results as a dict.

    Args:
        argv: command-line arguments (default sys.argv[1:]): --mnist FILE (default:
            datasets/mnist.h5, built in a temporary folder if missing), --scale K (the big
            synthetic file is K x MNIST, default 10), --tmp DIR for the synthetic files.

    Returns:
        {"memory": [{"file_rows", "batch_size", "peak_mib", "peak_above_baseline_mib", ...}, ...],
         "speed": {"t_step_us", "t_read_us", "read_fraction", and for k in (no_prefetch,
                   prefetch): "t_wait_<k>_us", "wait_<k>_fraction", "t_loop_<k>_us",
                   "loop_<k>_overhead_fraction"}}
    """
    p = argparse.ArgumentParser(prog="bench_data", description=__doc__.splitlines()[0])
    p.add_argument("--mnist", default=None, help="MNIST HDF5 file (default: datasets/mnist.h5)")
    p.add_argument("--scale", type=int, default=10, help="size of the big synthetic file, in MNISTs")
    p.add_argument("--tmp", default=None, help="folder for the synthetic files")
    p.add_argument("--case", nargs="+", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = p.parse_args(argv)
    if args.case:
        kind, rest = args.case[0], args.case[1:]
        res = case_memory(rest[0], int(rest[1])) if kind == "memory" else case_speed(rest[0])
        print(json.dumps(res))
        return res

    sys.path.insert(0, str(REPO))
    from paranet.data import default_data_path, prepare_mnist
    results = {"memory": [], "speed": None}
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="paranet-bench-") as tmp:
        mnist = Path(args.mnist) if args.mnist else default_data_path()
        if not mnist.is_file():
            mnist = prepare_mnist(Path(tmp) / "mnist.h5", progress=False)
        speed = run_case("speed", mnist)
        for k in ("read", "wait_no_prefetch", "wait_prefetch"):
            speed[f"{k}_fraction"] = speed[f"t_{k}_us"] / speed["t_step_us"]
        for k in ("no_prefetch", "prefetch"):
            speed[f"loop_{k}_overhead_fraction"] = speed[f"t_loop_{k}_us"] / speed["t_step_us"] - 1.0
        results["speed"] = speed

        for scale in (1, args.scale):
            f = write_synthetic(Path(tmp) / f"synthetic_{scale}x.h5", scale * MNIST_ROWS)
            for bs in (128, 8192):
                m = run_case("memory", f, bs)
                results["memory"].append({
                    "file_rows": m["rows_in_file"], "file_mib": f.stat().st_size / 2**20, "batch_size": bs,
                    "baseline_mib": m["baseline_kib"] / 1024, "peak_mib": m["peak_kib"] / 1024,
                    "peak_above_baseline_mib": (m["peak_kib"] - m["baseline_kib"]) / 1024})
            f.unlink()

    print("paranet.data — per-rank peak memory over one epoch (rank 0 of 4, prefetch on)")
    print(f"{'file rows':>10} {'file MiB':>9} {'batch':>6} {'baseline MiB':>13} {'peak MiB':>9} {'peak-base MiB':>14}")
    for m in results["memory"]:
        print(f"{m['file_rows']:>10} {m['file_mib']:>9.0f} {m['batch_size']:>6} {m['baseline_mib']:>13.1f} "
              f"{m['peak_mib']:>9.1f} {m['peak_above_baseline_mib']:>14.2f}")
    s = results["speed"]
    print(f"\nparanet.data — read time vs one MLP step (784-128-10, {s['rows_per_rank']} rows a rank = "
          f"batch 128 over 4 ranks, 1 BLAS thread)")
    print(f"  MLP step (forward+backward+SGD)      {s['t_step_us']:8.1f} us")
    print(f"  read one rank's share, no prefetch   {s['t_read_us']:8.1f} us  = {100 * s['read_fraction']:5.1f} % of a step")
    for k, label in (("no_prefetch", "no prefetch"), ("prefetch", "prefetch thread")):
        print(f"  in the step loop, {label:15s} wait {s[f't_wait_{k}_us']:8.1f} us  = "
              f"{100 * s[f'wait_{k}_fraction']:5.1f} % of a step; loop {s[f't_loop_{k}_us']:6.1f} us/step "
              f"= {100 * s[f'loop_{k}_overhead_fraction']:+5.1f} % over the bare step")
    return results


if __name__ == "__main__":
    main()
