"""Engine benchmark worker: paranet against a hand-written numpy + mpi4py loop (and PyTorch DDP).

Run under ``mpiexec -n P python -m bench.engine --batch B ...`` (``python -m bench`` does it for
you). Every rank builds the same 784-128-10 float32 MLP three ways and trains it with plain SGD
on the same synthetic data:

- ``engine``: ``Session(check_finite=False).run(model.loss, feed, need_grad=True)`` then
  ``DistributedOptimizer(GradientDescentOptimizer).reduce_and_apply(params, n, loss * n, 0, False,
  total=N)``, exactly as the trainer calls them, with the trainer's default ``--allreduce auto``
  (the shared-memory sum when several ranks share the machine);
- ``engine_mpi``: the same, its gradients summed by MPI_Allreduce like the baseline's, so that
  engine_mpi / baseline is the engine's own overhead (only where ``engine`` uses shared memory);
- ``baseline``: a minimal numpy loop, manual backprop into preallocated buffers, one fused
  in-place Allreduce of the gradient sums and the sample count, then ``w -= lr * g``;
- ``torch``: ``DistributedDataParallel`` over gloo (only where torch imports).

The contenders run interleaved, one timed segment each per repeat (engine, baseline, torch, then
the next repeat in rotated order), after an untimed warm-up. The same run also measures the
pieces of the compute-plus-communication limit (GEMM GFLOP/s at the step's shapes on every rank
at once, and the Allreduce latency of the gradient buffer), and a per-phase breakdown of one
engine and one baseline step. Rank 0 prints the result as one ``BENCH_JSON {...}`` line.
"""
import argparse
import json
import os
import socket
import statistics
import sys
import time

import numpy as np

from bench.bench_data import vm_hwm_kib
from paranet.distributed import MPI, DistributedOptimizer, SharedMemoryAllreduce, World
from paranet.graph import Session
from paranet.models import mlp
from paranet.train import GradientDescentOptimizer

N_IN, N_HID, N_OUT = 784, 128, 10
# forward x@W1, h@W2; backward h.T@dz, dz@W2.T, x.T@dh: 2*(784*128 + 128*10) + 2*784*128 + 2*2*128*10
FLOP_PER_SAMPLE = 2 * (N_IN * N_HID + N_HID * N_OUT) + 2 * N_IN * N_HID + 2 * 2 * N_HID * N_OUT
assert FLOP_PER_SAMPLE == 409088
JSON_TAG = "BENCH_JSON "
_clock = time.perf_counter


def make_batches(n_local, count, seed):
    """``count`` synthetic batches of this rank's ``n_local`` rows: x in [0, 1) (n, 784) float32,
    one-hot y (n, 10) float32 and the integer labels (n,) int64 (for torch)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        x = rng.random((n_local, N_IN), dtype=np.float32)
        labels = rng.integers(0, N_OUT, n_local)
        y = np.zeros((n_local, N_OUT), np.float32)
        y[np.arange(n_local), labels] = 1
        out.append((x, y, labels.astype(np.int64)))
    return out


# -- the contenders -----------------------------------------------------------------------------

class Engine:
    """paranet's path: Session.run with need_grad, then the distributed SGD update."""

    def __init__(self, world, lr, seed=0, name="engine"):
        self.world, self.name = world, name
        self.model = mlp(rng=np.random.default_rng(seed))
        # as the trainer runs it: its uint8-sourced feeds skip the NaN/inf pass
        self.session = Session(np.float32, check_finite=False)
        self.params = self.session.parameters(self.model.loss)
        self.opt = DistributedOptimizer(GradientDescentOptimizer(lr, self.model.loss), world)

    def initial_values(self):
        """{"W1", "b1", "W2", "b2"} copies of the current parameters, the baseline's names."""
        named = dict(self.params.named())
        return {k: named[n].value.copy() for k, n in
                (("W1", "fc1/W"), ("b1", "fc1/b"), ("W2", "fc2/W"), ("b2", "fc2/b"))}

    def step(self, x, y):
        m = self.model
        n = x.shape[0]
        loss = self.session.run(m.loss, {m.x: x, m.y: y}, need_grad=True)
        # as the trainer calls it: the reader tells every rank the global batch size
        self.opt.reduce_and_apply(self.params, n, loss * n, 0, False, total=n * self.world.size)
        return loss

    def flat(self):
        return self.params.values


