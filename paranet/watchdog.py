"""The stall watchdog: a rank that waits too long for the others in a collective aborts the job,
naming the ranks that did not arrive (as Horovod's stall inspector and PyTorch's collective
timeout do), instead of spinning in MPI forever beside a stopped or hung peer.

Each rank keeps a counter of the collectives it has entered in a slot of a small array in memory
shared by the ranks of its machine (MPI_Win_allocate_shared): entering one is a store to that
slot and a clock read, no message. A daemon thread on each rank wakes every second or so; when
its rank has been inside one collective longer than the timeout, it reads its peers' counters:
those behind its own did not arrive. The lowest-numbered rank that did arrive prints one line,
and every waiting rank calls MPI_Abort (the launcher then ends the job, a SIGSTOPped rank too).

The counters are seen within one machine; on several machines a rank names the missing ranks of
its own machine, or says that every rank of its machine arrived.
"""
import sys
import threading
import time

import numpy as np

EXIT_STALLED = 3  # the job's exit status after a stall


class Watchdog:
    """Watches one rank's waits in collectives; ``enter(what)``/``leave()`` bracket each wait.

    Args:
        world: a distributed paranet World (its ``comm``).
        timeout: seconds a rank may wait in one collective.
        poll: seconds between the thread's checks (default: a quarter of the timeout, at most 1).
    """

    def __init__(self, world, timeout, poll=None):
        from mpi4py import MPI

        self.world, self.timeout = world, float(timeout)
        self.poll = poll if poll is not None else min(1.0, self.timeout / 4)
        self.step = None  # the training step in progress (the trainer sets it), for the message
        self.context = ""  # where the trainer is otherwise, e.g. "evaluation after step 40"
        comm = world.comm
        self.node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local, n = self.node.Get_rank(), self.node.Get_size()
        self.ranks = self.node.allgather(comm.Get_rank())  # local rank -> rank in comm
        self.elsewhere = comm.Get_size() > n  # ranks on other machines, whose counters we cannot see
        self.win = MPI.Win.Allocate_shared(8 * n if self.local == 0 else 0, 8, comm=self.node)
        self.arrived = np.frombuffer(self.win.Shared_query(0)[0], np.int64)[:n]  # rank 0's segment, seen by all
        if self.local == 0:
            self.arrived[:] = 0
        self.node.Barrier()
        self.seq = 0  # collectives this rank has entered
        self.since = None  # when this rank entered the one it is in (None: in none)
        self.what = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="paranet-watchdog", daemon=True)
        self._thread.start()

    def enter(self, what):
        """This rank starts waiting in a collective (``what`` names it in the message)."""
        self.seq += 1
        self.arrived[self.local] = self.seq
        self.what = what
        self.since = time.monotonic()

    def leave(self):
        self.since = None

    def missing(self):
        """The ranks of this machine that have not reached this rank's current collective."""
        seq = self.seq
        return [self.ranks[i] for i in range(len(self.ranks)) if self.arrived[i] < seq]

    def describe(self, missing):
        where = f"{self.what} of step {self.step}" if self.step is not None else \
            f"{self.what}{' (' + self.context + ')' if self.context else ''}"
        if missing:
            who = f"rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} did not arrive"
        elif self.elsewhere:
            who = "every rank of this machine arrived; ranks on other machines did not"
        else:
            who = "every rank arrived but the collective did not complete"
        return (f"paranet: stalled: {who} at the {where} within {self.timeout:g} s (--stall-timeout); "
                f"aborting the job")

    def _watch(self):
        while not self._stop.wait(self.poll):
            since = self.since
            if since is None or time.monotonic() - since < self.timeout:
                continue
            missing = self.missing()
            waiting = [i for i in range(len(self.ranks)) if self.ranks[i] not in missing]
            if not waiting or self.local == min(waiting):
                print(self.describe(missing), file=sys.stderr, flush=True)
                time.sleep(0.5)  # let the launcher forward the line before Abort tears the job down
            else:
                time.sleep(min(2.0, self.timeout))  # the speaker's line first
            self.world.abort(EXIT_STALLED)

    def close(self, free=True):
        """Stop the thread; with ``free``, also free the shared counters (collective over the
        machine's ranks: pass False on a path that only this rank may take)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        if free:
            self.arrived = None
            self.win.Free()
            self.node.Free()
