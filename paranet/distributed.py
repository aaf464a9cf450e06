"""Data parallelism: the only module that imports mpi4py.

``World`` wraps COMM_WORLD (or a single process when mpi4py is missing or there is one rank).
``DistributedOptimizer`` wraps any optimizer: after backward, one in-place Allreduce over the
flat gradient buffer sums the ranks' gradients, weighted so that the wrapped optimizer's update
uses the exact mean over all samples of the global batch, and every rank applies that same
update. ``install_abort_hook`` makes an uncaught
exception on one rank end the whole job instead of leaving the others waiting in a collective.
"""
import os
import sys
import time
import traceback
import warnings
from time import perf_counter as _now

try:
    from mpi4py import MPI
except ImportError:  # the same code then runs single-process
    MPI = None

_warned_no_mpi = False

# Slots of Parameters.grad_storage's tail that ride along in the gradient Allreduce.
COUNT, LOSS_SUM, CORRECT, STOP = 0, 1, 2, 3


class World:
    """Rank, size and the collectives the trainer needs, with or without MPI."""

    def __init__(self, comm=None):
        global _warned_no_mpi
        if MPI is None:
            if not _warned_no_mpi:
                warnings.warn("mpi4py is not installed: running single-process", stacklevel=2)
                _warned_no_mpi = True
            self.comm, self.rank, self.size = None, 0, 1
            self.library = "none (mpi4py not installed)"
            self.local_size = 1
            return
        self.comm = comm or MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.library = " ".join(MPI.Get_library_version().strip().splitlines()[0].split())
        self.local_size = 1  # ranks sharing this machine, and so its cores
        if self.size > 1:
            node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
            self.local_size = node.Get_size()
            node.Free()

    @property
    def distributed(self):
        return self.size > 1

    def allreduce_sum(self, buf):
        """Sum ``buf`` in place over all ranks; the one place gradients are reduced."""
        if self.distributed:
            self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        return buf

    def broadcast(self, buf, root=0):
        """Overwrite ``buf`` on every rank with root's ``buf``."""
        if self.distributed:
            self.comm.Bcast(buf, root=root)
        return buf

    def bcast_object(self, obj, root=0):
        return self.comm.bcast(obj, root=root) if self.distributed else obj

    def gather_object(self, obj, root=0):
        return self.comm.gather(obj, root=root) if self.distributed else [obj]

    def barrier(self):
        if self.distributed:
            self.comm.Barrier()

    def abort(self, code=1):
        """End every rank of the job now."""
        if self.distributed:
            self.comm.Abort(code)
        os._exit(code)


def broadcast_parameters(params, world, root=0):
    """Make every replica start from root's parameters."""
    world.broadcast(params.values, root)


def replicas_agree(params, world):
    """True when every rank holds bit-identical parameters (compared by a digest of the bytes)."""
    if not world.distributed:
        return True
    digests = world.comm.allgather(params.digest())
    return len(set(digests)) == 1


class DistributedOptimizer:
    """Wraps an optimizer so that its update uses the gradient averaged over all ranks.

    Each rank's gradient is the mean over its own samples, so it is weighted by its share of
    the global batch before the sum; the count, the loss sum, the number of correct
    predictions and a stop flag travel in the spare tail of the same buffer. The update then
    uses the exact mean over the global batch, whatever the split.
    """

    def __init__(self, optimizer, world):
        self.optimizer = optimizer
        self.world = world
        self.loss = optimizer.loss
        self.comm_seconds = 0.0  # time spent in the Allreduce, for the comm share
        self.timeline = None  # a paranet.timeline.Timeline to record allreduce and update spans on
        self.grad_scale = 1.0  # params.grads * grad_scale is the mean gradient of the last step

    def apply_gradients(self, params, count=None, loss_sum=None, correct=0, stop=False, total=None):
        """Sum the ranks' gradients in one Allreduce and apply the wrapped optimizer's update
        with the exact global mean.

        Rank i holds the mean gradient g_i of its n_i samples; the global mean is
        sum(n_i g_i) / N. With ``total`` (N) known, each rank weights g_i by n_i P / N, a pass
        it skips when its share is the even one, N / P; the remaining 1 / P is folded into the
        update. Without it, g_i is weighted by n_i and the update scaled by 1 / (sum n_i).
        Afterwards ``params.grads`` holds the weighted sum and ``grad_scale`` the factor that
        makes it the mean.

        Args:
            count: this rank's samples in the step (default: the batch fed to the loss).
            loss_sum, correct: this rank's summed loss and correct predictions, reduced along.
            stop: this rank's request to stop after this step (SIGTERM).
            total: the global batch's sample count N, when the caller knows it (the reader does).
        Returns:
            the global (count, loss_sum, correct, stop) of the step.
        """
        if count is None:
            count = self.loss.root.value.shape[0]
        if loss_sum is None:
            loss_sum = float(self.loss.value) * count
        buf, tail, grads = params.grad_storage, params.grad_storage[params.size :], params.grads
        size = self.world.size
        weight = count if total is None else count * size / total
        if size > 1 and weight != 1:
            grads *= weight
        tail[COUNT], tail[LOSS_SUM], tail[CORRECT], tail[STOP] = count, loss_sum, correct, float(stop)
        t0 = _now()
        self.world.allreduce_sum(buf)
        t1 = _now()
        self.comm_seconds += t1 - t0
        if self.timeline is not None:
            self.timeline.add("allreduce", t0, t1)
        reduced = float(tail[COUNT])
        if total is not None and reduced != total:
            raise RuntimeError(f"ranks disagree on the global batch: {reduced:g} samples reduced, {total} expected")
        if size == 1:
            self.grad_scale = 1.0  # one rank: its mean is the global mean
        else:
            self.grad_scale = 1.0 / size if total is not None else 1.0 / max(reduced, 1.0)
        self.optimizer.apply_gradients(params, self.grad_scale)
        if self.timeline is not None:
            self.timeline.add("update", t1, _now())
        return reduced, float(tail[LOSS_SUM]), float(tail[CORRECT]), bool(tail[STOP] > 0)

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state)


def install_abort_hook(world, quiet=()):
    """On an uncaught exception, print the rank and the error, then abort the whole job.

    Exceptions of the types in ``quiet`` print one line instead of a traceback.
    """
    if not world.distributed:
        return

    def hook(kind, value, tb):
        if issubclass(kind, KeyboardInterrupt):  # Ctrl-C reaches every rank: one short line each
            print(f"paranet: rank {world.rank}: interrupted", file=sys.stderr, flush=True)
            world.abort(130)
        if issubclass(kind, quiet):
            print(f"paranet: rank {world.rank}: error: {value}", file=sys.stderr, flush=True)
        else:
            text = "".join(traceback.format_exception(kind, value, tb))
            print(f"paranet: rank {world.rank} of {world.size} failed:\n{text}", file=sys.stderr, flush=True)
        time.sleep(0.5)  # let the launcher forward our stderr before Abort tears the job down
        world.abort(1)

    sys.excepthook = hook