class Baseline:
    """The minimal hand-written loop the engine is measured against.

    Parameters live in one flat float32 buffer and gradients in another (plus two tail slots,
    the sample count and the loss sum, reduced by the same Allreduce). Backward computes the
    gradient of the *summed* loss; the update divides by the global count: w -= lr/N * sum g.
    """

    name = "baseline"

    def __init__(self, values, n_local, lr, comm=None):
        self.lr, self.comm = lr, comm if comm is not None and comm.Get_size() > 1 else None
        shapes = [("W1", (N_IN, N_HID)), ("b1", (N_HID,)), ("W2", (N_HID, N_OUT)), ("b2", (N_OUT,))]
        sizes = [int(np.prod(s)) for _, s in shapes]
        n = sum(sizes)
        self.w = np.empty(n, np.float32)
        self.gstore = np.zeros(n + 2, np.float32)  # gradient sums, then count and loss sum
        self.g, self.tail = self.gstore[:n], self.gstore[n:]
        self.tmp = np.empty(n, np.float32)
        off = 0
        for (name, shape), size in zip(shapes, sizes):
            setattr(self, name, self.w[off:off + size].reshape(shape))
            setattr(self, "g" + name, self.g[off:off + size].reshape(shape))
            getattr(self, name)[...] = values[name]
            off += size
        b = n_local
        self.h = np.empty((b, N_HID), np.float32)  # relu(x @ W1 + b1)
        self.mask = np.empty((b, N_HID), bool)
        self.dh = np.empty((b, N_HID), np.float32)
        self.z = np.empty((b, N_OUT), np.float32)  # logits, then log-probabilities
        self.p = np.empty((b, N_OUT), np.float32)  # probabilities, then dL/dz
        self.r = np.empty((b, 1), np.float32)  # row max, then log of the row sum

    def step(self, x, y):
        h, z, p, r = self.h, self.z, self.p, self.r
        n = x.shape[0]
        # forward: h = relu(x @ W1 + b1); z = h @ W2 + b2
        np.matmul(x, self.W1, out=h)
        h += self.b1
        np.maximum(h, 0, out=h)
        np.matmul(h, self.W2, out=z)
        z += self.b2
        # log p = z - max - log(sum(exp(z - max))); loss sum = -sum(y * log p)
        np.max(z, axis=1, keepdims=True, out=r)
        z -= r
        np.exp(z, out=p)
        np.sum(p, axis=1, keepdims=True, out=r)
        np.log(r, out=r)
        z -= r
        loss_sum = -float(np.vdot(y, z))
        # backward of the summed loss: dz = p - y; dW2 = h.T dz; dh = dz W2.T [h > 0]; dW1 = x.T dh
        np.exp(z, out=p)
        p -= y
        np.matmul(h.T, p, out=self.gW2)
        np.sum(p, axis=0, out=self.gb2)
        np.matmul(p, self.W2.T, out=self.dh)
        np.greater(h, 0, out=self.mask)
        np.multiply(self.dh, self.mask, out=self.dh)
        np.matmul(x.T, self.dh, out=self.gW1)
        np.sum(self.dh, axis=0, out=self.gb1)
        # one fused Allreduce of gradient sums, count and loss sum; then w -= lr * mean g
        self.tail[0], self.tail[1] = n, loss_sum
        if self.comm is not None:
            self.comm.Allreduce(MPI.IN_PLACE, self.gstore, op=MPI.SUM)
        total = float(self.tail[0])
        np.multiply(self.g, self.lr / total, out=self.tmp)
        self.w -= self.tmp
        return float(self.tail[1]) / total

    def step_phases(self, x, y, acc):
        """``step`` with a timestamp after each phase, added into ``acc`` (phase -> seconds)."""
        h, z, p, r = self.h, self.z, self.p, self.r
        n = x.shape[0]
        t0 = _clock()
        np.matmul(x, self.W1, out=h)
        h += self.b1
        np.maximum(h, 0, out=h)
        np.matmul(h, self.W2, out=z)
        z += self.b2
        t1 = _clock()
        np.max(z, axis=1, keepdims=True, out=r)
        z -= r
        np.exp(z, out=p)
        np.sum(p, axis=1, keepdims=True, out=r)
        np.log(r, out=r)
        z -= r
        loss_sum = -float(np.vdot(y, z))
        np.exp(z, out=p)
        p -= y
        t2 = _clock()
        np.matmul(h.T, p, out=self.gW2)
        np.sum(p, axis=0, out=self.gb2)
        np.matmul(p, self.W2.T, out=self.dh)
        np.greater(h, 0, out=self.mask)
        np.multiply(self.dh, self.mask, out=self.dh)
        np.matmul(x.T, self.dh, out=self.gW1)
        np.sum(self.dh, axis=0, out=self.gb1)
        t3 = _clock()
        self.tail[0], self.tail[1] = n, loss_sum
        if self.comm is not None:
            self.comm.Allreduce(MPI.IN_PLACE, self.gstore, op=MPI.SUM)
        t4 = _clock()
        total = float(self.tail[0])
        np.multiply(self.g, self.lr / total, out=self.tmp)
        self.w -= self.tmp
        t5 = _clock()
        for k, a, b in (("forward (dense, relu)", t0, t1), ("loss fwd+bwd (softmax CE)", t1, t2),
                        ("backward (dense, relu)", t2, t3), ("allreduce", t3, t4), ("update", t4, t5)):
            acc[k] = acc.get(k, 0.0) + (b - a)
        return float(self.tail[1]) / total

    def flat(self):
        return self.w


