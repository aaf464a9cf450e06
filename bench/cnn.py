"""CNN benchmark: paranet's CNN step against the same network in PyTorch CPU, and its compute limit.

``python -m bench.cnn`` (also run by ``make bench``) starts one ``mpiexec -n P python -m bench.cnn
--worker`` run per rank count P (default 1 and 2), one BLAS / torch thread a rank. The network is
paranet.models.cnn on MNIST-shaped input (N, 1, 28, 28) float32: conv 5x5 16 - ReLU - max-pool 2 -
conv 5x5 32 - ReLU - max-pool 2 - fc 128 - ReLU - fc 10, softmax cross-entropy, plain SGD. The
global batch is ``--batch`` (default 128) at every P, split evenly over the ranks (64 a rank at
P = 2), so the rows compare the same optimisation step. Contenders, alternating segment by segment
(rotated each repeat, after an untimed warm-up; the medians of the per-repeat figures):

- ``paranet``: the trainer's step: ``Session.forward`` and ``Session.backward`` of the model's loss,
  then ``DistributedOptimizer(GradientDescentOptimizer).reduce_and_apply`` (sum over the ranks, update);
- ``torch``: the same network, ``torch.set_num_threads(1)``, ``torch.optim.SGD``, wrapped in
  ``DistributedDataParallel`` over gloo where P > 1; skipped with a note where torch does not import
  in ``--python``;
- ``gemm``: only the step's GEMMs at the local batch, every rank running them at once: conv
  forward (O, C*kh*kw) @ (C*kh*kw, n*Ho*Wo), its kernel gradient (O, n*Ho*Wo) @ (n*Ho*Wo, C*kh*kw)
  and input gradient (C*kh*kw, O) @ (O, n*Ho*Wo) (not for the first conv, whose input needs none),
  and the dense layers' three GEMMs likewise, with np.matmul in float32. Its time is the compute
  limit: the step's FLOPs at the single-core sgemm rate measured at those shapes.

Targets (issue 13, target 2): paranet >= 2x torch, and >= 50% of the limit, at P = 1 and 2.
The per-op breakdown of one paranet step (rank 0) is printed too. Results: bench/results/cnn.json.
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
JSON_TAG = "BENCH_JSON "
TARGET_TORCH = 2.0
TARGET_LIMIT = 0.50
SAMPLE_SHAPE, NUM_CLASSES = (1, 28, 28), 10
_clock = time.perf_counter


# -- the network's GEMMs: FLOPs and the limit ----------------------------------------------------

def gemm_shapes(model, n):
    """(name, m, k, n) of every GEMM of one training step of ``model`` at local batch ``n``,
    in the fat one-GEMM-per-layer form; gradients only where the trainer computes them."""
    from paranet.nn.conv import Conv2DOp
    from paranet.nn.dense import Dense

    from paranet.graph import topological_order

    shapes = []
    for op in topological_order(model.loss):
        if isinstance(op, Conv2DOp):
            O, C, kh, kw = op.last[1].shape
            ckk, cols = C * kh * kw, n * op.shape[2] * op.shape[3]
            shapes += [(f"{op.name} fwd", O, ckk, cols), (f"{op.name} dK", O, cols, ckk)]
            if op.last[0].requires_grad:
                shapes.append((f"{op.name} dx", ckk, O, cols))
        elif isinstance(op, Dense):
            k, m = op.last[1].shape
            shapes += [(f"{op.name} fwd", n, k, m), (f"{op.name} dW", k, n, m)]
            if op.last[0].requires_grad:
                shapes.append((f"{op.name} dx", n, m, k))
    return shapes


def step_flop(model, n):
    """Floating-point operations of the step's GEMMs (2 m k n each) at local batch ``n``."""
    return sum(2 * m * k * c for _, m, k, c in gemm_shapes(model, n))


