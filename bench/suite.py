"""``python -m bench``: paranet's benchmarks, run side by side; table, bench/results/bench.json, scaling.png.

Every figure is the MNIST MLP 784-128-10 in float32 with plain SGD, one rank per core (one BLAS
thread per rank, also at P=1 so that P=1 compares like with like), steady-state samples/s with
warm-up excluded, median of several repeats. Each (ranks, batch) case is one
``mpiexec -n P python -m bench.engine`` run in which the contenders alternate segment by
segment, so a noisy machine slows all of them alike and the ratios hold; the targets are judged
on these steady-state ratios. Then they alternate step by step (median step times; each step
starts with the other contender's arrays in the caches), shown beside as a cold-cache view.

"engine" is the trainer's path with its default --allreduce auto: where several ranks share a
machine its gradients are summed in shared memory. "engine_mpi" is the same path summing with
MPI_Allreduce, as the baseline does; target 1 compares that one, so it measures the engine's own
overhead and not the faster reduction.

Targets (PASS/FAIL in the table):
  1. engine (engine_mpi where P > 1) >= 0.95 x the hand-written numpy + mpi4py loop, P = 1, 2, 4 and
     global batch 128, 1024;
  2. engine >= 4 x PyTorch DDP (gloo) at P=2 batch 128 and >= 2 x at batch 1024 (where torch imports);
  3. engine >= 70 % of the compute-plus-communication limit at P=2 batch 1024:
     B / (B * 409088 / (P * GEMM FLOP/s) + time to sum the gradients), both measured in the same
     run, the sum's time the faster of MPI_Allreduce and the shared-memory sum;
  6. per-rank peak RSS <= 150 MB with the MLP trainer at P=4.
Also: samples/s vs P (strong scaling at batch 1024, weak at 128 a rank), time to accuracy of
``mpiexec -n 2 python -m paranet.train`` (--time-to-accuracy), and bench/bench_data.py (--data-bench).
The CNN step against PyTorch and its GEMM limit: bench/cnn.py (bench/results/cnn.json; not with --quick).
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
JSON_TAG = "BENCH_JSON "
TARGET_OVERHEAD = 0.95
TARGET_TORCH = {128: 4.0, 1024: 2.0}
TARGET_LIMIT = 0.70
TARGET_RSS_MB = 150.0
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def worker_env():
    """One BLAS thread a rank (the ranks share the cores), this checkout importable."""
    env = dict(os.environ)
    env.update({k: "1" for k in THREAD_VARS})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def mpiexec_for(python, bind="none"):
    """mpiexec beside ``python``, with hydra's ``-bind-to`` option unless ``bind`` is "none"."""
    cmd = [str(Path(python).parent / "mpiexec")]
    return cmd if bind == "none" else cmd + ["-bind-to", bind]


def run_json(cmd, timeout):
    """Run ``cmd``; return the dict printed on its ``BENCH_JSON`` line (rank 0's)."""
    p = subprocess.run(cmd, cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=timeout)
    for line in p.stdout.splitlines():
        if line.startswith(JSON_TAG):
            if p.returncode != 0:
                break
            return json.loads(line[len(JSON_TAG):])
    raise RuntimeError(f"{' '.join(cmd)} failed (exit {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")


def run_worker(args, ranks, batch):
    """One side-by-side run of every contender at ``ranks`` x global ``batch``."""
    steps = max(args.min_steps, round(args.segment_samples / batch))
    cmd = [*mpiexec_for(args.python, args.bind_to), "-n", str(ranks), args.python, "-m", "bench.engine", "--batch", str(batch),
           "--steps", str(steps), "--warmup", str(args.warmup), "--repeats", str(args.repeats),
           "--stepwise", str(args.stepwise), "--profile-steps", str(args.profile_steps), "--cprofile", str(args.cprofile),
           "--torch", "off" if args.no_torch else "auto"]
    res = run_json(cmd, timeout=args.case_timeout)
    res["command"] = " ".join(cmd)
    return res


def run_check(args, ranks, batch=128, steps=5):
    """Engine, baseline (and torch) trained from the same start on the same data: parameter distance."""
    cmd = [*mpiexec_for(args.python), "-n", str(ranks), args.python, "-m", "bench.engine", "--batch", str(batch),
           "--check", str(steps), "--torch", "off" if args.no_torch else "auto"]
    return run_json(cmd, timeout=120)


