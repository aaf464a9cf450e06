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


def test_readme_tables_keep_indentation_and_report_unknown_markers():
    """A marker inside a list item gets its text indented alike; a renderer with nothing to show
    (threads' two-host part skipped) keeps the old text; a marker TABLES lacks is reported."""
    from bench import readme_tables

    results = {"watchdog": {"ranks": 2, "batch": 128, "blocks": 20, "block_steps": 25, "step_ms_off": 6.12,
                            "step_ms_on": 6.1, "median_ratio_on_off": 0.9987, "hook_ns": 651.3},
               "threads": {"bound": {"skipped": "--parts"}, "two_hosts": {"skipped": "needs root"}}}
    readme = ("- a bullet\n  <!-- bench:watchdog -->\n  Cost: old.\n  <!-- /bench:watchdog -->\n"
              "<!-- bench:threads_bound -->\nold bound\n<!-- /bench:threads_bound -->\n"
              "<!-- bench:nonsense -->\nx\n<!-- /bench:nonsense -->\n")
    new, done = readme_tables.render(readme, results)
    assert new.startswith("- a bullet\n  <!-- bench:watchdog -->\n  Cost: 0.65 µs a step for the hook against a "
                          "6.12 ms step (0.01%) at P=2, batch 128;")
    assert "each way) the on/off step time ratio was 0.999.\n  <!-- /bench:watchdog -->\n" in new
    assert "old bound" in new and "Cost: old." not in new
    assert new.endswith("<!-- bench:nonsense -->\nx\n<!-- /bench:nonsense -->\n")
    assert done == {"watchdog": "rewritten", "threads_bound": "kept (no results in the JSON)",
                    "nonsense": "unknown marker (not in bench.readme_tables.TABLES): kept"}
    assert readme_tables.render(new, results)[0] == new  # a second run changes nothing


def test_readme_tables_every_marker_names_a_function():
    import importlib

    from bench import readme_tables

    for marker, (key, module, function) in readme_tables.TABLES.items():
        assert callable(getattr(importlib.import_module(module), function)), marker


def _case(ranks, batch, engine, paired, mpi=None, torch=None, limit=None):
    c = {"ranks": ranks, "batch": batch, "engine_samples_per_s": engine, "engine_over_baseline_paired": paired,
         "limit_samples_per_s": limit or engine / 0.8}
    if mpi:
        c["engine_mpi_over_baseline_paired"] = mpi
    if torch:
        c["engine_over_torch_paired"] = torch
    return c