class Gemms:
    """The step's GEMMs at the local batch, nothing else (operands made once)."""

    name = "gemm"

    def __init__(self, model, n, seed=1):
        rng = np.random.default_rng(seed)
        self.shapes = gemm_shapes(model, n)
        self.ops = [(rng.random((m, k), dtype=np.float32), rng.random((k, c), dtype=np.float32),
                     np.empty((m, c), np.float32)) for _, m, k, c in self.shapes]
        self.flop = sum(2 * m * k * c for _, m, k, c in self.shapes)

    def step(self, *_):
        for a, b, c in self.ops:
            np.matmul(a, b, out=c)


# -- the contenders -----------------------------------------------------------------------------

def make_batches(n, count, seed):
    """``count`` synthetic batches of ``n`` rows: x in [0, 1) (n, 1, 28, 28) float32, one-hot y
    (n, 10) float32 and the integer labels (n,) int64 (for torch)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        x = rng.random((n, *SAMPLE_SHAPE), dtype=np.float32)
        labels = rng.integers(0, NUM_CLASSES, n)
        out.append((x, np.eye(NUM_CLASSES, dtype=np.float32)[labels], labels.astype(np.int64)))
    return out


class Paranet:
    """The trainer's step on the built-in CNN: forward, backward, distributed SGD update."""

    name = "paranet"

    def __init__(self, world, lr, seed=0):
        from paranet.distributed import DistributedOptimizer
        from paranet.graph import Session
        from paranet.models import cnn
        from paranet.train import GradientDescentOptimizer

        self.world = world
        self.model = cnn(SAMPLE_SHAPE, NUM_CLASSES, rng=np.random.default_rng(seed))
        self.session = Session(np.float32, check_finite=False)  # as the trainer: uint8-sourced feeds
        self.plan = self.session.plan(self.model.loss)
        self.params = self.plan.params
        self.opt = DistributedOptimizer(GradientDescentOptimizer(lr, self.model.loss), world)

    def step(self, x, y, _labels=None):
        m, n = self.model, x.shape[0]
        self.session.forward(self.plan, {m.x: x, m.y: y})
        self.session.backward(self.plan)
        self.opt.reduce_and_apply(self.params, n, float(m.loss.value) * n, 0, False, total=n * self.world.size)

    def named(self):
        return {name: v.value for name, v in self.params.named()}


class Torch:
    """The same CNN in PyTorch, one thread; DistributedDataParallel over gloo when P > 1."""

    name = "torch"

    def __init__(self, values, lr, comm):
        import torch

        torch.set_num_threads(1)
        self.torch = torch
        nn = torch.nn
        self.net = nn.Sequential(nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 5), nn.ReLU(),
                                 nn.MaxPool2d(2), nn.Flatten(), nn.Linear(512, 128), nn.ReLU(), nn.Linear(128, 10))
        with torch.no_grad():  # paranet's Dense holds W (in, out); torch's Linear (out, in)
            for layer, key, t in ((0, "conv1", False), (3, "conv2", False), (7, "fc1", True), (9, "fc2", True)):
                w = values[f"{key}/K" if not t else f"{key}/W"]
                self.net[layer].weight.copy_(torch.from_numpy(np.ascontiguousarray(w.T if t else w)))
                self.net[layer].bias.copy_(torch.from_numpy(values[f"{key}/b"]))
        self.model = self.net
        if comm.Get_size() > 1:
            import torch.distributed as dist
            from torch.nn.parallel import DistributedDataParallel

            port = None
            if comm.Get_rank() == 0:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
            port = comm.bcast(port, root=0)
            if not dist.is_initialized():
                dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=comm.Get_rank(),
                                        world_size=comm.Get_size())
            self.model = DistributedDataParallel(self.net)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr)
        self.loss = nn.CrossEntropyLoss()

    def prepare(self, batches):
        return [(self.torch.from_numpy(x), None, self.torch.from_numpy(lab)) for x, _, lab in batches]

    def step(self, x, _y, labels):
        self.opt.zero_grad(set_to_none=True)
        self.loss(self.model(x), labels).backward()
        self.opt.step()

    def named(self):
        out = {}
        for layer, key, t in ((0, "conv1", False), (3, "conv2", False), (7, "fc1", True), (9, "fc2", True)):
            w = self.net[layer].weight.detach().numpy()
            out[f"{key}/K" if not t else f"{key}/W"] = w.T if t else w
            out[f"{key}/b"] = self.net[layer].bias.detach().numpy()
        return out