def machine_info(python):
    """What the figures depend on: cores, CPU, numpy and its BLAS, MPI, load, the engine's commit."""
    info = {"nproc": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    try:
        info["cpus_allowed"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    probe = ("import json, numpy, threadpoolctl\n"
             "from mpi4py import MPI\n"
             "print(json.dumps({'numpy': numpy.__version__, 'mpi_library': ' '.join(MPI.Get_library_version().strip().splitlines()[0].split()),"
             " 'mpi4py': __import__('mpi4py').__version__,"
             " 'blas': [{k: i.get(k) for k in ('internal_api', 'version', 'architecture', 'num_threads')}"
             " for i in threadpoolctl.threadpool_info()]}))")
    try:
        p = subprocess.run([python, "-c", probe], env=worker_env(), capture_output=True, text=True, timeout=60)
        info.update(json.loads(p.stdout))
    except (subprocess.SubprocessError, ValueError) as e:
        info["probe_error"] = str(e)
    info["worker_python"] = python
    info["threads_per_rank"] = 1
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        info["git_commit"] = git("rev-parse", "HEAD")
        info["engine_uncommitted"] = git("status", "--porcelain", "--", "paranet").splitlines()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def memory_case(args, tmp):
    """Per-rank VmHWM of the MLP trainer at P=4 (``bench.rss`` wraps ``paranet.cli.main``), with the
    data staged in shared memory (the default for MNIST) and read from HDF5 each step. The target:
    at most TARGET_RSS_MB a rank plus the one shared copy of the data per machine."""
    from paranet.data import ensure_default_dataset

    ensure_default_dataset()  # converting MNIST on first use would dominate rank 0's peak
    out = {"ranks": 4, "steps": args.memory_steps, "target_mb": TARGET_RSS_MB}
    for mode in ("on", "off"):
        folder = Path(tmp) / f"rss-{mode}"
        folder.mkdir()
        metrics = Path(tmp) / f"rss-{mode}.json"
        cmd = [*mpiexec_for(args.python), "-n", "4", args.python, "-m", "bench.rss", "--max-steps", str(args.memory_steps),
               "--checkpoint", str(Path(tmp) / "rss.ckpt.h5"), "--metrics", str(metrics), "--data-in-memory", mode]
        env = {**worker_env(), "PARANET_BENCH_RSS_DIR": str(folder)}
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        ranks = sorted((json.loads(f.read_text()) for f in folder.glob("rank*.json")), key=lambda r: r["rank"])
        if p.returncode != 0 or len(ranks) != 4:
            raise RuntimeError(f"memory run failed (exit {p.returncode}, {len(ranks)} reports):\n{p.stderr[-3000:]}")
        shared_mb = json.loads(metrics.read_text()).get("data_in_memory_bytes", 0) / 1e6
        mb = [r["vm_hwm_kib"] * 1024 / 1e6 for r in ranks]
        out[f"data_in_memory_{mode}"] = {
            "command": " ".join(cmd), "vm_hwm_kib_per_rank": [r["vm_hwm_kib"] for r in ranks],
            "rss_shmem_kib_per_rank": [r.get("rss_shmem_kib") for r in ranks], "peak_mb_per_rank": mb,
            "max_mb": max(mb), "shared_copy_mb": shared_mb, "max_mb_less_shared_copy": max(mb) - shared_mb}
    worst = max(out[f"data_in_memory_{m}"]["max_mb_less_shared_copy"] for m in ("on", "off"))
    out.update(max_mb=worst, peak_mb_per_rank=out["data_in_memory_on"]["peak_mb_per_rank"],
               **{"pass": worst <= TARGET_RSS_MB})
    return out


def time_to_accuracy(args, tmp):
    """Wall time of ``mpiexec -n 2 python -m paranet.train`` with defaults, start-up included."""
    from paranet.data import ensure_default_dataset
    import paranet.nn

    ensure_default_dataset()  # built once beforehand: the timing is of training, not of conversion
    out = []
    for model in args.tta_models:
        if model == "cnn" and not hasattr(paranet.nn, "Conv2D"):
            out.append({"model": model, "skipped": "paranet.nn.Conv2D does not exist"})
            continue
        metrics = Path(tmp) / f"tta_{model}.json"
        cmd = [*mpiexec_for(args.python), "-n", "2", args.python, "-m", "paranet.train", "--model", model,
               "--metrics", str(metrics), "--checkpoint", str(Path(tmp) / f"tta_{model}.ckpt.h5")]
        t = time.perf_counter()
        p = subprocess.run(cmd, cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=1800)
        wall = time.perf_counter() - t
        if p.returncode != 0:
            out.append({"model": model, "command": " ".join(cmd), "error": p.stderr[-2000:]})
            continue
        m = json.loads(metrics.read_text())
        out.append({"model": model, "command": " ".join(cmd), "wall_seconds": wall, "test_accuracy": m["test_accuracy"],
                    "train_seconds": m["wall_seconds"], "steps": m["steps"], "epochs": m["flags"]["epochs"],
                    "samples_per_second": m["samples_per_second"]})
    return out


def plan_cases(args):
    """(ranks, global batch) pairs: every --procs x --batches, plus weak scaling at --weak-local a rank."""
    cases = [(p, b) for p in args.procs for b in args.batches]
    if args.weak_local:
        cases += [(p, args.weak_local * p) for p in args.procs]
    return sorted(set(cases), key=lambda c: (c[1] // c[0] != args.weak_local, c[1], c[0]))


def evaluate_targets(results):
    """Rows of (target, case, measured, wanted, PASS/FAIL/SKIP).

    Judged on the steady state, as the issue's figures are: the median over repeats of the
    ratio within one repeat (two segments of many steps run back to back). The step-by-step
    alternation is shown beside it: there every step starts with the other contender's
    arrays in the caches, a cold-cache view that favours the implementation touching less
    memory (the baseline reuses its activation buffers in place).
    """
    rows = []
    cases = {(c["ranks"], c["batch"]): c for c in results["cases"]}
    for (p, b), c in sorted(cases.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if b in (128, 1024):
            r = statistics.median(c.get("engine_mpi_over_baseline_paired") or c["engine_over_baseline_paired"])
            rows.append({"target": "1 engine/baseline", "ranks": p, "batch": b, "value": r, "want": TARGET_OVERHEAD,
                         "result": "PASS" if r >= TARGET_OVERHEAD else "FAIL"})
    for b, want in TARGET_TORCH.items():
        c = cases.get((2, b))
        if c is None:
            continue
        if "torch_samples_per_s" in c:
            r = statistics.median(c["engine_over_torch_paired"])
            rows.append({"target": "2 engine/torch DDP", "ranks": 2, "batch": b, "value": r, "want": want,
                         "result": "PASS" if r >= want else "FAIL"})
        else:
            rows.append({"target": "2 engine/torch DDP", "ranks": 2, "batch": b, "value": None, "want": want,
                         "result": "SKIP (torch not importable by the worker python)"})
    c = cases.get((2, 1024))
    if c is not None:
        r = c["engine_samples_per_s"] / c["limit_samples_per_s"]
        rows.append({"target": "3 engine/limit", "ranks": 2, "batch": 1024, "value": r, "want": TARGET_LIMIT,
                     "result": "PASS" if r >= TARGET_LIMIT else "FAIL"})
    mem = results.get("memory")
    if isinstance(mem, dict) and "max_mb" in mem:
        rows.append({"target": "6 peak RSS MB/rank less the shared data", "ranks": 4, "batch": 128, "value": mem["max_mb"],
                     "want": TARGET_RSS_MB, "result": "PASS" if mem["pass"] else "FAIL"})
    return rows


# -- output ---------------------------------------------------------------------------------------

def _f(v, fmt="{:,.0f}"):
    return "—" if v is None else fmt.format(v)


def print_report(results, args):
    info = results["machine"]
    print(f"paranet bench — MLP 784-128-10 float32, plain SGD, 1 BLAS thread a rank (also at P=1), ranks bound: {args.bind_to}, "
          f"medians of {args.repeats} interleaved repeats")
    print(f"machine: {info.get('nproc')} cores ({info.get('cpu', '?')}), numpy {info.get('numpy')}, "
          f"{info.get('mpi_library')}, load average {results['load_average']['before']} -> {results['load_average']['after']}")
    if info.get("nproc", 0) < max(args.procs):
        print(f"note: P={max(args.procs)} on {info.get('nproc')} cores is oversubscribed: ranks share cores, "
              "its figures measure time-slicing, not scaling")
    if info.get("engine_uncommitted"):
        print(f"note: the engine had uncommitted changes when measured: {', '.join(info['engine_uncommitted'])}")

    print("\nsegments: samples/s, median of the repeats; eng/base, eng/torch: median of the per-repeat ratios "
          "[min-max]; the targets are judged on these.\nstep: the same ratios from the step-by-step "
          "alternation (median step times, cold caches). engine: the trainer's default (shared-memory sum "
          "where P > 1);\nmpi/base: engine_mpi (MPI_Allreduce, as the baseline) over the baseline, target 1 where shown")
    print(f"{'P':>2} {'batch':>6} {'local':>6} {'engine/s':>10} {'baseline/s':>10} {'eng/base':>8} {'[min-max]':>11} "
          f"{'step':>6} {'mpi/base':>8} {'torch/s':>9} {'eng/torch':>9} {'step':>6} {'limit/s':>9} {'eng/limit':>9} {'step':>6}")
    for c in results["cases"]:
        paired = c["engine_over_baseline_paired"]
        t = c.get("torch_samples_per_s")
        tp = c.get("engine_over_torch_paired")
        sw = c.get("stepwise", {})
        mp = c.get("engine_mpi_over_baseline_paired")
        print(f"{c['ranks']:>2} {c['batch']:>6} {c['local_batch']:>6} {c['engine_samples_per_s']:>10,.0f} "
              f"{c['baseline_samples_per_s']:>10,.0f} {statistics.median(paired):>8.3f} "
              f"[{min(paired):.2f}-{max(paired):.2f}] {_f(sw.get('engine_over_baseline'), '{:.3f}'):>6} "
              f"{_f(mp and statistics.median(mp), '{:.3f}'):>8} "
              f"{_f(t):>9} {_f(tp and statistics.median(tp), '{:.2f}'):>9} {_f(sw.get('engine_over_torch'), '{:.2f}'):>6} "
              f"{c['limit_samples_per_s']:>9,.0f} {c['engine_samples_per_s'] / c['limit_samples_per_s']:>9.2f} "
              f"{_f(sw['engine_samples_per_s'] / sw['limit_samples_per_s'] if sw else None, '{:.2f}'):>6}")
    print("\nlimit = B / (B*409088 / (P * GEMM FLOP/s) + the faster sum of the gradients), measured in the same run:")
    print(f"{'P':>2} {'batch':>6} {'GEMM GFLOP/s/core':>18} {'compute ms':>11} {'MPI_Allreduce us':>17} "
          f"{'shared-mem sum us':>18} {'(bytes)':>9}")
    for c in results["cases"]:
        print(f"{c['ranks']:>2} {c['batch']:>6} {c['gemm_gflops']:>18.1f} {c['limit_compute_ms']:>11.3f} "
              f"{c['allreduce_us']:>17.1f} {_f(c.get('shm_allreduce_us'), '{:.1f}'):>18} {c['allreduce_bytes']:>9,}")

    for kind, rows in results["scaling"].items():
        print(f"\nscaling, {kind}: samples/s vs P")
        impls = [k for k in ("engine", "engine_mpi", "baseline", "torch", "limit") if any(k in r for r in rows)]
        print(f"{'P':>2} {'batch':>6} " + " ".join(f"{k:>11}" for k in impls) + f" {'engine speed-up':>16}"
              f" {'engine comm share':>18}")
        base = rows[0].get("engine") if rows else None
        for r in rows:
            share = r.get("engine_comm_share")
            print(f"{r['ranks']:>2} {r['batch']:>6} " + " ".join(f"{_f(r.get(k)):>11}" for k in impls)
                  + f" {_f(base and r['engine'] / base, '{:.2f}x'):>16} {_f(share and 100 * share, '{:.1f}%'):>18}")

    print("\nwhere a step's time goes, µs per step (rank 0; engine methods wrapped with timers):")
    for c in results["cases"]:
        ph = c.get("phases")
        if not ph or c["batch"] not in (128, 1024) or c["ranks"] not in (1, 2, max(args.procs)):
            continue
        print(f"  P={c['ranks']} batch {c['batch']}: engine {ph['engine_total_us']:,.0f} µs, "
              f"baseline {ph['baseline_total_us']:,.0f} µs")
        if len(ph.get("wait_us_per_rank", ())) > 1:
            print("    engine   wait for the slowest rank, each rank: " + " ".join(f"{w:.0f}" for w in ph["wait_us_per_rank"]))
        for k, v in sorted(ph["engine_us"].items(), key=lambda kv: -kv[1]):
            print(f"    engine   {k:<55} {v:>9.1f}")
        for k, v in ph["baseline_us"].items():
            print(f"    baseline {k:<55} {v:>9.1f}")

    chk = results.get("correctness")
    if chk:
        print("\ncorrectness: engine vs baseline (and torch) after the same SGD steps from the same start:")
        for c in chk:
            diffs = ", ".join(f"{k[len('max_abs_diff_'):]} {v:.2e}" for k, v in c.items() if k.startswith("max_abs_diff_"))
            print(f"  P={c['ranks']} batch {c['batch']}, {c['steps']} steps: engine moved {c['engine_moved']:.2e}; "
                  f"max |diff| {diffs}")

    mem = results.get("memory")
    if isinstance(mem, dict) and "max_mb" in mem:
        for mode in ("on", "off"):
            m = mem.get(f"data_in_memory_{mode}")
            if m:
                print(f"\nmemory: trainer at P=4 --data-in-memory {mode}, {mem['steps']} steps, peak RSS per rank (MB): "
                      + ", ".join(f"{v:.1f}" for v in m["peak_mb_per_rank"])
                      + f"; shared copy of the data {m['shared_copy_mb']:.0f} MB a machine; "
                      f"RssShmem at the end (MB): " + ", ".join(f"{(v or 0) / 1024:.1f}" for v in m["rss_shmem_kib_per_rank"]))
    tta = results.get("time_to_accuracy")
    if isinstance(tta, list):
        print("\ntime to accuracy, mpiexec -n 2 python -m paranet.train (defaults), start-up included:")
        for t in tta:
            if "wall_seconds" in t:
                print(f"  {t['model']}: {t['wall_seconds']:.1f} s wall ({t['train_seconds']:.1f} s in the trainer), "
                      f"{t['epochs']} epochs, {t['steps']} steps, test accuracy {100 * t['test_accuracy']:.2f} %")
            else:
                print(f"  {t['model']}: {t.get('skipped') or 'failed: ' + t.get('error', '')[-300:]}")

    print(f"\n{'target':<22} {'P':>2} {'batch':>6} {'measured':>10} {'wanted':>8}  result")
    for r in results["targets"]:
        print(f"{r['target']:<22} {r['ranks']:>2} {r['batch']:>6} {_f(r['value'], '{:.3f}'):>10} "
              f"{'>=' if 'RSS' not in r['target'] else '<='}{r['want']:<6}  {r['result']}")


# -- the README's tables (python -m bench.readme_tables rewrites them from bench.json) ------------

def _ratio3(v):
    """A ratio to three significant figures, as the README writes them: 0.962, 7.24, 11.1; None: —."""
    if v is None:
        return "—"
    digits = max(0, 3 - len(str(int(abs(v))))) if abs(v) >= 1 else 3
    return f"{v:.{digits}f}"


def markdown_cases(cases):
    """The README's table of the cases at the targets' batches (128 and 1024): engine samples/s
    and the medians of the per-repeat ratios the targets judge."""
    lines = ["| P | global batch | engine samples/s | engine_mpi / hand-written | engine / hand-written "
             "| engine / PyTorch DDP | share of the compute+comm limit |", "|---|---|---|---|---|---|---|"]
    for c in sorted((c for c in cases if c["batch"] in (128, 1024)), key=lambda c: (c["batch"], c["ranks"])):
        eb = statistics.median(c["engine_over_baseline_paired"])
        mp, tp = c.get("engine_mpi_over_baseline_paired"), c.get("engine_over_torch_paired")
        mpi = f"{statistics.median(mp):.3f}" if mp else f"{eb:.3f} (P=1: no sum)" if c["ranks"] == 1 else "—"
        lines.append(f"| {c['ranks']} | {c['batch']} | {c['engine_samples_per_s']:,.0f} | {mpi} | {eb:.3f} | "
                     f"{_ratio3(tp and statistics.median(tp))} | {c['engine_samples_per_s'] / c['limit_samples_per_s']:.2f} |")
    return "\n".join(lines)


def markdown_scaling(scaling):
    """One table per scaling kind (strong, weak): each contender's samples/s against P, the
    engine's speed-up over the fewest ranks and its efficiency (speed-up per rank added)."""
    names = {"engine": "engine", "engine_mpi": "engine_mpi", "baseline": "hand-written", "torch": "PyTorch DDP",
             "limit": "limit"}
    out = []
    for kind, rows in scaling.items():
        if not rows:
            continue
        impls = [k for k in names if any(r.get(k) for r in rows)]
        base = rows[0]
        out += [f"{kind[0].upper()}{kind[1:]}, samples/s:", "",
                "| P | " + " | ".join(names[k] for k in impls) + " | engine speed-up | efficiency |",
                "|---|" + "---|" * (len(impls) + 2)]
        for r in rows:
            up = r["engine"] / base["engine"]
            out.append(f"| {r['ranks']} | " + " | ".join(_f(r.get(k)) for k in impls)
                       + f" | {up:.2f}× | {100 * up * base['ranks'] / r['ranks']:.0f}% |")
        out.append("")
    return "\n".join(out).rstrip("\n") or None


def markdown_memory(memory):
    """The trainer's peak RSS per rank at P=4, with the data staged in shared memory and read
    from the file, against the target (a rank's peak less the one shared copy a machine)."""
    lines = ["| `--data-in-memory` | peak RSS per rank (MB) | shared copy of the data (MB a machine) "
             "| largest peak less the shared copy (MB) |", "|---|---|---:|---:|"]
    for mode in ("on", "off"):
        m = memory.get(f"data_in_memory_{mode}")
        if m:
            lines.append(f"| {mode} | " + ", ".join(f"{v:.0f}" for v in m["peak_mb_per_rank"])
                         + f" | {m['shared_copy_mb']:.0f} | {m['max_mb_less_shared_copy']:.0f} |")
    lines += ["", f"MLP trainer at P = {memory['ranks']}, {memory['steps']} steps; target: at most "
              f"{memory['target_mb']:.0f} MB a rank plus the shared copy: **{'PASS' if memory['pass'] else 'FAIL'}** "
              f"({memory['max_mb']:.0f} MB)."]
    return "\n".join(lines)


TTA_MODELS = {"mlp": "mlp (784-128-10, 101,770 parameters)",
              "cnn": "cnn (conv 5×5 16 - pool - conv 5×5 32 - pool - fc 128 - fc 10, 80,202 parameters)"}


def markdown_time_to_accuracy(runs):
    """The default runs at P=2: test accuracy against `make accuracy`'s thresholds, and the wall
    time, start-up included, against its target for both runs together."""
    from bench.accuracy import REQUIRED, TARGET_SECONDS

    lines = ["| model | test accuracy (measured, seed 0) | required | wall time, start-up included | epochs | command |",
             "|---|---|---|---|---|---|"]
    for t in runs:
        need = f"≥ {100 * REQUIRED[t['model']]:.1f}%" if t["model"] in REQUIRED else ""
        if "wall_seconds" not in t:
            why = t.get("skipped") or "failed: " + (t.get("error", "").strip().splitlines() or ["?"])[-1]
            lines.append(f"| {TTA_MODELS.get(t['model'], t['model'])} | {why} | {need} | | | |")
            continue
        argv = t["command"].split()
        cmd = f"{Path(argv[0]).name} {argv[1]} {argv[2]} python -m paranet.train" + (
            f" --model {t['model']}" if t["model"] != "mlp" else "")
        lines.append(f"| {TTA_MODELS.get(t['model'], t['model'])} | {100 * t['test_accuracy']:.2f}% | {need} | "
                     f"{t['wall_seconds']:.1f} s | {t['epochs']} | `{cmd}` |")
    timed = [t["wall_seconds"] for t in runs if "wall_seconds" in t]
    if timed and {t["model"] for t in runs if "wall_seconds" in t} >= set(REQUIRED):
        total = sum(timed)
        lines += ["", f"Both runs together: {total:.1f} s (target under {TARGET_SECONDS:.0f} s): "
                  f"**{'PASS' if total < TARGET_SECONDS else 'FAIL'}**."]
    return "\n".join(lines) if runs else None


def markdown_targets(targets):
    """Every target the bench judges: measured against wanted, PASS, FAIL or SKIP."""
    lines = ["| target | P | global batch | measured | wanted | result |", "|---|---|---|---|---|---|"]
    for r in targets:
        sign = "≤" if "RSS" in r["target"] else "≥"
        lines.append(f"| {r['target']} | {r['ranks']} | {r['batch']} | {_ratio3(r['value'])} | {sign} {r['want']:g} "
                     f"| {r['result']} |")
    return "\n".join(lines)


def plot(results, path):
    """samples/s vs P, strong and weak scaling side by side; None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): scaling.png not drawn"
    kinds = list(results["scaling"].items())
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4.2), squeeze=False)
    nproc = results["machine"].get("nproc") or 0
    for ax, (kind, rows) in zip(axes[0], kinds):
        for impl, style in (("engine", "o-"), ("engine_mpi", "o:"), ("baseline", "s--"), ("torch", "^-"), ("limit", "k:")):
            pts = [(r["ranks"], r[impl]) for r in rows if r.get(impl)]
            if pts:
                ax.plot(*zip(*pts), style, label=impl)
        if nproc and rows and max(r["ranks"] for r in rows) > nproc:
            ax.axvspan(nproc + 0.5, max(r["ranks"] for r in rows) + 0.5, color="0.9", label=f"> {nproc} cores")
        ax.set_xscale("log", base=2)
        ax.set_xticks([r["ranks"] for r in rows], [str(r["ranks"]) for r in rows])
        ax.set_xlabel("ranks P")
        ax.set_ylabel("samples/s")
        ax.set_title(kind)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("paranet MLP 784-128-10, float32 SGD, 1 thread a rank")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def scaling_tables(cases, args):
    def row(c):
        r = {"ranks": c["ranks"], "batch": c["batch"], "engine": c["engine_samples_per_s"],
             "baseline": c["baseline_samples_per_s"], "limit": c["limit_samples_per_s"],
             "engine_comm_share": c.get("engine_comm_share")}
        for impl in ("torch", "engine_mpi"):
            if f"{impl}_samples_per_s" in c:
                r[impl] = c[f"{impl}_samples_per_s"]
        return r
    out = {}
    strong_b = 1024 if 1024 in args.batches else max(args.batches)
    out[f"strong (global batch {strong_b})"] = [row(c) for c in cases if c["batch"] == strong_b]
    if args.weak_local:
        out[f"weak ({args.weak_local} a rank)"] = [row(c) for c in cases if c["batch"] == args.weak_local * c["ranks"]]
    return {k: sorted(v, key=lambda r: r["ranks"]) for k, v in out.items()}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0],
                                epilog="\n".join(__doc__.splitlines()[2:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny step counts and 2 repeats (the smoke test's setting; figures are not meaningful)")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4], help="rank counts P (default 1 2 4)")
    p.add_argument("--batches", type=int, nargs="+", default=[128, 1024], help="global batches (default 128 1024)")
    p.add_argument("--weak-local", type=int, default=128, help="weak scaling: this batch a rank (0: off; default 128)")
    p.add_argument("--repeats", type=int, default=None, help="timed segments per contender (default 15, quick 2)")
    p.add_argument("--segment-samples", type=int, default=None,
                   help="samples in one timed segment, i.e. steps = this / batch (default 12800, quick 512)")
    p.add_argument("--min-steps", type=int, default=None, help="at least this many steps a segment (default 10, quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps of each contender first (default 10, quick 2)")
    p.add_argument("--stepwise", type=int, default=None,
                   help="steps of the step-by-step (cold-cache) alternation shown beside the targets (default 300, quick 6; 0: off)")
    p.add_argument("--profile-steps", type=int, default=None, help="steps of the per-phase breakdown (default 100, quick 3)")
    p.add_argument("--cprofile", type=int, default=0, metavar="STEPS", help="also cProfile STEPS engine steps per case")
    p.add_argument("--python", default=sys.executable,
                   help="interpreter of the workers, with mpiexec beside it (default: this one); e.g. a venv "
                        "with torch, to add the PyTorch DDP rows")
    p.add_argument("--bind-to", choices=["none", "core", "hwthread"], default="none",
                   help="pin each rank of the timed cases to a core (mpiexec -bind-to): steadier steps when P "
                        "equals the cores, because the scheduler cannot stack two ranks on one core")
    p.add_argument("--no-torch", action="store_true", help="leave PyTorch out even where it imports")
    p.add_argument("--no-memory", action="store_true", help="skip the P=4 trainer peak-RSS run")
    p.add_argument("--memory-steps", type=int, default=None, help="trainer steps of the memory run (default 200, quick 20)")
    p.add_argument("--time-to-accuracy", action="store_true",
                   help="also time `mpiexec -n 2 python -m paranet.train` to its end, MLP and CNN (minutes)")
    p.add_argument("--tta-models", nargs="+", default=["mlp", "cnn"], help="models for --time-to-accuracy")
    p.add_argument("--data-bench", action="store_true", help="also run bench/bench_data.py (writes big temporary files)")
    p.add_argument("--data-scale", type=int, default=None, help="bench_data's --scale (its default: 10)")
    p.add_argument("--out", type=Path, default=RESULTS,
                   help="folder for bench.json and scaling.png (with --quick: bench/results/quick)")
    p.add_argument("--no-plot", action="store_true", help="do not draw scaling.png")
    p.add_argument("--case-timeout", type=int, default=600, help="seconds one case may take")
    args = p.parse_args(argv)
    quick = args.quick
    if quick and args.out == RESULTS:  # a smoke run never replaces the results the README shows
        args.out = RESULTS / "quick"
    for name, full, small in (("repeats", 15, 2), ("segment_samples", 12800, 512), ("min_steps", 10, 2),
                              ("warmup", 10, 2), ("stepwise", 300, 6), ("profile_steps", 100, 3), ("memory_steps", 200, 20)):
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    return args


def main(argv=None):
    """Run the benchmarks, print the table, write ``--out``/bench.json (and scaling.png); return the results."""
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    results = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "machine": machine_info(args.python), "load_average": {"before": os.getloadavg()[0]},
               "targets_wanted": {"engine_over_baseline": TARGET_OVERHEAD, "engine_over_torch": TARGET_TORCH,
                                  "engine_over_limit": TARGET_LIMIT, "peak_rss_mb": TARGET_RSS_MB}}
    results["correctness"] = [run_check(args, p) for p in sorted({1, 2} & set(args.procs) or {1})]
    results["cases"] = []
    for ranks, batch in plan_cases(args):
        print(f"bench: P={ranks} global batch {batch} ...", file=sys.stderr, flush=True)
        results["cases"].append(run_worker(args, ranks, batch))
    results["scaling"] = scaling_tables(results["cases"], args)
    with tempfile.TemporaryDirectory(prefix="paranet-bench-") as tmp:
        if args.no_memory:
            results["memory"] = {"skipped": "--no-memory"}
        else:
            print("bench: trainer peak RSS at P=4 ...", file=sys.stderr, flush=True)
            results["memory"] = memory_case(args, tmp)
        if args.time_to_accuracy:
            print("bench: time to accuracy ...", file=sys.stderr, flush=True)
            results["time_to_accuracy"] = time_to_accuracy(args, tmp)
        else:
            results["time_to_accuracy"] = {"skipped": "run with --time-to-accuracy"}
    from bench import trainer_e2e  # the trainer end to end against a hand-written in-memory loop (issue 13, target 1)
    print("bench: the trainer end to end against the hand-written loop ...", file=sys.stderr, flush=True)
    results["trainer_e2e"] = trainer_e2e.main(
        ["--python", args.python, "--procs", *map(str, sorted({1, 2} & set(args.procs) or {1})),
         "--batches", *map(str, args.batches), "--modes", "on", "off"]
        + (["--repeats", "1", "--epochs", "1"] if args.quick else []))
    from bench import threads as threads_bench  # BLAS threads a rank: bound vs unbound, two hosts vs one (issue 14)
    results["threads"] = {"skipped": "--quick"} if args.quick else threads_bench.main(["--out", str(args.out)])
    from bench import cnn as cnn_bench  # the CNN step against PyTorch and its GEMM limit (issue 13, target 2)
    results["cnn"] = {"skipped": "--quick"} if args.quick else cnn_bench.main(
        ["--out", str(args.out), "--python", args.python] + ["--no-torch"] * args.no_torch)
    from bench import cnn_pieces  # the CNN trainer: a rank's shard in pieces of <= 128 rows against one pass
    results["cnn_pieces"] = {"skipped": "--quick"} if args.quick else cnn_pieces.main(["--python", args.python])
    from bench import reproducible as repro_bench  # --reproducible: cost side by side, accuracy (issue 12)
    results["reproducible"] = repro_bench.main(["--quick"] * args.quick + ["--procs", *map(str, args.procs),
                                                                            "--batches", *map(str, args.batches)])
    from bench import watchdog as watchdog_bench  # --stall-timeout's cost a step, side by side (issue 11)
    results["watchdog"] = watchdog_bench.main(["--blocks", "6" if args.quick else "20"])
    if args.data_bench:
        from bench import bench_data
        results["data"] = bench_data.main([] if args.data_scale is None else ["--scale", str(args.data_scale)])
    else:
        results["data"] = {"skipped": "run with --data-bench"}
    results["targets"] = evaluate_targets(results)
    results["targets"] += trainer_e2e.targets(results["trainer_e2e"])
    results["targets"] += results["cnn"].get("targets", [])
    results["load_average"]["after"] = os.getloadavg()[0]
    results["seconds"] = time.perf_counter() - t_start
    png = args.out / "scaling.png"
    results["plot"] = "skipped: --no-plot" if args.no_plot else (plot(results, png) or str(png))
    (args.out / "bench.json").write_text(json.dumps(results, indent=2))
    print_report(results, args)
    print(f"\nwrote {args.out / 'bench.json'}; plot: {results['plot']}")
    return results
