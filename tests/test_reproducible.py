"""--reproducible (issue 12): the exact sum, the ordered (pairwise) sum, the micro-shard rule,
and training that gives the same SHA-256 of the parameters and the same metrics at P = 1..4,
for real under mpiexec."""
import hashlib
import inspect
import itertools
import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from paranet import reproducible as rp
from tests.launch import MPIEXEC, REPO, env, run_train

# -- the exact sum ---------------------------------------------------------------------------


def _wide_vectors(dtype, n=400, count=6, seed=0):
    """Vectors whose elements span many orders of magnitude, with exact cancellations
    (vector 5 is -vector 0) and near-cancellations (huge + tiny - huge)."""
    rng = np.random.default_rng(seed)
    top = 30 if np.dtype(dtype) == np.float32 else 200
    vs = [(rng.standard_normal(n) * 10.0 ** rng.integers(-top, top, n)).astype(dtype) for _ in range(count - 1)]
    vs.append(-vs[0])
    vs[1][:50] = vs[0][:50] * 3  # near-cancellations: with weights 32, 32 and 32, vector 0 + 1 - 3
    vs[3][:50] = vs[0][:50] * -4  # leaves vector 2 and 4 (and rounding, in a float sum)
    return vs


def _fsum_reference(vectors, weights):
    """The weighted sum element by element by math.fsum (exact, one rounding to float64)."""
    cols = np.stack([v.astype(np.float64) * w for v, w in zip(vectors, weights)])  # w < 2**8: exact products
    return np.array([math.fsum(c) for c in cols.T])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exact_sum_same_bits_in_every_order_and_grouping(dtype):
    vs = _wide_vectors(dtype)
    ws = [32, 32, 32, 32, 7, 1]
    reference = rp.exact_sum(vs, ws)
    # every order of the six vectors
    for perm in itertools.permutations(range(len(vs))):
        got = rp.exact_sum([vs[i] for i in perm], [ws[i] for i in perm])
        assert got.tobytes() == reference.tobytes(), f"order {perm} changed the bits"
    # every grouping into "ranks" (contiguous runs, as the micro-shard rule gives), each rank
    # accumulating its own int64 sum; the ranks' sums then added in reversed rank order
    e = rp.exponent_of(vs)
    bits = rp.fraction_bits(e, sum(ws))
    words = rp.words_for(dtype)
    for cuts in itertools.chain.from_iterable(itertools.combinations(range(1, len(vs)), r) for r in range(len(vs))):
        bounds = (0, *cuts, len(vs))
        total = np.zeros(words * vs[0].size, np.int64)
        for lo, hi in reversed(list(zip(bounds, bounds[1:]))):
            fp = rp.FixedPoint(vs[0].size, words)
            fp.start(bits, sum(ws))
            fp.zero()
            for i in reversed(range(lo, hi)):
                fp.add(vs[i], ws[i])
            fp.settle()
            total += fp.acc
        out = fp.to_float(total, np.empty(vs[0].size, dtype))
        assert out.tobytes() == reference.tobytes(), f"grouping {bounds} changed the bits"
    # and it is math.fsum's sum within the error bound of the fixed-point grid: half a grid step
    # (2**-bits; two words: 2**-(bits + LO_BITS)) per partial, plus one rounding to the dtype
    exact = _fsum_reference(vs, ws)
    grid = 2.0 ** -(bits + (rp.LO_BITS if words == 2 else 0))
    bound = np.spacing(np.abs(exact).astype(dtype)).astype(np.float64) + len(vs) * grid
    assert np.all(np.abs(reference.astype(np.float64) - exact) <= bound), "outside the error bound of the grid"
    # a huge value, a small one and the huge one negated: exactly the small one, in any order
    huge, small = dtype(3e7), dtype(1.25)
    for perm in itertools.permutations([huge, small, -huge]):
        assert rp.exact_sum([np.array([v], dtype) for v in perm])[0] == small


def test_float_sum_would_change_with_the_order():
    """The test above can fail: a plain float sum of the same vectors changes its bits with the order."""
    vs = _wide_vectors(np.float32)
    sums = {np.sum(np.stack([vs[i] for i in perm]), axis=0).tobytes()
            for perm in itertools.permutations(range(len(vs)))}
    assert len(sums) > 1


