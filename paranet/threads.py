"""How many BLAS threads each rank runs: decided once per rank, from the user's settings or the CPUs it may use.

The rule, in order (``decide``):

1. ``threads`` (the trainer's ``--threads N``, ``paranet.distributed.init(threads=N)``) wins.
2. Else a thread variable in the environment wins: ``OPENBLAS_NUM_THREADS``, ``MKL_NUM_THREADS``,
   then ``OMP_NUM_THREADS`` (the library-specific ones first, as OpenBLAS and MKL read them). The
   BLAS library read it when it was loaded, so ``configure`` leaves the library alone and reports
   what it runs. A set variable that is not a whole number >= 1 (``abc``, ``0``) is an error
   (``ThreadSettingError``, one line); an empty one counts as unset; ``4,2`` (OpenMP's nested
   form) means 4.
3. Else count the CPUs this rank may use, ``os.sched_getaffinity(0)``, which follows cgroups,
   ``taskset``, ``srun --cpu-bind`` and ``mpiexec -bind-to`` (``os.cpu_count()`` does not).
   Ranks on one machine whose CPU sets overlap, directly or through a chain of overlaps, form a
   group; the group's CPUs (the union of its sets) are split evenly among its ranks, rounded down,
   at least 1 and at most the rank's own CPUs. So 4 unbound ranks on 2 cores run 1 thread each,
   4 ranks bound to one core each run 1 each, and one rank alone on a 64-core node runs 64.
   A rank whose set overlaps no other rank's uses all of its own CPUs. Partial overlaps, e.g.
   {0,1,2,3} and {3}: one group of 2 ranks over 4 CPUs, 2 threads and 1 (its own CPU count).
   Within a group the threads never exceed its CPUs in total.

``configure`` gathers the sets of the ranks through a callable it is given (this module never
imports mpi4py), keeps those of the ranks that run on the same kernel as this one (same
``/proc/sys/kernel/random/boot_id``), decides, and applies the count with threadpoolctl. The
kernel, not MPI's idea of a machine, is what says which ranks compete for the same CPUs: ranks
in two network namespaces or two containers of one host are two "hosts" to MPI but share cores.
So the gather may span the machine's ranks or the whole world.
"""
import os
from dataclasses import dataclass

# The variables that set BLAS threads, in the order they win (library-specific first).
THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS")


class ThreadSettingError(ValueError):
    """A thread count from the user (flag or environment) that is not a whole number >= 1."""


@dataclass(frozen=True)
class ThreadDecision:
    """BLAS threads for this rank.

    Args:
        count: threads a rank runs (>= 1).
        reason: why, for the user: "1 CPU allowed", "OMP_NUM_THREADS=4", "2 ranks share 2 CPUs".
        source: "threads" (an explicit count), "environment" or "affinity".
    """
    count: int
    reason: str
    source: str

    def describe(self):
        """One line for the header, e.g. "1 BLAS thread a rank (1 CPU allowed)"."""
        return f"{self.count} BLAS thread{'' if self.count == 1 else 's'} a rank ({self.reason})"


