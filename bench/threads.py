"""``python -m bench.threads``: what BLAS threads a rank cost or save, as ratios measured side by side.

1. bound: ``taskset -c C python -m paranet.train`` (one CPU allowed, no thread variable set, so
   paranet's own rule decides) against the unbound one-thread run (``OMP_NUM_THREADS=1
   OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1``, no taskset). MLP 784-128-10, float32, SGD, global
   batch 128, ``--steps`` steps; the trainer's own samples/s (``--metrics``, training time only).
   Target: bound >= 0.9 x unbound (issue 14: it was 0.024 x, 41 x slower).
2. two hosts (root, ``ip netns``): the same training at P=2 with one rank in each of two network
   namespaces joined by a veth pair (tests/cluster/netns.py, MPICH over TCP), against P=2 on one
   host, with no thread variable set. A ratio, no target: the namespaces share this machine's
   cores, and the gradient sum crosses a TCP connection instead of shared memory.

The runs of one comparison alternate (A, B, A, B, ...) so that a noisy, shared machine slows both
alike; each figure is the median of ``--repeats``. ``--before COMMIT`` adds the same runs with
paranet as it was at COMMIT (``git archive`` into a temporary folder), e.g. the last commit
before paranet.threads, to show before and after in one table. Results: bench/results/threads.json.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
TARGET_BOUND = 0.9


def run_env(code, threads_one=False, extra=None):
    """The environment of a run: paranet from ``code``; thread variables removed, or all set to 1."""
    e = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    if threads_one:
        e.update({k: "1" for k in THREAD_VARS})
    e.update(PYTHONPATH=str(code), PYTHONUNBUFFERED="1", **(extra or {}))
    return e


def train_args(args, data, tmp, tag, *extra):
    return ["-m", "paranet.train", "--data", str(data), "--model", "mlp", "--optimizer", "sgd", "--batch-size", "128",
            "--max-steps", str(args.steps), "--checkpoint", str(Path(tmp) / f"{tag}.ckpt.h5"),
            "--metrics", str(Path(tmp) / f"{tag}.json"), *extra]


def run_case(cmd, env, metrics, cwd, timeout):
    """Run one training; (its metrics, the header's first line or None)."""
    metrics.unlink(missing_ok=True)
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0 or not metrics.exists():
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed (exit {p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    blas = next((line.strip() for line in p.stdout.splitlines() if "BLAS thread" in line), None)
    return json.loads(metrics.read_text()), blas


def alternate(cases, repeats, timeout):
    """Run ``cases`` ({label: (cmd, env, metrics path, cwd)}) round-robin ``repeats`` times."""
    out = {label: {"samples_per_s": [], "comm_share": [], "command": " ".join(map(str, c[0]))} for label, c in cases.items()}
    for _ in range(repeats):
        for label, (cmd, env, metrics, cwd) in cases.items():
            m, blas = run_case(cmd, env, metrics, cwd, timeout)
            sps = m["samples_per_second"]
            out[label]["samples_per_s"].append(sps)
            out[label]["comm_share"].append(m.get("comm_share", 0.0))
            out[label]["header"] = blas
            print(f"bench.threads: {label}: {sps:,.0f} samples/s", file=sys.stderr, flush=True)
    for r in out.values():
        r["median"] = statistics.median(r["samples_per_s"])
        r["comm_share_median"] = statistics.median(r["comm_share"])
    return out


def bound_cases(args, code, data, tmp, cpu, tag):
    """(cases, ratios): the bound run against the unbound one-thread run, and against the bound
    one-thread run (what the best rule could do on that core, which other programs may share)."""
    py = args.python
    bound = ["taskset", "-c", str(cpu), py]
    cases = {
        f"{tag}taskset -c {cpu}, no thread variable": ([*bound, *train_args(args, data, tmp, "bound")], run_env(code),
                                                       Path(tmp) / "bound.json", tmp),
        f"{tag}unbound, thread variables 1": ([py, *train_args(args, data, tmp, "free")], run_env(code, threads_one=True),
                                              Path(tmp) / "free.json", tmp),
        f"{tag}taskset -c {cpu}, thread variables 1": ([*bound, *train_args(args, data, tmp, "bound1")],
                                                       run_env(code, threads_one=True), Path(tmp) / "bound1.json", tmp),
    }
    return cases, {"bound / unbound": (0, 1, TARGET_BOUND), "bound / bound with variables 1": (0, 2, None)}


def two_host_cases(args, code, data, tmp, hosts, tag):
    """(cases, ratios): P=2 over two namespaces against P=2 on one host, without thread variables
    and with them set to 1 (as launch/mpirun.sh sets them)."""
    py, mpiexec = args.python, str(Path(args.python).parent / "mpiexec")
    hostfile = Path(tmp) / "hosts"
    hostfile.write_text("".join(f"{a}:1\n" for a in hosts.addrs))
    two = lambda name: hosts.command(0, [mpiexec, "-n", "2", "-f", hostfile, py, *train_args(args, data, tmp, name)])
    cases = {
        f"{tag}P=2 one host, no thread variable": ([mpiexec, "-n", "2", py, *train_args(args, data, tmp, "one")],
                                                   run_env(code), Path(tmp) / "one.json", tmp),
        f"{tag}P=2 two hosts, no thread variable": (two("two"), hosts.env(run_env(code)), Path(tmp) / "two.json", tmp),
        f"{tag}P=2 two hosts, thread variables 1": (two("two1"), hosts.env(run_env(code, threads_one=True)),
                                                    Path(tmp) / "two1.json", tmp),
    }
    # the same sum as across the hosts (MPI_Allreduce), but through MPICH's shared memory on one host
    cases[f"{tag}P=2 one host, no thread variable, --allreduce mpi"] = (
        [mpiexec, "-n", "2", py, *train_args(args, data, tmp, "onempi", "--allreduce", "mpi")], run_env(code),
        Path(tmp) / "onempi.json", tmp)
    return cases, {"two hosts / one host": (1, 0, None), "two hosts, variables 1 / one host": (2, 0, None),
                   "two hosts, variables 1 / one host MPI_Allreduce": (2, 3, None)}


def compare(cases_and_ratios, repeats, timeout):
    """Alternate the cases; each ratio as the ratio of medians and per round."""
    cases, ratios = cases_and_ratios
    r = alternate(cases, repeats, timeout)
    runs = list(r.values())
    out = {"cases": r, "ratios": {}}
    for name, (num, den, target) in ratios.items():
        a, b = runs[num], runs[den]
        out["ratios"][name] = {"ratio": a["median"] / b["median"], "target": target,
                               "paired": [x / y for x, y in zip(a["samples_per_s"], b["samples_per_s"])]}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.threads", description=__doc__.splitlines()[0],
                                epilog="\n".join(__doc__.splitlines()[2:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="training steps a run (default 300)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each case, alternated (default 3)")
    p.add_argument("--before", metavar="COMMIT", help="also run paranet as it was at COMMIT")
    p.add_argument("--paranet", type=Path, default=REPO, metavar="DIR",
                   help="run the paranet package in DIR/paranet instead of this checkout's (e.g. a patched copy)")
    p.add_argument("--parts", nargs="+", choices=["bound", "two-hosts"], default=["bound", "two-hosts"],
                   help="which comparisons to run (default both)")
    p.add_argument("--python", default=sys.executable, help="interpreter of the runs, mpiexec beside it")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for threads.json")
    p.add_argument("--timeout", type=int, default=300, help="seconds one run may take")
    args = p.parse_args(argv)

    from paranet.data import ensure_default_dataset
    data = ensure_default_dataset()
    cpu = min(os.sched_getaffinity(0))
    results = {"steps": args.steps, "repeats": args.repeats, "cpus_allowed": len(os.sched_getaffinity(0)),
               "load_average_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="paranet-bench-threads-") as tmp:
        codes, old = {"": args.paranet}, None
        if args.before:
            old = Path(tmp) / "before"
            old.mkdir()
            archive = subprocess.run(["git", "archive", args.before, "paranet", "datasets/mnist"], cwd=REPO, capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
            codes = {f"before ({args.before}) ": old, "now: ": args.paranet}
        datas = {tag: old_dataset(args, code, tmp) if code == old else data for tag, code in codes.items()}
        results["bound"] = {} if "bound" in args.parts else {"skipped": "--parts"}
        for tag, code in codes.items() if "bound" in args.parts else ():
            results["bound"][tag.strip() or "now"] = compare(bound_cases(args, code, datas[tag], tmp, cpu, tag),
                                                             args.repeats, args.timeout)

        results["two_hosts"] = two_hosts(args, codes, datas, tmp)
    results["load_average_after"] = os.getloadavg()[0]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "threads.json").write_text(json.dumps(results, indent=2))
    report(results)
    return results


def old_dataset(args, code, tmp):
    """MNIST converted by the older paranet in ``code`` (its file format may differ from today's)."""
    path = Path(tmp) / "before-mnist.h5"
    subprocess.run([args.python, "-m", "paranet.data", "mnist", "--out", str(path)], cwd=tmp, env=run_env(code),
                   check=True, capture_output=True, timeout=600)
    return path


def two_hosts(args, codes, datas, tmp):
    """The two-host comparison, or why it was skipped."""
    if "two-hosts" not in args.parts:
        return {"skipped": "--parts"}
    sys.path.insert(0, str(REPO / "tests"))
    from cluster.netns import TwoHosts, missing_requirement
    reason = missing_requirement()
    if reason:
        return {"skipped": reason}
    hosts = TwoHosts(addrs=("10.233.0.1", "10.233.0.2"), tag=f"b{os.getpid()}").create()
    out = {}
    try:
        for tag, code in codes.items():
            out[tag.strip() or "now"] = compare(two_host_cases(args, code, datas[tag], tmp, hosts, tag), args.repeats,
                                                args.timeout)
    finally:
        hosts.delete()
    return out


def report(results):
    print(f"bench.threads: MLP 784-128-10 float32, SGD, batch 128, {results['steps']} steps a run, "
          f"median of {results['repeats']} alternated runs; {results['cpus_allowed']} CPUs allowed; "
          f"load average {results['load_average_before']:.2f} -> {results['load_average_after']:.2f}")
    for part, title in (("bound", "one CPU allowed (taskset) vs unbound with 1 thread"),
                        ("two_hosts", "two hosts (network namespaces) vs one host, P=2")):
        res = results[part]
        print(f"\n{title}:")
        if "skipped" in res:
            print(f"  skipped: {res['skipped']}")
            continue
        for code, r in res.items():
            for label, c in r["cases"].items():
                print(f"  {label:<52} {c['median']:>9,.0f} samples/s  comm {100 * c['comm_share_median']:4.1f}%  "
                      f"{(c['header'] or '').rsplit('; ', 1)[-1]}")
            for name, q in r["ratios"].items():
                verdict = "" if q["target"] is None else f"  target >= {q['target']}: {'PASS' if q['ratio'] >= q['target'] else 'FAIL'}"
                print(f"  {'ratio ' + name:<52} {q['ratio']:>9.3f}  per round {', '.join(f'{x:.2f}' for x in q['paired'])}{verdict}")


# -- the README's tables (python -m bench.readme_tables rewrites them from bench.json) ------------

def _untagged(part, code):
    """{case label without the tag --before gives it: case} of one code's comparison in ``part``."""
    tag = "" if code == "now" else f"{code} "  # main(): the results are keyed by tag.strip() or "now"
    return {label[len(tag):]: c for label, c in part[code]["cases"].items()}


def _ratio_cell(r, digits, rounds=False):
    """A ratio in bold, "(54x slower)" when under 0.5, and the range of the rounds if asked."""
    cell = f"**{r['ratio']:.{digits if r['ratio'] >= 0.1 else 3}f}**"
    notes = [f"{1 / r['ratio']:.0f}x slower"] if r["ratio"] < 0.5 else []
    if rounds and len(r["paired"]) > 1:
        notes.append(f"rounds {min(r['paired']):.2f} to {max(r['paired']):.2f}")
    return cell + (f" ({'; '.join(notes)})" if notes else "")


def markdown_bound(results):
    """The README's table of part 1: the bound run, the unbound one-thread run and the bound
    one-thread run, samples/s (a column for --before's paranet where it ran), and bound / unbound."""
    bound = results.get("bound")
    if not bound or "skipped" in bound:
        return None
    codes = list(bound)  # "now", or "before (COMMIT)" and "now:"
    cases = {code: list(_untagged(bound, code).values()) for code in codes}  # in bound_cases() order
    first = next(iter(_untagged(bound, codes[0])))
    cpu = first.split("taskset -c ")[1].split(",")[0]
    runs = [f"`taskset -c {cpu} python -m paranet.train ...` (no thread variable)",
            "`OMP_NUM_THREADS=1 ... python -m paranet.train ...` (unbound)",
            f"`OMP_NUM_THREADS=1 ... taskset -c {cpu} python -m paranet.train ...`"]
    heads = ["samples/s"] if len(codes) == 1 else [f"{code.rstrip(':')}, samples/s" for code in codes]
    lines = ["| run | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(codes)]
    for i, run in enumerate(runs):
        lines.append(f"| {run} | " + " | ".join(f"{cases[code][i]['median']:,.0f}" for code in codes) + " |")
    target = bound[codes[-1]]["ratios"]["bound / unbound"]["target"]
    lines.append(f"| **bound / unbound** (target >= {target}) | "
                 + " | ".join(_ratio_cell(bound[code]["ratios"]["bound / unbound"], 3) for code in codes) + " |")
    return "\n".join(lines)


def markdown_two_hosts(results):
    """The README's table of part 2: P=2 on one host (shared-memory sum, and MPI_Allreduce) and
    over two network namespaces, samples/s and comm share, the ratio, and --before's two hosts."""
    two = results.get("two_hosts")
    if not two or "skipped" in two:
        return None
    codes = list(two)
    now, before = two[codes[-1]], two[codes[0]] if len(codes) > 1 else None
    cases = _untagged(two, codes[-1])
    rows = [("P=2 on one host (`mpiexec -n 2`, gradients summed in shared memory)", "P=2 one host, no thread variable"),
            ("P=2 on one host, `--allreduce mpi`", "P=2 one host, no thread variable, --allreduce mpi"),
            ("P=2 over the two namespaces (MPI_Allreduce over TCP)", "P=2 two hosts, no thread variable")]
    lines = ["| run | samples/s | comm share |", "|---|---:|---:|"]
    for run, label in rows:
        if label in cases:
            c = cases[label]
            share = c.get("comm_share_median")
            lines.append(f"| {run} | {c['median']:,.0f} | {'—' if share is None else format(100 * share, '.1f') + '%'} |")
    lines.append(f"| **two hosts / one host** | {_ratio_cell(now['ratios']['two hosts / one host'], 2, rounds=True)} | |")
    if before is not None:
        c = _untagged(two, codes[0])["P=2 two hosts, no thread variable"]
        lines.append(f"| before: two hosts ({codes[0].split('(')[1].rstrip(')')}, `--before` run) | {c['median']:,.0f} "
                     f"({before['ratios']['two hosts / one host']['ratio']:.3f} x one host) | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
