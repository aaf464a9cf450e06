"""``python -m bench.reproducible``: what ``--reproducible`` (paranet/reproducible.py) costs and how accurate it is.

Parts (all by default; pick some with flags):
  --gemm-check  does a row's GEMM result depend on how many rows the GEMM holds, or on the BLAS
                thread count? (why each micro-shard gets its own forward/backward)
  --accuracy    real gradients: MNIST MLP micro-shard partials at batch 128 (and 1024) after a few
                Adam steps; the error of the ordered sum, of the exact sum and of today's float sum
                against math.fsum of the same partials, largest and median element error, float32
                and float64
  --cost        the exact sum's own cost per micro-shard for the 101,770-parameter MLP (copy,
                exponent, conversion and int64 accumulation) and per step (back to floats)
  --throughput  training samples/s without --reproducible, with it (the ordered sum) and with
                --reproducible exact, side by side in one ``mpiexec -n P`` run per case: P = 1,
                2, 4; batch 128 and 1024; MLP and CNN

Prints a table and one ``BENCH_JSON {...}`` line.
"""
import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from paranet import reproducible as rp  # noqa: E402

JSON_TAG = "BENCH_JSON "


def _one_thread():
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(1)
    except ImportError:
        pass


# -- GEMM row and thread dependence ------------------------------------------------------------

