"""Bit-for-bit reproducible data parallelism: fixed micro-shards and a sum fixed by them.

The same seed, global batch and flags give the same bits at any number of ranks when two
things hold (issue 12):

1. **Samples are grouped the same way at every P.** A global batch of N rows is cut into
   micro-shards of ``m = micro_size(N)`` rows (the last one shorter), and each rank gets a
   contiguous run of whole micro-shards (``shard_range``). Each micro-shard's gradient is
   computed over exactly its rows, one GEMM per micro-shard, so its bits do not depend on which
   rank holds it. (A row's GEMM result does depend on how many rows the GEMM holds, and on the
   BLAS thread count: see ``bench/reproducible.py --gemm-check``.) A rank's full micro-shards
   run in one grouped forward and backward where the graph allows it (``Session.forward``'s
   ``groups``: numpy's stacked matmul, one GEMM a micro-shard in one call).
2. **The partials are combined by a sum that P does not change.** Two are offered:

   - ``"ordered"`` (the default): pairwise summation along one binary tree over the
     micro-shard indices, in the training dtype (``tree_nodes``, ``tree_sum``). Each rank
     adds the tree nodes its run covers as its partials come (``RunSum``), the ranks exchange
     those nodes so that each holds all of them for a slice of the columns (memory shared by
     the ranks of a machine, or MPI_Alltoallv), add their slice along the rest of the tree,
     and the slices are gathered: every element is the same additions of the same numbers at
     any P. It costs about what the plain float sum does, and its rounding is a float sum's
     (at most ceil(log2 k) roundings an element for k micro-shards).
   - ``"exact"``: ``FixedPoint`` turns each partial, weighted by its row count, into int64
     multiples of 2**-bits at a scale every rank agrees on (one small MAX allreduce of the
     partials' largest exponent), sums them in int64, which is associative, and the ranks add
     their int64 sums (MPI_Allreduce or the shared-memory sum, both exact on integers). Each
     partial is rounded once onto the grid, a rounding that does not depend on P; the sums
     are exact; the result is rounded once back to floats: the correctly rounded sum, at
     about 0.6 ns an element and partial more than the ordered one.

A value the representation cannot hold (NaN, infinity, a sum beyond the dtype's range)
raises ``ExactSumError`` naming the step and the micro-shard.

The module is numpy only: the caller passes the collectives (``paranet.distributed`` does).
"""
import math
import time

import numpy as np

from .graph import all_finite

MICRO_MIN, MICRO_MAX = 32, 128  # micro-shard rows: see micro_size
SUMS = ("ordered", "exact")  # how the partials are combined (see the module's docstring)
# A grouped backward writes one gradient a micro-shard; a rank's full micro-shards run in groups
# whose gradients take about this many bytes (about a core's L2: they are added while still there)
GROUP_BYTES = 1 << 20
# Codes of exponent_of besides a real exponent: every partial is zero, or some is not finite.
ZERO = -(1 << 40)
NONFINITE = 1 << 50
HEADROOM = 51  # a sum of partials stays below 2**51 in magnitude: each rounds exactly by MAGIC, int64 never overflows
LO_BITS = 51  # the second word (float64) holds the remainder times 2**51: |each| <= 2**50
MAGIC = 1.5 * 2.0 ** 52  # y + MAGIC is rint(y) in the low bits of a float64, for |y| < 2**51
MAGIC_BITS = int(np.array(MAGIC).view(np.int64))
STOP_UNIT = 1024  # the stop slot holds stop * STOP_UNIT as an integer (the trainer sends fractions)
MAX_BITS = 960  # 2**bits stays a finite float64; partials below 2**-960 round to zero


class ExactSumError(FloatingPointError):
    """A value the exact sum cannot represent (NaN, infinity); the message names the step."""


# -- the micro-shard rule ------------------------------------------------------------------

