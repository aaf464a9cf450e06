"""The graph engine: flat parameter buffers, pointer wiring, topological order, no global
registry, errors on bad graphs and feeds, dtypes and copies returned by Session.run."""
import gc
import re
import weakref

import numpy as np
import pytest

import paranet as pn
from paranet.graph import GraphError, topological_order


def mlp(seed=0, hidden=16):
    """784-free toy MLP: x (None, 6) -> FC relu -> FC softmax -> SoftmaxCrossEntropy."""
    rng = np.random.default_rng(seed)
    xs = pn.placeholder((None, 6), name="x")
    ys = pn.placeholder((None, 3), name="y")
    W1 = pn.Variable(rng.normal(0, 0.5, (6, hidden)), name="W1")
    b1 = pn.Variable(np.zeros(hidden), name="b1")
    W2 = pn.Variable(rng.normal(0, 0.5, (hidden, 3)), name="W2")
    b2 = pn.Variable(np.zeros(3), name="b2")
    h = pn.nn.FullConnection(xs, W1, b1, pn.relu)
    out = pn.nn.FullConnection(h, W2, b2, pn.softmax)
    loss = pn.SoftmaxCrossEntropy(out, ys)
    return xs, ys, [W1, b1, W2, b2], h, out, loss


def cnn(seed=0):
    """A small CNN with unnamed Variables (their names are made unique by the buffer layout)."""
    rng = np.random.default_rng(seed)
    xs = pn.placeholder((None, 1, 8, 8))
    ys = pn.placeholder((None, 3))
    h = pn.nn.Conv2D(xs, pn.Variable(rng.normal(size=(2, 1, 3, 3))), pn.Variable(np.zeros(2)), pn.relu)
    h = pn.nn.MaxPool(h)
    out = pn.nn.FullConnection(h, pn.Variable(rng.normal(size=(18, 3))), pn.Variable(np.zeros(3)), pn.softmax)
    return xs, ys, pn.SoftmaxCrossEntropy(out, ys)


def batch(n=5, seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 6)), np.eye(3)[rng.integers(0, 3, n)]


def address(a):
    return a.__array_interface__["data"][0]


# ---- flat buffers ---------------------------------------------------------------------

def test_values_and_grads_are_views_into_the_flat_buffers():
    xs, ys, variables, _, _, loss = mlp()
    sess = pn.Session()
    X, Y = batch()
    sess.run(loss, {xs: X, ys: Y}, need_grad=True)
    params = sess.parameters(loss)
    assert params.variables == variables  # the walk order from the loss
    assert params.values.ndim == 1 and params.values.flags.c_contiguous
    assert params.grads.ndim == 1 and params.grads.flags.c_contiguous
    assert params.values.size == params.grads.size == params.size == sum(v.value.size for v in variables)
    item = params.values.itemsize
    for i, v in enumerate(variables):
        lo, hi = params.offsets[i], params.offsets[i + 1]
        assert hi - lo == v.value.size
        assert np.shares_memory(v.value, params.values) and np.shares_memory(v.grad, params.grads)
        assert v.value.base is params.values  # a view of the buffer itself, not of a copy
        assert v.grad.base is params.grads.base or v.grad.base is params.grads
        assert address(v.value) == address(params.values) + lo * item
        assert address(v.grad) == address(params.grads) + lo * item
        assert v.params is params
    # contiguous offsets covering the buffer exactly
    assert params.offsets[0] == 0 and params.offsets[-1] == params.size
    assert np.all(np.diff(params.offsets) == [v.value.size for v in variables])
    # the flat gradient is the concatenation of the per-Variable gradients
    np.testing.assert_array_equal(params.grads, np.concatenate([v.grad.ravel() for v in variables]))
    assert np.any(params.grads != 0)


def test_writes_through_the_flat_buffers_are_seen_by_the_variables():
    xs, ys, (W1, b1, W2, b2), _, _, loss = mlp()
    sess = pn.Session()
    X, Y = batch()
    sess.run(loss, {xs: X, ys: Y}, need_grad=True)
    params = sess.parameters(loss)
    lo, hi = params.offsets[2], params.offsets[3]  # W2
    params.grads[lo:hi] = 7.0
    assert np.all(W2.grad == 7.0)
    params.grads[...] = 0
    assert np.all(W1.grad == 0) and np.all(b2.grad == 0)
    params.values[lo] = 123.0
    assert W2.value.flat[0] == 123.0
    W1.value = np.ones(W1.shape)  # the setter writes into the buffer, not a new array
    assert np.all(params.values[params.offsets[0]:params.offsets[1]] == 1)
    # the buffer survives further runs: the next forward uses the written values
    assert sess.parameters(loss) is params
    sess.run(loss, {xs: X, ys: Y}, need_grad=True)
    assert W2.value.flat[0] == 123.0 and sess.parameters(loss) is params


