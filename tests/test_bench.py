"""Smoke test of `python -m bench`: the machinery runs with tiny step counts, the JSON has its keys,
and the hand-written baseline the engine is measured against computes the same training steps."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from launch import REPO, env

pytestmark = pytest.mark.mpi


def test_baseline_trains_like_the_engine():
    """In process, P=1: after a few SGD steps from the same start on the same data, the baseline's
    parameters equal the engine's (both the plain and the phase-timed step)."""
    from bench.engine import Baseline, Engine, make_batches
    from paranet.distributed import MPI, World

    batches = make_batches(32, 3, seed=7)
    engine = Engine(World(MPI.COMM_SELF), lr=0.1, seed=3)
    start = engine.flat().copy()
    plain = Baseline(engine.initial_values(), 32, 0.1)
    timed = Baseline(engine.initial_values(), 32, 0.1)
    for i in range(6):
        x, y, _ = batches[i % 3]
        loss_e, loss_b = engine.step(x, y), plain.step(x, y)
        timed.step_phases(x, y, {})
        assert loss_b == pytest.approx(loss_e, rel=1e-5)
    moved = np.max(np.abs(engine.flat() - start))
    assert moved > 1e-3  # the comparison below is not of two untouched copies
    # float32 rounding only: a few ulps of values ~0.1, a thousandth of how far the steps moved them
    np.testing.assert_allclose(plain.flat(), engine.flat(), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(timed.flat(), plain.flat())


def test_quick_bench_writes_json(tmp_path):
    """`python -m bench --quick` at P=1, 2 under real mpiexec: every section and key is there, the
    baseline matches the engine across ranks, the figures are positive."""
    cmd = [sys.executable, "-m", "bench", "--quick", "--procs", "1", "2", "--batches", "128", "--weak-local", "64",
           "--no-torch", "--no-plot", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "engine/baseline" in proc.stdout
    res = json.loads((tmp_path / "bench.json").read_text())
    for key in ("config", "machine", "correctness", "cases", "scaling", "memory", "time_to_accuracy", "data",
                "targets", "plot"):
        assert key in res, key
    for key in ("nproc", "numpy", "mpi_library"):
        assert key in res["machine"], key
    assert {(c["ranks"], c["batch"]) for c in res["cases"]} == {(1, 128), (2, 128), (1, 64)}
    for c in res["cases"]:
        for key in ("engine_samples_per_s", "baseline_samples_per_s", "limit_samples_per_s", "gemm_gflops",
                    "allreduce_us", "phases", "engine_over_baseline_paired", "stepwise"):
            assert key in c, key
        assert c["engine_samples_per_s"] > 0 and c["baseline_samples_per_s"] > 0
        assert (c["allreduce_us"] > 0) == (c["ranks"] > 1)
        # P > 1 on one machine: the engine sums in shared memory, engine_mpi like the baseline
        assert ("engine_mpi_samples_per_s" in c) == ("shm_allreduce_us" in c) == (c["ranks"] > 1)
        assert len(c["phases"]["wait_us_per_rank"]) == c["ranks"]
    for chk in res["correctness"]:
        assert chk["engine_moved"] > 1e-3
        assert chk["max_abs_diff_baseline"] <= 1e-6, chk
        assert chk["replicas_agree"]
    assert {c["ranks"] for c in res["correctness"]} == {1, 2}
    assert [r["target"] for r in res["targets"]].count("1 engine/baseline") == 2
    assert all(r["result"] in ("PASS", "FAIL") or r["result"].startswith("SKIP") for r in res["targets"])
    mem = res["memory"]
    assert len(mem["peak_mb_per_rank"]) == 4 and all(m > 0 for m in mem["peak_mb_per_rank"])
    assert set(res["scaling"]) == {"strong (global batch 128)", "weak (64 a rank)"}


def test_help_names_the_flags():
    proc = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0
    for flag in ("--quick", "--time-to-accuracy", "--data-bench", "--python", "--procs"):
        assert flag in proc.stdout


def test_bind_to_reaches_mpiexec_and_pins_ranks():
    """--bind-to core adds hydra's -bind-to to the timed cases' mpiexec, and hydra then gives
    each rank one CPU (read back from /proc)."""
    from bench.suite import mpiexec_for, parse_args

    assert parse_args([]).bind_to == "none"
    assert mpiexec_for(sys.executable) == [str(Path(sys.executable).parent / "mpiexec")]
    cmd = mpiexec_for(sys.executable, parse_args(["--bind-to", "core"]).bind_to)
    assert cmd[1:] == ["-bind-to", "core"]
    probe = "import os; print(f'<cpus {len(os.sched_getaffinity(0))}>', flush=True)"
    proc = subprocess.run([*cmd, "-n", "2", sys.executable, "-c", probe], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert sorted(re.findall(r"<cpus \d+>", proc.stdout)) == ["<cpus 1>", "<cpus 1>"], proc.stdout  # ranks' lines may interleave


def test_readme_tables_are_rewritten_from_the_json_between_their_markers():
    from bench import readme_tables

    results = {"trainer_e2e": [{"ranks": 2, "batch": 128, "samples_per_second": {"loop": 1000.0, "trainer/on": 1500.0},
                                "ratio_to_loop": {"trainer/on": 1.5}}],
               "cnn": {"skipped": "--quick"}}
    readme = ("intro\n<!-- bench:trainer_e2e -->\n| old | table |\n<!-- /bench:trainer_e2e -->\n"
              "<!-- bench:cnn -->\nkept\n<!-- /bench:cnn -->\nend\n")
    new, done = readme_tables.render(readme, results)
    assert "| 2 | 128 | 1,000 | 1,500 (1.50x) |" in new and "| old | table |" not in new
    assert "kept" in new and new.startswith("intro\n") and new.endswith("end\n")
    assert done == {"trainer_e2e": "rewritten", "cnn": "kept (no results in the JSON)"}
