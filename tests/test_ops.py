"""Every op and layer in one table: its forward against plain numpy, its gradients against
central differences in float64. A new op adds one row to OPS."""
import numpy as np
import pytest

import paranet as pn

EPS = 1e-6  # central-difference step
RTOL = 1e-6  # relative error allowed between analytic and numeric gradients


# ---- independent numpy references --------------------------------------------------------

def np_sigmoid(x):
    return 1 / (1 + np.exp(-x))


def np_softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_log_softmax(x):
    z = x - x.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def np_dense(x, W, b):
    return x.reshape(len(x), -1) @ W + b


def np_conv2d(x, K, b, stride=1, padding=0):
    """torch.nn.functional.conv2d by loops: zero padding, cross-correlation, floored sizes."""
    sh, sw = (stride, stride) if np.ndim(stride) == 0 else stride
    ph, pw = (padding, padding) if np.ndim(padding) == 0 else padding
    N, C, H, W = x.shape
    O, _, kh, kw = K.shape
    xp = np.zeros((N, C, H + 2 * ph, W + 2 * pw))
    xp[:, :, ph:ph + H, pw:pw + W] = x
    Ho, Wo = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    y = np.zeros((N, O, Ho, Wo))
    for n in range(N):
        for o in range(O):
            for i in range(Ho):
                for j in range(Wo):
                    y[n, o, i, j] = np.sum(xp[n, :, i * sh:i * sh + kh, j * sw:j * sw + kw] * K[o]) + b[o]
    return y


def np_maxpool(x, size=2, stride=None):
    """Max pooling by loops, floored sizes; also the row-major first argmax of each window."""
    kh, kw = (size, size) if np.ndim(size) == 0 else size
    stride = (kh, kw) if stride is None else stride
    sh, sw = (stride, stride) if np.ndim(stride) == 0 else stride
    N, C, H, W = x.shape
    Ho, Wo = (H - kh) // sh + 1, (W - kw) // sw + 1
    y = np.zeros((N, C, Ho, Wo))
    first = np.zeros((N, C, Ho, Wo, 2), dtype=int)  # (row, col) in x of each window's argmax
    for n in range(N):
        for c in range(C):
            for i in range(Ho):
                for j in range(Wo):
                    win = x[n, c, i * sh:i * sh + kh, j * sw:j * sw + kw]
                    y[n, c, i, j] = win.max()
                    u, v = divmod(int(np.argmax(win)), kw)  # np.argmax: first in row-major order
                    first[n, c, i, j] = i * sh + u, j * sw + v
    return y, first


# ---- input generators ----------------------------------------------------------------------

def normal(*shape):
    return lambda rng: rng.normal(size=shape)


def away_from_zero(*shape):
    """Values with |x| in [0.1, 1]: no kink of relu within a finite-difference step."""
    return lambda rng: rng.choice([-1.0, 1.0], size=shape) * rng.uniform(0.1, 1, size=shape)


def positive(*shape):
    return lambda rng: rng.uniform(0.5, 2, size=shape)


def distinct(*shape):
    """Shuffled values 0.01 apart: every pooling window has a unique maximum."""
    return lambda rng: rng.permutation(int(np.prod(shape))).reshape(shape) * 0.01 + rng.uniform(0, 1e-3, size=shape)


def labels(n, k):
    """Soft labels: rows of non-negative numbers summing to 1."""
    return lambda rng: np_softmax(rng.normal(size=(n, k)))


def probabilities(n, k):
    return lambda rng: rng.uniform(0.05, 1, size=(n, k))


def conv_row(x_shape, k_shape, stride=1, padding=0, activation=None, ref_act=lambda y: y):
    O, C = k_shape[:2]
    return (
        [normal(*x_shape), normal(*k_shape), normal(O)],
        lambda x, K, b: pn.nn.Conv2D(x, K, b, activation, stride=stride, padding=padding),
        lambda x, K, b: ref_act(np_conv2d(x, K, b, stride, padding)),
    )


def pool_row(x_shape, size=2, stride=None):
    return (
        [distinct(*x_shape)],
        lambda x: pn.nn.MaxPool(x, size, stride),
        lambda x: np_maxpool(x, size, stride)[0],
    )


def shared_weight(x, W, b1, b2):
    """One Variable W used by two layers."""
    return pn.nn.FullConnection(pn.nn.FullConnection(x, W, b1, pn.sigmoid), W, b2)