class TorchDDP:
    """The same MLP in PyTorch, wrapped in DistributedDataParallel over gloo; one thread a rank."""

    name = "torch"

    def __init__(self, values, lr, comm):
        import torch
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        torch.set_num_threads(1)
        self.torch = torch
        rank, size = comm.Get_rank(), comm.Get_size()
        port = None
        if rank == 0:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        port = comm.bcast(port, root=0)
        if not dist.is_initialized():
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
        net = torch.nn.Sequential(torch.nn.Linear(N_IN, N_HID), torch.nn.ReLU(), torch.nn.Linear(N_HID, N_OUT))
        with torch.no_grad():  # Linear holds W.T: (out, in)
            net[0].weight.copy_(torch.from_numpy(values["W1"].T.copy()))
            net[0].bias.copy_(torch.from_numpy(values["b1"]))
            net[2].weight.copy_(torch.from_numpy(values["W2"].T.copy()))
            net[2].bias.copy_(torch.from_numpy(values["b2"]))
        self.net = net
        self.model = DistributedDataParallel(net)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr)
        self.loss = torch.nn.CrossEntropyLoss()  # mean over the local rows; DDP averages over ranks

    def prepare(self, batches):
        """Torch views of the numpy batches (shared memory, made once)."""
        return [(self.torch.from_numpy(x), self.torch.from_numpy(lab)) for x, _, lab in batches]

    def step(self, x, labels):
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(self.model(x), labels)
        loss.backward()
        self.opt.step()
        return loss.item()

    def flat(self):
        n = self.net
        return np.concatenate([n[0].weight.detach().numpy().T.ravel(), n[0].bias.detach().numpy(),
                               n[2].weight.detach().numpy().T.ravel(), n[2].bias.detach().numpy()])


def torch_available():
    try:
        import torch  # noqa: F401
        import torch.distributed as dist
        return dist.is_available()
    except ImportError:
        return False


# -- the limit's pieces -------------------------------------------------------------------------

