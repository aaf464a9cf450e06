"""Bit-for-bit reproducible data parallelism: fixed micro-shards and an exact sum.

The same seed, global batch and flags give the same bits at any number of ranks when two
things hold (issue 12):

1. **Samples are grouped the same way at every P.** A global batch of N rows is cut into
   micro-shards of ``m = micro_size(N)`` rows (the last one shorter), and each rank gets a
   contiguous run of whole micro-shards (``shard_range``). Each micro-shard's gradient is
   computed alone, by its own forward and backward over exactly its rows, so its bits do not
   depend on which rank holds it. (A row's GEMM result does depend on how many rows the GEMM
   holds, and on the BLAS thread count: see ``bench/reproducible.py --gemm-check``.)
2. **The partials are combined by an exact sum.** ``FixedPoint`` turns each partial, weighted
   by its row count, into int64 multiples of 2**-bits at a scale every rank agrees on (one
   small MAX allreduce of the partials' largest exponent), sums them in int64, which is
   associative, and the ranks add their int64 sums (MPI_Allreduce or the shared-memory sum,
   both exact on integers). Each partial is rounded once onto the grid, a rounding that does
   not depend on P; the sums are exact; the result is rounded once back to floats.

A value the representation cannot hold (NaN, infinity) raises ``ExactSumError`` naming the
step; the scale is chosen so that no sum can overflow int64 (bound: rows x 2**exponent).

The module is numpy only: the caller passes the collectives (``paranet.distributed`` does).
"""
import math
import time

import numpy as np