def test_suite_tables_render_the_readme_rows():
    from bench import suite

    cases = [_case(2, 256, 1e5, [1.0]),  # weak scaling only: not in the targets' table
             _case(2, 128, 304671.2, [1.07, 1.073, 1.08], mpi=[0.94, 0.947, 0.95], torch=[11.13], limit=380839),
             _case(1, 128, 196690.4, [0.962], torch=[1.713], limit=236976)]
    text = suite.markdown_cases(cases).splitlines()
    assert text[0].startswith("| P | global batch | engine samples/s | engine_mpi / hand-written |")
    assert text[2:] == ["| 1 | 128 | 196,690 | 0.962 (P=1: no sum) | 0.962 | 1.71 | 0.83 |",
                        "| 2 | 128 | 304,671 | 0.947 | 1.073 | 11.1 | 0.80 |"]

    rows = [{"ranks": 1, "batch": 1024, "engine": 165747, "baseline": 174065, "limit": 206010, "torch": 162732},
            {"ranks": 2, "batch": 1024, "engine": 291176, "engine_mpi": 291525, "baseline": 302663, "limit": 358283,
             "torch": 235682}]
    text = suite.markdown_scaling({"strong (global batch 1024)": rows, "weak (128 a rank)": []}).splitlines()
    assert text[0] == "Strong (global batch 1024), samples/s:"
    assert text[2] == "| P | engine | engine_mpi | hand-written | PyTorch DDP | limit | engine speed-up | efficiency |"
    assert text[4:] == ["| 1 | 165,747 | — | 174,065 | 162,732 | 206,010 | 1.00× | 100% |",
                        "| 2 | 291,176 | 291,525 | 302,663 | 235,682 | 358,283 | 1.76× | 88% |"]

    mem = {"ranks": 4, "steps": 200, "target_mb": 150.0, "max_mb": 84.2, "pass": True,
           "data_in_memory_on": {"peak_mb_per_rank": [84.1, 83.2, 80.4, 79.6], "shared_copy_mb": 222.1,
                                 "max_mb_less_shared_copy": 61.4},
           "data_in_memory_off": {"peak_mb_per_rank": [84.2, 80, 80, 79], "shared_copy_mb": 0,
                                  "max_mb_less_shared_copy": 84.2}}
    text = suite.markdown_memory(mem).splitlines()
    assert text[2:4] == ["| on | 84, 83, 80, 80 | 222 | 61 |", "| off | 84, 80, 80, 79 | 0 | 84 |"]
    assert text[-1] == ("MLP trainer at P = 4, 200 steps; target: at most 150 MB a rank plus the shared copy: "
                        "**PASS** (84 MB).")

    run = lambda model, wall, acc, epochs: {
        "model": model, "command": f"/v/bin/mpiexec -n 2 /v/bin/python -m paranet.train --model {model} --metrics m",
        "wall_seconds": wall, "test_accuracy": acc, "train_seconds": wall - 1, "steps": 1, "epochs": epochs,
        "samples_per_second": 1.0}
    text = suite.markdown_time_to_accuracy([run("mlp", 4.12, 0.9817, 12), run("cnn", 18.66, 0.99155, 5)]).splitlines()
    assert text[2].startswith("| mlp (784-128-10, 101,770 parameters) | 98.17% | ≥ 98.0% | 4.1 s | 12 | "
                              "`mpiexec -n 2 python -m paranet.train` |")
    assert text[3].endswith("| 99.16% | ≥ 99.0% | 18.7 s | 5 | `mpiexec -n 2 python -m paranet.train --model cnn` |")
    assert text[-1] == "Both runs together: 22.8 s (target under 30 s): **PASS**."
    text = suite.markdown_time_to_accuracy([{"model": "cnn", "command": "c", "error": "Traceback\nValueError: x\n"}])
    assert "| failed: ValueError: x | ≥ 99.0% |" in text and "Both runs" not in text

    text = suite.markdown_targets([
        {"target": "1 engine/baseline", "ranks": 2, "batch": 128, "value": 0.94712, "want": 0.95, "result": "FAIL"},
        {"target": "2 engine/torch DDP", "ranks": 2, "batch": 128, "value": None, "want": 4.0, "result": "SKIP (no torch)"},
        {"target": "6 peak RSS MB/rank less the shared data", "ranks": 4, "batch": 128, "value": 84.23, "want": 150.0,
         "result": "PASS"}]).splitlines()
    assert text[2:] == ["| 1 engine/baseline | 2 | 128 | 0.947 | ≥ 0.95 | FAIL |",
                        "| 2 engine/torch DDP | 2 | 128 | — | ≥ 4 | SKIP (no torch) |",
                        "| 6 peak RSS MB/rank less the shared data | 4 | 128 | 84.2 | ≤ 150 | PASS |"]


def _threads_part(tag, cases, ratios):
    """One code's comparison as bench.threads.compare() returns it (labels carry --before's tag)."""
    return {"cases": {tag + label: {"median": sps, "comm_share_median": share, "samples_per_s": [sps]}
                      for label, sps, share in cases},
            "ratios": {name: {"ratio": r, "target": t, "paired": paired} for name, r, t, paired in ratios}}