@pytest.mark.parametrize("weight", [1, 2, 32, 128, 3, 100])
def test_fixed_point_add_is_rint_of_weight_times_x_on_the_grid(weight):
    """FixedPoint.add(x, w) puts rint(w * x * 2**bits) (ties to even) into the int64 sum, whether
    the weight is a power of two (folded into the magic number) or not (multiplied first):
    against numpy's rint of the exactly scaled float64 values, for values over 40 orders of
    magnitude (most far below the grid's step: rounded), as the first add and as a later one."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(4000) * 10.0 ** rng.integers(-20, 20, 4000)).astype(np.float32)
    e = rp.exponent_of([x])
    bits = rp.fraction_bits(e, 2 * weight)
    x[:4] = [0.0, -0.0, 2.0 ** -bits / weight * 2.5, -(2.0 ** -bits) / weight * 3.5]  # ties (power-of-two weights): to 2, -4
    want = np.rint(x.astype(np.float64) * weight * 2.0 ** bits).astype(np.int64)
    fp = rp.FixedPoint(x.size)
    fp.start(bits)
    fp.add(x, weight)
    fp.settle()
    assert np.array_equal(fp.acc, want)
    fp.add(x, weight)  # a second add: acc += the same integers
    fp.settle()
    assert np.array_equal(fp.acc, 2 * want)


def test_limits_of_the_representation():
    # NaN and infinity are refused with a clear error, never summed into something silently wrong
    for bad in (np.nan, np.inf, -np.inf):
        v = np.ones(10, np.float32)
        v[3] = bad
        with pytest.raises(rp.ExactSumError, match="array 1 holds a NaN or infinity"):
            rp.exact_sum([np.ones(10, np.float32), v])
    # the largest finite values, many times over: no int64 overflow (the scale leaves room)
    big = np.full(8, np.finfo(np.float64).max / 4096, np.float64)
    got = rp.exact_sum([big] * 1000, [3] * 1000)
    assert np.array_equal(got, big * 3000)
    top = np.full(4, np.finfo(np.float32).max / 2, np.float32)
    assert np.array_equal(rp.exact_sum([top, -top, top], [1, 1, 1]), top)
    # a sum of float32 values past float32's range is an error, not an infinity
    with pytest.raises(rp.ExactSumError, match="cannot be held"):
        rp.exact_sum([top, top, top])
    # the documented limits of the grid: an element more than 2**(51 + 51 - log2 rows) below the
    # largest |partial| counts as zero (float64, two words; float32: 2**(51 - log2 rows)), and
    # so do partials below 2**-MAX_BITS
    bits = rp.fraction_bits(1, 2)  # the largest is 1.0 (exponent 1), 2 rows
    grid64, grid32 = 2.0 ** -(bits + rp.LO_BITS), 2.0 ** -bits
    got = rp.exact_sum([np.array([1e-30, 1.0]), np.array([0.0, 1.0])])
    assert got[1] == 2.0 and 0 < abs(got[0] - 1e-30) <= grid64
    got = rp.exact_sum([np.array([1e-40, 1.0]), np.array([0.0, 1.0])])
    assert got.tolist() == [0.0, 2.0]
    got = rp.exact_sum([np.array([1e-12, 1.0], np.float32), np.array([0.0, 1.0], np.float32)])
    assert got[1] == 2.0 and abs(float(got[0]) - float(np.float32(1e-12))) <= grid32 + float(np.spacing(got[0]))
    got = rp.exact_sum([np.array([1e-19, 1.0], np.float32), np.array([0.0, 1.0], np.float32)])
    assert got.tolist() == [0.0, 2.0]
    got = rp.exact_sum([np.array([1e-300]), np.array([1e-300])])[0]  # the grid is 2**-(MAX_BITS + 60) there
    assert 0 < abs(got - 2e-300) <= 2 * 2.0 ** -(rp.MAX_BITS + rp.LO_BITS)
    assert rp.exact_sum([np.array([1e-300]) * 1e-20] * 2)[0] == 0.0
    # all zeros: zeros (no exponent at all)
    assert not np.any(rp.exact_sum([np.zeros(5, np.float32)] * 3))


# -- the ordered sum ---------------------------------------------------------------------------


def _pairwise_sum(rows):
    """Pairwise summation written out, the reference for the ordered sum: add rows (0+1),
    (2+3), ..., carry an odd last one up unchanged, and do the same over those sums until one
    row is left. Each addition is numpy's, in the rows' dtype."""
    level = [np.array(r) for r in rows]
    while len(level) > 1:
        pairs = [level[i] + level[i + 1] for i in range(0, len(level) - 1, 2)]
        level = pairs + level[2 * len(pairs):]
    return level[0]


def _wide_rows(dtype, k, n=64, seed=0):
    """k rows of n elements spanning many orders of magnitude, with exact cancellations (row
    3i+1 is minus row 3i in half the columns) and near ones (row 3i+2 is -0.5 times row 3i in
    a quarter of the columns, so that what is left of row 3i is in the rounding of its sums)."""
    rng = np.random.default_rng(seed)
    top = 30 if np.dtype(dtype) == np.float32 else 200
    rows = rng.standard_normal((k, n)) * 10.0 ** rng.integers(-top, top, (k, n))
    for i in range(0, k - 1, 3):
        rows[i + 1, :n // 2] = -rows[i, :n // 2]
        if i + 2 < k:
            rows[i + 2, n // 2:3 * n // 4] = -0.5 * rows[i, n // 2:3 * n // 4]
    return rows.astype(dtype)


def _sequential_sum(rows):
    """Left to right: ((0 + 1) + 2) + ..."""
    total = np.array(rows[0])
    for r in rows[1:]:
        total = total + r
    return total


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ordered_sum_is_pairwise_summation(dtype):
    """ordered_sum gives the bits of pairwise summation written out, for 1..40 rows."""
    differs = []  # the k at which a left-to-right sum gives other bits: the order matters
    for k in range(1, 41):
        rows = _wide_rows(dtype, k, seed=k)
        want = _pairwise_sum(rows)
        out = np.empty(rows.shape[1], dtype)
        assert rp.ordered_sum(rows, out) is out
        assert out.tobytes() == want.tobytes(), f"k={k}: not the pairwise sum"
        scratch = np.empty((2 * rp.sum_tree_root(k), rows.shape[1]), dtype)
        assert rp.ordered_sum(rows, np.empty_like(out), scratch).tobytes() == want.tobytes(), f"k={k}, given scratch"
        if _sequential_sum(rows).tobytes() != want.tobytes():
            differs.append(k)
    # the test can fail: summed left to right, most of these row sets give other bits
    assert len(differs) >= 30, differs


def _greedy_nodes(first, count):
    """The reference cover of micro-shards first..first+count-1 by tree nodes: from the left,
    each time the largest aligned block 2**l * j .. 2**l * (j + 1) - 1 that fits in the run."""
    nodes, s, end = [], first, first + count
    while s < end:
        level = 0
        while s % (2 << level) == 0 and s + (2 << level) <= end:
            level += 1
        nodes.append((level, s >> level))
        s += 1 << level
    return nodes


def _all_cuts(k):
    """Every cut of k micro-shards into contiguous runs, as (first, count) lists (2**(k-1) of them)."""
    for cuts in itertools.product((False, True), repeat=max(k - 1, 0)):
        bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [k]
        yield [(a, b - a) for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tree_sum_of_every_cut_gives_the_ordered_sum(dtype):
    """However the micro-shards are cut into runs (the ranks', at P = 1..17; every cut of up to
    8), the runs' tree nodes summed by tree_sum give the bits of the pairwise sum, also when
    each of several ranks sums a slice of the columns."""
    n, m = 100, 32
    for parts in range(1, 9):  # the column slices: a cover of 0..n-1 in order, aligned starts
        slices = rp.column_slices(n, parts)
        assert len(slices) == parts and slices[0][0] == 0 and slices[-1][1] == n
        assert all(hi == lo2 for (_, hi), (lo2, _) in zip(slices, slices[1:]))
        assert all(lo % rp.ALIGN == 0 and lo <= hi for lo, hi in slices if lo < n)
    for k in range(1, 41):
        leaves = _wide_rows(dtype, k, n, seed=100 + k)
        want = _pairwise_sum(leaves)
        values = {}  # (level, j) -> the pairwise sum of its micro-shards, shared by the cuts

        def value(level, j):
            if (level, j) not in values:
                values[level, j] = _pairwise_sum(leaves[j << level:min((j + 1) << level, k)])
            return values[level, j]

        cuts = [rp.micro_shard_ranges(k * m, p, m) for p in range(1, 18)] + (list(_all_cuts(k)) if k <= 8 else [])
        for runs in cuts:
            nodes = []
            for first, count in runs:
                mine = rp.tree_nodes(first, count, k)
                covered = [leaf for level, j in mine for leaf in range(j << level, min((j + 1) << level, k))]
                assert covered == list(range(first, first + count)), f"k={k}, run {first}+{count}: nodes {mine}"
                assert mine == _greedy_nodes(first, count), f"k={k}, run {first}+{count}: not merged as far as it goes"
                nodes += mine
            assert [leaf for level, j in nodes for leaf in range(j << level, min((j + 1) << level, k))] == list(range(k))
            rows = np.stack([value(level, j) for level, j in nodes])
            out = np.empty(n, dtype)
            assert rp.tree_sum(nodes, rows, k, out).tobytes() == want.tobytes(), f"k={k}, runs {runs}: nodes {nodes}"
            scratch = np.empty((2 * rp.sum_tree_root(k), n + 7), dtype)  # wider than a slice, as a step's is
            for parts in (2, 3, 5, 8):
                out = np.full(n, np.nan, dtype)
                for lo, hi in rp.column_slices(n, parts):
                    rp.tree_sum(nodes, rows[:, lo:hi], k, out[lo:hi], scratch[:, :hi - lo])
                assert out.tobytes() == want.tobytes(), f"k={k}, runs {runs}, {parts} column slices"


# -- the micro-shard rule ----------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 44, 100, 128, 255, 256, 1000, 1024, 5000])
def test_shard_range(n):
    for size in (1, 2, 3, 4, 5, 8, 16):
        # micro = 1 is numpy.array_split over rows, the reader's rule without --reproducible
        parts = np.array_split(np.arange(n), size)
        for rank in range(size):
            begin, count = rp.shard_range(n, rank, size, 1)
            assert (begin, count) == ((parts[rank][0] if len(parts[rank]) else begin), len(parts[rank]))
        # with micro-shards: contiguous, complete, whole micro-shards only, any rank may get none
        micro = rp.micro_size(n)
        assert micro in (32, 64, 128)
        got = [rp.shard_range(n, rank, size, micro) for rank in range(size)]
        assert got[0][0] == 0 and sum(c for _, c in got) == n
        cuts = set()
        for (b, c), (b2, _) in zip(got, got[1:] + [(n, 0)]):
            assert b + c == b2
            cuts.add(b)
        assert all(b % micro == 0 or b == n for b in cuts)
        ks = [list(rp.local_micro_shards(n, rank, size, micro)) for rank in range(size)]
        assert sum(ks, []) == list(range(rp.num_micro_shards(n, micro)))


# -- training: the same bits at P = 1..4 -------------------------------------------------------

TIMINGS = {"samples_per_second", "comm_share", "wall_seconds", "comm_seconds", "world_size", "flags"}


@pytest.fixture(scope="module")
def small_h5(tmp_path_factory):
    """300 training rows (batch 128: 128, 128 and a short 44), 150 validation, 150 test."""
    import h5py

    from paranet.data import default_data_path, write_dataset

    src = default_data_path()
    if not src.exists():
        from paranet.data import ensure_default_dataset
        src = ensure_default_dataset()
    with h5py.File(src, "r") as f:
        splits = {s: (f[f"{s}/images"][:n], f[f"{s}/labels"][:n]) for s, n in (("train", 300), ("val", 150), ("test", 150))}
    return write_dataset(tmp_path_factory.mktemp("repro") / "small.h5", num_classes=10, **splits)


def test_reader_hands_each_rank_whole_micro_shards(small_h5):
    """BatchReader(micro_shards=True): at P = 1..5 each rank's rows of every batch are the run of
    whole micro-shards shard_range gives it, and the ranks' rows put together are the batch one
    process reads (the same rows, bytes and order), short last batch included."""
    from paranet.data import BatchReader

    def batches(rank, size, micro_shards):
        with BatchReader(small_h5, "train", rank=rank, size=size, batch_size=128, prefetch=False,
                         micro_shards=micro_shards) as r:
            return [(b.x.copy(), b.y.copy(), b.n_global) for b in r.epoch(1)]

    whole = batches(0, 1, False)
    assert [n for _, _, n in whole] == [128, 128, 44]
    for size in (1, 2, 3, 4, 5):
        per_rank = [batches(rank, size, True) for rank in range(size)]
        for step, (x, y, n) in enumerate(whole):
            for rank in range(size):
                begin, count = rp.shard_range(n, rank, size, rp.micro_size(n))
                assert len(per_rank[rank][step][0]) == count
            assert np.array_equal(np.concatenate([p[step][0] for p in per_rank]), x)
            assert np.array_equal(np.concatenate([p[step][1] for p in per_rank]), y)
    # without the option: np.array_split's rule, which differs from whole micro-shards at P = 3
    plain = [batches(rank, 3, False)[0][0] for rank in range(3)]
    assert [len(x) for x in plain] == [43, 43, 42]
    assert [len(p[0][0]) for p in [batches(rank, 3, True) for rank in range(3)]] == [64, 32, 32]


def test_the_loss_sum_adds_the_micro_shards_with_fsum():
    """The step's loss sum is math.fsum of the micro-shards' (rows x mean loss), not a float sum
    in some order: micro-shard losses of 2**53 and then 0.5, 0.5, 0.5 (times 32 rows: 2**58 and
    16, 16, 16) add to 2**58 + 48 rounded once (2**58 + 64), where left-to-right float addition
    loses every 16 (half an ulp of 2**58 is 32)."""
    import paranet as pn
    from paranet.graph import Session

    x, y = pn.placeholder((None, 1), name="x"), pn.placeholder((None, 1), name="y")
    W = pn.Variable(np.ones((1, 1)), name="W")
    loss = pn.MeanSquareLoss(pn.matmul(x, W), y)
    sess = Session(np.float64)
    plan = sess.plan(loss)
    steps = rp.MicroShardSteps(0, 1, lambda b: b, lambda v: v, partials=rp.LocalPartials())
    X = np.concatenate([np.full((32, 1), 2.0 ** 27), np.ones((96, 1))])  # mean losses 0.5 * x**2
    _, scale, count, loss_sum, _, _ = steps.step(sess, plan, {x: X, y: np.zeros((128, 1))}, 128)
    means = [sess.run(loss, {x: X[k * 32:(k + 1) * 32], y: np.zeros((32, 1))}) for k in range(4)]  # each alone
    assert means == [2.0 ** 53, 0.5, 0.5, 0.5]
    parts = [m * 32 for m in means]
    assert count == 128 and scale == 32 / 128
    assert loss_sum == math.fsum(parts)
    assert sum(parts) != math.fsum(parts)  # the float sum in this order would differ


def test_an_ordered_sum_beyond_float32_is_refused_naming_the_step():
    """Finite partials whose sum overflows float32 and finite losses (micro-shards of one row,
    x = 1.35e19, y = 0, W = 1: each loss 0.5 x**2 = 9.1e37, each dW = x**2 = 1.8e38, their sum
    3.6e38 > 3.4e38): the step is refused with one line naming it, not handed on as infinity;
    a NaN in one row names its micro-shard."""
    import paranet as pn
    from paranet.graph import Session

    x, y = pn.placeholder((None, 1), name="x"), pn.placeholder((None, 1), name="y")
    W = pn.Variable(np.ones((1, 1)), name="W")
    loss = pn.MeanSquareLoss(pn.matmul(x, W), y)
    sess = Session(np.float32, check_finite=False)  # the NaN below is this test's, not the feed check's
    plan = sess.plan(loss)
    steps = rp.MicroShardSteps(0, 1, lambda b: b, lambda v: v, micro=1, partials=rp.LocalPartials())
    X, Y = np.full((2, 1), 1.35e19, np.float32), np.zeros((2, 1), np.float32)
    for row in range(2):  # each micro-shard alone: finite loss and gradient
        assert np.isfinite(sess.run(loss, {x: X[row:row + 1], y: Y[:1]}, need_grad=True))
        assert np.isfinite(W.grad).all() and W.grad.item() > np.finfo(np.float32).max / 2
    with pytest.raises(rp.ExactSumError, match=r"gradient sum at step 7: a sum exceeds the largest float32"):
        steps.step(sess, plan, {x: X, y: Y}, 2, step=7)
    X[1] = np.nan
    with pytest.raises(rp.ExactSumError, match=r"non-finite gradient at step 8: micro-shard 1 \(rows 1..1 of the "
                                               r"global batch of 2\)"):
        steps.step(sess, plan, {x: X, y: Y}, 2, step=8)


@pytest.mark.filterwarnings("ignore:overflow encountered in matmul:RuntimeWarning")  # the overflow is the point
def test_a_non_finite_partial_with_a_finite_loss_is_named():
    """Micro-shard 1's prediction is exactly 0 (1e30 * 1 + 1e30 * -1) so its loss, 0.5 * 1e20,
    is finite, but its dW = x * (pred - y) = 1e30 * -1e10 overflows float32: the step names
    micro-shard 1 (found by recomputing each micro-shard alone), not the sum."""
    import paranet as pn
    from paranet.graph import Session

    x, y = pn.placeholder((None, 2), name="x"), pn.placeholder((None, 1), name="y")
    W = pn.Variable(np.array([[1.0], [-1.0]]), name="W")
    loss = pn.MeanSquareLoss(pn.matmul(x, W), y)
    sess = Session(np.float32)
    plan = sess.plan(loss)
    X = np.array([[1.0, 2.0], [1e30, 1e30]], np.float32)
    Y = np.array([[0.0], [1e10]], np.float32)
    assert np.isfinite(sess.run(loss, {x: X[1:], y: Y[1:]}, need_grad=True)) and not np.isfinite(W.grad).all()
    for partials in (rp.LocalPartials(), None):  # the ordered sum, and the exact one
        steps = rp.MicroShardSteps(0, 1, lambda b: b, lambda v: v, micro=1, partials=partials)
        with pytest.raises(rp.ExactSumError, match=r"non-finite gradient at step 5: micro-shard 1 \(rows 1..1 of the "
                                                   r"global batch of 2\)"):
            steps.step(sess, plan, {x: X, y: Y}, 2, step=5)


def _train(tmp_path, tag, nprocs, *args, extra_env=None):
    out = tmp_path / tag
    run_train(nprocs, "--reproducible", *args, "--checkpoint", f"{out}.ckpt.h5", "--metrics", f"{out}.json",
              "--save-params", f"{out}.npz", "--eval-batch-size", "100", timeout=180, extra_env=extra_env)
    with np.load(f"{out}.npz") as f:  # the bytes of the parameter buffer, in its order: Parameters.digest()
        digest = hashlib.sha256(b"".join(f[k].tobytes() for k in f.files)).hexdigest()
    import h5py

    with h5py.File(f"{out}.ckpt.h5", "r") as f:  # and the optimizer's state (Adam: m, v, steps)
        opt = f["optimizer"]
        digest += " " + hashlib.sha256(b"".join(opt[k][()].tobytes() for k in sorted(opt))
                                       + repr(sorted(opt.attrs.items())).encode()).hexdigest()
    metrics = json.loads((tmp_path / f"{tag}.json").read_text())
    kept = {k: v for k, v in metrics.items() if k not in TIMINGS}
    kept["history"] = [{k: v for k, v in h.items() if k not in TIMINGS} for h in metrics["history"]]
    return digest, kept


CASES = [  # (model, dtype, batch, allreduce, rank counts): every case has a short last micro-shard
    ("mlp", "float32", 256, "shm", (1, 2, 3, 4)),  # 256 (8 micro-shards of 32, 3 ranks: 3+3+2), then 44 (32 + 12)
    ("mlp", "float64", 100, "mpi", (1, 3, 4)),  # 3 batches of 100 rows: 32 + 32 + 32 + 4
    ("cnn", "float32", 128, "mpi", (1, 2, 4)),  # 128, 128, then 44: ranks 2 and 3 of 4 get none
]


@pytest.mark.parametrize("model,dtype,batch,allreduce,procs", CASES, ids=[f"{c[0]}-{c[1]}-{c[3]}" for c in CASES])
def test_training_identical_at_any_rank_count(tmp_path, small_h5, model, dtype, batch, allreduce, procs):
    results = {}
    for p in procs:
        ar = () if p == 1 else ("--allreduce", allreduce)
        # one process asks for 2 BLAS threads: --reproducible must pin one (float32 GEMMs round
        # differently with 2), or it would not match the ranks that have one each
        threads = {"OMP_NUM_THREADS": 2, "OPENBLAS_NUM_THREADS": 2} if p == 1 else None
        results[p] = _train(tmp_path, f"p{p}", p if p > 1 else None, "--data", small_h5, "--model", model,
                            "--dtype", dtype, "--batch-size", batch, "--epochs", 2, *ar, extra_env=threads)
    digest, metrics = results[procs[0]]
    assert metrics["steps"] == 2 * -(-300 // batch) and len(metrics["history"]) == 2
    for p in procs[1:]:
        assert results[p][0] == digest, f"P={p}: parameters or optimizer state differ from P={procs[0]}"
        assert results[p][1] == metrics, f"P={p}: metrics differ from P={procs[0]}"


def test_training_identical_with_the_exact_sum(tmp_path, small_h5):
    """--reproducible exact end to end: float64 (two int64 words an element), batch 128 (4
    micro-shards, then 44 rows: 2, so that rank 2 of 3 has none), the same bits at P = 1 and 3;
    and not those of the ordered sum, so the flag did choose the other sum."""
    common = ("--data", small_h5, "--dtype", "float64", "--batch-size", 128, "--epochs", 1)
    one = _train(tmp_path, "exact1", None, "exact", *common)
    three = _train(tmp_path, "exact3", 3, "exact", *common, "--allreduce", "shm")
    assert json.loads((tmp_path / "exact3.json").read_text())["flags"]["reproducible"] == "exact"
    assert three == one, "--reproducible exact: P=3 differs from P=1"
    ordered = _train(tmp_path, "ordered1", None, *common)
    assert ordered[0] != one[0], "the exact and the ordered sum gave the same bits: was the exact one used?"


def test_resume_at_another_rank_count(tmp_path, small_h5):
    common = ("--data", small_h5, "--batch-size", 128, "--epochs", 2)
    whole = _train(tmp_path, "whole", None, *common)
    # 4 steps at P=2 (into the second epoch), then the rest at P=3 from the checkpoint
    run_train(2, "--reproducible", *common, "--max-steps", 4, "--checkpoint", tmp_path / "part.ckpt.h5",
              "--eval-batch-size", 100, timeout=180)
    resumed = _train(tmp_path, "part", 3, *common, "--resume")
    assert resumed[0] == whole[0], "resumed at P=3: parameters differ from the uninterrupted run"
    for key in ("test_loss", "test_accuracy", "steps"):
        assert resumed[1][key] == whole[1][key]
    assert resumed[1]["history"][-1] == whole[1]["history"][-1]


USER_SCRIPT = textwrap.dedent('''
    """A user's own graph through the library API (not the trainer): a regression MLP. Before
    each step every rank works out, alone over the whole global batch, the gradient sum the step
    must give: each micro-shard's gradient by its own forward and backward, then their pairwise
    sum (weighted by rows / m) or their exact sum (weighted by rows)."""
    import math
    import sys
    import numpy as np
    from paranet import distributed, nn, activations as act
    from paranet import reproducible as rp
    from paranet.graph import Session, placeholder, Variable
    from paranet.losses import MeanSquareLoss
    from paranet.train import AdamOptimizer, GradientDescentOptimizer

    PAIRWISE_SUM

    dtype, allreduce, nan_at, how, name = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
    world = distributed.init(allreduce=allreduce)
    rng = np.random.default_rng(1)
    x, y = placeholder((None, 20)), placeholder((None, 3))
    h = nn.FullConnection(x, Variable(rng.normal(0, 0.3, (20, 32))), Variable(np.zeros(32)), act.relu)
    out = nn.FullConnection(h, Variable(rng.normal(0, 0.3, (32, 3))), Variable(np.zeros(3)))
    loss = MeanSquareLoss(out, y)
    sess = Session(dtype, check_finite=False)
    opt = AdamOptimizer(1e-2, loss) if name == "adam" else GradientDescentOptimizer(0.05, loss)
    dopt = distributed.DistributedOptimizer(opt, world, reproducible=True if how == "ordered" else how)  # the one change
    data = np.random.default_rng(2)
    X, Y = data.normal(size=(2000, 20)), data.normal(size=(2000, 3))
    if nan_at >= 0:
        X[nan_at, 5] = np.nan


    def expected(X, Y):
        """(gradient sum, its scale to the mean, mean loss) of a step on the global batch X, Y."""
        n = len(X)
        m = rp.micro_size(n)
        grads, weights, losses = [], [], []
        for lo in range(0, n, m):
            count = min(m, n - lo)
            losses.append(sess.run(loss, {x: X[lo:lo + count], y: Y[lo:lo + count]}, need_grad=True) * count)
            grads.append(sess.parameters(loss).grads.copy())
            weights.append(count)
        if how == "exact":
            return rp.exact_sum(grads, weights, sess.dtype), 1.0 / n, math.fsum(losses) / n
        return _pairwise_sum([g * sess.dtype.type(w / m) for g, w in zip(grads, weights)]), m / n, math.fsum(losses) / n


    plan = sess.plan(loss)
    losses = []
    for step, n in enumerate([300, 300, 137, 5, 300, 161]):  # uneven, short and tiny global batches
        lo = step * 300
        want = expected(X[lo:lo + n], Y[lo:lo + n]) if nan_at < 0 else None
        feed = {x: world.shard(X[lo:lo + n]), y: world.shard(Y[lo:lo + n])}
        if step % 2 == 0:
            losses.append(sess.run(dopt, feed))
        else:  # the step as a loop of one's own calls it
            sums = dopt.reproducible_step(sess, plan, feed, n)
            losses.append(sums.loss_sum / sums.count)
        if want is not None:
            assert dopt.last_sum.tobytes() == want[0].tobytes(), f"step {step + 1}: not the {how} sum of the micro-shards"
            assert (dopt.grad_scale, losses[-1]) == want[1:], (step + 1, dopt.grad_scale, losses[-1], want[1:])
    digests = world.gather_object(sess.parameters(loss).digest())
    if world.rank == 0:
        assert len(set(digests)) == 1, f"the replicas differ: {digests}"
        print("EXCHANGE", type(dopt.micro_steps().partials).__name__)
        print("RESULT", digests[0], repr(losses))
''').replace("PAIRWISE_SUM", inspect.getsource(_pairwise_sum))


def _user_run(tmp_path, nprocs, dtype="float32", allreduce="auto", nan_at=-1, check=True, how="ordered", opt="adam"):
    script = tmp_path / "user_graph.py"
    script.write_text(USER_SCRIPT)
    cmd = [str(MPIEXEC), "-n", str(nprocs), sys.executable, str(script), dtype, allreduce, str(nan_at), how, opt]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        lines = proc.stdout.splitlines()
        exchange = next(line.split()[1] for line in lines if line.startswith("EXCHANGE"))
        return next(line for line in lines if line.startswith("RESULT")), exchange
    return proc


MANY_MICRO_SHARDS = textwrap.dedent('''
    import hashlib, sys
    import numpy as np
    import paranet as pn
    from paranet.train import GradientDescentOptimizer
    world = pn.distributed.init(allreduce=sys.argv[1], threads=1)
    rng = np.random.default_rng(0)
    N = 9000  # 71 micro-shards of 128 rows: a tail of integer slots longer than 64
    x, y = pn.placeholder((None, 3)), pn.placeholder((None, 2))
    W, b = pn.Variable(rng.standard_normal((3, 2))), pn.Variable(np.zeros(2))
    loss = pn.SoftmaxCrossEntropy(pn.nn.FullConnection(x, W, b, pn.softmax), y)
    dopt = pn.DistributedOptimizer(GradientDescentOptimizer(0.1, loss), world=world, reproducible=True)
    sess = pn.Session()
    X, Y = rng.standard_normal((N, 3)), np.eye(2)[rng.integers(0, 2, N)]
    for _ in range(2):
        sess.run(dopt, {x: world.shard(X), y: world.shard(Y)})
    if world.rank == 0:
        print("RESULT", hashlib.sha256(sess.parameters(loss).values.tobytes()).hexdigest())
''')


def test_a_batch_of_many_micro_shards(tmp_path):
    """A global batch of 9,000 rows has 71 micro-shards, more integer slots (one loss slot
    each) than the shared exchange first allocates: P = 1, 2 and 3 by shared memory, 2 by MPI
    give the same bits."""
    script = tmp_path / "many.py"
    script.write_text(MANY_MICRO_SHARDS)
    out = set()
    for nprocs, allreduce in ((1, "auto"), (2, "shm"), (3, "shm"), (2, "mpi")):
        proc = subprocess.run([str(MPIEXEC), "-n", str(nprocs), sys.executable, str(script), allreduce], cwd=REPO,
                              env=env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        out.add(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT")))
    assert len(out) == 1, out


EXCHANGES = {"shm": "SharedPartials", "mpi": "MpiPartials"}
USER_CASES = [  # (dtype, sum, optimizer, (ranks, allreduce) runs): of the script's batches, 137 rows are
    # 5 micro-shards (3 ranks: 2 + 2 + 1), 5 rows are one (ranks 1.. hold no rows)
    ("float32", "ordered", "sgd", [(1, "shm"), (2, "shm"), (3, "shm"), (4, "shm"), (2, "mpi"), (3, "mpi"), (4, "mpi")]),
    ("float64", "ordered", "adam", [(1, "mpi"), (3, "shm"), (4, "mpi")]),
    ("float32", "exact", "adam", [(1, "shm"), (3, "shm"), (2, "mpi")]),
]


@pytest.mark.parametrize("dtype,how,opt,runs", USER_CASES, ids=[f"{c[0]}-{c[1]}" for c in USER_CASES])
def test_user_graph_through_the_library(tmp_path, dtype, how, opt, runs):
    """DistributedOptimizer(opt, world, reproducible=...) in a script of one's own, under mpiexec
    at P = 1..4 through shared memory and through MPI: each step's gradient sum is the one
    worked out alone (checked in the script), and the parameters end with the same SHA-256."""
    results = {}
    for p, allreduce in runs:
        results[p, allreduce], exchange = _user_run(tmp_path, p, dtype, allreduce, how=how, opt=opt)
        if how == "exact":
            assert exchange == "NoneType"  # the exact sum uses no exchange of partials
        else:
            assert exchange == ("LocalPartials" if p == 1 else EXCHANGES[allreduce])
    first = runs[0]
    for run in runs[1:]:
        assert results[run] == results[first], f"P={run[0]} --allreduce {run[1]} differs from P={first[0]}"


@pytest.mark.parametrize("how", ["ordered", "exact"])
def test_non_finite_gradient_names_the_step(tmp_path, how):
    proc = _user_run(tmp_path, 2, nan_at=670, check=False, how=how)  # row 70 of step 3's batch (rows 600..736)
    assert proc.returncode != 0
    assert "non-finite gradient at step 3: micro-shard 2 (rows 64..95 of the global batch of 137)" in proc.stderr, proc.stderr


@pytest.mark.netns
def test_two_hosts_give_the_single_process_bits(tmp_path, small_h5):
    """2 + 2 ranks on two "hosts" (network namespaces joined by a veth pair, MPICH over TCP:
    the shared-memory sum on each host, MPI_Allreduce of int64 between them) end with the bits
    of one process."""
    sys.path.insert(0, str(REPO / "tests"))
    from cluster import require
    from cluster.netns import TwoHosts, missing_requirement

    reason = missing_requirement()
    require(reason is None, reason)
    train = ("--reproducible", "--data", small_h5, "--batch-size", 256, "--epochs", 1, "--eval-batch-size", 100)
    single = _train(tmp_path, "single", None, *train[1:])
    hosts = TwoHosts().create()
    try:
        hostfile = tmp_path / "hosts"
        hostfile.write_text("".join(f"{addr}:2\n" for addr in hosts.addrs))
        e = hosts.env(env(PARANET_PYTHON=sys.executable))
        out = tmp_path / "two"
        cmd = hosts.command(0, [REPO / "launch" / "mpirun.sh", "-n", 4, "-f", hostfile, "--", *train,
                                "--checkpoint", f"{out}.ckpt.h5", "--save-params", f"{out}.npz",
                                "--metrics", f"{out}.json"])
        proc = subprocess.run([str(c) for c in cmd], cwd=tmp_path, env=e, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
        assert "shared memory (2 machines x 2 ranks)" in proc.stdout, proc.stdout
    finally:
        hosts.delete()
    with np.load(f"{out}.npz") as f:
        digest = hashlib.sha256(b"".join(f[k].tobytes() for k in f.files)).hexdigest()
    assert digest == single[0].split()[0], "two hosts: parameters differ from one process"
    metrics = json.loads((tmp_path / "two.json").read_text())
    assert metrics["world_size"] == 4
    assert (metrics["test_loss"], metrics["test_accuracy"]) == (single[1]["test_loss"], single[1]["test_accuracy"])
