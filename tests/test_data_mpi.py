"""A real `mpirun -n 4` run: ranks read their shards with rank/size from COMM_WORLD; gathered = P=1 batches."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = r'''
import sys
import numpy as np
from mpi4py import MPI
from paranet.data import BatchReader

comm = MPI.COMM_WORLD
try:
    path, steps_seen = sys.argv[1], 0
    with BatchReader(path, "train", rank=comm.rank, size=comm.size, batch_size=130, seed=9) as r:
        assert r.rows_read == 0
        ref = BatchReader(path, "train", batch_size=130, seed=9) if comm.rank == 0 else None
        for epoch in (0, 1):
            ref_it = iter(ref.epoch(epoch)) if ref else None
            for b in r.epoch(epoch):
                parts = comm.gather((b.x, b.y, b.n_local, b.n_global), root=0)
                steps_seen += 1
                if comm.rank == 0:
                    want = next(ref_it)
                    x = np.concatenate([p[0] for p in parts])
                    y = np.concatenate([p[1] for p in parts])
                    assert np.array_equal(x, want.x) and np.array_equal(y, want.y), (epoch, steps_seen)
                    assert sum(p[2] for p in parts) == want.n_global
                    assert {p[3] for p in parts} == {want.n_global}
            if ref_it is not None:
                assert next(ref_it, None) is None
        rows = comm.allreduce(r.rows_read)
    counts = comm.gather(steps_seen, root=0)
    if comm.rank == 0:
        assert counts == [2 * r.steps_per_epoch] * comm.size, counts
        assert rows == 2 * 55000, rows
        print(f"OK size={comm.size} steps={steps_seen} rows={rows}", flush=True)
except BaseException:
    import traceback
    traceback.print_exc()
    sys.stderr.flush()
    comm.Abort(1)  # a failing rank must not leave the others waiting in gather
'''


@pytest.mark.mpi
def test_mpirun_4_ranks_gather_the_single_process_batches(tmp_path, mnist_h5):
    mpirun = Path(sys.executable).parent / "mpirun"
    if not mpirun.exists():
        pytest.skip(f"no mpirun next to {sys.executable}")
    script = tmp_path / "read_shards.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([str(mpirun), "-n", "4", sys.executable, str(script), str(mnist_h5)],
                       env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    # ceil(55000 / 130) = 424 steps an epoch on every rank, the last one 10 rows (3, 3, 2, 2)
    assert "OK size=4 steps=848 rows=110000" in p.stdout, p.stdout + p.stderr


CHANGED = r'''
import os, sys
from mpi4py import MPI
from paranet.data import BatchReader, DataError

comm = MPI.COMM_WORLD
path = sys.argv[1]
r = BatchReader(path, "train", rank=comm.rank, size=comm.size, batch_size=64, prefetch=True)
it = iter(r.epoch(0))
next(it)
comm.barrier()
if comm.rank == 0:
    os.truncate(path, 1228800)  # as `truncate -s 1200K` while the job runs
comm.barrier()
try:
    for _ in range(5):
        next(it)
    print(f"rank {comm.rank}: NOT DETECTED", flush=True)
except DataError as e:
    print(f"rank {comm.rank}: {e}", flush=True)
try:
    r.verify_unchanged()
except DataError as e:
    print(f"rank {comm.rank} verify: {e}", flush=True)
'''


@pytest.mark.mpi
def test_mpirun_2_every_rank_notices_the_truncated_file(tmp_path, mnist_h5):
    import shutil
    mpirun = Path(sys.executable).parent / "mpirun"
    if not mpirun.exists():
        pytest.skip(f"no mpirun next to {sys.executable}")
    shutil.copyfile(mnist_h5, tmp_path / "d.h5")
    (tmp_path / "changed.py").write_text(CHANGED)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([str(mpirun), "-n", "2", sys.executable, str(tmp_path / "changed.py"), str(tmp_path / "d.h5")],
                       env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    for rank in (0, 1):
        assert f"rank {rank}: {tmp_path / 'd.h5'}: /train/images (rank {rank}): expected " in p.stdout, p.stdout
        assert f"rank {rank} verify: {tmp_path / 'd.h5'} (rank {rank}): expected " in p.stdout, p.stdout
    assert p.stdout.count("found 1228800: the file was truncated during the run") == 4, p.stdout