def gemm_check():
    """Rows of X @ W computed in GEMMs of different row counts (and 1 vs 2 BLAS threads),
    compared bit for bit with the same rows inside a 1024-row GEMM at one thread."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    out = {}
    for dt in (np.float32, np.float64):
        X = rng.standard_normal((1024, 784)).astype(dt)
        W = rng.standard_normal((784, 128)).astype(dt)
        with threadpool_limits(1):
            ref = X @ W
        rows_differ, threads_differ = [], []
        for rows in (1, 8, 16, 32, 64, 128, 1000):
            with threadpool_limits(1):
                one = X[:rows] @ W
            with threadpool_limits(2):
                two = X[:rows] @ W
            if not np.array_equal(one, ref[:rows]):
                rows_differ.append(rows)
            if not np.array_equal(one, two):
                threads_differ.append(rows)
        out[np.dtype(dt).name] = {"row_counts_differing_from_1024": rows_differ,
                                  "row_counts_differing_1_vs_2_threads": threads_differ}
    return out


# -- accuracy on real gradients ----------------------------------------------------------------

def _mnist(n):
    from paranet.data import BatchReader, default_data_path

    with BatchReader(default_data_path(), "train", batch_size=n, seed=0, prefetch=False) as r:
        return next(iter(r.epoch(0)))


def micro_partials(dtype, batch, micro, steps_before=(0, 20, 200)):
    """Per micro-shard mean gradients (float partials, one row each) of the MNIST MLP on one
    batch, after ``s`` Adam steps on the whole batch, for each s in ``steps_before``."""
    from paranet.graph import Session
    from paranet.models import mlp
    from paranet.train import AdamOptimizer

    b = _mnist(batch)
    m = mlp(rng=np.random.default_rng(0))
    sess = Session(dtype, check_finite=False)
    opt = AdamOptimizer(1e-3, m.loss)
    plan = sess.plan(m.loss)
    params = plan.params
    x, y = m.input(b.x).astype(dtype), b.y.astype(dtype)
    done, out = 0, {}
    for target in steps_before:
        while done < target:
            sess.run(opt, {m.x: x, m.y: y})
            done += 1
        rows = []
        for k in range(rp.num_micro_shards(batch, micro)):
            lo, n = rp.micro_shard(batch, micro, k)
            sess.forward(plan, {m.x: x[lo:lo + n], m.y: y[lo:lo + n]})
            sess.backward(plan)
            rows.append((params.grads.copy(), n))
        out[target] = rows
    return out


def sum_errors(partials, dtype, ranks):
    """Errors of the global mean gradient sum_k (n_k / N) g_k, element-wise against math.fsum:
    the exact sum's, and today's float sum's (each of ``ranks`` ranks holds a run of the
    partials as one float gradient, weighted by n_i P / N in the training dtype, summed over
    ranks in rank order in the training dtype, times 1 / P)."""
    dt = np.dtype(dtype)
    g = np.stack([p for p, _ in partials]).astype(np.float64)  # exact copies of the float partials
    w = np.array([n for _, n in partials], np.float64)
    N = w.sum()
    if dt == np.float64:  # fsum of the products n_k g_k split exactly (Dekker): exact to ~2**-100
        exact = _exact_mean_f64(g, w)
    else:  # float32 partials times w/N (a power of two here, else one float64 rounding, 2**-53)
        exact = np.array([math.fsum(col) for col in (g * (w[:, None] / N)).T])
    repro = _repro_as_trained(partials, dt, N)
    ordered = _ordered_as_trained(partials, dt, N)
    # today: rank i's gradient is the float mean over its rows (a GEMM's float sum), here its
    # micro-shards' partials added in the training dtype; weighted by n_i P / N in that dtype,
    # summed over the ranks in rank order, times 1 / P: as DistributedOptimizer does
    micro = partials[0][1]
    runs = [rp.local_micro_shards(int(N), r, ranks, micro) for r in range(ranks)]
    total = np.zeros(g.shape[1], dt)
    for run in runs:
        if len(run) == 0:
            continue
        n_i = sum(partials[k][1] for k in run)
        local = np.zeros(g.shape[1], dt)
        for k in run:  # the rank's mean over its rows, from its micro-shard means
            local += partials[k][0] * dt.type(partials[k][1] / n_i)
        local *= dt.type(n_i * ranks / N)
        total += local
    today = total * dt.type(1.0 / ranks)
    e_today = np.abs(today.astype(np.float64) - exact)
    e_repro = np.abs(repro.astype(np.float64) - exact)
    e_ordered = np.abs(ordered.astype(np.float64) - exact)
    return {"max_today": float(e_today.max()), "median_today": float(np.median(e_today)),
            "max_repro": float(e_repro.max()), "median_repro": float(np.median(e_repro)),
            "max_ordered": float(e_ordered.max()), "median_ordered": float(np.median(e_ordered)),
            "max_abs_grad": float(np.abs(exact).max()), "partials": len(partials)}


def _repro_as_trained(partials, dt, N):
    """The mean gradient the reproducible optimizer applies: int64 sum to floats (one rounding),
    then times 1/N in the training dtype, as the optimizer does with its grad_scale."""
    arrays = [p for p, _ in partials]
    weights = [n for _, n in partials]
    e = rp.exponent_of(arrays)
    fp = rp.FixedPoint(arrays[0].size, words=rp.words_for(arrays[0].dtype))
    fp.start(rp.fraction_bits(e, sum(weights)), sum(weights))
    fp.zero()
    for a, n in zip(arrays, weights):
        fp.add(a, n)
    fp.settle()
    out = fp.to_float(fp.acc, np.empty(arrays[0].size, dt))
    return out * dt.type(1.0 / N)


def _ordered_as_trained(partials, dt, N):
    """The mean gradient the ordered reproducible sum applies: each partial times rows / m in
    the training dtype, added along the micro-shard tree in that dtype, then times m / N as the
    optimizer does with its grad_scale."""
    micro = partials[0][1]
    rows = np.stack([p if n == micro else p * dt.type(n / micro) for p, n in partials]).astype(dt)
    out = rp.ordered_sum(rows, np.empty(rows.shape[1], dt))
    return out * dt.type(micro / N)


def _two_prod(a, b):
    """a * b = p + e exactly (Dekker/Veltkamp, float64 arrays)."""
    p = a * b
    split = 134217729.0  # 2**27 + 1
    def parts(x):
        c = split * x
        hi = c - (c - x)
        return hi, x - hi
    ah, al = parts(a)
    bh, bl = parts(b)
    e = ((ah * bh - p) + ah * bl + al * bh) + al * bl
    return p, e


def _exact_mean_f64(g, w):
    """sum_k w_k g_k / N for float64 partials, correctly rounded (fsum of exact products)."""
    N = w.sum()
    p, e = _two_prod(g, np.broadcast_to(w[:, None], g.shape))
    sums = np.array([math.fsum(np.concatenate([p[:, j], e[:, j]])) for j in range(g.shape[1])])
    return sums / N


def accuracy(batches=(128, 1024), rank_counts=(2, 4), dtypes=("float32", "float64"), steps=(0, 20, 200)):
    rows = []
    for dtype in dtypes:
        for batch in batches:
            micro = rp.micro_size(batch)
            by_step = micro_partials(np.dtype(dtype), batch, micro, steps)
            for step, partials in by_step.items():
                for ranks in rank_counts:
                    r = sum_errors(partials, dtype, ranks)
                    r.update(dtype=dtype, batch=batch, micro=micro, step=step, ranks=ranks)
                    rows.append(r)
    return rows


# -- cost of the exact sum ---------------------------------------------------------------------

def cost(n=101770, micro_shards=4, repeats=200):
    """Microseconds per micro-shard (copy out of the gradient buffer, exponent, conversion and
    int64 add) and per step (back to float32), for n float32 parameters."""
    rng = np.random.default_rng(0)
    grads = (rng.standard_normal(n) * 1e-3).astype(np.float32)
    stash = np.empty((micro_shards, n), np.float32)
    fp = rp.FixedPoint(n)
    out = np.empty(n, np.float32)

    def per_step():
        for k in range(micro_shards):
            np.copyto(stash[k], grads)
        e = rp.exponent_of(list(stash))
        fp.start(rp.fraction_bits(e, 32 * micro_shards), 32 * micro_shards)
        for k in range(micro_shards):
            fp.add(stash[k], 32)
        fp.settle()
        fp.to_float(fp.acc, out)

    def back():
        fp.to_float(fp.acc, out)

    def timed(f):
        f()
        ts = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(repeats):
                f()
            ts.append((time.perf_counter() - t) / repeats)
        return min(ts) * 1e6

    step_us, back_us = timed(per_step), timed(back)
    return {"parameters": n, "micro_shards": micro_shards, "per_micro_shard_us": (step_us - back_us) / micro_shards,
            "back_to_float_us": back_us}


# -- throughput ------------------------------------------------------------------------------

def throughput(args):
    """One ``mpiexec -n P python -m bench.reproducible --worker`` run per case."""
    import subprocess

    from bench.suite import mpiexec_for, worker_env

    rows = []
    for model in args.models:
        for batch in args.batches:
            for ranks in args.procs:
                cmd = [*mpiexec_for(sys.executable), "-n", str(ranks), sys.executable, "-m", "bench.reproducible",
                       "--worker", "--model", model, "--batch", str(batch), "--repeats", str(args.repeats),
                       "--samples", str(args.samples if model == "mlp" else args.samples // 8), "--dtype", args.dtype]
                p = subprocess.run(cmd, cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=900)
                line = next((ln for ln in p.stdout.splitlines() if ln.startswith(JSON_TAG)), None)
                if p.returncode or line is None:
                    raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
                rows.append(json.loads(line[len(JSON_TAG):]))
                r = rows[-1]
                print(f"  {model} P={ranks} batch {batch}: plain {r['plain']:,.0f}/s, reproducible "
                      f"{r['reproducible']:,.0f}/s, ratio {r['ratio']:.3f}; exact {r['exact']:,.0f}/s, "
                      f"ratio {r['ratio_exact']:.3f}", flush=True)
    return rows


def worker(args):
    """Under mpiexec: the trainer's step with and without reproducible, alternating segments.

    Each contender has its own World (a duplicate of COMM_WORLD), so that each gets its own
    shared-memory sum, and its own reader (the reproducible one hands out whole micro-shards)."""
    from mpi4py import MPI

    from paranet import distributed
    from paranet.data import BatchReader, default_data_path
    from paranet.graph import Session
    from paranet.models import MODELS
    from paranet.train import GradientDescentOptimizer

    distributed.init(allreduce="auto", threads=1)
    contenders = {}
    for name, repro in (("plain", False), ("reproducible", "ordered"), ("exact", "exact")):
        world = distributed.World(comm=MPI.COMM_WORLD.Dup(), allreduce="auto")
        model = MODELS[args.model](rng=np.random.default_rng(0))
        sess = Session(args.dtype, check_finite=False)
        dopt = distributed.DistributedOptimizer(GradientDescentOptimizer(0.01, model.loss), world=world, reproducible=repro)
        dopt.broadcast_state(sess.parameters(model.loss))
        reader = BatchReader(default_data_path(), "train", rank=world.rank, size=world.size, batch_size=args.batch,
                             prefetch=False, dtype=args.dtype, micro_shards=bool(repro))
        it = iter(reader.epoch(0))
        batches = [next(it) for _ in range(4)]
        contenders[name] = (world, model, sess, dopt, batches)

    def one_step(model, sess, dopt, b):  # as paranet.trainer.Trainer.step does it
        plan = sess.plan(model.loss)
        feed = {model.x: model.input(b.x), model.y: b.y}
        if dopt.reproducible:
            return dopt.reproducible_step(sess, plan, feed, b.n_global)
        loss_sum = 0.0
        if b.n_local:
            sess.forward(plan, feed)
            sess.backward(plan)
            loss_sum = float(model.loss.value) * b.n_local
        return dopt.reduce_and_apply(plan.params, b.n_local, loss_sum, 0, 0, total=b.n_global)

    def segment(name, nsteps):
        world, model, sess, dopt, batches = contenders[name]
        world.barrier()
        t = time.perf_counter()
        for i in range(nsteps):
            one_step(model, sess, dopt, batches[i % len(batches)])
        world.barrier()
        return time.perf_counter() - t

    steps = max(3, round(args.samples / args.batch))
    rates = {k: [] for k in contenders}
    for name in contenders:  # warm-up
        segment(name, 3)
    for _ in range(args.repeats):
        for name in contenders:
            rates[name].append(steps * args.batch / segment(name, steps))
    world = contenders["plain"][0]
    if world.rank == 0:
        plain, repro = statistics.median(rates["plain"]), statistics.median(rates["reproducible"])
        exact = statistics.median(rates["exact"])
        print(JSON_TAG + json.dumps({"model": args.model, "dtype": args.dtype, "ranks": world.size, "batch": args.batch, "plain": plain,
                                     "reproducible": repro, "ratio": repro / plain, "exact": exact,
                                     "ratio_exact": exact / plain, "micro": rp.micro_size(args.batch)}), flush=True)
    for world, *_ in contenders.values():
        world.close()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gemm-check", action="store_true")
    p.add_argument("--accuracy", action="store_true")
    p.add_argument("--cost", action="store_true")
    p.add_argument("--throughput", action="store_true")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--batches", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--models", nargs="+", default=["mlp", "cnn"])
    p.add_argument("--repeats", type=int, default=5, help="timed segments per contender")
    p.add_argument("--samples", type=int, default=8192, help="samples per timed segment (MLP; CNN an eighth)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="the training dtype (--throughput)")
    p.add_argument("--quick", action="store_true", help="fewer repeats and samples")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default="mlp", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=128, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:  # make bench --quick: the MLP only, and accuracy at batch 128 in float32
        args.repeats, args.samples, args.models = 2, 2048, ["mlp"]
    if args.worker:
        return worker(args)
    _one_thread()
    parts = [k for k in ("gemm_check", "accuracy", "cost", "throughput") if getattr(args, k)] or \
        ["gemm_check", "accuracy", "cost", "throughput"]
    result = {}
    if "gemm_check" in parts:
        result["gemm_check"] = g = gemm_check()
        print("GEMM row results vs the same rows in a 1024-row GEMM (1 thread), and 1 vs 2 threads:")
        for dt, r in g.items():
            print(f"  {dt}: rows differ at GEMM row counts {r['row_counts_differing_from_1024']}; "
                  f"1 vs 2 threads differ at {r['row_counts_differing_1_vs_2_threads']}")
    if "accuracy" in parts:
        result["accuracy"] = rows = accuracy(**({"batches": (128,), "dtypes": ("float32",), "steps": (0, 20)}
                                                 if args.quick else {}))
        print("\nmean-gradient error against math.fsum of the partials (MNIST MLP, micro-shard partials):")
        print(f"{'dtype':>8} {'batch':>5} {'m':>4} {'step':>4} {'P':>2} {'max |g|':>9} {'max today':>10} {'max ordrd':>10} "
              f"{'max exact':>10} {'med today':>10} {'med ordrd':>10} {'med exact':>10}")
        for r in rows:
            print(f"{r['dtype']:>8} {r['batch']:>5} {r['micro']:>4} {r['step']:>4} {r['ranks']:>2} {r['max_abs_grad']:9.2e} "
                  f"{r['max_today']:10.2e} {r['max_ordered']:10.2e} {r['max_repro']:10.2e} {r['median_today']:10.2e} "
                  f"{r['median_ordered']:10.2e} {r['median_repro']:10.2e}")
    if "cost" in parts:
        result["cost"] = c = cost()
        print(f"\nexact sum's cost, {c['parameters']:,} float32 parameters: {c['per_micro_shard_us']:.0f} µs per "
              f"micro-shard (copy, exponent, to int64, add), {c['back_to_float_us']:.0f} µs per step back to float32")
    if "throughput" in parts:
        print(f"\nthroughput, samples/s, median of segments alternating in one run (SGD, {args.dtype}):")
        result["throughput"] = throughput(args)
    print(JSON_TAG + json.dumps(result))
    return result


# -- the README's tables (python -m bench.readme_tables rewrites them from bench.json) ------------

def _e(v):
    """1.5e-8 as the README writes errors (no exponent padding); 0 as 0."""
    return "0" if v == 0 else f"{v:.1e}".replace("e-0", "e-").replace("e+0", "e+")


def markdown_accuracy(results):
    """The README's accuracy table (``--accuracy``) at the largest P measured: the largest
    gradient element, and the largest and median element errors of today's sum and the exact one."""
    rows = results.get("accuracy")
    if not rows:
        return None
    ranks = max(r["ranks"] for r in rows)
    lines = ["| dtype | batch | m | step | largest \\|g\\| | max error: today | ordered | exact "
             "| median error: today | ordered | exact |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["ranks"] == ranks:
            lines.append(f"| {r['dtype']} | {r['batch']} | {r['micro']} | {r['step']} | {_e(r['max_abs_grad'])} | "
                         f"{_e(r['max_today'])} | {_e(r['max_ordered'])} | {_e(r['max_repro'])} | "
                         f"{_e(r['median_today'])} | {_e(r['median_ordered'])} | {_e(r['median_repro'])} |")
    return "\n".join(lines)


def markdown_throughput(results):
    """The README's cost table (``--throughput``): reproducible / plain samples/s for each model,
    dtype and batch (rows) at each P (columns)."""
    rows = results.get("throughput")
    if not rows:
        return None
    procs = sorted({r["ranks"] for r in rows})
    table = {}  # (model, dtype, batch, m) -> {P: row}, in the order measured
    for r in rows:
        table.setdefault((r["model"], r["dtype"], r["batch"], r["micro"]), {})[r["ranks"]] = r
    lines = ["| model, dtype | batch | m | " + " | ".join(f"ordered, P = {p}" for p in procs) + " | "
             + " | ".join(f"exact, P = {p}" for p in procs) + " |",
             "|---|---:|---:|" + "---:|" * (2 * len(procs))]
    for (model, dtype, batch, micro), by_p in table.items():
        cells = [f"{by_p[p]['ratio']:.2f}" if p in by_p else "" for p in procs]
        cells += [f"{by_p[p]['ratio_exact']:.2f}" if p in by_p and "ratio_exact" in by_p[p] else "" for p in procs]
        lines.append(f"| {model.upper()} {dtype} | {batch} | {micro} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
