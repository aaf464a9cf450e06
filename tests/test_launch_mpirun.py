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
                          env=env(PARANET_PYTHON=sys.executable, **extra), timeout=timeout)


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
    (["--epochs", "2"], "unknown option --"),  # training flags need "--" before them
    (["-f", "/nonexistent/hosts"], "hostfile /nonexistent/hosts is not readable"),
])
def test_usage_errors_exit_2(args, message):
    proc = _run(*args, timeout=30)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


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