def test_threads_tables_render_the_readme_rows():
    from bench import threads

    bound = lambda tag, a, b, c: _threads_part(tag, [("taskset -c 0, no thread variable", a, 0.0),
                                                     ("unbound, thread variables 1", b, 0.0),
                                                     ("taskset -c 0, thread variables 1", c, 0.0)],
                                               [("bound / unbound", a / b, 0.9, [a / b]),
                                                ("bound / bound with variables 1", a / c, None, [a / c])])
    res = {"bound": {"before (f5526ae)": bound("before (f5526ae) ", 3042, 165298, 3168),
                     "now:": bound("now: ", 202475, 209782, 207147)}}
    text = threads.markdown_bound(res).splitlines()
    assert text[0] == "| run | before (f5526ae), samples/s | now, samples/s |"
    assert text[2:] == ["| `taskset -c 0 python -m paranet.train ...` (no thread variable) | 3,042 | 202,475 |",
                        "| `OMP_NUM_THREADS=1 ... python -m paranet.train ...` (unbound) | 165,298 | 209,782 |",
                        "| `OMP_NUM_THREADS=1 ... taskset -c 0 python -m paranet.train ...` | 3,168 | 207,147 |",
                        "| **bound / unbound** (target >= 0.9) | **0.018** (54x slower) | **0.965** |"]
    now_only = threads.markdown_bound({"bound": {"now": bound("", 223188, 224175, 222526)}}).splitlines()
    assert now_only[0] == "| run | samples/s |" and now_only[-1] == "| **bound / unbound** (target >= 0.9) | **0.996** |"
    assert threads.markdown_two_hosts(res) is None  # the part was not run

    two = {"now": _threads_part("", [("P=2 one host, no thread variable", 331268, 0.118),
                                     ("P=2 two hosts, no thread variable", 253766, 0.319),
                                     ("P=2 two hosts, thread variables 1", 270231, 0.28),
                                     ("P=2 one host, no thread variable, --allreduce mpi", 312852, 0.185)],
                                [("two hosts / one host", 0.766, None, [0.77, 0.81, 0.8, 0.78, 0.71])])}
    text = threads.markdown_two_hosts({"two_hosts": two}).splitlines()
    assert text[2:] == ["| P=2 on one host (`mpiexec -n 2`, gradients summed in shared memory) | 331,268 | 11.8% |",
                        "| P=2 on one host, `--allreduce mpi` | 312,852 | 18.5% |",
                        "| P=2 over the two namespaces (MPI_Allreduce over TCP) | 253,766 | 31.9% |",
                        "| **two hosts / one host** | **0.77** (rounds 0.71 to 0.81) | |"]
    two = {"before (f5526ae)": _threads_part("before (f5526ae) ", [("P=2 one host, no thread variable", 79137, 0.666),
                                                                   ("P=2 two hosts, no thread variable", 1225, 0.379)],
                                             [("two hosts / one host", 0.0155, None, [0.02, 0.04])]), **two}
    text = threads.markdown_two_hosts({"two_hosts": two}).splitlines()
    assert text[-1] == "| before: two hosts (f5526ae, `--before` run) | 1,225 (0.015 x one host) | |"


def test_cnn_tables_render_the_readme_rows():
    from bench import cnn

    case = {"ranks": 1, "batch": 128, "paranet_samples_per_s": 6354.6, "torch_samples_per_s": 4496.9,
            "limit_samples_per_s": 7958.0, "gemm_gflops": 49.64, "paranet_over_torch": 1.4563,
            "paranet_over_limit": 0.7979, "limit_over_torch": 1.9935,
            "ops": {"steps": 20, "total_us": 10000.0,
                    "us": {"fwd Conv2DOp 'conv1'": 1340.0, "bwd Conv2DOp 'conv2'": 4900.0, "fwd Relu 'Relu'": 20.0,
                           "bwd MaxPoolOp 'MaxPoolOp'": 1330.0, "bwd MaxPoolOp 'MaxPoolOp#2'": 1000.0,
                           "fwd Dense 'fc1'": 310.0, "other (Session bookkeeping, feeds)": 1100.0}}}
    no_torch = {"ranks": 2, "batch": 128, "paranet_samples_per_s": 8040.2, "limit_samples_per_s": 11568.4,
                "gemm_gflops": 36.07, "paranet_over_limit": 0.6949, "torch_skipped": "torch does not import"}
    text = cnn.markdown({"cases": [case, no_torch]}).splitlines()
    assert text[0].startswith("| P | global batch | paranet samples/s | torch samples/s | GEMMs-only samples/s |")
    assert text[2:] == ["| 1 | 128 | 6,355 | 4,497 | 7,958 | 49.6 | 1.46× | 80% | 1.99× |",
                        "| 2 | 128 | 8,040 | — | 11,568 | 36.1 | — | 69% | — |"]
    text = cnn.markdown_ops({"cases": [no_torch, case]}, share=0.05).splitlines()
    assert text[2:] == ["| conv2 backward | 4,900 |", "| conv1 forward | 1,340 |", "| pool 1 backward | 1,330 |",
                        "| other (Session bookkeeping, feeds) | 1,100 |", "| pool 2 backward | 1,000 |",
                        "| everything else (2 phases) | under 350 each |",
                        "| **the step** (P = 1, batch 128) | **10,000** |"]
    assert cnn.markdown_ops({"cases": [no_torch]}) is None