MICRO_MIN, MICRO_MAX = 64, 128  # micro-shard rows: see micro_size
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
    n_global / 8, within [64, 128] (64 at batch 128, 128 at 1024). It depends on the batch
    only, never on the rank count. Big enough that the per-micro-shard cost (one forward and
    backward call of its own, one conversion of the whole gradient: about 35 % of a 32-row
    MLP micro-shard's compute) stays small next to the GEMMs, so that one process pays well
    under 2x; small enough that 8 ranks all get work from batch 512 on. More ranks than
    micro-shards are correct but idle."""
    want = max(1, int(n_global) // 8)
    return min(MICRO_MAX, max(MICRO_MIN, 1 << (want.bit_length() - 1)))


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
    k = num_micro_shards(n_global, micro)
    base, extra = divmod(k, size)
    first = rank * base + min(rank, extra)
    last = first + base + (rank < extra)  # micro-shards first..last-1
    begin, end = min(first * micro, n_global), min(last * micro, n_global)
    return begin, end - begin


def local_micro_shards(n_global, rank, size, micro):
    """The indices of the micro-shards rank ``rank`` holds: a range."""
    k = num_micro_shards(n_global, micro)
    base, extra = divmod(k, size)
    first = rank * base + min(rank, extra)
    return range(first, first + base + (rank < extra))


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
        self._bias = 0  # adds whose MAGIC bias is still in acc (see settle)
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
        scale = float(weight) * 2.0 ** self.bits  # exact: weight < 2**53, power-of-two factor
        n, y = self.n, self._f64
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
        self._bias += not self.fresh
        self.fresh = False

    def _deposit(self, magic_plus_q, acc):
        """acc = q (first add) or acc += MAGIC_BITS + q (later adds: settle() removes the bias)."""
        q = magic_plus_q.view(np.int64)  # MAGIC_BITS + rint(y)
        if self.fresh:
            np.subtract(q, MAGIC_BITS, out=acc)
        else:
            np.add(acc, q, out=acc)  # may wrap past 2**63: settle() brings it back, mod 2**64

    def settle(self):
        """Remove the MAGIC bias the adds left in ``acc`` (one pass; integer arithmetic modulo
        2**64, so acc is exactly the sum of the rounded values again). Call before reading acc."""
        if self._bias:
            bias = (self._bias * MAGIC_BITS) % (1 << 64)
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


def fsum_or_nan(values):
    """math.fsum of ``values``, or their plain sum when one is NaN or infinite (so the caller sees it)."""
    values = [float(v) for v in values]
    if all(math.isfinite(v) for v in values):
        return math.fsum(values)
    return sum(values)


class MicroShardSteps:
    """One rank's side of reproducible training steps and evaluation (numpy only: the caller
    passes the collectives).

    ``step`` runs forward and backward on each of this rank's micro-shards alone, keeps each
    partial gradient, agrees a fixed-point scale with the other ranks (``max_over_ranks`` of
    one int64: the largest exponent), converts and adds the partials in int64 (``FixedPoint``)
    and sums over the ranks in int64 (``sum_over_ranks``). The same int64 buffer carries the
    step's sample count, correct predictions and stop requests (integers: exact), and each
    micro-shard's loss sum as the bits of a float64 in a slot only its owner writes (others
    write 0, and x + 0 = x in any order); every rank then adds the slots with math.fsum.

    Args:
        rank, size: this rank and the number of ranks.
        sum_over_ranks: f(int64 buffer) -> the elementwise sum over ranks (in place or not).
        max_over_ranks: f(int) -> the max over ranks.
        buffer: f(like) -> a zeroed int64 buffer shaped like ``like`` that ``sum_over_ranks``
            sums (e.g. memory shared by the ranks of a machine); default np.zeros_like.
        micro: rows per micro-shard; default ``micro_size(n_global)`` per batch.
    """

    COUNT, STOP, CORRECT, TAIL = 0, 1, 2, 3  # integer slots after the gradient words; loss slots follow

    def __init__(self, rank, size, sum_over_ranks, max_over_ranks, buffer=None, micro=None):
        self.rank, self.size = int(rank), int(size)
        self.sum_over_ranks, self.max_over_ranks = sum_over_ranks, max_over_ranks
        self.new_buffer = buffer or np.zeros_like
        self.micro = micro
        self.fixed = None  # FixedPoint over this rank's part of the int64 buffer
        self._buf = None
        self._stash = None  # (micro-shards, parameters): this rank's partial gradients of a step
        self._grad_sum = None  # the gradient summed over the batch's rows, handed to the optimizer
        self.comm_seconds = 0.0  # time in the two collectives of step()

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

    def step(self, session, plan, feed, n_global, *, step=None, metric=None, stop=0):
        """Forward, backward and the exact gradient sum of one global batch.

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
            (gradient, count, loss_sum, correct, stop) over all ranks: the gradient summed over
            the batch's rows (sum of rows x micro-shard mean; divide by count for the mean),
            valid until the next step.
        Raises:
            ExactSumError: a partial gradient holds a NaN or infinity (on every rank).
        """
        params = plan.params
        loss = plan.order[-1]
        root = getattr(loss, "root", None)
        n_local = len(feed[root]) if root is not None and root in feed else None
        if n_local is None:
            raise ValueError("reproducible step: the loss's input placeholder must be fed")
        micro, begin, ks = self.rows(n_global, n_local)
        total_k = num_micro_shards(n_global, micro)
        buf = self._buffers(params, total_k)
        nw = self.fixed.words * params.size
        if self._stash is None or self._stash.shape[0] < len(ks) - 1 or self._stash.shape[1] != params.size \
                or self._stash.dtype != params.dtype:
            self._stash = np.empty((max(len(ks) - 1, 1), params.size), params.dtype)
        tail = buf[nw:]
        tail[...] = 0
        cut = [ph for ph, v in feed.items() if np.ndim(v) >= 1 and len(v) == n_local]
        correct = 0
        for i, k in enumerate(ks):
            lo, count = micro_shard(n_global, micro, k)
            a = lo - begin
            sub = dict(feed)
            for ph in cut:
                sub[ph] = feed[ph][a:a + count]
            session.forward(plan, sub)
            session.backward(plan)
            if i < len(ks) - 1:  # the last partial stays where backward left it
                np.copyto(self._stash[i], params.grads)
            tail[self.TAIL + k] = _float_bits(float(loss.value) * count)
            if metric is not None:
                correct += int(metric(slice(a, a + count)))
        partials = [self._stash[i] for i in range(len(ks) - 1)] + [params.grads] * bool(ks)
        code = exponent_of([self._stash[:len(ks) - 1], params.grads] if ks else [])  # one max, one min each
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
        return self._grad_sum, count, loss_sum, correct_total, stop_total

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
            for k in ks:
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


def use_micro_shards(reader):
    """Make a BatchReader give this rank whole micro-shards of every global batch
    (``shard_range`` with ``micro_size``) instead of an even split of the rows."""
    rank, size = reader.rank, reader.size
    reader.shard = lambda n_global: shard_range(n_global, rank, size, micro_size(n_global))
    return reader
