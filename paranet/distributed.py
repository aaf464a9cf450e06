"""Data parallelism: the only module that imports mpi4py.

``World`` wraps COMM_WORLD (or a single process when mpi4py is missing or there is one rank).
``DistributedOptimizer`` wraps any optimizer: after backward, one sum over the ranks of the
flat gradient buffer (MPI_Allreduce, or ``SharedMemoryAllreduce``) adds up their gradients, weighted so that the wrapped optimizer's update
uses the exact mean over all samples of the global batch, and every rank applies that same
update. ``SharedMemoryAllreduce`` is the faster way to do that sum when several ranks share a
machine (the trainer's ``--allreduce``). ``install_abort_hook`` makes an uncaught exception on one rank end the
whole job instead of leaving the others waiting in a collective.
"""
import atexit
import os
import sys
import time
import traceback
import warnings
import zlib
from time import perf_counter as _now
from typing import NamedTuple

import numpy as np

from .reproducible import SUMS, column_slices

try:
    from mpi4py import MPI
except ImportError:  # the same code then runs single-process
    MPI = None

_warned_no_mpi = False

# Slots of Parameters.grad_storage's tail that ride along in the gradient Allreduce.
COUNT, LOSS_SUM, CORRECT, STOP = 0, 1, 2, 3
# How the gradients are summed (World's ``allreduce``, the trainer's --allreduce).
ALLREDUCE_CHOICES = ("auto", "shm", "mpi")