def torch_status():
    """None when torch (with torch.distributed) imports, else why not."""
    try:
        import torch
        import torch.distributed as dist
    except ImportError as e:
        return f"torch does not import in {sys.executable}: {e}"
    return None if dist.is_available() else f"torch {torch.__version__} has no torch.distributed"


# -- the worker ---------------------------------------------------------------------------------

def timed_segment(comm, step, batches, steps):
    """Seconds for ``steps`` steps on the slowest rank (ranks start together at a barrier)."""
    from mpi4py import MPI

    comm.Barrier()
    t = _clock()
    for i in range(steps):
        step(*batches[i % len(batches)])
    return comm.allreduce(_clock() - t, op=MPI.MAX)


def op_breakdown(engine, batches, steps):
    """Mean µs per step of each op's forward and backward, the update and the rest (this rank)."""
    acc, undo = {}, []

    def wrap(obj, attr, key):
        fn = getattr(obj, attr)

        def timed(*a, **k):
            t = _clock()
            try:
                return fn(*a, **k)
            finally:
                acc[key] = acc.get(key, 0.0) + (_clock() - t)
        setattr(obj, attr, timed)
        undo.append((obj, attr))

    counts = {}
    for op in engine.plan.ops:
        counts[op.name] = counts.get(op.name, 0) + 1
        label = op.name if counts[op.name] == 1 else f"{op.name}#{counts[op.name]}"
        wrap(op, "forward", f"fwd {type(op).__name__} '{label}'")
        if op.requires_grad:
            wrap(op, "backward", f"bwd {type(op).__name__} '{label}'")
    wrap(engine.opt, "reduce_and_apply", "sum + update (reduce_and_apply)")
    t = _clock()
    for i in range(steps):
        engine.step(*batches[i % len(batches)])
    total = (_clock() - t) / steps * 1e6
    for obj, attr in undo:
        delattr(obj, attr)
    out = {k: v / steps * 1e6 for k, v in acc.items()}
    out["other (Session bookkeeping, feeds)"] = total - sum(out.values())
    return {"steps": steps, "total_us": total, "us": out}


def agreement(args, world, comm, batches):
    """paranet and torch trained 3 steps from the same start on the same data: max |difference|."""
    eng = Paranet(world, args.lr)
    t = Torch(eng.named(), args.lr, comm)
    tb = t.prepare(batches)
    start = {k: v.copy() for k, v in eng.named().items()}
    for i in range(3):
        eng.step(*batches[i % len(batches)])
        t.step(*tb[i % len(tb)])
    a, b = eng.named(), t.named()
    return {"steps": 3, "max_abs_diff": max(float(np.max(np.abs(a[k] - b[k]))) for k in a),
            "paranet_moved": max(float(np.max(np.abs(a[k] - start[k]))) for k in a)}


