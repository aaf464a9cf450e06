"""The mpiexec launchers, run for real: launch/mpirun.sh, and launch/pbs.sh in a simulated PBS job.

No PBS server is available here, so pbs.sh runs as PBS would start it: PBS_JOBID, PBS_O_WORKDIR
and PBS_NODEFILE set, and SIGTERM sent to the job script.
"""
import json
import re
import signal
import subprocess
import sys
import time

import pytest

from launch import REPO, env, load_params, max_abs_diff, run_train

MPIRUN_SH = REPO / "launch" / "mpirun.sh"


def _run(*args, timeout=120, **extra):
    return subprocess.run([str(MPIRUN_SH), *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          env=env(**{"PARANET_PYTHON": sys.executable, **extra}), timeout=timeout)


@pytest.mark.mpi
def test_runs_the_trainer_on_n_ranks(mnist_h5, tmp_path):
    proc = _run("-n", 2, "--", "--data", mnist_h5, "--max-steps", 20, "--batch-size", 64,
                "--checkpoint", tmp_path / "ck.h5", "--metrics", tmp_path / "m.json")
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["world_size"] == 2 and metrics["completed"] is True and metrics["steps"] == 20
    assert "paranet: world size 2," in proc.stdout
    assert f"{sys.executable} -m paranet.train" in proc.stderr  # the Python it was told to use


@pytest.mark.mpi
def test_hostfile_goes_to_mpiexec(tmp_path):
    """-f reaches hydra: it launches onto the file's (remote) host through the given launcher."""
    hostfile = tmp_path / "hosts"
    hostfile.write_text("192.0.2.7:2\n")  # TEST-NET-1: never this machine
    seen = tmp_path / "seen"
    fake_ssh = tmp_path / "fake-ssh"
    fake_ssh.write_text(f'#!/bin/sh\n[ "$1" = -x ] && shift\necho "$1" >> {seen}\nexit 1\n')
    fake_ssh.chmod(0o755)
    proc = _run("-n", 2, "-f", hostfile, "--", "--data", tmp_path / "none.h5", "--max-steps", 1, timeout=60,
                HYDRA_LAUNCHER="ssh", HYDRA_LAUNCHER_EXEC=fake_ssh)
    assert proc.returncode != 0
    assert seen.read_text().split() == ["192.0.2.7"], proc.stderr


@pytest.mark.parametrize("args, message", [
    (["-n", "0"], "-n wants a positive rank count, not '0'"),
    (["-n"], "option -n needs a value"),
    (["--epochs", "2"], 'training flags go after "--": launch/mpirun.sh -n RANKS -- --epochs 2'),
    (["-f", "/nonexistent/hosts"], "hostfile /nonexistent/hosts is not readable"),
])
def test_usage_errors_exit_2(args, message):
    proc = _run(*args, timeout=30)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_a_python_without_paranet_is_refused_before_launch(tmp_path):
    """PARANET_PYTHON that cannot import paranet (here: no site-packages, no PYTHONPATH) is one
    line naming it and Python's reason, exit 2, and mpiexec never starts."""
    bare = tmp_path / "python"
    bare.write_text(f"#!/bin/sh\nexec {sys.executable} -I -S \"$@\"\n")
    bare.chmod(0o755)
    fake = _fake_mpiexec(tmp_path)
    proc = _run("-n", 2, "--", "--epochs", 1, timeout=30, PARANET_PYTHON=bare, PARANET_MPIEXEC=fake)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines()[0] == (f"launch/mpirun.sh: {bare} cannot import paranet (ModuleNotFoundError: No "
                                           "module named 'paranet'): install paranet there, or set PARANET_PYTHON")
    assert _calls(tmp_path) == []


def test_help_describes_the_options():
    proc = _run("-h", timeout=30)
    assert proc.returncode == 0
    assert "-n RANKS" in proc.stdout and "-f HOSTFILE" in proc.stdout and "set -euo" not in proc.stdout


@pytest.mark.mpi
def test_pbs_script_checkpoints_on_sigterm_and_resumes_like_an_uninterrupted_run(mnist_h5, tmp_path):
    steps = 2500  # 2-6 s at P=2: still training 0.3 s after the header, even on an idle machine
    train = ("--data", mnist_h5, "--dtype", "float64", "--batch-size", 64, "--max-steps", steps)
    run_train(2, *train, "--checkpoint", tmp_path / "ref.h5", "--save-params", tmp_path / "ref.npz")

    nodefile = tmp_path / "nodes"
    nodefile.write_text("localhost\nlocalhost\n")  # PBS: one line per rank
    run_dir = tmp_path / "run"
    e = env(PBS_JOBID="42.pbs-server", PBS_O_WORKDIR=tmp_path, PBS_NODEFILE=nodefile, PARANET_RUN_DIR=run_dir,
            PARANET_PYTHON=sys.executable, PARANET_REQUEUE=0,
            PARANET_TRAIN_ARGS=" ".join(map(str, train)))
    cmd = [str(REPO / "launch" / "pbs.sh"), "--save-params", str(tmp_path / "p.npz")]
    out = tmp_path / "first.out"
    with open(out, "w") as f:
        job = subprocess.Popen(cmd, cwd=tmp_path, env=e, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "paranet: world size 2," not in out.read_text():
            assert job.poll() is None and time.monotonic() < deadline, out.read_text()
            time.sleep(0.1)
        time.sleep(0.3)
        job.send_signal(signal.SIGTERM)  # what PBS does at the walltime; the script passes it on
        assert job.wait(timeout=60) == 75, out.read_text()
    finally:
        if job.poll() is None:
            job.kill()
    log = out.read_text()
    m = re.search(r"stopped by SIGTERM after step (\d+)", log)
    assert m and 0 < int(m.group(1)) < steps, log
    assert (run_dir / "checkpoint.h5").exists() and not (run_dir / "metrics.json").exists()

    again = subprocess.run(cmd, cwd=tmp_path, env=e, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, f"{again.stdout}\n{again.stderr}"
    assert f"step {m.group(1)} (written by 2 ranks)" in again.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == steps
    assert max_abs_diff(load_params(tmp_path / "p.npz"), load_params(tmp_path / "ref.npz")) <= 1e-10


# -- everything is validated before anything is launched ---------------------------------------

FAKE_MPIEXEC = """#!/bin/sh
# stands in for mpiexec: records that it ran, and "completes" training by writing --metrics;
# launch/mpirun.sh's --version probe (which MPI?) is answered as MPICH's hydra does, unrecorded
[ "$1" = --version ] && {{ echo "HYDRA build details:"; exit 0; }}
printf '%s\\n' "$*" >> "{calls}"
prev=
for a in "$@"; do [ "$prev" = --metrics ] && echo '{{}}' > "$a"; prev=$a; done
exit 0
"""


def _fake_mpiexec(folder):
    """An mpiexec at folder/bin/mpiexec that records its calls in folder/calls."""
    (folder / "bin").mkdir(exist_ok=True)
    fake = folder / "bin" / "mpiexec"
    fake.write_text(FAKE_MPIEXEC.format(calls=folder / "calls"))
    fake.chmod(0o755)
    return fake


def _calls(folder):
    calls = folder / "calls"
    return calls.read_text().splitlines() if calls.exists() else []


def _path_with(folder):
    import os
    return f"{folder / 'bin'}:{os.environ['PATH']}"


@pytest.mark.parametrize("extra, message", [
    # a wrong mpiexec is an error, not silently replaced by the one on PATH
    ({"PARANET_MPIEXEC": "/nonexistent/mpiexec"}, "PARANET_MPIEXEC=/nonexistent/mpiexec is not an executable file"),
    # a missing Python is reported as such, not as a missing mpiexec
    ({"PARANET_PYTHON": "/nonexistent/python"}, "PARANET_PYTHON=/nonexistent/python is not an executable file"),
    ({"PARANET_PYTHON": "no-such-python3"}, "PARANET_PYTHON=no-such-python3 is not an executable file"),
])
def test_mpirun_sh_wrong_programs_are_errors_and_nothing_runs(tmp_path, extra, message):
    _fake_mpiexec(tmp_path)  # first on PATH: the old fallback would have run it
    proc = _run("-n", 2, "--", "--max-steps", 1, timeout=30, PATH=_path_with(tmp_path), **extra)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert _calls(tmp_path) == []


@pytest.mark.parametrize("content, message", [
    ("", "lists no hosts"),
    ("# only a comment\n\n   \n", "lists no hosts"),
    ("node1:2\nnode2:x\n", "line 2: expected host[:ranks], got 'node2:x'"),
    ("node1:0\n", "line 1: expected host[:ranks], got 'node1:0'"),
])
def test_mpirun_sh_a_bad_hostfile_is_an_error(tmp_path, content, message):
    hostfile = tmp_path / "hosts"
    hostfile.write_text(content)
    fake = _fake_mpiexec(tmp_path)
    proc = _run("-n", 2, "-f", hostfile, "--", "--max-steps", 1, timeout=30, PARANET_MPIEXEC=fake)
    assert proc.returncode == 2 and f"hostfile {hostfile} " in proc.stderr and message in proc.stderr, proc.stderr
    assert _calls(tmp_path) == []  # it no longer runs locally without a word


def test_mpirun_sh_python_found_on_path_and_a_good_hostfile_run(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two hosts\nnode1:2\nnode2\n")
    fake = _fake_mpiexec(tmp_path)
    proc = _run("-n", 3, "-f", hostfile, "--", "--epochs", 1, timeout=30, PARANET_MPIEXEC=fake,
                PARANET_PYTHON="python3")
    assert proc.returncode == 0, proc.stderr
    (call,) = _calls(tmp_path)
    assert call.startswith(f"-n 3 -f {hostfile} ") and " -m paranet.train --epochs 1" in call


def _pbs(tmp_path, nodes="localhost\nlocalhost\n", **extra):
    """launch/pbs.sh in a simulated PBS job whose mpiexec is the fake one; returns (proc, calls)."""
    nodefile = tmp_path / "nodes"
    if nodes is not None:
        nodefile.write_text(nodes)
    fake = _fake_mpiexec(tmp_path)
    e = env(PBS_JOBID="7.server", PBS_O_WORKDIR=tmp_path, PBS_NODEFILE=nodefile, PARANET_RUN_DIR=tmp_path / "run",
            PARANET_PYTHON=sys.executable, PARANET_MPIEXEC=fake, PARANET_REQUEUE=0, PATH=_path_with(tmp_path))
    e.pop("PBS_WALLTIME", None)
    e.update({k: str(v) for k, v in extra.items()})
    proc = subprocess.run([str(REPO / "launch" / "pbs.sh")], cwd=tmp_path, env=e, capture_output=True, text=True,
                          timeout=60)
    return proc, _calls(tmp_path)


@pytest.mark.parametrize("extra, message", [
    ({"PARANET_SIGNAL_MARGIN": "2m"}, "PARANET_SIGNAL_MARGIN must be a whole number of seconds, not '2m'"),
    ({"PARANET_SIGNAL_MARGIN": "-5"}, "PARANET_SIGNAL_MARGIN must be a whole number of seconds, not '-5'"),
    ({"PARANET_WALLTIME": "1h"}, "PARANET_WALLTIME must be [[h:]m:]s, not '1h'"),
    ({"PARANET_WALLTIME": "1:2:3:4"}, "PARANET_WALLTIME must be [[h:]m:]s, not '1:2:3:4'"),
    ({"PBS_WALLTIME": "soon"}, "PBS_WALLTIME must be [[h:]m:]s, not 'soon'"),
    ({"PARANET_WALLTIME": "100"}, "PARANET_SIGNAL_MARGIN (120 s) must be less than the walltime (100 s)"),
    ({"PARANET_REQUEUE": "yes"}, "PARANET_REQUEUE must be 0 or 1, not 'yes'"),
    ({"PARANET_MPIEXEC": "/nonexistent/mpiexec"}, "PARANET_MPIEXEC=/nonexistent/mpiexec is not an executable file"),
    ({"PARANET_PYTHON": "/nonexistent/python"}, "PARANET_PYTHON=/nonexistent/python is not an executable file"),
    ({"PBS_JOBID": ""}, "PBS_JOBID is not set: this script runs inside a PBS job (submit it with qsub)"),
    ({"PBS_O_WORKDIR": "/nonexistent"}, "cannot enter PBS_O_WORKDIR=/nonexistent (the submit directory)"),
    ({"PBS_NODEFILE": ""}, "PBS_NODEFILE is not set: this script runs inside a PBS job (submit it with qsub)"),
])
def test_pbs_sh_bad_settings_are_one_line_and_nothing_is_launched(tmp_path, extra, message):
    proc, calls = _pbs(tmp_path, **extra)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [f"paranet-pbs: {message}"], proc.stdout + proc.stderr
    assert calls == []  # no ranks left running as orphans


def test_slurm_sbatch_outside_a_job_is_one_line(tmp_path):
    e = {k: v for k, v in env().items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", str(REPO / "launch" / "slurm.sbatch")], cwd=tmp_path, env=e, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        "paranet-sbatch: SLURM_JOB_ID is not set: this script runs inside a SLURM job (submit it with sbatch)"]


@pytest.mark.parametrize("nodes, message", [("", "lists no hosts"), ("\n\n", "lists no hosts"),
                                            (None, "is not readable")])
def test_pbs_sh_empty_or_missing_nodefile_is_a_clear_error(tmp_path, nodes, message):
    proc, calls = _pbs(tmp_path, nodes=nodes)
    assert proc.returncode == 2 and f"PBS_NODEFILE {tmp_path / 'nodes'} {message}" in proc.stderr, \
        proc.stdout + proc.stderr
    assert calls == []


@pytest.mark.parametrize("walltime, seconds", [("45", 45), ("1:00:00", 3600), ("90:00", 5400), ("0:08:09", 489),
                                               ("01:02:03", 3723)])
def test_pbs_sh_walltime_formats_set_the_timer(tmp_path, walltime, seconds):
    proc, calls = _pbs(tmp_path, PARANET_WALLTIME=walltime, PARANET_SIGNAL_MARGIN=10)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SIGTERM to the ranks in {seconds - 10} s (walltime {seconds} s)" in proc.stdout
    assert len(calls) == 1 and calls[0].startswith("-n 2 -f ")


@pytest.mark.parametrize("extra, message", [
    ({"PARANET_LAUNCHER": "mpiexec", "PARANET_MPIEXEC": "/nonexistent/mpiexec"},
     "PARANET_MPIEXEC=/nonexistent/mpiexec is not an executable file"),
    ({"PARANET_PYTHON": "/nonexistent/python"}, "PARANET_PYTHON=/nonexistent/python is not an executable file"),
    ({"PARANET_REQUEUE": "true"}, "PARANET_REQUEUE must be 0 or 1, not 'true'"),
    ({"PARANET_SRUN_MPI": "none"}, "PARANET_SRUN_MPI=none would start every rank as a singleton"),
])
def test_slurm_sbatch_checks_its_settings_before_launching(tmp_path, extra, message):
    """The same checks in launch/slurm.sbatch; they run before srun, so no SLURM is needed here."""
    fake = _fake_mpiexec(tmp_path)
    (tmp_path / "bin" / "srun").symlink_to(fake)  # a launch would be recorded
    e = env(SLURM_JOB_ID=9, SLURM_SUBMIT_DIR=tmp_path, SLURM_NTASKS=2, PARANET_PYTHON=sys.executable,
            PATH=_path_with(tmp_path), PARANET_REQUEUE=0)
    e.update(extra)
    proc = subprocess.run([str(REPO / "launch" / "slurm.sbatch")], cwd=tmp_path, env=e, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stdout + proc.stderr
    assert _calls(tmp_path) == [] and not (tmp_path / "runs").exists()