def node_fan_out(x):
    """One node h consumed twice by the same op and once more by another."""
    h = pn.exp(x)
    return pn.square(h + h) + pn.sin(h)


# id -> (input generators, build(*Variables) -> node, numpy reference(*arrays) -> array)
OPS = {
    "exp": ([normal(3, 4)], pn.exp, np.exp),
    "sin": ([normal(3, 4)], pn.sin, np.sin),
    "cos": ([normal(3, 4)], pn.cos, np.cos),
    "log": ([positive(3, 4)], pn.log, np.log),
    "square": ([normal(3, 4)], pn.square, np.square),
    "relu": ([away_from_zero(3, 4)], pn.relu, lambda x: np.maximum(x, 0)),
    "sigmoid": ([normal(3, 4)], pn.sigmoid, np_sigmoid),
    "softmax": ([normal(3, 5)], pn.softmax, np_softmax),
    "Line": ([normal(3, 4)], pn.Line, lambda x: x),
    "add": ([normal(3, 4), normal(3, 4)], lambda a, b: a + b, np.add),
    "add-fn": ([normal(2, 3, 4), normal(2, 3, 4)], pn.add, np.add),
    "matmul": ([normal(3, 4), normal(4, 5)], pn.matmul, np.matmul),
    "FullConnection-2d": ([normal(4, 6), normal(6, 3), normal(3)], pn.nn.FullConnection, np_dense),
    "FullConnection-relu": (
        [normal(4, 6), normal(6, 3), away_from_zero(3)],
        lambda x, W, b: pn.nn.FullConnection(x, W, b, pn.relu),
        lambda x, W, b: np.maximum(np_dense(x, W, b), 0),
    ),
    "FullConnection-4d": ([normal(2, 3, 2, 2), normal(12, 4), normal(4)], pn.nn.FullConnection, np_dense),
    "Conv2D-s1-p0": conv_row((2, 2, 6, 5), (3, 2, 3, 3)),
    "Conv2D-s2-p1": conv_row((2, 2, 7, 6), (3, 2, 3, 3), stride=2, padding=1),
    "Conv2D-s1-p2-3x2": conv_row((2, 2, 5, 6), (3, 2, 3, 2), stride=1, padding=2),
    "Conv2D-s2-p0-2x3-floor": conv_row((2, 3, 7, 8), (2, 3, 2, 3), stride=2, padding=0),
    "Conv2D-s(2,1)-p(0,1)": conv_row((1, 2, 6, 5), (2, 2, 3, 3), stride=(2, 1), padding=(0, 1)),
    "Conv2D-1x1": conv_row((2, 3, 4, 4), (2, 3, 1, 1)),
    "Conv2D-rows-8ch-4x4": conv_row((2, 8, 7, 6), (3, 8, 4, 4)),  # C*kw >= 32: one GEMM per kernel row
    "Conv2D-rows-s(1,2)-p1-relu": conv_row((2, 8, 6, 9), (2, 8, 3, 4), stride=(1, 2), padding=1, activation=pn.relu,
                                           ref_act=lambda y: np.maximum(y, 0)),
    "Conv2D-relu": conv_row((2, 1, 6, 6), (2, 1, 3, 3), activation=pn.relu, ref_act=lambda y: np.maximum(y, 0)),
    "MaxPool-2": pool_row((2, 3, 6, 4)),
    "MaxPool-2-floor": pool_row((2, 2, 7, 5)),
    "MaxPool-3-stride2-overlap": pool_row((2, 2, 7, 7), 3, 2),
    "MaxPool-2x3-stride(1,2)": pool_row((1, 2, 5, 7), (2, 3), (1, 2)),
    "MeanSquareLoss": ([normal(4, 3), normal(4, 3)], pn.MeanSquareLoss, lambda a, b: 0.5 * np.mean((a - b) ** 2)),
    "SoftmaxCrossEntropy-fused": (
        [normal(4, 5), labels(4, 5)],
        lambda z, y: pn.SoftmaxCrossEntropy(pn.softmax(z), y),
        lambda z, y: -np.sum(y * np_log_softmax(z)) / len(z),
    ),
    "SoftmaxCrossEntropy-probabilities": (
        [probabilities(4, 5), labels(4, 5)],
        pn.SoftmaxCrossEntropy,
        lambda p, y: -np.sum(y * np.log(p)) / len(p),
    ),
    "SoftmaxCrossEntropy-on-sigmoid": (
        [normal(4, 5), labels(4, 5)],
        lambda z, y: pn.SoftmaxCrossEntropy(pn.sigmoid(z), y),
        lambda z, y: -np.sum(y * np.log(np_sigmoid(z))) / len(z),
    ),
    "fan-out-node": ([normal(3, 4)], node_fan_out, lambda x: np.square(2 * np.exp(x)) + np.sin(np.exp(x))),
    "fan-out-same-input": ([normal(3, 4)], lambda x: x + x, lambda x: 2 * x),
    "fan-out-variable-two-ops": ([normal(3, 4)], lambda x: pn.square(pn.sin(x)) + pn.cos(x), lambda x: np.sin(x) ** 2 + np.cos(x)),
    "shared-weight-two-layers": (
        [normal(4, 3), normal(3, 3), normal(3), normal(3)],
        shared_weight,
        lambda x, W, b1, b2: np_dense(np_sigmoid(np_dense(x, W, b1)), W, b2),
    ),
    "lenet-like-chain": (
        [normal(2, 1, 8, 8), normal(2, 1, 3, 3), normal(2), normal(2 * 3 * 3, 3), normal(3), labels(2, 3)],
        lambda x, K, b, W, c, y: pn.SoftmaxCrossEntropy(
            pn.nn.FullConnection(pn.nn.MaxPool(pn.nn.Conv2D(x, K, b, pn.sigmoid)), W, c, pn.softmax), y),
        lambda x, K, b, W, c, y: -np.sum(
            y * np_log_softmax(np_dense(np_maxpool(np_sigmoid(np_conv2d(x, K, b)))[0], W, c))) / len(x),
    ),
    # conv and pool ops handing batch-last arrays to each other (paranet.layout): a fused relu,
    # a separate relu, padding, a floored pool, then a Dense layer that takes C order
    "cnn-batch-last-chain": (
        [normal(3, 2, 9, 9), normal(3, 2, 3, 3), normal(3), normal(4, 3, 2, 2), normal(4), normal(16, 3), normal(3),
         labels(3, 3)],
        lambda x, K1, b1, K2, b2, W, c, y: pn.SoftmaxCrossEntropy(pn.nn.FullConnection(pn.nn.MaxPool(pn.relu(
            pn.nn.Conv2D(pn.nn.MaxPool(pn.nn.Conv2D(x, K1, b1, pn.relu)), K2, b2, padding=1))), W, c, pn.softmax), y),
        lambda x, K1, b1, K2, b2, W, c, y: -np.sum(y * np_log_softmax(np_dense(np_maxpool(np.maximum(np_conv2d(
            np_maxpool(np.maximum(np_conv2d(x, K1, b1), 0))[0], K2, b2, 1, 1), 0))[0], W, c))) / len(x),
    ),
    # a pool read by a conv (batch-last) and by a Dense layer (C order): it must give C order
    "cnn-mixed-consumers": (
        [normal(3, 2, 6, 6), normal(2, 2, 3, 3), normal(2), normal(2, 2, 2, 2), normal(2), normal(8, 2), normal(18, 2)],
        lambda x, K1, b1, K2, b2, W1, W2: _two_readers(pn.nn.MaxPool(pn.nn.Conv2D(x, K1, b1, pn.relu)), K2, b2, W1, W2),
        lambda x, K1, b1, K2, b2, W1, W2: _np_two_readers(np_maxpool(np.maximum(np_conv2d(x, K1, b1), 0))[0],
                                                          K2, b2, W1, W2),
    ),
}