def test_backward_writes_gradients_instead_of_accumulating_across_runs():
    xs, ys, variables, _, _, loss = mlp()
    sess = pn.Session()
    X, Y = batch()
    sess.run(loss, {xs: X, ys: Y}, need_grad=True)
    first = sess.parameters(loss).grads.copy()
    sess.parameters(loss).grads[...] = 1e6  # garbage that must be overwritten
    sess.run(loss, {xs: X, ys: Y}, need_grad=True)
    np.testing.assert_array_equal(sess.parameters(loss).grads, first)


@pytest.mark.parametrize("model", [mlp, cnn])
def test_replicas_get_the_same_layout(model):
    def layout(seed):
        built = model(seed)
        loss = built[-1]
        xs, ys = built[0], built[1]
        sess = pn.Session()
        n = 4
        x = np.zeros((n,) + tuple(xs.shape[1:]))
        sess.run(loss, {xs: x, ys: np.eye(3)[[0, 1, 2, 0]]}, need_grad=True)
        params = sess.parameters(loss)
        return [(name, v.shape) for name, v in params.named()], list(params.offsets), params
    names_a, offsets_a, pa = layout(0)
    names_b, offsets_b, pb = layout(1)  # built by the same code again, other initial values
    assert names_a == names_b and offsets_a == offsets_b
    assert len({name for name, _ in names_a}) == len(names_a)  # names are unique: they key checkpoints
    assert pa.values is not pb.values and not np.shares_memory(pa.values, pb.values)


def test_default_dtype_is_float32_and_float64_session_gives_float64():
    xs, ys, variables, _, _, loss = mlp()
    X, Y = batch()
    sess = pn.Session()
    sess.run(loss, {xs: X, ys: Y}, need_grad=True)
    assert sess.parameters(loss).values.dtype == np.float32
    assert all(v.value.dtype == np.float32 and v.grad.dtype == np.float32 for v in variables)
    assert xs.value.dtype == np.float32 and loss.last[0].value.dtype == np.float32

    xs, ys, variables, _, out, loss = mlp()
    sess = pn.Session(np.float64)
    sess.run(loss, {xs: X, ys: Y}, need_grad=True)
    assert sess.parameters(loss).values.dtype == np.float64
    assert all(v.value.dtype == np.float64 and v.grad.dtype == np.float64 for v in variables)
    assert sess.run(out, {xs: X}).dtype == np.float64
    with pytest.raises(GraphError, match="floating dtype, got int32"):
        pn.Session(np.int32)


def test_session_run_returns_a_copy():
    xs, ys, _, h, out, loss = mlp()
    sess = pn.Session()
    X1, _ = batch(seed=1)
    X2, _ = batch(seed=2)
    first = sess.run(out, {xs: X1})
    kept = first.copy()
    assert not np.shares_memory(first, out.value)
    first[...] = -1  # scribbling on the result does not touch the graph
    assert np.all(out.value >= 0)
    sess.run(out, {xs: X1})
    second = sess.run(out, {xs: X2})  # the next run reuses the op buffers...
    np.testing.assert_array_equal(sess.run(out, {xs: X1}), kept)  # ...but earlier results are the caller's
    assert not np.array_equal(second, kept)
    value = sess.run(loss, {xs: X1, ys: np.eye(3)[[0, 1, 2, 0, 1]]})
    assert isinstance(value, float)


# ---- pointers ---------------------------------------------------------------------------

def test_last_next_root_target_wiring():
    xs, ys, (W1, b1, W2, b2), h, out, loss = mlp()
    dense1 = h.last[0]
    assert isinstance(dense1, pn.nn.Dense) and dense1.last == [xs, W1, b1]
    assert dense1 in xs.next and dense1 in W1.next and dense1 in b1.next
    assert h.next[0].last[0] is h  # relu -> dense2
    dense2 = out.last[0]
    assert dense2.last == [h, W2, b2] and out in dense2.next
    # fused loss: its first input is the logits under the softmax; the softmax stays wired
    assert loss.last == [dense2, ys] and loss in dense2.next and loss in ys.next
    assert loss.probs is out and loss.fused
    # root: the input placeholder upstream; Variables have none; target: the label placeholder
    assert xs.root is xs and ys.root is ys
    assert dense1.root is xs and h.root is xs and out.root is xs and loss.root is xs
    assert W1.root is None
    assert loss.target is ys
    unfused = pn.MeanSquareLoss(out, ys)
    assert unfused.last == [out, ys] and unfused.target is ys and unfused.root is xs
    # a consumer list grows in creation order
    assert xs.next == [dense1]
    other = pn.exp(xs)
    assert xs.next == [dense1, other]


def test_topological_order_of_a_diamond():
    a = pn.Variable(np.array([0.3, -0.7]), name="a")
    b, c = pn.exp(a), pn.sin(a)
    d = b + c
    order = topological_order(d)
    assert len(order) == 4 and order[0] is a and order[-1] is d
    for node in order:
        for parent in node.last:
            assert order.index(parent) < order.index(node)
    twice = d + d  # one node as both inputs of an op: still walked once
    assert topological_order(twice) == order + [twice]
    loss = pn.MeanSquareLoss(d, pn.Variable(np.zeros(2), trainable=False))
    sess = pn.Session(np.float64)
    sess.run(loss, need_grad=True)
    value = np.exp(a.value) + np.sin(a.value)
    np.testing.assert_allclose(a.grad, value / 2 * (np.exp(a.value) + np.cos(a.value)), rtol=1e-12)


