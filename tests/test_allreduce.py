"""The shared-memory gradient sum under real mpiexec, against numpy's rank-order sum of every
rank's buffer, and the trainer with each way of summing against the single-process run."""
import subprocess
import sys

import numpy as np
import pytest

from launch import MPIEXEC, REPO, env, load_params, max_abs_diff, run_train

pytestmark = pytest.mark.mpi

WORKER = r'''
import sys
import numpy as np
from mpi4py import MPI
from paranet.distributed import SharedMemoryAllreduce, World

comm = MPI.COMM_WORLD
rank, size = comm.rank, comm.size
rng = np.random.default_rng(100 + rank)


def rank_order_sum(x, groups):
    """sum over the groups (machines) of each group's rank-order sum: what the reducer computes"""
    parts = comm.allgather(x)
    total = None
    for g in groups:
        s = parts[g[0]].copy()
        for r in g[1:]:
            s += parts[r]
        total = s if total is None else total + s
    return total


def check(shm, groups, calls=3):
    for call in range(calls):  # fresh data each call: nothing stale may survive from the last one
        x = rng.standard_normal(shm.size).astype(shm.dtype) * (call + 1)
        shm.buffer[...] = x
        copy = call == 2  # the sum is left in shared memory, or also copied into the buffer
        out = shm.allreduce(copy=copy)
        assert (out is shm.buffer) == copy and (copy or not out.flags.writeable)
        want = rank_order_sum(x, groups)
        assert np.array_equal(out, want), (shm.size, shm.dtype, float(np.abs(out - want).max()))
        assert np.array_equal(np.concatenate(comm.allgather(out[-3:])), np.tile(want[-3:], size))


one_machine = [list(range(size))]
for n in (1, 5, 17, 1290, 101774):
    for dtype in (np.float32, np.float64):
        shm = SharedMemoryAllreduce(comm, n, dtype)
        check(shm, one_machine)
        shm.close()
        shm.close()  # a second close is harmless

if size == 4:  # act out two machines of two ranks: sums per machine, then across them
    node = comm.Split(rank // 2, rank)
    shm = SharedMemoryAllreduce(comm, 1290, np.float64, node_comm=node)
    assert shm.cross is not None and shm.cross.Get_size() == 2
    check(shm, [[0, 1], [2, 3]])
    shm.close()
    node.Free()
if size == 3:  # machines of unequal size cannot pair their slices: a clear error on every rank
    node = comm.Split(rank // 2, rank)
    try:
        SharedMemoryAllreduce(comm, 100, np.float32, node_comm=node)
    except ValueError as e:
        assert "same number of ranks on every machine" in str(e), e
    else:
        raise AssertionError("unequal machines accepted")
    node.Free()

# World: the shared buffer goes through shared memory, any other buffer through MPI_Allreduce
world = World(allreduce="auto")
assert world.allreduce_method == ("shm" if size > 1 else "mpi"), world.allreduce_method
g = world.shared_buffer(np.zeros(1000))
assert world.shared_buffer(np.zeros(10)) is not None  # a second buffer: a plain one
g[...] = rank + 1
world.allreduce_sum(g)
assert np.all(g == size * (size + 1) / 2)
other = np.full(7, float(rank))
world.allreduce_sum(other)
assert np.all(other == size * (size - 1) / 2)
world.close()
print(f"rank {rank} ok", flush=True)
'''


@pytest.mark.parametrize("nprocs", [1, 2, 3, 4])
def test_shared_memory_sum_is_numpys_rank_order_sum(nprocs, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    proc = subprocess.run([str(MPIEXEC), "-n", str(nprocs), sys.executable, str(script)], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert all(f"rank {r} ok" in proc.stdout for r in range(nprocs)), proc.stdout


COMMON = ("--dtype", "float64", "--batch-size", "126", "--optimizer", "momentum", "--lr", "0.05", "--max-steps", 20)


def test_both_ways_of_summing_reach_the_single_process_parameters(mnist_h5, tmp_path):
    run_train(None, "--data", mnist_h5, *COMMON, "--checkpoint", tmp_path / "p1.h5", "--save-params", tmp_path / "p1.npz")
    ref = load_params(tmp_path / "p1.npz")
    seen = {}
    for how, line in (("shm", "gradients summed in shared memory (3 ranks on one machine)"),
                      ("mpi", "gradients summed by MPI_Allreduce")):
        proc = run_train(3, "--data", mnist_h5, *COMMON, "--allreduce", how, "--check-replicas", 5,
                         "--checkpoint", tmp_path / f"{how}.h5", "--save-params", tmp_path / f"{how}.npz")
        assert line in proc.stdout
        seen[how] = load_params(tmp_path / f"{how}.npz")
        assert max_abs_diff(seen[how], ref) <= 1e-10
    assert max_abs_diff(seen["shm"], seen["mpi"]) <= 1e-12
    assert max(float(np.max(np.abs(ref[k]))) for k in ref) > 0.01  # the parameters are not all zero


def test_default_sums_in_shared_memory_on_one_machine(mnist_h5, tmp_path):
    proc = run_train(2, "--data", mnist_h5, "--max-steps", 3, "--checkpoint", tmp_path / "c.h5")
    assert "gradients summed in shared memory (2 ranks on one machine)" in proc.stdout