def _two_readers(h, K2, b2, W1, W2):
    """h read by a Dense layer and by a conv."""
    zeros = pn.Variable(np.zeros(2), trainable=False)
    return pn.nn.Dense(h, W1, zeros) + pn.nn.Dense(pn.nn.Conv2D(h, K2, b2, padding=1), W2, zeros)


def _np_two_readers(h, K2, b2, W1, W2):
    return np_dense(h, W1, np.zeros(2)) + np_dense(np_conv2d(h, K2, b2, 1, 1), W2, np.zeros(2))


def build(row_id, seed=0):
    """The row's inputs as trainable float64 Variables, its node, and a scalar loss on it."""
    gens, make, ref = OPS[row_id]
    rng = np.random.default_rng(seed)
    arrays = [g(rng) for g in gens]
    variables = [pn.Variable(a, name=f"in{i}") for i, a in enumerate(arrays)]
    node = make(*variables)
    expected = ref(*arrays)
    if np.ndim(expected) == 0:
        loss = node
    else:  # a fixed random projection to a scalar
        target = pn.Variable(rng.normal(size=np.shape(expected)), trainable=False, name="target")
        loss = pn.MeanSquareLoss(node, target)
    return arrays, variables, node, expected, loss


def numeric_grads(sess, loss, params):
    """Central differences of ``loss`` in every entry of the flat value buffer."""
    grads = np.empty(params.size)
    for i in range(params.size):
        old = params.values[i]
        params.values[i] = old + EPS
        up = sess.run(loss)
        params.values[i] = old - EPS
        down = sess.run(loss)
        params.values[i] = old
        grads[i] = (up - down) / (2 * EPS)
    return grads