def worker(args):
    from paranet.distributed import World

    world = World()
    comm = world.comm
    if args.batch % world.size:
        raise SystemExit(f"bench.cnn: --batch {args.batch} does not split evenly over {world.size} ranks")
    n = args.batch // world.size
    batches = make_batches(n, 4, seed=1000 + world.rank)
    engine = Paranet(world, args.lr)
    gemms = Gemms(engine.model, n)
    timed = [(engine.name, engine.step, batches), (gemms.name, gemms.step, [()])]
    why_not = torch_status() if args.torch == "auto" else "--no-torch"
    out = {"ranks": world.size, "batch": args.batch, "local_batch": n, "steps": args.steps, "repeats": args.repeats,
           "warmup": args.warmup, "allreduce": world.allreduce_method,
           "flop_per_step_local": gemms.flop, "flop_per_sample": gemms.flop / n,
           "gemm_shapes": [list(s) for s in gemms.shapes]}
    if why_not is None:
        import torch

        out["torch_version"] = torch.__version__
        out["agreement"] = agreement(args, world, comm, batches)
        t = Torch(engine.named(), args.lr, comm)
        timed.append((t.name, t.step, t.prepare(batches)))
    else:
        out["torch_skipped"] = why_not
    for name, step, data in timed:  # warm-up: buffers, BLAS, DDP buckets, MPI connections
        timed_segment(comm, step, data, args.warmup)
    seconds = {name: [] for name, *_ in timed}
    for r in range(args.repeats):
        k = r % len(timed)
        for name, step, data in timed[k:] + timed[:k]:  # rotated: no contender always goes first
            seconds[name].append(timed_segment(comm, step, data, args.steps))
    out["seconds"] = seconds
    for name in ("paranet", "torch"):
        if name in seconds:
            sps = [args.batch * args.steps / s for s in seconds[name]]
            out[f"{name}_samples_per_s"] = statistics.median(sps)
            out[f"{name}_samples_per_s_all"] = sps
    # the limit: the step's GEMMs alone, at the local shapes, every rank at once (global samples/s)
    out["limit_samples_per_s"] = statistics.median(args.batch * args.steps / s for s in seconds["gemm"])
    out["gemm_gflops"] = statistics.median(gemms.flop * args.steps / s / 1e9 for s in seconds["gemm"])
    # paired ratios (same repeat, adjacent in time); the targets take their medians
    out["paranet_over_limit_paired"] = [g / e for e, g in zip(seconds["paranet"], seconds["gemm"])]
    out["paranet_over_limit"] = statistics.median(out["paranet_over_limit_paired"])
    if "torch" in seconds:
        out["paranet_over_torch_paired"] = [t / e for e, t in zip(seconds["paranet"], seconds["torch"])]
        out["paranet_over_torch"] = statistics.median(out["paranet_over_torch_paired"])
        # the GEMMs alone against torch: the most any implementation of these FLOPs at this sgemm rate could reach
        out["limit_over_torch"] = statistics.median(t / g for g, t in zip(seconds["gemm"], seconds["torch"]))
    if args.profile_steps:
        out["ops"] = op_breakdown(engine, batches, args.profile_steps)
    if world.rank == 0:
        print(JSON_TAG + json.dumps(out), flush=True)
    if "torch" in sys.modules:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


# -- the driver ---------------------------------------------------------------------------------

def run_case(args, ranks):
    from bench.suite import mpiexec_for, run_json

    cmd = [*mpiexec_for(args.python), "-n", str(ranks), args.python, "-m", "bench.cnn", "--worker",
           "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--repeats", str(args.repeats), "--profile-steps", str(args.profile_steps), "--lr", str(args.lr)]
    if args.no_torch:
        cmd.append("--no-torch")
    res = run_json(cmd, timeout=args.case_timeout)
    res["command"] = " ".join(cmd)
    return res


def targets(cases):
    rows = []
    for c in cases:
        rows.append({"target": "cnn over limit", "ranks": c["ranks"], "batch": c["batch"], "want": TARGET_LIMIT,
                     "value": c["paranet_over_limit"],
                     "result": "PASS" if c["paranet_over_limit"] >= TARGET_LIMIT else "FAIL"})
        v = c.get("paranet_over_torch")
        rows.append({"target": "cnn over torch", "ranks": c["ranks"], "batch": c["batch"], "want": TARGET_TORCH,
                     "value": v, "result": "skipped (no torch)" if v is None else "PASS" if v >= TARGET_TORCH else "FAIL"})
    return rows


