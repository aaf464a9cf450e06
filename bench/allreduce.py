"""``mpiexec -n P python -m bench.allreduce``: MPI_Allreduce against paranet's shared-memory sum.

Both sum the same float32 buffer (default: the MLP's gradients and tail, 101,774 values),
MPI in place, the shared-memory sum into shared memory where the trainer reads it; they
alternate in blocks, every rank rewriting its buffer before each call as backward
does. First both are checked against a sum of every rank's buffer computed in rank order with
numpy (the shared-memory sum must match it bit for bit). Rank 0 prints one line per size, and
a ``BENCH_JSON`` line.
"""
import argparse
import json
import statistics
import sys
import time

import numpy as np

from paranet.distributed import MPI, SharedMemoryAllreduce

JSON_TAG = "BENCH_JSON "


def check(comm, shm, n, rng):
    """The shared-memory sum equals numpy's rank-order sum exactly; MPI's within float32 rounding."""
    x = rng.standard_normal(n).astype(np.float32)
    ref = np.zeros(n, np.float32)
    for y in comm.allgather(x):
        ref += y
    shm.buffer[...] = x
    total = shm.allreduce()
    buf = x.copy()
    comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    if not np.array_equal(total, ref):
        raise SystemExit(f"bench.allreduce: rank {comm.rank}: shared-memory sum differs from numpy's by "
                         f"{np.abs(total - ref).max():g}")
    return float(np.abs(buf - ref).max())


def timed(comm, fill, call, calls):
    """Mean seconds of one call on the slowest rank, each call after ``fill()`` (untimed)."""
    total = 0.0
    for _ in range(calls):
        fill()
        comm.Barrier()
        t = time.perf_counter()
        call()
        total += time.perf_counter() - t
    return comm.allreduce(total, op=MPI.MAX) / calls


def main(argv=None):
    p = argparse.ArgumentParser(prog="bench.allreduce", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[101774], help="float32 values per buffer")
    p.add_argument("--calls", type=int, default=200, help="calls per timed block")
    p.add_argument("--blocks", type=int, default=5, help="timed blocks of each, alternating")
    args = p.parse_args(argv)
    comm = MPI.COMM_WORLD
    rng = np.random.default_rng(comm.rank)
    rows = []
    for n in args.sizes:
        shm = SharedMemoryAllreduce(comm, n, np.float32)
        mpi_err = check(comm, shm, n, rng)
        buf = np.empty(n, np.float32)
        contenders = {"mpi": (lambda: buf.fill(1.0), lambda: comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)),
                      "shm": (lambda: shm.buffer.fill(1.0), shm.allreduce)}
        for fill, call in contenders.values():  # warm-up
            timed(comm, fill, call, 20)
        times = {k: [timed(comm, f, c, args.calls) for _ in range(args.blocks)] for k, (f, c) in contenders.items()}
        row = {"ranks": comm.size, "values": n, "bytes": 4 * n, "mpi_us": statistics.median(times["mpi"]) * 1e6,
               "shm_us": statistics.median(times["shm"]) * 1e6, "mpi_max_abs_err": mpi_err}
        row["mpi_over_shm"] = row["mpi_us"] / row["shm_us"]
        rows.append(row)
        shm.close()
        if comm.rank == 0:
            print(f"P={comm.size:<3} {4 * n:>10,} B  MPI_Allreduce {row['mpi_us']:9.1f} us  shared memory "
                  f"{row['shm_us']:9.1f} us  ({row['mpi_over_shm']:.2f}x)", flush=True)
    if comm.rank == 0:
        print(JSON_TAG + json.dumps({"library": MPI.Get_library_version().splitlines()[0], "rows": rows}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