def test_deep_stack_of_diamonds_is_walked_once_per_node():
    a = pn.Variable(np.array([0.1]), name="a")
    h = a
    for _ in range(200):  # a walk without memo would visit 2**200 paths
        h = pn.sin(h) + pn.cos(h)
    order = topological_order(h)
    assert len(order) == 1 + 3 * 200 and len({id(n) for n in order}) == len(order)
    position = {id(n): i for i, n in enumerate(order)}
    assert all(position[id(p)] < position[id(n)] for n in order for p in n.last)


def test_two_graphs_do_not_see_each_other():
    xs_a, ys_a, vars_a, _, _, loss_a = mlp(0)
    xs_b, ys_b, vars_b, _, _, loss_b = mlp(1)
    order_a = {id(n) for n in topological_order(loss_a)}
    assert not order_a & {id(n) for n in topological_order(loss_b)}
    sess = pn.Session()
    X, Y = batch()
    before_b = [v.value.copy() for v in vars_b]
    opt = pn.train.GradientDescentOptimizer(0.5, loss_a)
    sess.run(opt, {xs_a: X, ys_a: Y})
    assert sess.parameters(loss_a).variables == vars_a
    assert all(v.params is None for v in vars_b)  # B was never packed nor touched
    assert all(np.array_equal(v.value, w) for v, w in zip(vars_b, before_b))
    # the same graph in two sessions: each computes the same loss
    other = pn.Session()
    assert np.isclose(other.run(loss_a, {xs_a: X, ys_a: Y}), sess.run(loss_a, {xs_a: X, ys_a: Y}))


def test_a_dropped_graph_is_garbage_collectable():
    def build_and_run(run):
        xs, ys, variables, _, _, loss = mlp()
        if run:
            sess = pn.Session()
            X, Y = batch()
            sess.run(pn.train.AdamOptimizer(1e-3, loss), {xs: X, ys: Y})
        return weakref.ref(loss), weakref.ref(variables[0]), weakref.ref(xs)

    for run in (False, True):
        refs = build_and_run(run)
        gc.collect()
        assert all(r() is None for r in refs), f"graph kept alive (run={run})"


# ---- errors: each names the node and the expected and actual shape or dtype -----------------

