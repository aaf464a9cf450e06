"""BLAS threads a rank (paranet.threads): the decision over settings and CPU sets, then real processes.

The unit tests give ``decide`` explicit environments and CPU sets, so they hold on any machine.
The process tests start real ranks (``taskset``, the wheel's ``mpiexec -bind-to``) and read the
count the BLAS library runs with from threadpoolctl inside them. Those that check the automatic
rule remove the thread variables from the child's environment (tests/launch.py's ``env()`` sets
them to 1, which would decide instead).
"""
import ast
import json
import os
import shutil
import subprocess
import sys

import pytest

from launch import MPIEXEC, REPO
from paranet.threads import THREAD_VARIABLES, ThreadDecision, ThreadSettingError, configure, decide, machine_id

NO_VARS = {}  # an environment without any thread variable
ALLOWED = sorted(os.sched_getaffinity(0))


# ---- the decision -----------------------------------------------------------------------------

def test_describe_reads_as_the_header_line():
    assert ThreadDecision(1, "1 CPU allowed", "affinity").describe() == "1 BLAS thread a rank (1 CPU allowed)"
    assert ThreadDecision(4, "OMP_NUM_THREADS=4", "environment").describe() == "4 BLAS threads a rank (OMP_NUM_THREADS=4)"


@pytest.mark.parametrize("name", THREAD_VARIABLES)
def test_a_thread_variable_wins_over_the_cpus(name):
    d = decide(environ={name: "3"}, allowed={0}, peers=[{0}] * 4)
    assert (d.count, d.source) == (3, "environment")
    assert d.describe() == f"3 BLAS threads a rank ({name}=3)"