def rel_error(a, b):
    return np.linalg.norm(a - b) / max(np.linalg.norm(a) + np.linalg.norm(b), 1e-12)


@pytest.mark.parametrize("row_id", OPS)
def test_forward_matches_numpy(row_id):
    arrays, variables, node, expected, _ = build(row_id)
    got = pn.Session(np.float64).run(node)
    assert np.shape(got) == np.shape(expected)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    # the static shape agrees with the run-time one
    assert node.shape is None or pn.graph.shapes_match(node.shape, np.shape(got))


@pytest.mark.parametrize("row_id", OPS)
def test_forward_float32(row_id):
    arrays, variables, node, expected, _ = build(row_id)
    got = pn.Session().run(node)
    assert np.asarray(got).dtype == np.float32 or np.ndim(got) == 0
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("row_id", OPS)
def test_gradient_matches_central_differences(row_id):
    arrays, variables, node, expected, loss = build(row_id)
    sess = pn.Session(np.float64)
    sess.run(loss, need_grad=True)
    params = sess.parameters(loss)
    assert set(map(id, params.variables)) == set(map(id, variables))  # every input is checked
    analytic = params.grads.copy()
    numeric = numeric_grads(sess, loss, params)
    for v in variables:  # per input, so that a small gradient is not hidden by a large one
        lo, hi = params.offsets[params.variables.index(v)], params.offsets[params.variables.index(v) + 1]
        assert np.linalg.norm(numeric[lo:hi]) > 1e-8, f"{row_id}: no gradient reaches {v.name}"
        err = rel_error(analytic[lo:hi], numeric[lo:hi])
        assert err < RTOL, f"{row_id}: d loss / d {v.name} relative error {err:.2e}"


# ---- MaxPool ties: central differences are ill-defined there, so check the routing itself ----

@pytest.mark.parametrize("size, stride", [(2, None), (3, 1), ((2, 3), (2, 1))])
def test_maxpool_ties_route_to_first_max(size, stride):
    rng = np.random.default_rng(3)
    x = rng.integers(0, 3, size=(2, 2, 6, 7)).astype(np.float64)  # few levels: many ties
    x[0, 0] = 1.0  # a channel that is all one tie
    X = pn.Variable(x)
    y = pn.nn.MaxPool(X, size, stride)
    target = rng.normal(size=np_maxpool(x, size, stride)[0].shape)
    loss = pn.MeanSquareLoss(y, pn.Variable(target, trainable=False))
    sess = pn.Session(np.float64)
    sess.run(loss, need_grad=True)
    ref, first = np_maxpool(x, size, stride)
    g = (ref - target) / ref.size  # d loss / d y
    expected = np.zeros_like(x)
    for idx in np.ndindex(ref.shape):
        n, c = idx[:2]
        r, s = first[idx]
        expected[n, c, r, s] += g[idx]
    np.testing.assert_allclose(X.grad, expected, rtol=1e-12, atol=1e-15)
    if stride is not None:
        return
    # non-overlapping windows: exactly one non-zero per window, and each window's total equals
    # the derivative for shifting the whole window, which is well-defined at ties
    assert np.count_nonzero(X.grad) == np.count_nonzero(g)
    kh, kw = (size, size) if np.ndim(size) == 0 else size
    for n, c, i, j in [(0, 0, 0, 0), (1, 1, 1, 1), (0, 1, ref.shape[2] - 1, ref.shape[3] - 1)]:
        window = (n, c, slice(i * kh, (i + 1) * kh), slice(j * kw, (j + 1) * kw))
        X.value[window] += EPS
        up = sess.run(loss)
        X.value[window] -= 2 * EPS
        down = sess.run(loss)
        X.value[window] += EPS
        assert np.isclose((up - down) / (2 * EPS), X.grad[window].sum(), rtol=1e-6, atol=1e-12)
        assert np.count_nonzero(X.grad[window]) <= 1