def report(results):
    cases = results["cases"]
    print(f"\nCNN step (conv5x5x16-pool-conv5x5x32-pool-fc128-fc10, float32 SGD, 1 thread a rank), "
          f"{cases[0]['flop_per_sample'] / 1e6:.2f} MFLOP a sample in its GEMMs")
    print(f"{'P':>2} {'batch':>6} {'paranet/s':>10} {'torch/s':>10} {'limit/s':>10} {'GEMM GF/s':>10} "
          f"{'vs torch':>9} {'of limit':>9}")
    for c in cases:
        t, r = c.get("torch_samples_per_s"), c.get("paranet_over_torch")
        print(f"{c['ranks']:>2} {c['batch']:>6} {c['paranet_samples_per_s']:>10,.0f} "
              f"{'—' if t is None else format(t, ',.0f'):>10} {c['limit_samples_per_s']:>10,.0f} "
              f"{c['gemm_gflops']:>10.1f} {'—' if r is None else format(r, '.2f') + 'x':>9} "
              f"{100 * c['paranet_over_limit']:>8.1f}%")
        if "limit_over_torch" in c:
            print(f"     the GEMMs alone run {c['limit_over_torch']:.2f}x torch's step: the ceiling of paranet / torch "
                  f"at these FLOPs and this sgemm rate")
        if "torch_skipped" in c:
            print(f"     torch skipped: {c['torch_skipped']}")
        if "agreement" in c:
            a = c["agreement"]
            print(f"     paranet vs torch after {a['steps']} SGD steps from the same start: max |diff| "
                  f"{a['max_abs_diff']:.2e} (parameters moved up to {a['paranet_moved']:.2e})")
    for c in cases:
        ops = c.get("ops")
        if ops:
            print(f"\nwhere a paranet step goes at P={c['ranks']} (rank 0, {ops['total_us']:,.0f} µs a step):")
            for k, v in sorted(ops["us"].items(), key=lambda kv: -kv[1]):
                print(f"  {k:<45} {v:>9.1f} µs")
    print(f"\n{'target':<16} {'P':>2} {'batch':>6} {'measured':>9} {'wanted':>7}  result")
    for r in results["targets"]:
        v = r["value"]
        print(f"{r['target']:<16} {r['ranks']:>2} {r['batch']:>6} {'—' if v is None else format(v, '.3f'):>9} "
              f">={r['want']:<5}  {r['result']}")


# -- the README's tables (python -m bench.readme_tables rewrites them from bench.json) ------------

def markdown(results):
    """The README's table: each P's samples/s of paranet, torch and the GEMMs alone, the GEMM
    rate, and the medians of the paired ratios the targets judge."""
    lines = ["| P | global batch | paranet samples/s | torch samples/s | GEMMs-only samples/s | GEMM GFLOP/s "
             "| paranet / torch | paranet / limit | GEMMs only / torch |", "|---|---|---|---|---|---|---|---|---|"]
    for c in results["cases"]:
        t, r, g = c.get("torch_samples_per_s"), c.get("paranet_over_torch"), c.get("limit_over_torch")
        lines.append(f"| {c['ranks']} | {c['batch']} | {c['paranet_samples_per_s']:,.0f} | "
                     f"{'—' if t is None else format(t, ',.0f')} | {c['limit_samples_per_s']:,.0f} | "
                     f"{c['gemm_gflops']:.1f} | {'—' if r is None else format(r, '.2f') + '×'} | "
                     f"{100 * c['paranet_over_limit']:.0f}% | {'—' if g is None else format(g, '.2f') + '×'} |")
    return "\n".join(lines)


_KINDS = {"MaxPoolOp": "pool", "Relu": "ReLU"}