@pytest.mark.mpi
def test_cnn_pieces_bench_runs_both_contenders_and_renders_its_table(mnist_h5, tmp_path):
    """A tiny run: both contenders train through the trainer's CLI and report samples/s, and the
    table shows the run's own figures (the pieces' gradient itself is tested in test_train.py)."""
    from bench import cnn_pieces

    results = cnn_pieces.main(["--data", str(mnist_h5), "--procs", "1", "--batches", "256", "--steps", "2",
                               "--repeats", "1", "--json", str(tmp_path / "p.json")])
    (case,) = results["cases"]
    assert case["rows_per_rank"] == 256 and case["whole"][0] > 0 and case["pieces"][0] > 0
    assert case["ratio"] == case["pieces"][0] / case["whole"][0]
    assert json.loads((tmp_path / "p.json").read_text()) == results
    lines = cnn_pieces.markdown(results).splitlines()
    assert lines[2] == (f"| 1 | 256 | 256 | {case['whole_median']:,.0f} | {case['pieces_median']:,.0f} | "
                        f"{case['ratio']:.2f}x |")
    proc = subprocess.run([sys.executable, "-m", "bench.cnn_pieces", "--run", "--rows", "0", "--", "--help"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "paranet-train" in proc.stdout  # --run hands the rest to the trainer's CLI


def test_reproducible_and_watchdog_tables_render_the_readme_rows():
    from bench import reproducible, watchdog

    acc = lambda dtype, batch, m, step, ranks, *errs: dict(zip(
        ("dtype", "batch", "micro", "step", "ranks", "max_abs_grad", "max_today", "max_ordered", "max_repro",
         "median_today", "median_ordered", "median_repro"), (dtype, batch, m, step, ranks, *errs)), partials=batch // m)
    res = {"accuracy": [acc("float32", 128, 32, 0, 2, 0.43, 1e-8, 1e-8, 1e-8, 5e-11, 5e-11, 5e-11),
                        acc("float32", 128, 32, 0, 4, 0.4312, 1.53e-8, 1.52e-8, 1.5e-8, 5.8e-11, 5.9e-11, 5.8e-11),
                        acc("float64", 1024, 128, 200, 4, 7.2e-4, 1.4e-19, 1.1e-19, 0.0, 4.2e-22, 4.2e-22, 0.0)],
           "throughput": [{"model": m, "dtype": "float32", "ranks": p, "batch": b, "micro": b // 8 if b > 128 else 32,
                           "plain": 1.0, "reproducible": r, "ratio": r, "exact": e, "ratio_exact": e}
                          for m, b, p, r, e in (("mlp", 128, 1, 0.69, 0.5), ("mlp", 128, 2, 0.63, 0.49),
                                                ("mlp", 1024, 1, 0.8249, 0.8), ("mlp", 1024, 2, 0.69, 0.7),
                                                ("cnn", 128, 1, 1.014, 1.0), ("cnn", 128, 2, 0.95, 0.925))]}
    text = reproducible.markdown_accuracy(res).splitlines()
    assert text[0].startswith("| dtype | batch | m | step | largest \\|g\\| | max error: today | ordered | exact |")
    assert text[2:] == ["| float32 | 128 | 32 | 0 | 4.3e-1 | 1.5e-8 | 1.5e-8 | 1.5e-8 | 5.8e-11 | 5.9e-11 | 5.8e-11 |",
                        "| float64 | 1024 | 128 | 200 | 7.2e-4 | 1.4e-19 | 1.1e-19 | 0 | 4.2e-22 | 4.2e-22 | 0 |"]
    text = reproducible.markdown_throughput(res).splitlines()
    assert text[0] == "| model, dtype | batch | m | ordered, P = 1 | ordered, P = 2 | exact, P = 1 | exact, P = 2 |"
    assert text[2:] == ["| MLP float32 | 128 | 32 | 0.69 | 0.63 | 0.50 | 0.49 |",
                        "| MLP float32 | 1024 | 128 | 0.82 | 0.69 | 0.80 | 0.70 |",
                        "| CNN float32 | 128 | 32 | 1.01 | 0.95 | 1.00 | 0.93 |"]
    assert reproducible.markdown_throughput({"accuracy": res["accuracy"]}) is None  # --accuracy alone

    text = watchdog.markdown({"ranks": 2, "batch": 128, "blocks": 6, "block_steps": 25, "step_ms_off": 5.96,
                              "step_ms_on": 5.97, "median_ratio_on_off": 1.0071, "hook_ns": 702.0})
    assert text == ("Cost: 0.70 µs a step for the hook against a 5.96 ms step (0.01%) at P=2, batch 128; side by side "
                    "in one job (`python -m bench.watchdog`, 6 alternated blocks of 25 steps each way) the on/off step "
                    "time ratio was 1.007.")


def test_the_readme_tables_are_the_committed_bench_json():
    """No benchmark table in the README is edited by hand: rendering bench/results/bench.json (the
    last full `make bench`, committed beside them) gives the README as it is."""
    import json
    from pathlib import Path

    from bench import readme_tables

    repo = Path(__file__).resolve().parents[1]
    readme = (repo / "README.md").read_text()
    results = json.loads((repo / "bench" / "results" / "bench.json").read_text())
    new, done = readme_tables.render(readme, results)
    assert done and all(v == "rewritten" for v in done.values()), done
    assert new == readme