def test_maxpool_floors_uncovered_rows_and_columns():
    x = np.arange(2 * 1 * 5 * 7, dtype=np.float64).reshape(2, 1, 5, 7)
    X = pn.Variable(x)
    y = pn.nn.MaxPool(X, 2)
    assert y.shape == (2, 1, 2, 3)
    sess = pn.Session(np.float64)
    loss = pn.MeanSquareLoss(y, pn.Variable(np.zeros((2, 1, 2, 3)), trainable=False))
    sess.run(loss, need_grad=True)
    assert np.all(X.grad[:, :, 4, :] == 0) and np.all(X.grad[:, :, :, 6] == 0)


# ---- numerical stability ----------------------------------------------------------------

@pytest.mark.parametrize("scale", [1000.0, 5000.0])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_cross_entropy_large_logits(scale, dtype):
    z = np.array([[1.0, -1.0, 0.5], [-1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]) * scale
    y = np.eye(3)[[1, 1, 2]]
    Z = pn.Variable(z)
    ys = pn.placeholder((None, 3))
    p = pn.softmax(Z)
    loss = pn.SoftmaxCrossEntropy(p, ys)
    sess = pn.Session(dtype)
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # no overflow on the way
        value = sess.run(loss, {ys: y}, need_grad=True)
        probs = sess.run(p)
    assert np.isfinite(value)
    expected = -np.sum(y * np_log_softmax(z)) / 3  # 2 * scale / 3 + log(3) / 3
    assert np.isclose(value, expected, rtol=1e-6)
    assert np.all(np.isfinite(Z.grad))
    # the fused gradient is (p - y) / batch
    np.testing.assert_allclose(Z.grad, (np_softmax(z) - y) / 3, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(p.value, np_softmax(z), rtol=1e-6, atol=1e-7)
    # the softmax alone is finite too
    assert np.all(np.isfinite(probs)) and np.allclose(probs.sum(axis=1), 1)


def test_fused_gradient_is_p_minus_y_over_batch():
    rng = np.random.default_rng(5)
    z, y = rng.normal(size=(8, 10)), np.eye(10)[rng.integers(0, 10, 8)]
    Z = pn.Variable(z)
    loss = pn.SoftmaxCrossEntropy(pn.softmax(Z), pn.Variable(y, trainable=False))
    pn.Session(np.float64).run(loss, need_grad=True)
    np.testing.assert_allclose(Z.grad, (np_softmax(z) - y) / 8, rtol=1e-13, atol=1e-16)


@pytest.mark.parametrize("scale", [1000.0, 5000.0])
def test_sigmoid_large_inputs(scale):
    x = np.array([[-1.0, 1.0, 0.0, -0.5]]) * scale
    X = pn.Variable(x)
    s = pn.sigmoid(X)
    loss = pn.MeanSquareLoss(s, pn.Variable(np.full((1, 4), 0.5), trainable=False))
    sess = pn.Session()
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # no overflow on the way
        value = sess.run(loss, need_grad=True)
        out = sess.run(s)
    assert np.isfinite(value) and np.all(np.isfinite(out)) and np.all(np.isfinite(X.grad))
    np.testing.assert_allclose(out, [[0.0, 1.0, 0.5, 0.0]], atol=1e-7)


def test_conv_float32_matches_loops_at_lenet_sizes():
    rng = np.random.default_rng(2)
    x, K, b = rng.normal(size=(4, 8, 12, 12)), rng.normal(size=(16, 8, 5, 5)), rng.normal(size=16)
    xs = pn.placeholder((None, 8, 12, 12))
    y = pn.nn.Conv2D(xs, pn.Variable(K), pn.Variable(b))
    assert y.shape == (None, 16, 8, 8)
    got = pn.Session().run(y, {xs: x})
    np.testing.assert_allclose(got, np_conv2d(x, K, b), rtol=1e-4, atol=1e-4)