class Gemms:
    """The step's five GEMMs at the local batch shape, nothing else: the compute part of the limit."""

    def __init__(self, b, seed=1):
        rng = np.random.default_rng(seed)
        f = np.float32
        self.x = rng.random((b, N_IN), dtype=f)
        self.W1, self.W2 = rng.random((N_IN, N_HID), dtype=f), rng.random((N_HID, N_OUT), dtype=f)
        self.h, self.dh = np.empty((b, N_HID), f), np.empty((b, N_HID), f)
        self.z, self.dz = np.empty((b, N_OUT), f), rng.random((b, N_OUT), dtype=f)
        self.gW1, self.gW2 = np.empty((N_IN, N_HID), f), np.empty((N_HID, N_OUT), f)
        self.flop = b * FLOP_PER_SAMPLE

    def step(self, *_):
        np.matmul(self.x, self.W1, out=self.h)
        np.matmul(self.h, self.W2, out=self.z)
        np.matmul(self.h.T, self.dz, out=self.gW2)
        np.matmul(self.dz, self.W2.T, out=self.dh)
        np.matmul(self.x.T, self.dh, out=self.gW1)


class AllreduceOnly:
    """One in-place Allreduce of a buffer the size of the engine's gradient storage, after
    rewriting the buffer as backward does (the rewrite, one memset, is timed with it: without
    it the shared-memory sum would find its peers' rows already in its own cache)."""

    def __init__(self, comm, n):
        self.comm, self.buf = comm, np.zeros(n, np.float32)

    def step(self, *_):
        self.buf.fill(0.0)
        if self.comm.Get_size() > 1:
            self.comm.Allreduce(MPI.IN_PLACE, self.buf, op=MPI.SUM)


class ShmAllreduceOnly:
    """The same through paranet's SharedMemoryAllreduce (where every machine has > 1 rank)."""

    def __init__(self, comm, n):
        self.shm = SharedMemoryAllreduce(comm, n, np.float32)

    def step(self, *_):
        self.shm.buffer.fill(0.0)
        self.shm.allreduce()


# -- the per-phase breakdown of the engine path -------------------------------------------------

class PhaseTimers:
    """Wraps the engine's methods on their instances with timers (the real code path still runs).

    Phases: each placeholder's feed check, each op's forward and backward, the gradient sum
    inside the DistributedOptimizer (split into the wait for the slowest rank and the sum),
    the inner optimizer's update, and the rest of the step (Session.run's and backward's
    Python bookkeeping, plan lookup, the copy of the returned loss) as the difference to the
    step's total.
    """

    def __init__(self, engine):
        self.acc = {}
        self.undo = []
        plan = engine.session.plan(engine.model.loss)
        for ph in plan.placeholders:
            self._wrap(ph, "feed", f"feed check '{ph.name}'")
        for op in plan.ops:
            self._wrap(op, "forward", f"fwd {type(op).__name__} '{op.name}'")
        for op, _ in plan.routes:
            self._wrap(op, "backward", f"bwd {type(op).__name__} '{op.name}'")
        self._wrap_sum(engine.world)
        self._wrap(engine.opt.optimizer, "apply_gradients", "update (inner optimizer)")

    def _wrap(self, obj, attr, key):
        fn = getattr(obj, attr)
        acc = self.acc

        def timed(*a, **k):
            t = _clock()
            try:
                return fn(*a, **k)
            finally:
                acc[key] = acc.get(key, 0.0) + (_clock() - t)

        setattr(obj, attr, timed)
        self.undo.append((obj, attr))

    def _wrap_sum(self, world):
        """The gradient sum, split into the wait for the slowest rank (a barrier just before it)
        and the sum itself, which then starts with every rank present."""
        fn, acc, comm = world.sum_over_ranks, self.acc, world.comm

        def timed(buf):
            t0 = _clock()
            if comm is not None:
                comm.Barrier()
            t1 = _clock()
            try:
                return fn(buf)
            finally:
                t2 = _clock()
                acc["allreduce: waiting for the slowest rank"] = acc.get("allreduce: waiting for the slowest rank", 0.0) + (t1 - t0)
                acc["allreduce: the sum"] = acc.get("allreduce: the sum", 0.0) + (t2 - t1)

        world.sum_over_ranks = timed
        self.undo.append((world, "sum_over_ranks"))

    def remove(self):
        for obj, attr in self.undo:
            try:
                delattr(obj, attr)  # back to the class's method
            except AttributeError:
                pass