def raises(match_all, fn, *args, **kwargs):
    """fn(...) raises GraphError whose message contains every string in match_all."""
    with pytest.raises(GraphError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    for part in match_all:
        assert part in message, f"{part!r} not in {message!r}"
    return message


def test_feed_of_wrong_shape_or_rank():
    xs, ys, _, _, out, loss = mlp()
    sess = pn.Session()
    raises(["'x'", "(None, 6)", "(5, 7)"], sess.run, out, {xs: np.zeros((5, 7))})
    raises(["'x'", "(None, 6)", "(6,)"], sess.run, out, {xs: np.zeros(6)})
    raises(["'x'", "(None, 6)", "(2, 6, 1)"], sess.run, out, {xs: np.zeros((2, 6, 1))})
    raises(["'y'", "(None, 3)", "(5, 4)"], sess.run, loss, {xs: np.zeros((5, 6)), ys: np.zeros((5, 4))})


def test_missing_placeholder():
    xs, ys, _, _, _, loss = mlp()
    raises(["'y'", "(None, 3)", "missing"], pn.Session().run, loss, {xs: np.zeros((5, 6))})


@pytest.mark.parametrize("bad, dtype", [
    (np.array([["a"] * 6]), "<U1"),
    (np.array([[object()] * 6], dtype=object), "object"),
    (np.ones((1, 6), dtype=bool), "bool"),
    (np.ones((1, 6), dtype=complex), "complex128"),
])
def test_non_numeric_feed(bad, dtype):
    xs, _, _, _, out, _ = mlp()
    raises(["'x'", "numeric", dtype], pn.Session().run, out, {xs: bad})


def test_non_numeric_variable():
    raises(["'w'", "numeric", "<U1"], pn.Variable, np.array(["a", "b"]), name="w")
    raises(["'w'", "numeric", "bool"], pn.Variable, np.array([True]), name="w")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_feed(bad):
    xs, _, _, _, out, _ = mlp()
    X = np.zeros((4, 6))
    X[2, 3] = bad
    raises(["'x'", "finite", str(bad), "(2, 3)"], pn.Session().run, out, {xs: X})


def test_huge_finite_feed_is_accepted():
    xs = pn.placeholder((None, 2), name="x")
    big = np.array([[1e308, 1e308]])  # finite, though their sum overflows
    np.testing.assert_array_equal(pn.Session(np.float64).run(pn.Line(xs), {xs: big}), big)


def test_mismatched_variables_into_full_connection():
    xs = pn.placeholder((None, 5), name="x")
    W, b = pn.Variable(np.zeros((6, 3)), name="W"), pn.Variable(np.zeros(3), name="b")
    raises(["'fc'", "'x'", "(None, 5)", "5 features", "(6, 3)", "6"], pn.nn.FullConnection, xs, W, b, name="fc")
    bad_b = pn.Variable(np.zeros(4), name="b")
    raises(["'fc'", "'b'", "(3,)", "(4,)"], pn.nn.FullConnection, pn.placeholder((None, 6)), W, bad_b, name="fc")
    raises(["'fc'", "2-D", "(6,)"], pn.nn.FullConnection, xs, pn.Variable(np.zeros(6), name="W1d"), b, name="fc")
    # a batch whose width differs only at run time
    loose = pn.placeholder((None, None), name="loose")
    fc = pn.nn.FullConnection(loose, W, b, name="fc")
    raises(["'fc'", "5 features", "(6, 3)"], pn.Session().run, fc, {loose: np.zeros((2, 5))})


def test_mismatched_variables_into_conv2d():
    xs = pn.placeholder((None, 2, 8, 8), name="img")
    K, b = pn.Variable(np.zeros((4, 3, 3, 3)), name="K"), pn.Variable(np.zeros(4), name="b")
    raises(["'conv'", "'img'", "3 channels", "(None, 2, 8, 8)", "(4, 3, 3, 3)"], pn.nn.Conv2D, xs, K, b, name="conv")
    raises(["'conv'", "'b'", "(4,)", "(5,)"], pn.nn.Conv2D, pn.placeholder((None, 3, 8, 8)), K,
           pn.Variable(np.zeros(5), name="b"), name="conv")
    raises(["'conv'", "'K3'", "(4, 3, 3)"], pn.nn.Conv2D, xs, pn.Variable(np.zeros((4, 3, 3)), name="K3"), b, name="conv")
    raises(["'conv'", "'flat'", "(None, 64)"], pn.nn.Conv2D, pn.placeholder((None, 64), name="flat"), K, b, name="conv")
    raises(["'conv'", "do not fit", "(None, 3, 2, 2)"], pn.nn.Conv2D, pn.placeholder((None, 3, 2, 2)), K, b, name="conv")
    raises(["'pool'", "(None, 64)"], pn.nn.MaxPool, pn.placeholder((None, 64)), name="pool")
    # channels known only at run time
    loose = pn.placeholder((None, None, 8, 8), name="loose")
    conv = pn.nn.Conv2D(loose, K, b, name="conv")
    raises(["'conv'", "(N, 3, H >= 3, W >= 3)", "(1, 2, 8, 8)"], pn.Session().run, conv, {loose: np.zeros((1, 2, 8, 8))})


def test_mismatched_add_and_matmul_no_silent_broadcasting():
    a, row = pn.Variable(np.zeros((3, 4)), name="a"), pn.Variable(np.zeros(4), name="row")
    raises(["'a'", "(3, 4)", "'row'", "(4,)"], pn.add, a, row)
    raises(["'a'", "(3, 4)", "'row'", "(4,)"], lambda: a + row)
    raises(["'a'", "(3, 4)", "'c'", "(5, 2)"], pn.matmul, a, pn.Variable(np.zeros((5, 2)), name="c"))
    # shapes that agree statically but not at run time are caught by the op
    xs = pn.placeholder((None, 4), name="x")
    s = pn.add(xs, a)
    raises(["Add", "(5, 4)", "(3, 4)"], pn.Session().run, s, {xs: np.zeros((5, 4))})
    raises(["MeanSquareLoss", "(3, 4)", "(4,)"], pn.MeanSquareLoss, a, row)


def test_variable_value_setter_checks_shape():
    W = pn.Variable(np.zeros((2, 3)), name="W")
    raises(["'W'", "(2, 3)", "(3, 2)"], setattr, W, "value", np.zeros((3, 2)))


def test_gradient_of_a_non_scalar_is_refused():
    xs, _, _, _, out, _ = mlp()
    raises(["gradients need a scalar", "(5, 3)"], pn.Session().run, out, {xs: np.zeros((5, 6))}, need_grad=True)


def test_error_messages_are_graph_errors_and_value_errors():
    assert issubclass(GraphError, ValueError)
    with pytest.raises(GraphError, match=re.escape("placeholder 'x'")):
        xs, _, _, _, out, _ = mlp()
        pn.Session().run(out, {xs: np.zeros((1, 2))})


def test_check_finite_off_skips_only_the_nan_pass():
    """Session(check_finite=False) lets NaN through (the caller vouches for its data) but
    still checks shapes and dtypes."""
    x = pn.placeholder((None, 3), name="x")
    y = pn.square(x)
    bad = np.array([[1.0, np.nan, 2.0]])
    with pytest.raises(pn.GraphError, match="finite"):
        pn.Session().run(y, {x: bad})
    out = pn.Session(check_finite=False).run(y, {x: bad})
    assert np.isnan(out[0, 1]) and out[0, 2] == 4.0
    with pytest.raises(pn.GraphError, match=r"expected shape \(None, 3\)"):
        pn.Session(check_finite=False).run(y, {x: np.ones((2, 4))})


def test_gradients_follow_batch_size_changes_and_moved_storage():
    """Backward reuses its buffer lookups while the fed shapes stay put: after other batch sizes
    and after the gradients move to new storage, every gradient still equals a fresh session's,
    for a chain and for a graph where one node feeds two consumers (fan-out)."""
    rng = np.random.default_rng(4)

    def fan_out_graph():
        xs, ys = pn.placeholder((None, 6), name="x"), pn.placeholder((None, 3), name="y")
        W = pn.Variable(rng.normal(0, 0.5, (6, 3)), name="W")
        b = pn.Variable(np.zeros(3), name="b")
        z = pn.nn.FullConnection(xs, W, b)
        loss = pn.SoftmaxCrossEntropy(pn.softmax(z + z), ys)  # z reaches the loss twice
        return xs, ys, [W, b], loss

    for build in (lambda: (lambda m: (m[0], m[1], m[2], m[5]))(mlp()), fan_out_graph):
        xs, ys, variables, loss = build()
        sess = pn.Session(np.float64)
        for step, n in enumerate((5, 3, 5, 5, 1, 5)):
            X = rng.random((n, 6))
            Y = np.eye(3)[rng.integers(0, 3, n)]
            if step == 3:  # the gradients move (as the shared-memory sum makes them) at an unchanged batch
                params = sess.parameters(loss)
                params.use_grad_storage(np.zeros_like(params.grad_storage))
            sess.run(loss, {xs: X, ys: Y}, need_grad=True)
            got = [v.grad.copy() for v in variables]
            fresh = pn.Session(np.float64)
            fresh.run(loss, {xs: X, ys: Y}, need_grad=True)  # same nodes, new plan: a fresh lookup
            for v, g in zip(variables, got):
                np.testing.assert_array_equal(g, v.grad)
                assert np.any(g != 0)


# ---- grouped passes: G micro-shards stacked, each one the bits it has alone -----------------

def plain_pass(sess, plan, feed):
    """Loss value and flat gradient of a plain forward and backward over ``feed``."""
    sess.forward(plan, feed)
    sess.backward(plan)
    return np.array(plan.order[-1].value), plan.params.grads.copy()


def grouped_pass(sess, plan, feed, groups):
    """Loss values (G,) and gradient rows (G, parameters) of a grouped pass; the rows start
    as NaN, so that a row or a part the engine leaves unwritten shows."""
    sess.forward(plan, feed, groups=groups)
    into = np.full((groups, plan.params.size), np.nan, dtype=sess.dtype)
    sess.backward(plan, into)
    return np.array(plan.order[-1].value), into


def assert_grouped_equals_plain(sess, plan, xs, ys, X, Y, rows, groups=(1, 2, 3, 5, 8), offsets=(0, 1, 3)):
    """For every G and every offset (in micro-shards into X), a grouped pass over G micro-shards
    of ``rows`` rows gives each one's loss and gradient row with the exact bits of a plain pass
    over that micro-shard alone."""
    alone = [plain_pass(sess, plan, {xs: X[k * rows:(k + 1) * rows], ys: Y[k * rows:(k + 1) * rows]})
             for k in range(len(X) // rows)]
    assert all(np.any(g != 0) for _, g in alone)
    for G in groups:
        for first in offsets:
            lo, hi = first * rows, (first + G) * rows
            losses, into = grouped_pass(sess, plan, {xs: X[lo:hi], ys: Y[lo:hi]}, G)
            assert losses.shape == (G,) and losses.dtype == sess.dtype
            for i in range(G):
                loss, grad = alone[first + i]
                assert np.array_equal(losses[i], loss), f"G={G}, micro-shard {first + i} at {i}: loss {losses[i]!r} != {loss!r}"
                assert np.array_equal(into[i], grad), (
                    f"G={G}, micro-shard {first + i} at {i}: gradient differs by up to {np.nanmax(np.abs(into[i] - grad))}")


def labels(rng, n, classes):
    return np.eye(classes)[rng.integers(0, classes, n)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_grouped_mlp_model_gives_each_micro_shard_its_own_bits(dtype):
    """The built-in MLP (784-128-10, ReLU, fused softmax cross-entropy), micro-shards of 32 rows."""
    from paranet.models import MODELS

    model = MODELS["mlp"]((28, 28), 10, np.random.default_rng(0))
    sess = pn.Session(dtype)
    plan = sess.plan(model.loss)
    assert plan.groupable
    rng = np.random.default_rng(1)
    rows = 32
    X = rng.random((11 * rows, 784)).astype(dtype)
    Y = labels(rng, 11 * rows, 10).astype(dtype)
    assert_grouped_equals_plain(sess, plan, model.x, model.y, X, Y, rows)


def sigmoid_graph(loss, seed=0, features=20, hidden=16):
    """x (None, features) -> FC sigmoid -> FC softmax -> MeanSquareLoss, or -> FC sigmoid ->
    SoftmaxCrossEntropy reading the sigmoid as probabilities (the loss's unfused path). At 16
    and more features, one GEMM over all rows would give other bits than a GEMM a micro-shard."""
    rng = np.random.default_rng(seed)
    xs, ys = pn.placeholder((None, features), name="x"), pn.placeholder((None, 3), name="y")
    h = pn.nn.FullConnection(xs, pn.Variable(rng.normal(0, 0.5, (features, hidden))), pn.Variable(rng.normal(size=hidden)),
                             pn.sigmoid)
    W2, b2 = pn.Variable(rng.normal(size=(hidden, 3))), pn.Variable(rng.normal(size=3))
    if loss is pn.MeanSquareLoss:
        return xs, ys, loss(pn.nn.FullConnection(h, W2, b2, pn.softmax), ys)
    return xs, ys, loss(pn.nn.FullConnection(h, W2, b2, pn.sigmoid), ys)


def matmul_graph(seed=0, features=16):
    """matmul directly, W used by two matmuls (its gradient is a fan-out sum), sin, square, +,
    and a fused softmax cross-entropy: x (None, f) -> sin(x W) W + (x V)**2 -> loss."""
    rng = np.random.default_rng(seed)
    xs, ys = pn.placeholder((None, features), name="x"), pn.placeholder((None, features), name="y")
    scale = 1 / np.sqrt(features)
    W = pn.Variable(rng.normal(0, scale, (features, features)), name="W")
    V = pn.Variable(rng.normal(0, scale, (features, features)), name="V")
    h = pn.matmul(pn.sin(pn.matmul(xs, W)), W) + pn.square(pn.matmul(xs, V))
    return xs, ys, pn.SoftmaxCrossEntropy(pn.softmax(h), ys)


@pytest.mark.parametrize("rows", [5, 32])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("build", [lambda: sigmoid_graph(pn.MeanSquareLoss), lambda: sigmoid_graph(pn.SoftmaxCrossEntropy),
                                   matmul_graph], ids=["sigmoid-softmax-mse", "sigmoid-cross-entropy", "matmul"])
def test_grouped_public_op_graphs_give_each_micro_shard_its_own_bits(build, dtype, rows):
    xs, ys, loss = build()
    sess = pn.Session(dtype)
    plan = sess.plan(loss)
    assert plan.groupable
    rng = np.random.default_rng(2)
    X = rng.normal(size=(11 * rows, xs.shape[1])).astype(dtype)
    Y = labels(rng, 11 * rows, ys.shape[1]).astype(dtype)
    assert_grouped_equals_plain(sess, plan, xs, ys, X, Y, rows)


def test_grouped_gradient_matches_a_numpy_reimplementation():
    """Independent of the engine's backward: 2 micro-shards of 3 rows, 4 features, float64,
    FC sigmoid -> FC softmax -> cross-entropy written out in numpy, per micro-shard."""
    rng = np.random.default_rng(5)
    xs, ys = pn.placeholder((None, 4), name="x"), pn.placeholder((None, 3), name="y")
    W1, b1 = pn.Variable(rng.normal(size=(4, 5)), name="W1"), pn.Variable(rng.normal(size=5), name="b1")
    W2, b2 = pn.Variable(rng.normal(size=(5, 3)), name="W2"), pn.Variable(rng.normal(size=3), name="b2")
    h = pn.nn.FullConnection(xs, W1, b1, pn.sigmoid)
    loss = pn.SoftmaxCrossEntropy(pn.nn.FullConnection(h, W2, b2, pn.softmax), ys)
    X, Y = rng.normal(size=(6, 4)), labels(rng, 6, 3)
    sess = pn.Session(np.float64)
    plan = sess.plan(loss)
    losses, into = grouped_pass(sess, plan, {xs: X, ys: Y}, 2)
    for i in range(2):
        x, y = X[3 * i:3 * i + 3], Y[3 * i:3 * i + 3]
        s = 1 / (1 + np.exp(-(x @ W1.value + b1.value)))
        z = s @ W2.value + b2.value
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        np.testing.assert_allclose(losses[i], -np.sum(y * np.log(p)) / 3, rtol=1e-12)
        dz = (p - y) / 3  # d loss / d logits of the second layer
        ds = dz @ W2.value.T * s * (1 - s)  # back through the sigmoid
        expected = {W1: x.T @ ds, b1: ds.sum(axis=0), W2: s.T @ dz, b2: dz.sum(axis=0)}
        for v, g in expected.items():
            np.testing.assert_allclose(plan.params.group_view(v, into)[i], g, rtol=1e-10, atol=1e-14, err_msg=v.name)


def test_grouped_gradient_matches_central_differences():
    """Independent of the engine's backward: the matmul graph (a shared weight, sin, square, +)
    in float64, 2 micro-shards of 3 rows; every parameter nudged both ways, the G losses of a
    grouped forward give each micro-shard's derivative."""
    xs, ys, loss = matmul_graph(seed=6, features=5)
    rng = np.random.default_rng(6)
    X, Y = rng.normal(size=(6, 5)), labels(rng, 6, 5)
    sess = pn.Session(np.float64)
    plan = sess.plan(loss)
    feed = {xs: X, ys: Y}
    _, into = grouped_pass(sess, plan, feed, 2)
    values, eps = plan.params.values, 1e-6
    numeric = np.empty_like(into)
    for j in range(values.size):
        keep = values[j]
        values[j] = keep + eps
        sess.forward(plan, feed, groups=2)
        up = np.array(loss.value)
        values[j] = keep - eps
        sess.forward(plan, feed, groups=2)
        numeric[:, j] = (up - loss.value) / (2 * eps)
        values[j] = keep
    assert np.all(np.abs(numeric) > 0)  # every parameter matters to both micro-shards
    np.testing.assert_allclose(into, numeric, rtol=1e-6, atol=1e-9)


class Twice(pn.Node):
    """A user-defined op: 2x, with no notion of micro-shards."""

    def __init__(self, x):
        super().__init__(x)
        self.shape = x.shape

    def forward(self, x):
        return 2 * x

    def backward(self, g, out):
        out[0][...] = 2 * g


class RowsTimes(pn.Node):
    """A user-defined op that declares itself groupable: rows x (n, k) times s (k,)."""

    groupable = True

    def __init__(self, x, s):
        super().__init__(x, s)
        self.shape = x.shape

    def forward(self, x, s):
        return x * s

    def backward(self, g, out):
        if out[0] is not None:
            out[0][...] = g * self.last[1].value
        if out[1] is not None:
            out[1][...] = (g * self.last[0].value).sum(axis=0)


def test_graphs_that_cannot_run_grouped_say_so():
    """Conv2D/MaxPool, a user-defined op, and a Variable reaching an op through another op
    (even one that declares itself groupable): plan.groupable is False and a grouped forward
    raises, before touching any op."""
    from paranet.models import MODELS

    model = MODELS["cnn"]((28, 28), 10, np.random.default_rng(0))
    cnn_x, cnn_y, cnn_loss = cnn()
    rng = np.random.default_rng(7)
    x6, y3 = pn.placeholder((None, 6)), pn.placeholder((None, 3))
    W = pn.Variable(rng.normal(size=(6, 3)), name="W")
    through_exp = pn.SoftmaxCrossEntropy(pn.softmax(pn.matmul(x6, pn.exp(W))), y3)
    b = pn.Variable(np.zeros(3), name="b")
    user_op = pn.SoftmaxCrossEntropy(pn.softmax(Twice(pn.nn.FullConnection(x6, W, b))), y3)
    s = pn.Variable(np.ones(6), name="s")
    scaled_by_exp = pn.SoftmaxCrossEntropy(pn.softmax(pn.nn.FullConnection(RowsTimes(x6, pn.exp(s)), W, b)), y3)
    X6, Y3 = rng.normal(size=(4, 6)), labels(rng, 4, 3)
    cases = [(model.loss, {model.x: rng.random((4, 1, 28, 28)), model.y: labels(rng, 4, 10)}),
             (cnn_loss, {cnn_x: rng.random((4, 1, 8, 8)), cnn_y: Y3}),
             (through_exp, {x6: X6, y3: Y3}),
             (user_op, {x6: X6, y3: Y3}),
             (scaled_by_exp, {x6: X6, y3: Y3})]
    sess = pn.Session(np.float64)
    for loss, feed in cases:
        plan = sess.plan(loss)
        assert plan.groupable is False, loss
        raises(["cannot run micro-shards stacked"], sess.forward, plan, feed, groups=2)
        assert all(op.groups is None for op in plan.ops)
        assert np.isfinite(sess.run(loss, feed, need_grad=True))  # the plain pass still runs


def test_grouped_backward_refuses_a_wrongly_shaped_into():
    """After a grouped forward of G=2, backward wants ``into`` of shape (2, parameters) exactly."""
    xs, ys, loss = sigmoid_graph(pn.MeanSquareLoss)
    sess = pn.Session(np.float64)
    plan = sess.plan(loss)
    rng = np.random.default_rng(8)
    sess.forward(plan, {xs: rng.normal(size=(6, 20)), ys: labels(rng, 6, 3)}, groups=2)
    P = plan.params.size
    for into in (None, np.zeros((3, P)), np.zeros((2, P + 1)), np.zeros((2, P - 1)), np.zeros(2 * P),
                 np.zeros((1, 2, P))):
        raises(["grouped backward", f"(2, {P})", str(None if into is None else into.shape)],
               sess.backward, plan, into)
    # the right shape in another dtype would round the rows differently: refused too
    raises(["grouped backward", "float64", "float32"], sess.backward, plan, np.zeros((2, P), np.float32))


def test_grouped_forward_refuses_rows_it_cannot_cut_evenly():
    """G micro-shards must be equal: a row count G does not divide, or a G that is not a
    positive whole number, is refused naming the placeholder or the value (not a reshape error
    deep in an op, and not silently wrong losses in a graph without GEMMs)."""
    a, b = pn.placeholder((None, 4), name="a"), pn.placeholder((None, 4), name="b")
    no_gemm = pn.SoftmaxCrossEntropy(pn.softmax(pn.sin(a)), b)
    xs, ys, mse = sigmoid_graph(pn.MeanSquareLoss)
    rng = np.random.default_rng(10)
    sess = pn.Session(np.float64)
    for loss, feed in ((no_gemm, {a: rng.normal(size=(10, 4)), b: labels(rng, 10, 4)}),
                       (mse, {xs: rng.normal(size=(10, 20)), ys: labels(rng, 10, 3)})):
        plan = sess.plan(loss)
        raises(["3 equal micro-shards", "divisible by 3", "(10, "], sess.forward, plan, feed, groups=3)
        for bad in (0, -1, 2.5):
            raises(["groups must be a positive number", repr(bad)], sess.forward, plan, feed, groups=bad)
        sess.forward(plan, feed, groups=2)  # 10 rows in 2 micro-shards of 5: fine
        assert np.shape(loss.value) == (2,)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_grouped_backward_zeroes_the_rows_of_unreached_variables(dtype):
    """A trainable Variable that the gradient does not flow to (here W1, marked
    requires_grad=False before the graph is built on it: a frozen weight) is in the parameters
    but in plan.unreached: its part of every row of ``into`` is zero, as its plain grad is."""
    rng = np.random.default_rng(9)
    xs, ys = pn.placeholder((None, 6), name="x"), pn.placeholder((None, 3), name="y")
    W1, b1 = pn.Variable(rng.normal(size=(6, 8)), name="W1"), pn.Variable(rng.normal(size=8), name="b1")
    W1.requires_grad = False
    W2, b2 = pn.Variable(rng.normal(size=(8, 3)), name="W2"), pn.Variable(np.zeros(3), name="b2")
    h = pn.nn.FullConnection(xs, W1, b1, pn.sigmoid)
    loss = pn.SoftmaxCrossEntropy(pn.nn.FullConnection(h, W2, b2, pn.softmax), ys)
    sess = pn.Session(dtype)
    plan = sess.plan(loss)
    assert plan.params.variables == [W1, b1, W2, b2] and plan.unreached == [W1] and plan.groupable
    X, Y = rng.normal(size=(20, 6)).astype(dtype), labels(rng, 20, 3).astype(dtype)
    W1.grad[...] = np.nan
    losses, into = grouped_pass(sess, plan, {xs: X, ys: Y}, 4)
    assert np.array_equal(plan.params.group_view(W1, into), np.zeros((4, 6, 8), dtype))
    assert np.all(np.isnan(W1.grad))  # a grouped backward leaves the Variables' grad alone
    for i in range(4):
        loss_i, grad_i = plain_pass(sess, plan, {xs: X[5 * i:5 * i + 5], ys: Y[5 * i:5 * i + 5]})
        assert np.all(W1.grad == 0)
        assert np.array_equal(losses[i], loss_i) and np.array_equal(into[i], grad_i)
        assert np.all(plan.params.group_view(b1, into)[i] != 0)


def test_plain_pass_after_grouped_pass_is_plain_again():
    """A grouped pass leaves nothing behind: the plain forward/backward, Session.run and an
    optimizer step on the same plan and feed give the bits they gave before it."""
    xs, ys, variables, _, out, loss = mlp()
    sess = pn.Session(np.float64)
    plan = sess.plan(loss)
    rng = np.random.default_rng(10)
    X, Y = rng.normal(size=(8, 6)), labels(rng, 8, 3)
    feed = {xs: X, ys: Y}
    before_loss, before_grads = plain_pass(sess, plan, feed)
    before_out = sess.run(out, {xs: X})
    before_run = sess.run(loss, feed, need_grad=True)
    first_losses, first_rows = grouped_pass(sess, plan, feed, 2)
    for groups in (2, 4, 8, 1):
        grouped_pass(sess, plan, feed, groups)
        assert all(op.groups == groups for op in plan.ops)
        after_loss, after_grads = plain_pass(sess, plan, feed)
        assert all(op.groups is None for op in plan.ops)
        assert np.shape(loss.value) == () and after_loss.shape == ()
        assert np.array_equal(after_loss, before_loss) and np.array_equal(after_grads, before_grads)
        assert sess.run(loss, feed, need_grad=True) == before_run
        assert np.array_equal(plan.params.grads, before_grads)
        np.testing.assert_array_equal(sess.run(out, {xs: X}), before_out)
    again_losses, again_rows = grouped_pass(sess, plan, feed, 2)  # and grouped again after plain
    assert np.array_equal(again_losses, first_losses) and np.array_equal(again_rows, first_rows)
    values = plan.params.values.copy()
    sess.run(pn.train.GradientDescentOptimizer(0.5, loss), feed)
    np.testing.assert_array_equal(plan.params.values, values - 0.5 * before_grads)