class World:
    """Rank, size and the collectives the trainer needs, with or without MPI."""

    def __init__(self, comm=None, allreduce="auto"):
        """``allreduce``: how ``shared_buffer``'s buffers are summed: "shm" through memory shared
        by the ranks of each machine (``SharedMemoryAllreduce``), "mpi" by MPI_Allreduce, "auto"
        shm where every machine runs the same number (> 1) of ranks, else mpi."""
        global _warned_no_mpi
        if allreduce not in ALLREDUCE_CHOICES:
            raise ValueError(f"allreduce: expected one of {', '.join(ALLREDUCE_CHOICES)}, got {allreduce!r}")
        self._shm = None
        self._partials = None  # partial_exchange()'s
        self._windows = []  # shared_array's windows
        self.allreduce_method = "mpi"
        self.nodes = 1
        self.blas = None  # the ThreadDecision init() made for this rank (paranet.threads)
        self.watchdog = None  # a paranet.watchdog.Watchdog timing the waits in the collectives below
        if MPI is None:
            if not _warned_no_mpi:
                warnings.warn("mpi4py is not installed: running single-process", stacklevel=2)
                _warned_no_mpi = True
            self.comm, self.rank, self.size = None, 0, 1
            self.library = "none (mpi4py not installed)"
            self.local_rank, self.local_size, self.node_comm = 0, 1, None
            return
        self.comm = comm or MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        # (Open MPI's string ends in a NUL, which would reach the header and make its log "binary";
        # its first line goes on after the version: ", package: ..., ident: ..., repo rev: ...")
        self.library = " ".join(MPI.Get_library_version().replace("\0", " ").strip().splitlines()[0].split())
        self.library = self.library.split(", package:")[0]
        # the ranks sharing this machine, and so its cores and memory
        self.node_comm = self.comm.Split_type(MPI.COMM_TYPE_SHARED) if self.size > 1 else None
        self.local_rank = self.node_comm.Get_rank() if self.node_comm is not None else 0
        self.local_size = self.node_comm.Get_size() if self.node_comm is not None else 1
        if self.size > 1:
            sizes = set(self.comm.allgather(self.local_size))
            self.nodes = self.size // self.local_size if len(sizes) == 1 else None
            even = len(sizes) == 1 and self.local_size > 1
            if allreduce == "shm" and not even:
                raise ValueError(f"--allreduce shm needs the same number (> 1) of ranks on every machine; "
                                 f"ranks per machine here: {sorted(sizes)}")
            self.allreduce_method = "shm" if allreduce == "shm" or (allreduce == "auto" and even) else "mpi"

    def __repr__(self):
        return f"<World rank {self.rank} of {self.size}, local {self.local_rank} of {self.local_size}>"

    @property
    def distributed(self):
        return self.size > 1

    # -- for users' own scripts and metrics ------------------------------------------------

    shard_micro = 1  # rows per micro-shard of shard(); "auto" once a reproducible optimizer uses this world

    def shard(self, array):
        """This rank's rows of a global batch: ``numpy.array_split(array, size)[rank]``, the
        reader's rule (sizes differ by at most one, lower ranks take the extra rows). A rank
        may get zero rows; it still joins every collective. Once a
        ``DistributedOptimizer(reproducible=True)`` uses this world, whole micro-shards instead
        (``paranet.reproducible.shard_range``)."""
        from .reproducible import micro_size, shard_range

        array = np.asarray(array)
        micro = micro_size(len(array)) if self.shard_micro == "auto" else self.shard_micro
        begin, count = shard_range(len(array), self.rank, self.size, micro)
        return array[begin:begin + count]

    def allreduce(self, x):
        """The sum of ``x`` (a number or an array) over all ranks, as a new value of its type."""
        arr = np.array(x)  # a copy: the caller's array is left as it was
        if arr.dtype == object or arr.dtype.kind not in "biuf":
            raise TypeError(f"World.allreduce: expected a number or a numeric array, got {type(x).__name__}")
        if arr.dtype.kind == "b":
            arr = arr.astype(np.int64)
        if self.distributed:
            self._waited("sum over the ranks", self.comm.Allreduce, MPI.IN_PLACE, arr, op=MPI.SUM)
        return arr.item() if arr.ndim == 0 else arr

    def max(self, x):
        """The largest ``x`` (a number) over all ranks."""
        if not self.distributed:
            return x
        buf = np.array([x])  # the buffer form: no pickling on the reproducible step's path
        self._waited("maximum over the ranks", self.comm.Allreduce, MPI.IN_PLACE, buf, op=MPI.MAX)
        return buf.item()

    def mean(self, x):
        """The mean of ``x`` (a number or an array) over all ranks."""
        total = self.allreduce(x)
        return total / self.size

    def allreduce_sum(self, buf):
        """Sum ``buf`` in place over all ranks."""
        total = self.sum_over_ranks(buf)
        if total is not buf:
            np.copyto(buf, total)
        return buf

    def sum_over_ranks(self, buf):
        """The sum of ``buf`` over all ranks; the one place gradients are reduced.

        A buffer that ``shared_buffer`` handed out is summed through shared memory and the
        sum returned as a read-only view of shared memory, valid until the next call (it
        saves the copy back into ``buf``). Any other buffer is summed in place by
        MPI_Allreduce and returned.
        """
        if not self.distributed:
            return buf
        if self._shm is not None and buf is self._shm.buffer:
            return self._waited("sum over the ranks", self._shm.allreduce)
        self._waited("sum over the ranks", self.comm.Allreduce, MPI.IN_PLACE, buf, op=MPI.SUM)
        return buf

    def _waited(self, what, collective, *args, **kwargs):
        """Run ``collective`` with the stall watchdog (when one runs) timing the wait as ``what``."""
        wd = self.watchdog
        if wd is None:
            return collective(*args, **kwargs)
        wd.enter(what)
        try:
            return collective(*args, **kwargs)
        finally:
            wd.leave()

    def shared_buffer(self, like):
        """A zeroed buffer of ``like``'s shape and dtype for repeated ``allreduce_sum`` calls
        (the gradients): in memory shared by the ranks of each machine when ``allreduce`` is
        "shm" (the first buffer asked for), else a plain array. Collective: every rank calls it."""
        like = np.asarray(like)
        if self.allreduce_method != "shm" or self._shm is not None:  # a world shares one buffer; others go by MPI
            return np.zeros_like(like)
        self._shm = SharedMemoryAllreduce(self.comm, like.size, like.dtype)
        return self._shm.buffer

    def partial_exchange(self):
        """The exchange of the ordered reproducible sum (``paranet.reproducible``) for this
        world: through shared memory when all ranks share one machine and ``allreduce`` is
        shm, else by MPI; a plain one for a single process. Collective on first use."""
        if self._partials is None:
            from .reproducible import LocalPartials

            if not self.distributed:
                self._partials = LocalPartials()
            elif self.allreduce_method == "shm" and self.nodes == 1:
                self._partials = SharedPartials(self.node_comm, self._waited)
            else:
                self._partials = MpiPartials(self.comm, self._waited)
        return self._partials

    def describe_allreduce(self):
        """One line for the log: how gradients are summed."""
        if not self.distributed:
            return "one process: nothing to reduce"
        if self.allreduce_method == "shm":
            where = (f"{self.nodes} machines x {self.local_size} ranks" if self.nodes > 1
                     else f"{self.local_size} ranks on one machine")
            return f"gradients summed in shared memory ({where})"
        return "gradients summed by MPI_Allreduce"

    def shared_array(self, shape, dtype, fill):
        """An array that the ranks of this machine share (one copy per machine, in an MPI-3
        shared window): one rank of the machine calls ``fill(array)``, then every rank of the
        machine gets it, read-only, once it is full. Collective over the world's ranks. The
        window lives until ``close()``. Without MPI or alone it is a plain array."""
        shape, dtype = tuple(int(d) for d in shape), np.dtype(dtype)
        if self.node_comm is None:
            arr = np.empty(shape, dtype)
            fill(arr)
            arr.flags.writeable = False
            return arr
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        win = MPI.Win.Allocate_shared(nbytes if self.local_rank == 0 else 0, dtype.itemsize, comm=self.node_comm)
        self._windows.append(win)
        memory, _ = win.Shared_query(0)
        arr = np.frombuffer(memory, dtype, count=nbytes // dtype.itemsize).reshape(shape)
        error = None
        if self.local_rank == 0:
            try:
                fill(arr)
            except Exception as e:  # every rank of the machine must hear of it, not wait for it
                error = e
        win.Fence()  # the filler's stores are visible to the machine's ranks after this
        failed = self.node_comm.bcast(None if error is None else f"{type(error).__name__}: {error}", root=0)
        if error is not None:
            raise error
        if failed:
            raise RuntimeError(f"rank {self.rank}: the machine's shared copy could not be filled: {failed}")
        arr.flags.writeable = False
        return arr

    def shared_memory_free(self):
        """Bytes free where MPI's shared windows live (/dev/shm), or None where unknown."""
        try:
            st = os.statvfs("/dev/shm")
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    def close(self):
        """Free the shared buffer, the shared arrays and the machine's communicator
        (collective); safe to call more than once."""
        if self._shm is not None:
            self._shm.close()
            self._shm = None
        if self._partials is not None and hasattr(self._partials, "close"):
            self._partials.close()
            self._partials = None
        for win in self._windows:
            win.Free()
        self._windows = []
        if self.node_comm is not None:
            self.node_comm.Free()
            self.node_comm = None

    def broadcast(self, buf, root=0):
        """Overwrite ``buf`` on every rank with root's ``buf``."""
        if self.distributed:
            self.comm.Bcast(buf, root=root)
        return buf

    def bcast_object(self, obj, root=0):
        return self._waited("broadcast", self.comm.bcast, obj, root=root) if self.distributed else obj

    def gather_object(self, obj, root=0):
        return self._waited("gather", self.comm.gather, obj, root=root) if self.distributed else [obj]

    def barrier(self):
        if self.distributed:
            self._waited("barrier", self.comm.Barrier)

    def abort(self, code=1):
        """End every rank of the job now."""
        if self.distributed:
            self.comm.Abort(code)
        os._exit(code)


_default = None  # the World that init() made


def init(allreduce="auto", threads=None, comm=None, quiet=()):
    """Start paranet's data parallelism in this process and return the World, as ``hvd.init()``.

    Works under any MPI launcher (``mpirun -n P``, ``srun``) and without one or without
    mpi4py (a world of size 1). It also:

    * decides this rank's BLAS threads once (``paranet.threads``): an explicit ``threads`` or
      OMP_NUM_THREADS / OPENBLAS_NUM_THREADS / MKL_NUM_THREADS wins; otherwise the CPUs this
      rank may use (its affinity), shared with the ranks of the machine whose CPUs overlap;
    * installs the abort hook: an uncaught exception on one rank ends the whole job instead of
      leaving the others waiting in a collective.

    Args:
        allreduce: how gradients are summed: "auto", "shm" (memory shared by the ranks of a
            machine) or "mpi" (MPI_Allreduce).
        threads: BLAS threads per rank; None decides as above.
        comm: the communicator (default MPI.COMM_WORLD).
        quiet: exception types the abort hook reports in one line instead of a traceback.
    Returns:
        the World (``.rank``, ``.size``, ``.local_rank``, ``.local_size``, ``.shard``,
        ``.allreduce``, ``.mean``); ``DistributedOptimizer`` uses it by default.
    """
    global _default
    world = World(comm=comm, allreduce=allreduce)
    install_abort_hook(world, quiet=quiet)
    from . import threads as _threads

    if world.comm is None or world.size == 1:
        world.blas = _threads.configure(threads=threads)
    else:
        # The ranks that share this kernel share its CPUs, also where MPI counts them as two
        # machines (containers, network namespaces); configure drops any hash collision.
        kernel = world.comm.Split(zlib.crc32(_threads.machine_id().encode()) & 0x7FFFFFFF, world.rank)
        try:
            world.blas = _threads.configure(gather=kernel.allgather, threads=threads)
        finally:
            kernel.Free()
    _default = world
    return world


def default_world():
    """The World that ``init()`` made; made now (``init()``) when there is none yet."""
    return _default if _default is not None else init()


class SharedMemoryAllreduce:
    """The sum over all ranks of one fixed buffer, through MPI-3 shared memory.

    The ranks of a machine allocate two windows with MPI_Win_allocate_shared, each contiguous
    across the ranks (the MPI standard's default), so that every rank sees them as arrays:
    ``grads``, one row per local rank, and ``summed``, the summed vector cut into one slice
    per local rank. ``buffer`` is this rank's row: the trainer's gradients live there.
    ``allreduce()``:

    1. barrier: every local rank has written its row;
    2. reduce-scatter: local rank i adds up its slice of the columns of ``grads``, rows in
       rank order, into its slice of ``summed`` (one numpy call, reading the peers' memory
       directly); with several machines, the ranks owning the same slice on each machine then
       MPI_Allreduce that slice among themselves (one rank a machine);
    3. barrier: every slice is summed;
    4. allgather: ``allreduce()`` returns ``summed``, which every rank reads (a caller that
       needs the sum in its row copies it: ``allreduce(copy=True)``).

    Each rank reads about twice the buffer, with two barriers and one numpy call, where
    MPI_Allreduce's point-to-point rounds copy the data through MPI's buffers several times.
    Every rank reads the same sums, so the replicas get the same bits. No step can race with a slower peer's: the rows are read only between the barriers
    of 1 and 3, and ``summed`` only after 3 and before the next step's barrier 1, so its
    readers must be done with it before they call ``allreduce()`` again.
    """

    ALIGN = 64  # bytes: rows and slices start on their own cache line

    def __init__(self, comm, size, dtype, node_comm=None):
        """``node_comm``: the ranks sharing memory (default: split ``comm`` by machine; tests
        pass a smaller split to act out several machines on one)."""
        self.dtype, self.size = np.dtype(dtype), int(size)
        self.node = node_comm if node_comm is not None else comm.Split_type(MPI.COMM_TYPE_SHARED)
        self._own_node = node_comm is None
        rank, local = self.node.Get_rank(), self.node.Get_size()
        sizes = sorted(set(comm.allgather(local)))
        if len(sizes) > 1:  # slice i must be the same columns on every machine
            raise ValueError(f"shared-memory allreduce needs the same number of ranks on every machine, got {sizes}")
        item = self.dtype.itemsize
        unit = max(1, self.ALIGN // item)
        row = -(-max(self.size, 1) // unit) * unit  # a row's length, padded to whole cache lines
        piece = -(-row // (local * unit)) * unit  # one local rank's slice of the columns
        self._wins = [MPI.Win.Allocate_shared(row * item, item, comm=self.node),
                      MPI.Win.Allocate_shared(piece * item, item, comm=self.node)]
        for w in self._wins:
            w.Lock_all(MPI.MODE_NOCHECK)  # one passive epoch: Sync() orders the plain loads and stores
        grads = self._contiguous(self._wins[0], local, row).reshape(local, row)
        summed = self._contiguous(self._wins[1], local, piece)
        self.buffer = grads[rank, : self.size]
        self.buffer[...] = 0  # first touch: this row's pages on this rank's memory node
        lo, hi = min(rank * piece, self.size), min((rank + 1) * piece, self.size)
        self._columns, self._mine = grads[:, lo:hi], summed[lo:hi]
        self._summed = summed[: self.size]
        self._summed.flags.writeable = False  # this rank's slice is written through self._mine only
        # several machines: one rank per machine owns each slice; they Allreduce it among themselves
        self.cross = comm.Split(rank, comm.Get_rank()) if comm.Get_size() > local else None
        self.node.Barrier()
        atexit.register(self.close)

    def _contiguous(self, win, local, count):
        """All ranks' segments of ``win`` as one array (they must abut, as MPI allocates them)."""
        base = np.frombuffer(win.Shared_query(0)[0], self.dtype).ctypes.data
        step = count * self.dtype.itemsize
        for j in range(1, local):
            at = np.frombuffer(win.Shared_query(j)[0], self.dtype).ctypes.data
            if at != base + j * step:
                raise RuntimeError(f"shared window: segment of local rank {j} at {at:#x}, expected {base + j * step:#x}")
        memory = getattr(MPI, "buffer", None) or MPI.memory  # mpi4py 4 / 3
        return np.frombuffer(memory.fromaddress(base, local * step), self.dtype)

    def allreduce(self, copy=False):
        """The sum of ``buffer`` over all ranks: a read-only view of the shared sum, valid until
        the next call; with ``copy``, also copied into ``buffer``, which is returned."""
        w_grads, w_summed = self._wins
        w_grads.Sync()  # this rank's stores to its row are visible...
        self.node.Barrier()  # ...and every peer's are done
        w_grads.Sync()
        np.sum(self._columns, axis=0, out=self._mine)
        if self.cross is not None:
            self.cross.Allreduce(MPI.IN_PLACE, self._mine, op=MPI.SUM)
        w_summed.Sync()
        self.node.Barrier()
        w_summed.Sync()
        if copy:
            np.copyto(self.buffer, self._summed)
            return self.buffer
        return self._summed

    def close(self):
        """Free the windows and communicators (collective); safe to call more than once."""
        if not self._wins:
            return
        self.buffer = self._columns = self._mine = self._summed = None
        for w in self._wins:
            w.Unlock_all()
            w.Free()
        self._wins = []
        if self.cross is not None:
            self.cross.Free()
        if self._own_node:
            self.node.Free()


class SharedPartials:
    """The ordered reproducible sum's exchange on one machine (``paranet.reproducible``).

    One MPI-3 shared window holds a row per tree node the ranks ship (at most one per
    micro-shard of the global batch), and a row for the sum; another, one row of integer
    slots per rank. A step:

    1. each rank writes the values of its tree nodes into its rows (``rows``) and its slots,
       then ``gather``: barrier;
    2. each rank adds its slice of the columns of all rows along the sum tree into its slice
       of the sum row (``tree_sum``, reading the peers' rows directly), and adds the slots of
       all ranks;
    3. ``finish``: barrier; every rank reads the whole sum row, and whether any rank found its
       slice not finite.

    The partials travel once, in the training dtype, and each rank sums 1/P of the columns: what
    the plain path's ``SharedMemoryAllreduce`` does for one row a rank. Races are excluded as
    there: rows and slots are read between the barriers of 1 and 3 only, and the sum only
    after 3 and before the next step's 1. The windows grow (collectively: every rank asks for
    the same sizes) when a batch has more micro-shards than any before.
    """

    def __init__(self, node_comm, waited):
        self.node, self.waited = node_comm, waited
        self.rank, self.local = node_comm.Get_rank(), node_comm.Get_size()
        self._wins = []
        self._shape = None  # (rows, columns, dtype, slots) the windows hold
        self._k = 0

    def _allocate(self, k, n, dtype, slots):
        rows, cols, have_dtype, have_slots = self._shape or (0, 0, None, 0)
        if k <= rows and n == cols and dtype == have_dtype and slots <= have_slots:
            return
        self.close()
        item = dtype.itemsize
        pitch = -(-n * item // 64) * 64 // item  # rows start on their own cache line
        rows, slots = max(k, rows if n == cols else 0), max(slots, have_slots, 64)
        self._wins = [MPI.Win.Allocate_shared((rows + 1) * pitch * item if self.rank == 0 else 0, item, comm=self.node),
                      MPI.Win.Allocate_shared(self.local * slots * 8 if self.rank == 0 else 0, 8, comm=self.node)]
        for w in self._wins:
            w.Lock_all(MPI.MODE_NOCHECK)
        floats = np.frombuffer(self._wins[0].Shared_query(0)[0], dtype, count=(rows + 1) * pitch).reshape(rows + 1, pitch)
        ints = np.frombuffer(self._wins[1].Shared_query(0)[0], np.int64, count=self.local * slots).reshape(self.local, slots)
        self.parts, self.sum_row, self.slots = floats[:rows, :n], floats[rows, :n], ints
        self._shape = (rows, n, dtype, slots)
        lo, hi = column_slices(n, self.local)[self.rank]
        self._mine = slice(lo, hi)
        self.node.Barrier()

    def rows(self, counts, n, dtype, slots):
        """This rank's rows (``counts[rank]`` of them, after the lower ranks'), to write the values
        of its tree nodes into; ``slots``: the length of the integer tail ``gather`` will send."""
        self._k = sum(counts)
        self._allocate(self._k, n, np.dtype(dtype), slots + 1)  # the last slot: finish()'s flag
        first = sum(counts[:self.rank])
        return self.parts[first:first + counts[self.rank]]

    def _barrier(self):
        for w in self._wins:
            w.Sync()
        self.waited("sum over the ranks", self.node.Barrier)
        for w in self._wins:
            w.Sync()

    def gather(self, tail):
        """After every rank's ``rows`` are written: (all rows' columns of this rank's slice,
        its slice of the sum row, the ranks' ``tail`` slots summed)."""
        self.slots[self.rank, :tail.size] = tail
        self._barrier()
        tails = self.slots[:, :tail.size].sum(axis=0)
        return self.parts[:self._k, self._mine], self.sum_row[self._mine], tails

    def finish(self, bad=False):
        """Once this rank's slice is summed: (the whole sum, a view valid until the next step;
        whether any rank's slice ``bad``: not finite), through the last integer slot of each rank."""
        self.slots[self.rank, -1] = bool(bad)
        self._barrier()
        return self.sum_row, bool(self.slots[:, -1].any())

    def close(self):
        for w in self._wins:
            w.Unlock_all()
            w.Free()
        self._wins, self._shape = [], None


class MpiPartials:
    """The ordered reproducible sum's exchange by MPI (several machines, or ``--allreduce mpi``):
    MPI_Alltoallv hands every rank each micro-shard's partial for its slice of the columns,
    in micro-shard order (the ranks' runs of micro-shards are in rank order); MPI_Allreduce
    adds the integer slots; MPI_Allgatherv gathers the summed slices. The same additions of
    the same numbers as ``SharedPartials``, so the same bits."""

    def __init__(self, comm, waited):
        self.comm, self.waited = comm, waited
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self._key = None

    def rows(self, counts, n, dtype, slots):
        dtype = np.dtype(dtype)
        key = (tuple(counts), n, dtype)
        if key != self._key:
            count, k = counts[self.rank], sum(counts)
            starts = np.concatenate([[0], np.cumsum(counts)]).astype(int)
            slices = column_slices(n, self.size)
            lo, hi = slices[self.rank]
            w = hi - lo
            self._local = np.empty((count, n), dtype)
            self._send = np.empty(count * n, dtype)
            self._recv = np.empty((k, w), dtype)
            self._sum = np.empty(n, dtype)
            self._slices = slices
            self._sendspec = ([count * (b - a) for a, b in slices], [count * a for a, _ in slices])
            self._recvspec = ([c * w for c in counts], [int(f) * w for f in starts[:-1]])
            self._gatherspec = ([b - a for a, b in slices], [a for a, _ in slices])
            self._mine = slice(lo, hi)
            self._count = count
            self._key = key
        return self._local

    def gather(self, tail):
        c = self._count
        for a, b in self._slices:  # pack: destination j's columns of every partial, together
            self._send[c * a:c * b].reshape(c, b - a)[...] = self._local[:, a:b]
        self.waited("sum over the ranks", self.comm.Alltoallv, [self._send, self._sendspec],
                    [self._recv.reshape(-1), self._recvspec])
        tails = tail.copy()
        self.waited("sum over the ranks", self.comm.Allreduce, MPI.IN_PLACE, tails, op=MPI.SUM)
        return self._recv, self._sum[self._mine], tails

    def finish(self, bad=False):
        """(the whole sum, None: every rank holds it all and looks at it for non-finite values)."""
        self.waited("sum over the ranks", self.comm.Allgatherv, MPI.IN_PLACE, [self._sum, self._gatherspec])
        return self._sum, None

    def close(self):
        pass


def broadcast_parameters(params, world, root=0):
    """Make every replica start from root's parameters."""
    world.broadcast(params.values, root)


def replicas_agree(params, world):
    """True when every rank holds bit-identical parameters (compared by a digest of the bytes)."""
    if not world.distributed:
        return True
    digests = world.comm.allgather(params.digest())
    return len(set(digests)) == 1


class StepSums(NamedTuple):
    """One step's totals over all ranks (the gradient sum's tail)."""

    count: float  # samples in the global batch
    loss_sum: float  # sum over those samples of the loss
    correct: float  # correct predictions among them
    stop: float  # the ranks' stop requests, summed (0: nobody asked to stop)


class DistributedOptimizer:
    """Wraps any optimizer so that its update uses the gradient averaged over all ranks.

    ``sess.run(DistributedOptimizer(opt), feed)`` on this rank's shard of a global batch runs
    forward and backward, sums the ranks' gradients (weighted by each rank's share of the
    batch, so the mean is exact for uneven shards, and a rank with zero rows joins with weight
    zero), applies the wrapped optimizer's update, and returns the global mean loss. On the
    first run it broadcasts rank 0's parameters and optimizer state, so every replica starts
    from the same point.

    Args:
        optimizer: any paranet optimizer (``GradientDescentOptimizer``, ``AdamOptimizer`` ...).
        world: the World to sum over; default: the one ``init()`` made (made on first use).
        reproducible: the same bits at any number of ranks (see ``paranet.reproducible``):
            True or "ordered" (the partial gradients of fixed micro-shards added in a fixed
            order), or "exact" (added exactly, in fixed point: the correctly rounded sum, at a
            higher cost).
    """

    def __init__(self, optimizer, world=None, reproducible=False):
        if isinstance(optimizer, DistributedOptimizer):
            raise TypeError("DistributedOptimizer: the optimizer is already distributed")
        if not hasattr(optimizer, "apply_gradients") or not hasattr(optimizer, "loss"):
            raise TypeError(f"DistributedOptimizer: expected a paranet optimizer, got {optimizer!r}")
        self.optimizer = optimizer
        self.world = world if world is not None else default_world()
        if reproducible not in (False, True, None, *SUMS):
            raise ValueError(f"DistributedOptimizer: reproducible must be True, False, or one of {', '.join(SUMS)}; "
                             f"got {reproducible!r}")
        self.reproducible = bool(reproducible)
        self.reproducible_sum = (SUMS[0] if reproducible is True else reproducible) if reproducible else None
        self.loss = optimizer.loss
        self.comm_seconds = 0.0  # time spent in the gradient sum, for the comm share
        self.timeline = None  # a paranet.timeline.Timeline to record allreduce and update spans on
        self.grad_scale = 1.0  # params.grads * grad_scale is the mean gradient of the last step
        self.last = None  # the StepSums of the last step
        self.last_sum = None  # the weighted gradient sum of the last step (valid until the next)
        self._params = None  # the Parameters whose gradient storage the world reduces
        self._synced = None  # the Parameters last made equal to rank 0's
        self._views = {}  # id(array) -> (array, its gradient part, its tail), see _split
        # reproducible: Session.run hands the whole step to run_step (micro-shards, the reproducible sum)
        self.run_step = self._run_reproducible if self.reproducible else None
        self._micro = None  # the paranet.reproducible.MicroShardSteps of this rank
        if self.reproducible:
            from .reproducible import one_blas_thread

            one_blas_thread()  # a GEMM's bits change with the BLAS thread count
            from .threads import ThreadDecision

            self.world.blas = ThreadDecision(1, "--reproducible: a GEMM's bits change with the thread count",
                                             "reproducible")
            self.world.shard_micro = "auto"  # World.shard cuts whole micro-shards

    @property
    def learning_rate(self):
        return self.optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, value):
        self.optimizer.learning_rate = value

    # -- Session.run's protocol: prepare() before forward, apply_gradients() after backward --

    def prepare(self, params):
        """Before a run's forward: on the first run, every rank takes rank 0's parameters and
        optimizer state."""
        if params is not self._synced:
            self.broadcast_state(params)

    def apply_gradients(self, params):
        """After backward on this rank's shard: sum, update; returns the global mean loss."""
        count = self.loss.root.value.shape[0] if self.loss.root is not None else 1
        sums = self.reduce_and_apply(params, count, float(self.loss.value) * count)
        return sums.loss_sum / sums.count if sums.count else 0.0

    # -- the step --------------------------------------------------------------------------

    def broadcast_state(self, params, root=0):
        """Make every rank hold root's parameter values and optimizer state (collective)."""
        self.world.broadcast(params.values, root)
        state = self.world.bcast_object(self.optimizer.state_dict() if self.world.rank == root else None, root)
        if self.world.rank != root:
            self.optimizer.load_state_dict(state)
        self._synced = params

    def reduce_and_apply(self, params, count, loss_sum, correct=0, stop=False, total=None):
        """Sum the ranks' gradients in one reduction and apply the wrapped optimizer's update
        with the exact global mean; returns the step's StepSums over all ranks.

        Rank i holds the mean gradient g_i of its n_i samples (zero when n_i = 0); the global
        mean is sum(n_i g_i) / N. With ``total`` (N) known, each rank weights g_i by
        n_i P / N, a pass it skips when its share is the even one, N / P; the remaining 1 / P
        is folded into the update. Without it, g_i is weighted by n_i and the update scaled by
        1 / (sum n_i). The wrapped optimizer reads the weighted sum where the world left it
        (``params.grads`` after an MPI_Allreduce, shared memory after the shared-memory sum;
        ``last_sum`` after the step), and ``grad_scale`` is the factor that makes it the mean.

        Args:
            count: this rank's samples in the step (0 is allowed: it joins with weight zero).
            loss_sum, correct: this rank's summed loss and correct predictions, reduced along.
            stop: this rank's request to stop after this step (a number; the trainer sends 1 for
                SIGTERM), summed over the ranks like the rest.
            total: the global batch's sample count N, when the caller knows it (the reader does).
        """
        if self.reproducible:  # a float sum here would undo it: the step goes micro-shard by micro-shard
            raise RuntimeError("DistributedOptimizer(reproducible=True): run steps with Session.run(optimizer, feed) "
                               "or reproducible_step(), not reduce_and_apply()")
        if params is not self._params:  # first step: the gradients move to the buffer the world reduces
            params.use_grad_storage(self.world.shared_buffer(params.grad_storage))
            self._params, self._views = params, {}
        if self._synced is None:
            self._synced = params  # a caller driving the step itself (the trainer) synced it already
        buf = params.grad_storage
        size = self.world.size
        if count == 0:
            params.grads[...] = 0  # no samples: whatever backward left there must not count
        weight = count if total is None else count * size / total
        if size > 1 and weight != 1:
            params.grads *= weight
        tail = self._split(buf, params.size)[1]
        tail[COUNT], tail[LOSS_SUM], tail[CORRECT], tail[STOP] = count, loss_sum, correct, float(stop)
        t0 = _now()
        summed = self.world.sum_over_ranks(buf)  # buf itself, or the shared sum (no copy back)
        t1 = _now()
        self.comm_seconds += t1 - t0
        if self.timeline is not None:
            self.timeline.add("allreduce", t0, t1)
        self.last_sum, summed_tail = self._split(summed, params.size)
        reduced, loss_total, correct_total, stop_total = summed_tail.tolist()
        if total is not None and reduced != total:
            raise RuntimeError(f"ranks disagree on the global batch: {reduced:g} samples reduced, {total} expected")
        if size == 1:
            self.grad_scale = 1.0  # one rank: its mean is the global mean
        else:
            self.grad_scale = 1.0 / size if total is not None else 1.0 / max(reduced, 1.0)
        self.optimizer.apply_gradients(params, self.grad_scale, grads=self.last_sum)
        if self.timeline is not None:
            self.timeline.add("update", t1, _now())
        self.last = StepSums(reduced, loss_total, correct_total, stop_total)
        return self.last

    # -- reproducible: the same bits at any number of ranks (paranet/reproducible.py) ----------

    def micro_steps(self):
        """This rank's MicroShardSteps, made on first use: the ordered sum goes through the
        world's ``partial_exchange()``; the exact sum's int64 buffer is summed in shared memory
        or by MPI_Allreduce like the gradients, its scale agreed by one MAX allreduce."""
        if self._micro is None:
            from .reproducible import MicroShardSteps

            w = self.world
            partials = w.partial_exchange() if self.reproducible_sum == "ordered" else None
            self._micro = MicroShardSteps(w.rank, w.size, w.sum_over_ranks, w.max, buffer=w.shared_buffer,
                                          partials=partials)
        return self._micro

    def reproducible_step(self, session, plan, feed, total, metric=None, stop=0):
        """One step of ``reproducible=True``: forward and backward on each of this rank's
        micro-shards of the global batch (``total`` rows), the exact gradient sum over ranks,
        and the wrapped optimizer's update with the mean; returns the step's StepSums."""
        micro = self.micro_steps()
        comm0 = micro.comm_seconds
        grad_sum, scale, count, loss_sum, correct, stop_total = micro.step(
            session, plan, feed, total, step=self.optimizer.steps + 1, metric=metric, stop=stop)
        self.comm_seconds += micro.comm_seconds - comm0
        t1 = _now()
        self.grad_scale = scale  # grad_sum * scale is the mean gradient
        self.last_sum = grad_sum
        self.optimizer.apply_gradients(plan.params, self.grad_scale, grads=grad_sum)
        if self.timeline is not None:
            self.timeline.add("update", t1, _now())
        self.last = StepSums(count, loss_sum, correct, stop_total)
        return self.last

    def _run_reproducible(self, session, plan, feed):
        """Session.run(self, feed): the global batch's row count comes from one small sum."""
        root = self.loss.root
        n_local = len(feed[root]) if root is not None and root in feed else 0
        total = int(self.world.allreduce(n_local)) if self.world.distributed else n_local
        sums = self.reproducible_step(session, plan, feed, total)
        return sums.loss_sum / sums.count if sums.count else 0.0

    def _split(self, arr, n):
        """(arr[:n], arr[n:]), sliced once per array: the same one or two arrays (the gradient
        buffer, the shared sum) come back every step."""
        views = self._views.get(id(arr))
        if views is None or views[0] is not arr:
            views = self._views[id(arr)] = (arr, arr[:n], arr[n:])
        return views[1], views[2]

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