def phase_breakdown(engine, baseline, batches, steps):
    """Mean µs per step of each phase, for the engine (instrumented) and the baseline."""
    timers = PhaseTimers(engine)
    t_engine, t_base, acc_base = 0.0, 0.0, {}
    try:
        for i in range(steps):
            x, y, _ = batches[i % len(batches)]
            t = _clock()
            engine.step(x, y)
            t_engine += _clock() - t
            t = _clock()
            baseline.step_phases(x, y, acc_base)
            t_base += _clock() - t
    finally:
        timers.remove()
    eng = {k: v / steps * 1e6 for k, v in timers.acc.items()}
    eng["other (run/backward bookkeeping, grad scaling, copies)"] = t_engine / steps * 1e6 - sum(eng.values())
    base = {k: v / steps * 1e6 for k, v in acc_base.items()}
    base["other (python)"] = t_base / steps * 1e6 - sum(base.values())
    comm = engine.world.comm
    wait = eng.get("allreduce: waiting for the slowest rank", 0.0)
    # every rank's wait: a rank that never waits is the one the others wait for
    waits = comm.allgather(wait) if comm is not None else [wait]
    return {"steps": steps, "wait_us_per_rank": waits, "engine_us": eng, "engine_total_us": t_engine / steps * 1e6,
            "baseline_us": base, "baseline_total_us": t_base / steps * 1e6}