def micro_size(n_global):
    """Rows per micro-shard for a global batch of ``n_global`` rows: a power of two near
    n_global / 8, within [32, 128] (32 at batch 128 and 256, 64 at 512, 128 at 1024). It
    depends on the batch only, never on the rank count. Small enough that 4 ranks all get
    work at batch 128 and 8 from batch 256 on (more ranks than micro-shards are correct but
    idle); big enough that a micro-shard's GEMMs stay efficient (32-row ones cost about 5 %
    more than one GEMM over the rows of 2 of them, 128-row ones 1 to 3 %)."""
    want = max(1, int(n_global) // 8)
    return min(MICRO_MAX, max(MICRO_MIN, 1 << (want.bit_length() - 1)))


def micro_shard_run(n_global, rank, size, micro):
    """(first micro-shard, count) of rank ``rank``'s run: the micro-shard count split as
    ``np.array_split`` splits it (the first ranks get one more)."""
    base, extra = divmod(num_micro_shards(n_global, micro), size)
    return rank * base + min(rank, extra), base + (rank < extra)


def micro_shard_ranges(n_global, size, micro):
    """(first micro-shard, count) of every rank 0..size-1: the ranks' runs, in order."""
    return [micro_shard_run(n_global, r, size, micro) for r in range(size)]


def num_micro_shards(n_global, micro):
    """How many micro-shards of ``micro`` rows a batch of ``n_global`` rows has (the last may be short)."""
    return -(-int(n_global) // int(micro))


def micro_shard(n_global, micro, k):
    """(begin, count) of micro-shard ``k`` within the global batch."""
    begin = k * micro
    return begin, max(0, min(micro, n_global - begin))


def shard_range(n_global, rank, size, micro=1):
    """(begin, count) of rank ``rank``'s rows of a global batch of ``n_global`` rows.

    The batch is cut into micro-shards of ``micro`` rows (the last may be shorter) and the
    ranks get contiguous runs of whole micro-shards, split as ``np.array_split`` splits
    the micro-shard count (the first ones get one more). With ``micro=1`` that is
    np.array_split's rule over rows. Ranks past the last micro-shard get (n_global, 0)
    clipped to the batch.
    """
    first, count = micro_shard_run(n_global, rank, size, micro)
    begin, end = min(first * micro, n_global), min((first + count) * micro, n_global)
    return begin, end - begin


def local_micro_shards(n_global, rank, size, micro):
    """The indices of the micro-shards rank ``rank`` holds: a range."""
    first, count = micro_shard_run(n_global, rank, size, micro)
    return range(first, first + count)


# -- the exact sum -------------------------------------------------------------------------

def exponent_of(arrays):
    """The smallest E with |x| < 2**E for every element, ZERO when all are zero (or there are
    none), or NONFINITE + (count - i) when array i holds a NaN or infinity (the MAX over ranks
    then names the first such array)."""
    top, count = 0.0, len(arrays)
    for i, a in enumerate(arrays):
        if a.size == 0:
            continue
        hi, lo = float(a.max()), float(a.min())  # two passes, no temporary; NaN propagates
        if not (math.isfinite(hi) and math.isfinite(lo)):
            return NONFINITE + (count - i)
        top = max(top, hi, -lo)
    if top == 0.0:
        return ZERO
    return math.frexp(top)[1]  # top = f * 2**E, 0.5 <= f < 1


def fraction_bits(exponent, total_weight):
    """Fraction bits of the fixed-point grid for partials below 2**exponent whose weights add up
    to ``total_weight``: the sum of |weight * partial| * 2**bits stays below 2**51."""
    if exponent == ZERO:
        return 0
    bits = HEADROOM - exponent - max(1, int(total_weight)).bit_length()
    return min(bits, MAX_BITS)


class FixedPoint:
    """An exact sum of weighted float arrays as int64 multiples of 2**-bits.

    ``add(x, w)`` adds rint(w * x * 2**bits) element-wise to the int64 accumulator ``acc``.
    Integer addition is associative, so the total is the same bits whatever the order and
    grouping of the ``add`` calls and of the sums of several accumulators (over ranks). With
    ``bits`` from ``fraction_bits(exponent_of(partials), sum of weights)``, nothing overflows.
    The product w * x * 2**bits is computed in float64 (exactly for float32 partials, and for
    float64 ones when w is a power of two) and rounded to an integer by adding MAGIC, whose
    float64 bits then hold the integer: no float -> int64 cast, which numpy does slowly. So the
    only errors are that rounding, at most 2**-(bits + 1) per add, and the one rounding of
    ``to_float``. Call ``settle()`` after the last ``add`` (it removes the MAGIC bias).

    With ``words=2`` (float64 training) each element also keeps the remainder y - rint(y) on a
    grid 2**51 times finer, in a second int64 word: about 2**-100 of the largest partial
    instead of 2**-50, so that the sum is no less accurate than float64 additions also for the
    many elements far below the largest.

    Args:
        n: elements per array.
        words: int64 words an element: 1 (float32 partials) or 2 (float64).
        acc: an int64 array of words * n elements to accumulate into (e.g. memory shared
            between ranks: hi words, then lo words); a new one by default.
    """

    def __init__(self, n, words=1, acc=None):
        if words not in (1, 2):
            raise ValueError(f"FixedPoint: expected words 1 or 2, got {words!r}")
        self.n, self.words = int(n), words
        self.acc = np.zeros(words * self.n, np.int64) if acc is None else acc
        if self.acc.dtype != np.int64 or self.acc.shape != (words * self.n,):
            raise ValueError(f"FixedPoint: expected an int64 accumulator of shape ({words * self.n},), "
                             f"got {self.acc.dtype} {self.acc.shape}")
        self._f64 = np.empty(self.n, np.float64)
        self._f64b = np.empty(self.n, np.float64) if words == 2 else None
        self._bias = 0  # the sum of the magic numbers' bits the adds left in acc (see settle)
        self.bits = 0
        self.lo_bits = LO_BITS
        self.fresh = True  # the next add overwrites acc instead of adding to it

    def start(self, bits, total_weight=1):
        """Begin a new sum on the grid 2**-bits (``total_weight``: kept for the callers' symmetry
        with fraction_bits; the second word's grid is 2**-(bits + LO_BITS))."""
        self.bits = int(bits)
        self.fresh = True
        self._bias = 0

    def add(self, x, weight=1):
        """acc += rint(weight * x * 2**bits), element-wise; x is float32 or float64."""
        x = np.asarray(x).reshape(-1)
        n, y = self.n, self._f64
        w = int(weight)
        shift = self.bits + w.bit_length() - 1
        if self.words == 1 and w == weight and w > 0 and w & (w - 1) == 0 and shift <= 1020:
            # a power-of-two weight folds into the grid: x + MAGIC * 2**-shift rounds x to
            # multiples of 2**-shift, and its bits are MAGIC's plus rint(weight * x * 2**bits):
            # the same integer as the multiply below, one pass fewer
            magic = MAGIC * 2.0 ** -shift
            np.copyto(y, x)  # float32 -> float64: exact
            y += magic
            self._deposit(y, self.acc, _float_bits(magic))
            self._bias += 0 if self.fresh else _float_bits(magic)
            self.fresh = False
            return
        scale = float(weight) * 2.0 ** self.bits  # exact: weight < 2**53, power-of-two factor
        np.copyto(y, x)  # float32 -> float64: exact (and fast)
        y *= scale  # exact for float32 x: 24 + 8 significant bits at most
        if self.words == 1:
            y += MAGIC  # y = MAGIC + rint(y): |y| < 2**51
            self._deposit(y, self.acc)
        else:  # the second word: the remainder y - rint(y), exact, times 2**LO_BITS, rounded the same way
            t = self._f64b
            np.add(y, MAGIC, out=t)
            self._deposit(t, self.acc[:n])
            t -= MAGIC  # rint(y), exactly
            y -= t  # |remainder| <= 1/2, exact
            y *= 2.0 ** LO_BITS
            y += MAGIC
            self._deposit(y, self.acc[n:])
        self._bias += 0 if self.fresh else MAGIC_BITS  # once an add: every word got it
        self.fresh = False

    def _deposit(self, magic_plus_q, acc, magic_bits=MAGIC_BITS):
        """acc = q (first add) or acc += magic_bits + q (later adds: settle() removes the bias)."""
        q = magic_plus_q.view(np.int64)  # magic_bits + rint(y)
        if self.fresh:
            np.subtract(q, magic_bits, out=acc)
        else:
            np.add(acc, q, out=acc)  # may wrap past 2**63: settle() brings it back, mod 2**64

    def settle(self):
        """Remove the bias the adds left in ``acc`` (one pass; integer arithmetic modulo 2**64,
        so acc is exactly the sum of the rounded values again). Call before reading acc."""
        if self._bias:
            bias = self._bias % (1 << 64)
            np.subtract(self.acc, np.int64(bias - (1 << 64) if bias >= 1 << 63 else bias), out=self.acc)
            self._bias = 0

    def zero(self):
        """Make the sum zero (a rank without partials still joins the sum over ranks)."""
        if self.fresh:
            self.acc[...] = 0
            self.fresh = False

    def to_float(self, total, out, divisor=1.0):
        """out = total * 2**-bits / divisor, where ``total`` is an int64 sum of accumulators.

        One rounding from int64 to out's dtype, then an exact power-of-two scaling when every
        result is a normal number of that dtype; otherwise (and when dividing) in float64.
        Two words: high word + remainder are added once in float64 (within one rounding of the
        exact value)."""
        scale = 2.0 ** -self.bits
        info = np.finfo(out.dtype)
        with np.errstate(over="ignore"):  # an overflow is looked for below, and named
            self._to_float(total, out, scale, divisor, info)
        if HEADROOM - self.bits >= info.maxexp:  # |sum| < 2**(51 - bits) may not fit: look
            with np.errstate(over="ignore", invalid="ignore"):
                if not np.isfinite(out).all():
                    raise ExactSumError(f"a sum exceeds the largest {out.dtype} ({info.max:.3g}) and cannot be held")
        return out

    def _to_float(self, total, out, scale, divisor, info):
        if self.words == 2:
            self._two_words_to_float(total, out, scale / divisor)
        elif divisor == 1.0 and info.tiny <= scale <= info.max / 2.0 ** 63:  # every result a normal number
            np.copyto(out, total, casting="unsafe")
            out *= out.dtype.type(scale)
        else:
            np.multiply(total, scale / divisor, out=out, casting="unsafe")

    def _two_words_to_float(self, total, out, scale):
        """(hi + lo * 2**-LO_BITS) * scale: |hi| < 2**51 converts exactly, and so does lo while
        the batch has fewer than 8 micro-shards (then one rounding, in the addition)."""
        n, y = self.n, self._f64
        np.copyto(y, total[n:], casting="unsafe")
        y *= 2.0 ** -LO_BITS
        np.add(y, total[:n], out=y, casting="unsafe")
        y *= scale
        np.copyto(out, y, casting="unsafe")
        return out


def words_for(dtype):
    """int64 words an element for partials of ``dtype``: 1 for float32 (and narrower), 2 for float64."""
    return 2 if np.dtype(dtype).itemsize >= 8 else 1


def exact_sum(arrays, weights=None, dtype=None):
    """The weighted sum of ``arrays`` through ``FixedPoint``: the same bits for any order of
    the arrays (a single-process convenience; tests and the benchmark use it).

    Raises ExactSumError when an array holds a NaN or infinity."""
    arrays = [np.asarray(a) for a in arrays]
    weights = [1] * len(arrays) if weights is None else list(weights)
    dtype = np.dtype(dtype or (arrays[0].dtype if arrays else np.float64))
    n = arrays[0].size if arrays else 0
    e = exponent_of(arrays)
    if e >= NONFINITE:
        raise ExactSumError(f"exact sum: array {len(arrays) - (e - NONFINITE)} holds a NaN or infinity")
    fp = FixedPoint(n, words=words_for(arrays[0].dtype if arrays else dtype))
    fp.start(fraction_bits(e, sum(weights)), sum(weights))
    fp.zero()
    for a, w in zip(arrays, weights):
        fp.add(a, w)
    fp.settle()
    return fp.to_float(fp.acc, np.empty(n, dtype))


# -- the ordered sum ------------------------------------------------------------------------

ALIGN = 16  # column slices start on a multiple of 16 elements (64 bytes in float32)


def column_slices(n, parts):
    """[lo, hi) of ``parts`` slices of n columns, equal but for the last, each starting on a
    multiple of ALIGN elements (empty slices at the end when n is small)."""
    per = -(-max(int(n), 1) // parts)
    per = -(-per // ALIGN) * ALIGN
    return [(min(i * per, n), min((i + 1) * per, n)) for i in range(parts)]


def sum_tree_root(k):
    """The level of the sum tree's root over k leaves: the smallest L with 2**L >= k."""
    return max(0, int(k) - 1).bit_length()


def tree_nodes(first, count, k):
    """The nodes of the sum tree over k micro-shards that a run of micro-shards first ..
    first + count - 1 adds up alone, left to right, as (level, index) pairs.

    The tree: node (0, j) is micro-shard j; node (l, j) covers micro-shards j * 2**l up to
    (j + 1) * 2**l - 1 (clipped at k) and is node (l-1, 2j) + node (l-1, 2j+1), or node
    (l-1, 2j) alone when the right one starts at k or later. That is pairwise summation:
    (0+1), (2+3), ..., then pairs of those, the odd last carried up. A run's nodes are what
    merging each micro-shard with its left sibling, as soon as both are there, leaves."""
    stack = []
    for leaf in range(first, first + count):
        level, j = 0, leaf
        while j % 2 == 1 and stack and stack[-1] == (level, j - 1):
            stack.pop()
            level, j = level + 1, j // 2
        stack.append((level, j))
    return stack


def tree_sum(nodes, rows, k, out, scratch=None):
    """out = the sum tree's root over k micro-shards (see ``tree_nodes``), given the values of
    ``nodes`` (a cover of the micro-shards by tree nodes, left to right) in ``rows`` (one row
    each, any strides). The additions are those of the tree whatever the cover, so the result
    is the same bits for any cut of the micro-shards into runs. ``scratch``: at least
    2 * sum_tree_root(k) rows as wide as ``out``."""
    given = {node: i for i, node in enumerate(nodes)}
    top = sum_tree_root(k)
    if scratch is None or scratch.shape[0] < 2 * top:
        scratch = np.empty((2 * top, out.shape[0]), out.dtype)

    def value(level, j, dest):
        i = given.get((level, j))
        if i is not None:
            return rows[i]
        if level == 0:
            raise ValueError(f"tree_sum: micro-shard {j} of {k} is in no node given")
        if (2 * j + 1) << (level - 1) >= k:  # no right child: the left one carried up
            return value(level - 1, 2 * j, dest)
        left = value(level - 1, 2 * j, scratch[2 * (level - 1)])
        right = value(level - 1, 2 * j + 1, scratch[2 * (level - 1) + 1])
        return np.add(left, right, out=dest)

    if k == 0:
        out[...] = 0
        return out
    with np.errstate(over="ignore", invalid="ignore"):  # the caller looks for non-finite sums
        root = value(top, 0, out)
    if root is not out:
        np.copyto(out, root)
    return out


def ordered_sum(rows, out, scratch=None):
    """out = the sum tree's root over the k rows of ``rows`` (k x w): ``tree_sum`` with every
    micro-shard given alone (the reference the tests hold the cut-up sums to)."""
    return tree_sum([(0, j) for j in range(rows.shape[0])], rows, rows.shape[0], out, scratch)


class RunSum:
    """A rank's run of micro-shards added up along the sum tree as their partials come
    (``tree_nodes``): each is merged with its left sibling as soon as both are there, straight
    into the row the merged node ships in (``rows``, one per node of the run) or a spare array,
    while the partials are still in cache. ``finish`` leaves every node of the run in its row.

    ``add(i, value, kept)``: the run's i-th partial; ``kept`` False when ``value`` lies in a
    buffer the next pass overwrites (``settle`` then copies what still needs it)."""

    def __init__(self, first, nodes, rows, spares):
        self.first = first
        self.home = {j << level: row for row, (level, j) in zip(rows, nodes)}
        self.free = list(spares)
        self.stack = []  # (level, index, array, kept) of the nodes so far, left to right

    def _place(self, level, j):
        """Where node (level, j) goes: the row it ships in, or a spare array."""
        row = self.home.get(j << level)
        return row if row is not None else self.free.pop()

    def add(self, i, value, kept):
        level, j = 0, self.first + i
        while j % 2 == 1 and self.stack and self.stack[-1][:2] == (level, j - 1):
            _, _, left, left_kept = self.stack.pop()
            level, j = level + 1, j // 2
            dest = left if left_kept else self._place(level, j)
            with np.errstate(over="ignore", invalid="ignore"):  # a sum that overflows is named after the step
                np.add(left, value, out=dest)  # left + right: the tree's addition (IEEE + commutes)
            if kept and value is not dest and not any(value is r for r in self.home.values()):
                self.free.append(value)  # a spare that held the right half
            value, kept = dest, True
        self.stack.append((level, j, value, kept))

    def settle(self):
        """Copy the nodes that still lie in a pass's buffer to their place."""
        for n, (level, j, value, kept) in enumerate(self.stack):
            if not kept:
                dest = self._place(level, j)
                np.copyto(dest, value)
                self.stack[n] = (level, j, dest, True)

    def finish(self):
        """Every node of the run in its row (they are all nodes this rank ships)."""
        for level, j, value, _ in self.stack:
            row = self.home[j << level]
            if not np.may_share_memory(value, row):
                np.copyto(row, value)
        self.stack = []


class LocalPartials:
    """The ordered sum's exchange for one process: the rows it ships are all the rows."""

    def __init__(self):
        self._rows = np.empty((0, 0))
        self._sum = None
        self._k = 0

    def rows(self, counts, n, dtype, slots):
        """A (counts[rank], n) array for the values of this rank's tree nodes (``tree_nodes``);
        ``counts``: how many each rank ships; ``slots``: the length of the integer tail
        ``gather`` will send (the exchanges between processes size their buffers by it)."""
        k = sum(counts)
        dtype = np.dtype(dtype)
        if self._rows.shape[0] < k or self._rows.shape[1] != n or self._rows.dtype != dtype:
            self._rows = np.empty((max(k, 1), n), dtype)
            self._sum = np.empty(n, dtype)
        self._k = k
        return self._rows[:k]

    def gather(self, tail):
        """After every rank's rows are written: (all ranks' rows, their columns of this rank's
        slice, in rank order; where this slice's sum goes; the ranks' ``tail`` slots summed)."""
        return self._rows[:self._k], self._sum, tail

    def finish(self, bad=False):
        """(the whole sum, whether a slice's sum was not finite), once every slice's is written
        (``bad``: this rank's slice's; None from an exchange means: look at the whole sum)."""
        return self._sum, bool(bad)


# -- reproducible steps and evaluation -------------------------------------------------------

def one_blas_thread():
    """Run BLAS with one thread in this process: a float32 GEMM's bits change with the thread
    count (``bench/reproducible.py --gemm-check``), which the automatic choice varies with P."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # then the environment decides (OMP_NUM_THREADS=1 under the launchers)
        return
    threadpool_limits(limits=1, user_api="blas")


def _float_bits(value):
    """The IEEE bits of a float64 as an int64 (NaN and infinity included)."""
    return int(np.array(value, np.float64).view(np.int64))


def _floats(bits):
    """Inverse of _float_bits, for an int64 array."""
    return np.ascontiguousarray(bits, np.int64).view(np.float64)


def _rows_of(feed, n_local):
    """f(a, count) -> ``feed`` with rows a..a+count-1 of every array whose first axis is this
    rank's row count (the inputs and labels); other arrays fed whole."""
    cut = [ph for ph, v in feed.items() if np.ndim(v) >= 1 and len(v) == n_local]

    def rows(a, count):
        sub = dict(feed)
        for ph in cut:
            sub[ph] = feed[ph][a:a + count]
        return sub

    return rows


def fsum_or_nan(values):
    """math.fsum of ``values``, or their plain sum when one is NaN or infinite (so the caller sees it)."""
    values = [float(v) for v in values]
    if all(math.isfinite(v) for v in values):
        return math.fsum(values)
    return sum(values)


class MicroShardSteps:
    """One rank's side of reproducible training steps and evaluation (numpy only: the caller
    passes the collectives).

    ``step`` runs forward and backward on each of this rank's micro-shards alone and keeps each
    partial gradient; then the partials of all ranks are combined by one of the two sums (see
    the module's docstring):

    - ordered (``partials`` given): each partial, weighted by its rows / m, is added along the
      sum tree (``RunSum``) into the rows of ``partials`` (the exchange), which hands this
      rank every rank's tree nodes for its slice of the columns; ``tree_sum`` adds them; the
      exchange gathers the slices.
    - exact: a fixed-point scale is agreed with the other ranks (``max_over_ranks`` of one
      int64: the largest exponent), the partials are converted and added in int64
      (``FixedPoint``) and summed over the ranks in int64 (``sum_over_ranks``).

    The step's sample count, correct predictions and stop requests travel as integers (exact),
    and each micro-shard's loss sum as the bits of a float64 in a slot only its owner writes
    (others write 0, and x + 0 = x in any order); every rank then adds the slots with math.fsum.

    Args:
        rank, size: this rank and the number of ranks.
        sum_over_ranks: f(int64 buffer) -> the elementwise sum over ranks (in place or not).
        max_over_ranks: f(int) -> the max over ranks.
        buffer: f(like) -> a zeroed int64 buffer shaped like ``like`` that ``sum_over_ranks``
            sums (e.g. memory shared by the ranks of a machine); default np.zeros_like.
        micro: rows per micro-shard; default ``micro_size(n_global)`` per batch.
        partials: the ordered sum's exchange (``LocalPartials``, or
            ``paranet.distributed``'s shared-memory and MPI ones); None: the exact sum.
    """

    COUNT, STOP, CORRECT, TAIL = 0, 1, 2, 3  # integer slots of the tail; loss slots follow

    def __init__(self, rank, size, sum_over_ranks, max_over_ranks, buffer=None, micro=None, partials=None):
        self.rank, self.size = int(rank), int(size)
        self.sum_over_ranks, self.max_over_ranks = sum_over_ranks, max_over_ranks
        self.new_buffer = buffer or np.zeros_like
        self.micro = micro
        self.partials = partials
        self.fixed = None  # exact: FixedPoint over this rank's part of the int64 buffer
        self._buf = None
        self._stash = None  # exact: (micro-shards, parameters): this rank's partial gradients of a step
        self._grad_sum = None  # exact: the gradient summed over the batch's rows, handed to the optimizer
        self._tail = np.zeros(0, np.int64)  # ordered: this rank's integer slots
        self._scratch = None  # ordered: tree_sum's levels
        self._spare = None  # ordered: arrays for tree nodes this rank does not ship
        self._tree_key = self._tree = None  # ordered: _plan_tree's
        self._grouped = None  # the per-micro-shard gradients of a grouped backward
        self.comm_seconds = 0.0  # time in the collectives of step()

    def micro_for(self, n_global):
        return self.micro or micro_size(n_global)

    def rows(self, n_global, n_local=None):
        """(micro, begin, the micro-shard indices) of this rank's rows of a batch; checks that a
        shard of n_local rows is the one ``shard_range`` gives this rank."""
        micro = self.micro_for(n_global)
        begin, count = shard_range(n_global, self.rank, self.size, micro)
        if n_local is not None and n_local != count:
            raise ValueError(f"reproducible step: rank {self.rank} of {self.size} holds {n_local} rows of a global "
                             f"batch of {n_global}; the micro-shard rule gives it {count} (rows {begin}..{begin + count - 1}, "
                             f"micro-shards of {micro}): cut batches with paranet.reproducible.shard_range or World.shard")
        return micro, begin, local_micro_shards(n_global, self.rank, self.size, micro)

    def _buffers(self, params, slots):
        words = words_for(params.dtype)
        need = words * params.size + self.TAIL + slots
        if self._buf is None or self._buf.size < need or self.fixed.n != params.size or self.fixed.words != words:
            size = max(need, words * params.size + self.TAIL + 16)
            self._buf = self.new_buffer(np.zeros(size, np.int64))
            self.fixed = FixedPoint(params.size, words, acc=self._buf[:words * params.size])
            self._grad_sum = np.empty(params.size, params.dtype)
        return self._buf

    def _micro_shards(self, session, plan, feed, n_global, micro, begin, ks, tail, keep, metric, into_for=None,
                      settle=None):
        """Forward and backward on each micro-shard ``ks`` alone; ``keep(i, count, grads)``
        stores the i-th one's partial gradient (``grads``, valid until the next pass); its loss
        sum goes to tail[TAIL + k]. Returns the correct predictions (``metric``).

        When the graph allows it (``plan.groupable``), the full micro-shards run stacked, in
        one grouped forward and backward (``Session.forward``'s groups): one GEMM call a layer
        for all of them, each micro-shard's rows computed as if alone; a short last one runs
        by itself. ``into_for(i, G)``: where the grouped backward of micro-shards i.. writes,
        if not the usual buffer (then ``keep`` is told they are in place); ``settle()``: called
        before a pass overwrites the previous one's buffers."""
        loss = plan.order[-1]
        rows = _rows_of(feed, len(feed[loss.root]))
        correct, done = 0, 0
        full = [k for k in ks if micro_shard(n_global, micro, k)[1] == micro] if plan.groupable else []
        chunk = max(1, int(GROUP_BYTES // max(plan.params.size * plan.params.dtype.itemsize, 1)))
        while done < len(full):
            G = min(chunk, len(full) - done)
            a = micro_shard(n_global, micro, full[done])[0] - begin
            if settle is not None:
                settle()
            session.forward(plan, rows(a, G * micro), groups=G)
            into = into_for(done, G) if into_for is not None else None
            placed = into is not None
            if into is None:
                into = self._group_grads(G, plan.params)
            session.backward(plan, into)
            for i in range(G):
                keep(done + i, micro, into[i], placed)
                tail[self.TAIL + full[done + i]] = _float_bits(float(loss.value[i]) * micro)
            if metric is not None:
                correct += int(metric(slice(a, a + G * micro)))
            done += G
        for i in range(done, len(ks)):
            lo, count = micro_shard(n_global, micro, ks[i])
            a = lo - begin
            if settle is not None:
                settle()
            session.forward(plan, rows(a, count))
            session.backward(plan)
            keep(i, count, plan.params.grads)
            tail[self.TAIL + ks[i]] = _float_bits(float(loss.value) * count)
            if metric is not None:
                correct += int(metric(slice(a, a + count)))
        return correct

    def _group_grads(self, groups, params):
        """A (groups, parameters) array for a grouped backward's per-micro-shard gradients."""
        g = self._grouped
        if g is None or g.shape[0] < groups or g.shape[1] != params.size or g.dtype != params.dtype:
            g = self._grouped = np.empty((groups, params.size), params.dtype)
        return g[:groups]

    def step(self, session, plan, feed, n_global, *, step=None, metric=None, stop=0):
        """Forward, backward and the reproducible gradient sum of one global batch.

        Args:
            session, plan: the Session and the Plan of the loss (``session.plan(loss)``).
            feed: this rank's rows: placeholder -> array; arrays whose first axis is the input
                placeholder's row count are cut into micro-shards, others fed whole.
            n_global: rows in the global batch.
            step: the step number, for error messages.
            metric: f(rows: slice of this rank's arrays) -> int, called after each micro-shard's
                forward (the trainer counts correct predictions).
            stop: this rank's stop requests, a multiple of 1/1024 (the trainer's flags), summed over ranks.
        Returns:
            (gradient, scale, count, loss_sum, correct, stop) over all ranks: gradient * scale is
            the mean gradient over the batch's rows; gradient is valid until the next step.
        Raises:
            ExactSumError: a partial gradient holds a NaN or infinity, or the sum overflows
                (on every rank).
        """
        root = getattr(plan.order[-1], "root", None)
        if root is None or root not in feed:
            raise ValueError("reproducible step: the loss's input placeholder must be fed")
        n_local = len(feed[root])
        micro, begin, ks = self.rows(n_global, n_local)
        if self.partials is not None:
            return self._step_ordered(session, plan, feed, n_global, micro, begin, ks, step, metric, stop)
        return self._step_exact(session, plan, feed, n_global, micro, begin, ks, step, metric, stop)

    def _plan_tree(self, n_global, micro):
        """(every rank's tree nodes, left to right, as one list; how many each rank ships; this
        rank's nodes; its first micro-shard) for a batch of n_global rows: cached per batch size."""
        key = (n_global, micro)
        if self._tree_key != key:
            k = num_micro_shards(n_global, micro)
            ranges = micro_shard_ranges(n_global, self.size, micro)
            per_rank = [tree_nodes(first, count, k) for first, count in ranges]
            self._tree = ([n for nodes in per_rank for n in nodes], [len(n) for n in per_rank], per_rank[self.rank],
                          ranges[self.rank][0])
            self._tree_key = key
        return self._tree

    def _step_ordered(self, session, plan, feed, n_global, micro, begin, ks, step, metric, stop):
        params = plan.params
        total_k = num_micro_shards(n_global, micro)
        nodes, counts, mine, first = self._plan_tree(n_global, micro)
        if self._tail.size != self.TAIL + total_k:
            self._tail = np.zeros(self.TAIL + total_k, np.int64)
        ship = self.partials.rows(counts, params.size, params.dtype, self._tail.size)  # this rank's nodes go here
        tail = self._tail
        tail[...] = 0
        spares = sum_tree_root(total_k) + 2  # a node waits for its right sibling at each level, plus a weighted one
        if not self._spare or len(self._spare) < spares or self._spare[0].shape != (params.size,) \
                or self._spare[0].dtype != params.dtype:
            self._spare = [np.empty(params.size, params.dtype) for _ in range(spares)]
        run = RunSum(first, mine, ship, self._spare)
        alone = {j: q for q, (level, j) in enumerate(mine) if level == 0}  # micro-shards shipped as they are

        def keep(i, count, grads, placed=False):
            # this micro-shard's partial, weighted by rows / m (exact in binary: m is a power of two)
            if count != micro:
                run.add(i, np.multiply(grads, params.dtype.type(count / micro), out=run.free.pop()), True)
            else:
                run.add(i, grads, placed)

        def into_for(i, groups):
            """A grouped pass over the run's micro-shards i.. writes straight into their rows when
            each is a node of its own, in consecutive rows (e.g. one micro-shard a rank)."""
            q = alone.get(first + i)
            if q is None or any(alone.get(first + i + d) != q + d for d in range(groups)):
                return None
            return ship[q:q + groups]

        correct = self._micro_shards(session, plan, feed, n_global, micro, begin, ks, tail, keep, metric,
                                     into_for=into_for, settle=run.settle)
        run.finish()
        tail[self.COUNT], tail[self.STOP], tail[self.CORRECT] = len(feed[plan.order[-1].root]), round(stop * STOP_UNIT), correct
        t0 = time.perf_counter()
        columns, out, tails = self.partials.gather(tail)
        top = sum_tree_root(total_k)
        if self._scratch is None or self._scratch.shape[0] < 2 * top or self._scratch.shape[1] < out.size \
                or self._scratch.dtype != out.dtype:
            self._scratch = np.empty((2 * top, out.size), out.dtype)
        tree_sum(nodes, columns, total_k, out, self._scratch[:, :out.size])
        summed, bad = self.partials.finish(not all_finite(out))
        self.comm_seconds += time.perf_counter() - t0
        count, stop_total, correct_total = (int(v) for v in tails[:self.TAIL])
        if count != n_global:
            raise RuntimeError(f"ranks disagree on the global batch: {count} rows summed, {n_global} expected")
        losses = _floats(tails[self.TAIL:self.TAIL + total_k])
        if bad or (bad is None and not all_finite(summed)):  # every rank holds the same verdict: all come here
            self._name_non_finite(losses, n_global, micro, step, summed.dtype, lambda: self._first_bad_partial(
                session, plan, feed, n_global, micro, begin, ks))
        return summed, micro / n_global, count, fsum_or_nan(losses), correct_total, stop_total / STOP_UNIT

    def _name_non_finite(self, losses, n_global, micro, step, dtype, recheck):
        """Raise ExactSumError naming the first micro-shard whose loss is not finite (the same
        on every rank: all hold every loss), else the first whose partial gradient is not,
        found by ``recheck()`` (this rank's first such micro-shard, recomputed alone; the
        smallest over the ranks by one MAX), else the overflow of the sum itself. The same
        verdict at any P: the partials are what they are whichever rank recomputes them."""
        at = f" at step {step}" if step is not None else ""
        total_k = len(losses)
        bad = [k for k, v in enumerate(losses) if not math.isfinite(v)]
        first = bad[0] if bad else total_k - int(self.max_over_ranks(total_k - recheck()))
        if first < total_k:
            lo, count = micro_shard(n_global, micro, first)
            what = "has a NaN or infinite loss" if bad else "has a partial gradient with a NaN or infinity"
            raise ExactSumError(f"non-finite gradient{at}: micro-shard {first} (rows {lo}..{lo + count - 1} of the "
                                f"global batch of {n_global}) {what}; lower the learning rate or check the data")
        raise ExactSumError(f"gradient sum{at}: a sum exceeds the largest {dtype} ({np.finfo(dtype).max:.3g}) "
                            f"and cannot be held; lower the learning rate or check the data")

    @staticmethod
    def _first_bad_partial(session, plan, feed, n_global, micro, begin, ks):
        """The first of micro-shards ``ks`` whose partial gradient, computed alone, is not
        finite, or the micro-shard count when none (the error path only: it recomputes)."""
        rows = _rows_of(feed, len(feed[plan.order[-1].root]))
        for k in ks:
            lo, count = micro_shard(n_global, micro, k)
            with np.errstate(all="ignore"):
                session.forward(plan, rows(lo - begin, count))
                session.backward(plan)
            if not all_finite(plan.params.grads):
                return k
        return num_micro_shards(n_global, micro)

    def _step_exact(self, session, plan, feed, n_global, micro, begin, ks, step, metric, stop):
        params = plan.params
        n_local = len(feed[plan.order[-1].root])
        total_k = num_micro_shards(n_global, micro)
        buf = self._buffers(params, total_k)
        nw = self.fixed.words * params.size
        if self._stash is None or self._stash.shape[0] < len(ks) or self._stash.shape[1] != params.size \
                or self._stash.dtype != params.dtype:
            self._stash = np.empty((max(len(ks), 1), params.size), params.dtype)
        tail = buf[nw:]
        tail[...] = 0

        def keep(i, count, grads, placed=False):
            if not placed:
                np.copyto(self._stash[i], grads)

        correct = self._micro_shards(session, plan, feed, n_global, micro, begin, ks, tail, keep, metric,
                                     into_for=lambda i, groups: self._stash[i:i + groups])
        partials = [self._stash[i] for i in range(len(ks))]
        code = exponent_of([self._stash[:len(ks)]] if ks else [])  # one max, one min
        if code >= NONFINITE:  # which partial: look again one by one
            code = exponent_of(partials)
        if code >= NONFINITE:  # name the global micro-shard: the max over ranks then finds the first
            code = NONFINITE + (total_k - ks[len(ks) - (code - NONFINITE)])
        t0 = time.perf_counter()
        code = int(self.max_over_ranks(int(code)))
        self.comm_seconds += time.perf_counter() - t0
        if code >= NONFINITE:
            k = total_k - (code - NONFINITE)
            lo, count = micro_shard(n_global, micro, k)
            at = f" at step {step}" if step is not None else ""
            raise ExactSumError(f"non-finite gradient{at}: micro-shard {k} (rows {lo}..{lo + count - 1} of the global "
                                f"batch of {n_global}) holds a NaN or infinity, which the reproducible sum cannot "
                                f"represent; lower the learning rate or check the data")
        fp = self.fixed
        fp.start(fraction_bits(code, n_global), n_global)
        if not ks:
            fp.zero()  # no rows here: this rank adds zeros
        for x, k in zip(partials, ks):
            fp.add(x, micro_shard(n_global, micro, k)[1])
        fp.settle()
        tail[self.COUNT], tail[self.STOP], tail[self.CORRECT] = n_local, round(stop * STOP_UNIT), correct
        t0 = time.perf_counter()
        summed = self.sum_over_ranks(buf)
        self.comm_seconds += time.perf_counter() - t0
        count, stop_total, correct_total = (int(v) for v in summed[nw:nw + self.TAIL])
        stop_total /= STOP_UNIT
        if count != n_global:
            raise RuntimeError(f"ranks disagree on the global batch: {count} rows summed, {n_global} expected")
        loss_sum = fsum_or_nan(_floats(summed[nw + self.TAIL:nw + self.TAIL + total_k]))
        try:
            fp.to_float(summed[:nw], self._grad_sum)
        except ExactSumError as e:
            raise ExactSumError(f"gradient sum at step {step}: {e}") from None
        return self._grad_sum, 1.0 / count, count, loss_sum, correct_total, stop_total

    def evaluate(self, session, loss, batches, feed_of, metric=None, allreduce=None):
        """(count, loss sum, correct) over batches of a split, each rank its micro-shards.

        Args:
            loss: the loss node (its value is the mean over the rows fed).
            batches: this rank's batches, each with ``n_local`` and ``n_global``.
            feed_of: f(batch, rows: slice) -> feed dict for those rows of the batch.
            metric: f(batch, rows) -> int after each forward (correct predictions).
            allreduce: f(int64 array) -> its sum over ranks (default ``sum_over_ranks``).
        """
        plan = session.plan(loss)
        slots, correct, count = [], 0, 0
        for batch in batches:
            micro, begin, ks = self.rows(batch.n_global, batch.n_local)
            total_k = num_micro_shards(batch.n_global, micro)
            mine = [0] * total_k
            full = [k for k in ks if micro_shard(batch.n_global, micro, k)[1] == micro] if plan.groupable else []
            if full:  # the full micro-shards stacked in one grouped forward, as the step runs them
                a = micro_shard(batch.n_global, micro, full[0])[0] - begin
                sl = slice(a, a + len(full) * micro)
                session.forward(plan, feed_of(batch, sl), groups=len(full))
                for i, k in enumerate(full):
                    mine[k] = _float_bits(float(loss.value[i]) * micro)
                if metric is not None:
                    correct += int(metric(batch, sl))
            for k in ks[len(full):]:
                lo, rows = micro_shard(batch.n_global, micro, k)
                sl = slice(lo - begin, lo - begin + rows)
                session.forward(plan, feed_of(batch, sl))
                mine[k] = _float_bits(float(loss.value) * rows)
                if metric is not None:
                    correct += int(metric(batch, sl))
            slots += mine
            count += batch.n_local
        vec = np.array([count, correct] + slots, np.int64)
        vec = (allreduce or self.sum_over_ranks)(vec)
        return int(vec[0]), fsum_or_nan(_floats(vec[2:])), int(vec[1])