def _phase(key):
    """An op_breakdown key as the README names the phase: "bwd Conv2DOp 'conv2'" -> "conv2 backward",
    "bwd MaxPoolOp 'MaxPoolOp#2'" -> "pool 2 backward"; the other keys as they are."""
    if not key.startswith(("fwd ", "bwd ")):
        return key
    way, cls, label = key.split(" ", 2)
    label = label.strip("'")
    name, _, k = label.partition("#")
    if name == cls:  # an op the model did not name: its kind and its place among its kind
        name = f"{_KINDS.get(cls, cls)} {k or 1}"
    return f"{name} {'forward' if way == 'fwd' else 'backward'}"


def markdown_ops(results, share=0.05):
    """The README's table of where a P = 1 step goes (rank 0, µs a step): the phases that take at
    least ``share`` of the step, largest first, then one row for the rest."""
    case = next((c for c in results["cases"] if c.get("ops") and c["ranks"] == 1), None)
    if case is None:
        return None
    ops = case["ops"]
    big = sorted(((k, v) for k, v in ops["us"].items() if v >= share * ops["total_us"]), key=lambda kv: -kv[1])
    rest = [v for k, v in ops["us"].items() if v < share * ops["total_us"]]
    lines = ["| phase | time (µs) |", "|---|---:|"]
    lines += [f"| {_phase(k)} | {v:,.0f} |" for k, v in big]
    if rest:
        lines.append(f"| everything else ({len(rest)} phases) | under {50 * -int(-max(rest) // 50):,} each |")
    lines.append(f"| **the step** (P = 1, batch {case['batch']}) | **{ops['total_us']:,.0f}** |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.cnn", description=__doc__.splitlines()[0],
                                epilog="\n".join(__doc__.splitlines()[2:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="rank counts P (default 1 2)")
    p.add_argument("--batch", type=int, default=128, help="global batch, split over the ranks (default 128)")
    p.add_argument("--steps", type=int, default=None, help="steps in one timed segment (default 20, quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps of each contender first (default 5, quick 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed segments of each contender (default 7, quick 2)")
    p.add_argument("--profile-steps", type=int, default=None, help="steps of the per-op breakdown (default 20, quick 2)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--quick", action="store_true", help="tiny step counts (a smoke test; figures not meaningful)")
    p.add_argument("--python", default=sys.executable,
                   help="interpreter of the workers, mpiexec beside it; e.g. a venv with torch (and mpi4py, h5py)")
    p.add_argument("--no-torch", action="store_true", help="leave PyTorch out even where it imports")
    p.add_argument("--torch", choices=["auto", "off"], default="auto", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for cnn.json")
    p.add_argument("--case-timeout", type=int, default=600, help="seconds one P may take")
    args = p.parse_args(argv)
    if args.no_torch:
        args.torch = "off"
    for name, full, small in (("steps", 20, 2), ("warmup", 5, 1), ("repeats", 7, 2), ("profile_steps", 20, 2)):
        if getattr(args, name) is None:
            setattr(args, name, small if args.quick else full)
    return args


def main(argv=None):
    """Run P = 1, 2 side by side; print the table; write ``--out``/cnn.json; return the results."""
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = _clock()
    results = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "threads_per_rank": 1, "load_average": {"before": os.getloadavg()[0]}, "cases": []}
    try:
        results["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    for ranks in args.procs:
        print(f"bench.cnn: P={ranks} global batch {args.batch} ...", file=sys.stderr, flush=True)
        results["cases"].append(run_case(args, ranks))
    results["targets"] = targets(results["cases"])
    results["load_average"]["after"] = os.getloadavg()[0]
    results["seconds"] = _clock() - t0
    (args.out / "cnn.json").write_text(json.dumps(results, indent=2))
    report(results)
    print(f"\nwrote {args.out / 'cnn.json'}")
    return results


if __name__ == "__main__":
    out = main()
    sys.exit(out if isinstance(out, int) else 0)