def allowed_cpus():
    """The CPUs this process may run on (its affinity mask; all CPUs where the OS cannot tell)."""
    try:
        return frozenset(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows: no affinity call
        return frozenset(range(os.cpu_count() or 1))


def machine_id():
    """What tells this kernel from another's: its boot id (the host name where /proc lacks it)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        import socket
        return socket.gethostname()


def _parse_count(name, value):
    """``value`` of variable/flag ``name`` as a thread count; None when empty (unset)."""
    text = str(value).strip()
    if not text:
        return None
    first = text.split(",", 1)[0].strip()  # OMP_NUM_THREADS=4,2: 4 at the outer level
    if not first.isdigit() or int(first) < 1:
        raise ThreadSettingError(f"{name}={value!r}: expected a whole number of threads >= 1")
    return int(first)


def _plural(n, word):
    return f"{n} {word}{'' if n == 1 else 's'}"


def decide(*, threads=None, environ=None, allowed=None, peers=None):
    """Decide this rank's BLAS threads; pure (reads nothing but its arguments and their defaults).

    Args:
        threads: an explicit count (``--threads N``), or None.
        environ: the environment to read the thread variables from (default ``os.environ``).
        allowed: this rank's CPU set (default ``os.sched_getaffinity(0)``).
        peers: the CPU sets of all ranks on this machine, this one included (default: this one
            alone).
    Returns:
        a ThreadDecision.
    Raises:
        ThreadSettingError: ``threads`` or a set thread variable is not a whole number >= 1.
    """
    environ = os.environ if environ is None else environ
    found = [(name, _parse_count(name, environ[name])) for name in THREAD_VARIABLES if name in environ]
    found = [(name, n) for name, n in found if n is not None]  # every set one is checked, the first wins
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ThreadSettingError(f"--threads {threads!r}: expected a whole number of threads >= 1")
        return ThreadDecision(threads, f"--threads {threads}", "threads")
    if found:
        name, n = found[0]
        return ThreadDecision(n, f"{name}={environ[name].strip()}", "environment")

    own = frozenset(allowed_cpus() if allowed is None else allowed)
    if not own:
        raise ValueError("allowed: an empty CPU set")
    sets = [frozenset(p) for p in (peers or [own])]
    # The group: every set that overlaps the union so far, until nothing more joins.
    union, members = set(own), []
    grew = True
    while grew:
        grew = False
        for i, s in enumerate(sets):
            if i not in members and s & union:
                members.append(i)
                union |= s
                grew = True
    ranks = len(members) + (0 if any(sets[i] == own for i in members) else 1)
    if ranks == 1:
        return ThreadDecision(len(own), f"{_plural(len(own), 'CPU')} allowed", "affinity")
    count = max(1, min(len(own), len(union) // ranks))
    reason = f"{ranks} ranks share {_plural(len(union), 'CPU')}"
    if len(own) < len(union) // ranks:
        reason += f", {len(own)} allowed to this one"
    return ThreadDecision(count, reason, "affinity")


def _blas_counts():
    """{internal_api: num_threads} of the BLAS libraries loaded in this process."""
    from threadpoolctl import threadpool_info
    return {i.get("internal_api"): i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"}


def configure(*, gather=None, threads=None, environ=None):
    """Decide this rank's BLAS threads with the ranks on this machine, and apply it.

    Args:
        gather: a callable that allgathers one Python object over the ranks and returns the list
            (``node_comm.allgather`` for the machine's ranks, or ``comm.allgather`` for all: only
            those on this kernel count); None: this process alone. Every rank the gather spans
            must call ``configure`` (it is collective), whatever its settings.
        threads: an explicit count (``--threads N``), or None.
        environ: as in ``decide`` (default ``os.environ``).
    Returns:
        the ThreadDecision in force. Where a thread variable decided, the library is left as it
        loaded; if it runs another count than the variable says (OpenBLAS caps it at the CPUs
        allowed), the decision reports the library's count and says so.
    Raises:
        ThreadSettingError: as ``decide``, on every rank alike (after the gather).
    """
    import numpy  # noqa: F401  (loads the BLAS library, so that threadpoolctl finds it)
    from threadpoolctl import threadpool_limits

    own, here = allowed_cpus(), machine_id()
    everyone = [(here, sorted(own))] if gather is None else gather((here, sorted(own)))
    peers = [frozenset(cpus) for machine, cpus in everyone if machine == here]
    decision = decide(threads=threads, environ=environ, allowed=own, peers=peers)
    if decision.source != "environment":
        threadpool_limits(limits=decision.count)
        return decision
    counts = _blas_counts()
    if len(set(counts.values())) == 1:
        (api, n), = list(counts.items())[:1]
        if n != decision.count:
            return ThreadDecision(n, f"{decision.reason}; {api} runs {n}", "environment")
    return decision