def test_library_variables_win_over_omp():
    """OpenBLAS and MKL read their own variable before OMP_NUM_THREADS; so does the report."""
    assert decide(environ={"OMP_NUM_THREADS": "4", "OPENBLAS_NUM_THREADS": "2"}, allowed={0}).count == 2
    assert decide(environ={"OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "3"}, allowed={0}).count == 3


def test_the_threads_flag_wins_over_everything():
    d = decide(threads=2, environ={"OMP_NUM_THREADS": "4"}, allowed={0}, peers=[{0}] * 4)
    assert (d.count, d.source) == (2, "threads")
    assert d.describe() == "2 BLAS threads a rank (--threads 2)"


@pytest.mark.parametrize("value, count", [("4,2", 4), (" 2 ", 2), ("", None)])
def test_thread_variable_forms(value, count):
    """OpenMP's nested list means its first level; an empty variable counts as unset."""
    d = decide(environ={"OMP_NUM_THREADS": value}, allowed={0, 1, 2})
    assert d.count == (count or 3) and d.source == ("environment" if count else "affinity")


@pytest.mark.parametrize("value", ["abc", "0", "-1", "1.5", "two"])
@pytest.mark.parametrize("name", THREAD_VARIABLES)
def test_bad_thread_variable_is_one_clear_error(name, value):
    with pytest.raises(ThreadSettingError) as e:
        decide(environ={name: value}, allowed={0})
    assert str(e.value) == f"{name}={value!r}: expected a whole number of threads >= 1"


def test_bad_variable_is_an_error_even_where_another_decides():
    with pytest.raises(ThreadSettingError, match="OMP_NUM_THREADS='abc'"):
        decide(environ={"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "abc"}, allowed={0})


@pytest.mark.parametrize("threads", [0, -2, True, "2", 1.0])
def test_bad_threads_flag_is_an_error(threads):
    with pytest.raises(ThreadSettingError, match="--threads"):
        decide(threads=threads, environ=NO_VARS, allowed={0})


def test_one_cpu_allowed_is_one_thread():
    d = decide(environ=NO_VARS, allowed={5})
    assert (d.count, d.source, d.describe()) == (1, "affinity", "1 BLAS thread a rank (1 CPU allowed)")


def test_one_rank_alone_uses_every_cpu_it_may():
    assert decide(environ=NO_VARS, allowed=set(range(64))).describe() == "64 BLAS threads a rank (64 CPUs allowed)"


# (the CPU sets of the ranks on one machine) -> the threads each rank gets, at P = 1..4
CASES = {
    # every rank may use the same CPUs: they share them
    "same 2 CPUs": ([{0, 1}] * 1, [2]),
    "same 2 CPUs, P=2": ([{0, 1}] * 2, [1, 1]),
    "same 2 CPUs, P=3": ([{0, 1}] * 3, [1, 1, 1]),
    "same 2 CPUs, P=4": ([{0, 1}] * 4, [1, 1, 1, 1]),
    "same 8 CPUs, P=2": ([set(range(8))] * 2, [4, 4]),
    "same 8 CPUs, P=3": ([set(range(8))] * 3, [2, 2, 2]),
    "same 8 CPUs, P=4": ([set(range(8))] * 4, [2, 2, 2, 2]),
    # bound ranks (mpiexec -bind-to core, srun --cpu-bind=cores): each its own
    "one core each, P=2": ([{0}, {1}], [1, 1]),
    "one core each, P=4": ([{0}, {1}, {2}, {3}], [1, 1, 1, 1]),
    "two cores each, P=3": ([{0, 1}, {2, 3}, {4, 5}], [2, 2, 2]),
    "four cores each, P=4": ([set(range(4 * i, 4 * i + 4)) for i in range(4)], [4, 4, 4, 4]),
    # partial overlaps: one group over the union, never more than a rank's own CPUs
    "4 CPUs and one of them": ([{0, 1, 2, 3}, {3}], [2, 1]),
    "a chain": ([{0, 1}, {1, 2}, {2, 3}], [1, 1, 1]),
    "a chain of fours": ([{0, 1, 2, 3}, {3, 4, 5, 6}, {6, 7, 8, 9}], [3, 3, 3]),
    # the ends overlap only through the middle rank: still one group of 3 ranks over 12 CPUs
    "a chain through a small set": ([set(range(6)), {5, 6}, set(range(6, 12))], [4, 2, 4]),
    # two groups on one machine: a pair sharing {0,1}, two ranks bound to 4 CPUs each
    "two groups, P=4": ([{0, 1}, {0, 1}, {2, 3, 4, 5}, {6, 7, 8, 9}], [1, 1, 4, 4]),
}


@pytest.mark.parametrize("case", CASES)
def test_ranks_share_overlapping_cpus_and_keep_disjoint_ones(case):
    sets, expected = CASES[case]
    counts = [decide(environ=NO_VARS, allowed=own, peers=sets).count for own in sets]
    assert counts == expected
    # never more threads than CPUs: not on any one rank's set, nor in total over a shared set
    assert all(c <= len(s) for c, s in zip(counts, sets))
    assert sum(counts) <= max(len(set().union(*sets)), len(sets))


def test_shared_reason_names_ranks_and_cpus():
    assert decide(environ=NO_VARS, allowed={0, 1}, peers=[{0, 1}] * 4).describe() == \
        "1 BLAS thread a rank (4 ranks share 2 CPUs)"
    assert decide(environ=NO_VARS, allowed={3}, peers=[{0, 1, 2, 3}, {3}]).describe() == \
        "1 BLAS thread a rank (2 ranks share 4 CPUs, 1 allowed to this one)"


# ---- configure in this process ----------------------------------------------------------------

@pytest.fixture
def blas_restored():
    """The BLAS thread count of this process is put back after the test."""
    from threadpoolctl import threadpool_info, threadpool_limits
    before = _blas_threads(threadpool_info())
    yield
    threadpool_limits(limits=before[0] if before else None)


def _blas_threads(info):
    return [i["num_threads"] for i in info if i["user_api"] == "blas"]


def test_configure_gathers_the_cpu_set_and_applies_the_share(blas_restored):
    from threadpoolctl import threadpool_info
    sent = []

    def gather(obj):  # three ranks on this machine with the same CPUs as this one
        sent.append(obj)
        return [obj] * 3

    d = configure(gather=gather, environ=NO_VARS)
    assert sent == [(machine_id(), ALLOWED)]  # one collective call, with this rank's kernel and CPUs
    assert d.count == max(1, len(ALLOWED) // 3)
    assert _blas_threads(threadpool_info()) == [d.count]


def test_configure_counts_only_the_ranks_on_this_kernel(blas_restored):
    """Ranks on other machines (another boot id) use other CPUs, whatever their numbers."""
    from threadpoolctl import threadpool_info
    elsewhere = [("another-machine", ALLOWED)] * 3
    d = configure(gather=lambda obj: [obj, *elsewhere], environ=NO_VARS)
    assert d.describe() == f"{len(ALLOWED)} BLAS thread{'s' * (len(ALLOWED) > 1)} a rank ({len(ALLOWED)} CPU{'s' * (len(ALLOWED) > 1)} allowed)"
    assert _blas_threads(threadpool_info()) == [len(ALLOWED)]


def test_configure_leaves_the_library_alone_where_a_variable_decides(blas_restored):
    from threadpoolctl import threadpool_info, threadpool_limits
    threadpool_limits(limits=1)
    d = configure(environ={"OMP_NUM_THREADS": "1"}, gather=lambda obj: [obj])
    assert d.describe() == "1 BLAS thread a rank (OMP_NUM_THREADS=1)"
    assert _blas_threads(threadpool_info()) == [1]


def test_threads_module_never_imports_mpi4py():
    tree = ast.parse((REPO / "paranet" / "threads.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "mpi4py" not in imported and imported <= {"os", "dataclasses", "numpy", "socket", "threadpoolctl"}


# ---- real processes -----------------------------------------------------------------------------

# Inside each rank: configure with the machine's ranks, then what threadpoolctl sees.
PROBE = """
import json, os, sys, threadpoolctl
from paranet.threads import configure
gather = None
if sys.argv[1:] == ["mpi"]:
    from mpi4py import MPI
    node = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED)
    gather = node.allgather
d = configure(gather=gather, threads=int(os.environ["PROBE_THREADS"]) if "PROBE_THREADS" in os.environ else None)
blas = [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
print("PROBE " + json.dumps({"allowed": sorted(os.sched_getaffinity(0)), "count": d.count,
                             "describe": d.describe(), "blas": blas}), flush=True)
"""


def child_env(**extra):
    """This checkout importable and no thread variable set, so that the automatic rule decides."""
    e = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    e.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", **{k: str(v) for k, v in extra.items()})
    return e


def probe(prefix=(), mpi=False, timeout=60, **extra):
    """Run PROBE under ``prefix`` (taskset, mpiexec ...); the reports of all ranks."""
    cmd = [*map(str, prefix), sys.executable, "-c", PROBE, *(["mpi"] if mpi else [])]
    p = subprocess.run(cmd, cwd=REPO, env=child_env(**extra), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd[:6])} ... failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    # Hydra may splice two ranks' lines: find every report wherever it starts.
    reports = [json.loads(part.split("\n", 1)[0]) for part in p.stdout.split("PROBE ")[1:]]
    return reports


two_cpus = pytest.mark.skipif(len(ALLOWED) < 2, reason="needs at least 2 CPUs allowed to this process")
needs_taskset = pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset (util-linux) missing")


@two_cpus
@needs_taskset
def test_taskset_one_cpu_runs_one_blas_thread():
    """The 41x case: os.cpu_count() says 2 or more, the process may use one CPU."""
    (r,) = probe(["taskset", "-c", ALLOWED[0]])
    assert r["allowed"] == [ALLOWED[0]]
    assert r["blas"] == [1] and r["describe"] == "1 BLAS thread a rank (1 CPU allowed)"


def test_unbound_process_runs_a_thread_per_allowed_cpu():
    (r,) = probe()
    assert r["blas"] == [len(ALLOWED)] and r["describe"] == f"{len(ALLOWED)} BLAS thread{'s' * (len(ALLOWED) > 1)} a rank ({len(ALLOWED)} CPU{'s' * (len(ALLOWED) > 1)} allowed)"


@two_cpus
def test_user_variable_is_respected_not_overridden():
    (r,) = probe(OPENBLAS_NUM_THREADS=1)
    assert r["blas"] == [1] and r["describe"] == "1 BLAS thread a rank (OPENBLAS_NUM_THREADS=1)"


def test_variable_above_the_cpus_reports_what_the_library_runs():
    """configure does not override a variable, and the header tells what the library made of it
    (OpenBLAS caps OMP_NUM_THREADS at the CPUs allowed): the same count as a process that only
    imports numpy with that environment."""
    asked = len(ALLOWED) + 2
    own = subprocess.run([sys.executable, "-c", "import json, numpy, threadpoolctl; print(json.dumps("
                          "[i['num_threads'] for i in threadpoolctl.threadpool_info() if i['user_api'] == 'blas']))"],
                         env=child_env(OMP_NUM_THREADS=asked), capture_output=True, text=True, timeout=60)
    library = json.loads(own.stdout)
    (r,) = probe(OMP_NUM_THREADS=asked)
    assert r["blas"] == library and r["count"] == library[0]
    assert r["describe"].startswith(f"{library[0]} BLAS thread") and f"(OMP_NUM_THREADS={asked}" in r["describe"]


@two_cpus
@needs_taskset
def test_threads_flag_wins_over_the_cpu_count():
    (r,) = probe(["taskset", "-c", ALLOWED[0]], PROBE_THREADS=2, OPENBLAS_NUM_THREADS=1)
    assert r["blas"] == [2] and r["describe"] == "2 BLAS threads a rank (--threads 2)"


def test_bad_variable_stops_the_process_with_one_line():
    p = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=child_env(OMP_NUM_THREADS="abc"),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    assert p.stderr.strip().splitlines()[-1] == \
        "paranet.threads.ThreadSettingError: OMP_NUM_THREADS='abc': expected a whole number of threads >= 1"


@pytest.mark.mpi
@two_cpus
def test_mpiexec_bind_to_core_one_thread_each():
    reports = probe([MPIEXEC, "-n", 2, "-bind-to", "core"], mpi=True)
    assert len(reports) == 2
    assert all(len(r["allowed"]) == 1 for r in reports)
    assert reports[0]["allowed"] != reports[1]["allowed"]  # bound to two different cores
    assert [r["blas"] for r in reports] == [[1], [1]]
    assert {r["describe"] for r in reports} == {"1 BLAS thread a rank (1 CPU allowed)"}


@pytest.mark.mpi
@two_cpus
def test_mpiexec_one_rank_bound_to_one_core():
    """One rank: os.cpu_count() // local ranks would give it every core; it may use one."""
    (r,) = probe([MPIEXEC, "-n", 1, "-bind-to", "core"], mpi=True)
    assert len(r["allowed"]) == 1 and r["blas"] == [1]


@pytest.mark.mpi
@two_cpus
def test_mpiexec_unbound_ranks_share_the_cpus():
    reports = probe([MPIEXEC, "-n", 2], mpi=True)
    share = max(1, len(ALLOWED) // 2)
    assert [r["blas"] for r in reports] == [[share], [share]]
    assert {r["describe"] for r in reports} == {f"{share} BLAS thread{'s' * (share > 1)} a rank (2 ranks share {len(ALLOWED)} CPUs)"}


@pytest.mark.mpi
@two_cpus
def test_mpiexec_partial_overlap_shares_the_union():
    """Rank 0 may use CPUs {a, b}, rank 1 only {b}: one group of 2 ranks over 2 CPUs, 1 thread each
    (rank 0 alone would take 2 and spin on rank 1's CPU)."""
    a, b = ALLOWED[:2]
    reports = probe([MPIEXEC, "-n", 2, "-bind-to", f"user:{a}+{b},{b}"], mpi=True)
    assert sorted(r["allowed"] for r in reports) == [[a, b], [b]]
    assert [r["blas"] for r in reports] == [[1], [1]]


# Inside each rank of a two-"host" run: the gather spans the world; how many ranks MPI puts on
# this rank's machine, and what configure decided.
WORLD_PROBE = """
import json, threadpoolctl
from mpi4py import MPI
from paranet.threads import configure
d = configure(gather=MPI.COMM_WORLD.allgather)
blas = [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
local = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED).Get_size()
print("PROBE " + json.dumps({"local_size": local, "describe": d.describe(), "blas": blas}), flush=True)
"""


@pytest.mark.netns
@pytest.mark.mpi
@two_cpus
def test_two_namespaces_on_one_kernel_share_its_cpus(tmp_path):
    """Two network namespaces are two machines to MPI (one local rank each) but one kernel with the
    same cores: gathered over the world, the ranks see each other and run 1 thread each on 2 CPUs,
    not 2 each (the two-host test's slowness)."""
    reports = probe_two_namespaces(tmp_path, WORLD_PROBE, ("10.232.0.1", "10.232.0.2"), "t")
    assert [r["local_size"] for r in reports] == [1, 1]  # MPI: one rank on each of two machines
    share = max(1, len(ALLOWED) // 2)
    assert [r["blas"] for r in reports] == [[share], [share]]
    assert {r["describe"] for r in reports} == {f"{share} BLAS thread{'s' * (share > 1)} a rank (2 ranks share {len(ALLOWED)} CPUs)"}


# ---- through paranet.distributed.init() and the trainer ------------------------------------------

INIT_PROBE = """
import json, os, threadpoolctl
from paranet.distributed import init
w = init(threads=int(os.environ["PROBE_THREADS"]) if "PROBE_THREADS" in os.environ else None)
blas = [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
print("PROBE " + json.dumps({"rank": w.rank, "local_size": w.local_size, "describe": w.blas.describe(), "blas": blas}), flush=True)
"""


def run_reports(cmd, env, timeout=60):
    p = subprocess.run([*map(str, cmd)], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{p.stdout}\n{p.stderr}"
    return [json.loads(part.split("\n", 1)[0]) for part in p.stdout.split("PROBE ")[1:]]


def probe_two_namespaces(tmp_path, probe_code, addrs, tag):
    """The PROBE reports of one rank in each of two network namespaces (two "machines" to MPI on
    this kernel), run through MPICH's hydra; the namespaces are gone afterwards."""
    sys.path.insert(0, str(REPO / "tests"))
    from cluster import require
    from cluster.netns import TwoHosts, missing_requirement

    reason = missing_requirement()
    require(reason is None, reason)
    hosts = TwoHosts(addrs=addrs, tag=f"{tag}{os.getpid()}").create()
    try:
        hostfile = tmp_path / "hosts"
        hostfile.write_text("".join(f"{a}:1\n" for a in hosts.addrs))
        return run_reports(hosts.command(0, [MPIEXEC, "-n", 2, "-f", hostfile, sys.executable, "-c", probe_code]),
                           hosts.env(child_env()))
    finally:
        hosts.delete()


@pytest.mark.mpi
@two_cpus
def test_init_decides_for_each_rank():
    """paranet.distributed.init() decides once per rank: bound ranks one thread each, unbound ranks
    share, and --threads (init(threads=N)) wins."""
    bound = run_reports([MPIEXEC, "-n", 1, "-bind-to", "core", sys.executable, "-c", INIT_PROBE], child_env())
    assert [(r["blas"], r["describe"]) for r in bound] == [([1], "1 BLAS thread a rank (1 CPU allowed)")]
    shared = run_reports([MPIEXEC, "-n", 2, sys.executable, "-c", INIT_PROBE], child_env())
    share = max(1, len(ALLOWED) // 2)
    assert sorted(r["rank"] for r in shared) == [0, 1] and [r["blas"] for r in shared] == [[share], [share]]
    forced = run_reports([MPIEXEC, "-n", 2, "-bind-to", "core", sys.executable, "-c", INIT_PROBE],
                         child_env(PROBE_THREADS=2))
    assert [r["blas"] for r in forced] == [[2], [2]]
    assert {r["describe"] for r in forced} == {"2 BLAS threads a rank (--threads 2)"}


def _train(prefix, data, tmp_path, *args, **extra):
    cmd = [*map(str, prefix), sys.executable, "-m", "paranet.train", "--data", str(data), "--max-steps", "2",
           "--checkpoint", str(tmp_path / "ck.h5"), *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, env=child_env(**extra), capture_output=True, text=True, timeout=120)


@two_cpus
@needs_taskset
def test_trainer_header_says_threads_and_why(mnist_h5, tmp_path):
    p = _train(["taskset", "-c", ALLOWED[0]], mnist_h5, tmp_path)
    assert p.returncode == 0, p.stderr
    header = p.stdout.splitlines()[0]
    assert header.endswith("; 1 BLAS thread a rank (1 CPU allowed)"), header
    p = _train(["taskset", "-c", ALLOWED[0]], mnist_h5, tmp_path, "--threads", 2)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[0].endswith("; 2 BLAS threads a rank (--threads 2)")


def test_trainer_refuses_a_bad_thread_variable_in_one_line(mnist_h5, tmp_path):
    p = _train([], mnist_h5, tmp_path, OMP_NUM_THREADS="abc")
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == ["paranet: error: OMP_NUM_THREADS='abc': expected a whole number of threads >= 1"]


@two_cpus
@needs_taskset
def test_bench_threads_runs_and_reports_the_ratios(tmp_path):
    """``python -m bench.threads`` (part of make bench) with tiny runs: the JSON has both ratios of
    the bound comparison and the header lines of the runs; the figures themselves mean nothing here."""
    cmd = [sys.executable, "-m", "bench.threads", "--parts", "bound", "--steps", "3", "--repeats", "1", "--out", str(tmp_path)]
    p = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "threads.json").read_text())
    now = res["bound"]["now"]
    assert set(now["ratios"]) == {"bound / unbound", "bound / bound with variables 1"}
    headers = {label.split(", ", 1)[1]: c["header"] for label, c in now["cases"].items()}
    assert headers["no thread variable"].endswith("; 1 BLAS thread a rank (1 CPU allowed)")
    assert res["two_hosts"] == {"skipped": "--parts"}
    assert "bound / unbound" in p.stdout


@pytest.mark.netns
@pytest.mark.mpi
@two_cpus
def test_init_over_two_namespaces_shares_the_cores(tmp_path):
    """Through paranet.distributed.init(): one rank in each of two network namespaces is one rank
    on each of two machines to MPI, but the two share this kernel's cores, so 1 thread each on 2
    CPUs. init() must gather over the ranks of this kernel (or the world: configure keeps those
    of this kernel itself); gathered over MPI's machine communicator, each rank thinks it is alone
    and takes every CPU."""
    reports = probe_two_namespaces(tmp_path, INIT_PROBE, ("10.232.1.1", "10.232.1.2"), "i")
    assert [r["local_size"] for r in reports] == [1, 1]
    share = max(1, len(ALLOWED) // 2)
    assert [r["blas"] for r in reports] == [[share], [share]], (
        f"{reports}: paranet.distributed.init should gather over the ranks of this kernel "
        "(world.comm.Split by paranet.threads.machine_id(), or world.comm.allgather), not node_comm.allgather")