def cprofile_engine(engine, batches, steps, top=25):
    """cProfile of ``steps`` engine steps: the top functions by internal time, as text."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for i in range(steps):
        x, y, _ = batches[i % len(batches)]
        engine.step(x, y)
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(top)
    return s.getvalue()


# -- the run --------------------------------------------------------------------------------------

def timed_segment(comm, step, batches, steps):
    """Seconds for ``steps`` steps on the slowest rank (ranks start together at a barrier)."""
    comm.Barrier()
    t = _clock()
    nb = len(batches)
    for i in range(steps):
        step(*batches[i % nb])
    t = _clock() - t
    return comm.allreduce(t, op=MPI.MAX)


def stepwise(comm, timed, steps):
    """Median seconds of one step of each contender, the contenders alternating step by step.

    Each step's time is the slowest rank's; a step that the OS preempted is an outlier the
    median ignores, which makes this the steadier figure on a machine shared with other work.
    """
    times = {name: np.empty(steps) for name, *_ in timed}
    comm.Barrier()
    for i in range(steps):
        k = i % len(timed)
        for name, step, data, _ in timed[k:] + timed[:k]:
            t = _clock()
            step(*data[i % len(data)])
            times[name][i] = _clock() - t
    for name, arr in times.items():
        comm.Allreduce(MPI.IN_PLACE, arr, op=MPI.MAX)
    return {name: float(np.median(arr)) for name, arr in times.items()}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="bench.engine", description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128, help="global batch, split evenly over the ranks")
    p.add_argument("--steps", type=int, default=100, help="steps in one timed segment")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps of each contender first")
    p.add_argument("--repeats", type=int, default=7, help="timed segments of each contender")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--torch", choices=["auto", "off"], default="auto", help="auto: add PyTorch DDP if it imports")
    p.add_argument("--stepwise", type=int, default=200, help="steps of the step-by-step alternation (0: off)")
    p.add_argument("--profile-steps", type=int, default=50, help="steps of the per-phase breakdown (0: off)")
    p.add_argument("--cprofile", type=int, default=0, metavar="STEPS", help="also cProfile this many engine steps")
    p.add_argument("--check", type=int, default=0, metavar="STEPS",
                   help="instead of timing: train every contender from the same start for STEPS steps "
                        "on the same data and report how far their parameters are apart")
    return p.parse_args(argv)


def build(args, world):
    comm = world.comm if world.comm is not None else MPI.COMM_WORLD
    if args.batch % world.size:
        raise SystemExit(f"bench.engine: --batch {args.batch} does not split evenly over {world.size} ranks")
    n_local = args.batch // world.size
    batches = make_batches(n_local, 4, seed=1000 + world.rank)
    engine = Engine(world, args.lr)
    values = engine.initial_values()
    contenders = [engine, Baseline(values, n_local, args.lr, comm)]
    if world.allreduce_method == "shm":  # the engine's own overhead, measured with the baseline's reduction
        contenders.append(Engine(World(comm, allreduce="mpi"), args.lr, name="engine_mpi"))
    torch_batches = None
    if args.torch == "auto" and torch_available():
        t = TorchDDP(values, args.lr, comm)
        torch_batches = t.prepare(batches)
        contenders.append(t)
    return comm, n_local, batches, torch_batches, contenders


def check(args, world):
    """Train each contender ``args.check`` steps from the same start; max |difference| to the engine."""
    comm, n_local, batches, torch_batches, contenders = build(args, world)
    for c in contenders:
        data = torch_batches if c.name == "torch" else [b[:2] for b in batches]
        for i in range(args.check):
            c.step(*data[i % len(data)])
    ref = contenders[0].flat()
    start = Engine(World(MPI.COMM_SELF), args.lr).flat()  # the common starting point (same seed)
    out = {"steps": args.check, "batch": args.batch, "ranks": world.size,
           "engine_moved": float(np.max(np.abs(ref - start)))}
    for c in contenders[1:]:
        out[f"max_abs_diff_{c.name}"] = float(np.max(np.abs(c.flat() - ref)))
    # the phase-timed baseline step must do what the plain one does
    b2 = Baseline(Engine(World(MPI.COMM_SELF), args.lr).initial_values(), n_local, args.lr, comm)
    for i in range(args.check):
        b2.step_phases(*batches[i % len(batches)][:2], {})
    out["max_abs_diff_baseline_phases"] = float(np.max(np.abs(b2.flat() - ref)))
    digests = comm.allgather(float(np.sum(ref, dtype=np.float64)))
    out["replicas_agree"] = len(set(digests)) == 1
    return out


def measure(args, world):
    comm, n_local, batches, torch_batches, contenders = build(args, world)
    gemms = Gemms(n_local)
    n_grad = contenders[0].params.grad_storage.size
    allreduce = AllreduceOnly(comm, n_grad)
    timed = [(c.name, c.step, torch_batches if c.name == "torch" else [b[:2] for b in batches], args.steps)
             for c in contenders]
    timed.append(("gemm", gemms.step, [()], args.steps))
    ar_calls = max(50, args.steps)
    timed.append(("allreduce", allreduce.step, [()], ar_calls))
    if world.allreduce_method == "shm":
        timed.append(("shm_allreduce", ShmAllreduceOnly(comm, n_grad).step, [()], ar_calls))
    for name, step, data, _ in timed:  # warm-up: allocations, BLAS, DDP buckets, MPI connections
        timed_segment(comm, step, data, args.warmup)
    seconds = {name: [] for name, *_ in timed}
    engine = contenders[0]
    engine.opt.comm_seconds = 0.0  # from here on: the engine's time inside the Allreduce
    for r in range(args.repeats):
        k = r % len(timed)
        for name, step, data, steps in timed[k:] + timed[:k]:  # rotate: no contender always goes first
            seconds[name].append(timed_segment(comm, step, data, steps))
    # the communication share as the trainer reports it: time in the Allreduce call (waiting for
    # the slower rank included) over the engine's training time, the largest over the ranks
    comm_share = comm.allreduce(engine.opt.comm_seconds / sum(seconds["engine"]), op=MPI.MAX)
    out = {"ranks": world.size, "batch": args.batch, "local_batch": n_local, "steps": args.steps,
           "warmup": args.warmup, "repeats": args.repeats, "mpi_library": world.library,
           "contenders": [c.name for c in contenders], "seconds": seconds, "engine_comm_share": comm_share}
    for c in contenders:
        sps = [args.batch * args.steps / t for t in seconds[c.name]]
        out[f"{c.name}_samples_per_s"] = statistics.median(sps)
        out[f"{c.name}_samples_per_s_all"] = sps
    # paired ratios (same repeat, adjacent in time): their spread says how noisy the run was
    out["engine_over_baseline_paired"] = [b / e for e, b in zip(seconds["engine"], seconds["baseline"])]
    if "engine_mpi" in seconds:
        out["engine_mpi_over_baseline_paired"] = [b / e for e, b in zip(seconds["engine_mpi"], seconds["baseline"])]
    if "torch" in seconds:
        out["engine_over_torch_paired"] = [t / e for e, t in zip(seconds["engine"], seconds["torch"])]
    # the limit: GEMM rate of one core at the local shapes, while every rank runs them at once
    gflops = [gemms.flop * args.steps / t / 1e9 for t in seconds["gemm"]]
    out["gemm_gflops"] = statistics.median(gflops)
    out["gemm_gflops_all"] = gflops
    t_ar = statistics.median(t / ar_calls for t in seconds["allreduce"]) if world.size > 1 else 0.0
    out["allreduce_bytes"] = allreduce.buf.nbytes
    out["allreduce_us"] = t_ar * 1e6
    if "shm_allreduce" in seconds:  # the limit takes the faster of the two ways to sum the buffer
        t_shm = statistics.median(t / ar_calls for t in seconds["shm_allreduce"])
        out["shm_allreduce_us"] = t_shm * 1e6
        t_ar = min(t_ar, t_shm)
    t_compute = args.batch * FLOP_PER_SAMPLE / (world.size * out["gemm_gflops"] * 1e9)
    out["limit_samples_per_s"] = args.batch / (t_compute + t_ar)
    out["limit_compute_ms"], out["limit_comm_ms"] = t_compute * 1e3, t_ar * 1e3
    if args.stepwise:
        med = stepwise(comm, timed, args.stepwise)
        sw = {"steps": args.stepwise, "median_step_us": {k: v * 1e6 for k, v in med.items()}}
        for c in contenders:
            sw[f"{c.name}_samples_per_s"] = args.batch / med[c.name]
        sw["engine_over_baseline"] = med["baseline"] / med["engine"]
        if "torch" in med:
            sw["engine_over_torch"] = med["torch"] / med["engine"]
        sw["gemm_gflops"] = gemms.flop / med["gemm"] / 1e9
        t_ar_sw = min(med["allreduce"], med.get("shm_allreduce", np.inf)) if world.size > 1 else 0.0
        sw["limit_samples_per_s"] = args.batch / (args.batch * FLOP_PER_SAMPLE / (world.size * sw["gemm_gflops"] * 1e9) + t_ar_sw)
        out["stepwise"] = sw
    if args.profile_steps:
        out["phases"] = phase_breakdown(contenders[0], contenders[1], batches, args.profile_steps)
    if args.cprofile and world.rank == 0:
        out["cprofile"] = cprofile_engine(contenders[0], batches, args.cprofile)
    out["vm_hwm_kib_per_rank"] = comm.gather(vm_hwm_kib(), root=0)
    return out


def main(argv=None):
    args = parse_args(argv)
    world = World()
    out = check(args, world) if args.check else measure(args, world)
    if world.rank == 0:
        if "torch" in out.get("contenders", ()):
            import torch
            out["torch_version"] = torch.__version__
        out["threads"] = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
        print(JSON_TAG + json.dumps(out), flush=True)
    if "torch" in sys.modules:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
