"""Optimizers against an independent numpy transcription of PyTorch's update rules
(torch.optim.SGD with and without momentum, torch.optim.Adam), and state_dict round trips."""
import numpy as np
import pytest

import paranet as pn

STEPS = 12


def problem(seed=0):
    """Linear regression: data, initial W (4, 3) and b (3,), and the exact gradient in numpy."""
    rng = np.random.default_rng(seed)
    X, Y = rng.normal(size=(8, 4)), rng.normal(size=(8, 3))
    W0, b0 = rng.normal(size=(4, 3)), rng.normal(size=3)

    def grad(w):  # w: flat [W, b] as paranet lays it out; loss = 0.5 * mean((X W + b - Y)^2)
        W, b = w[:12].reshape(4, 3), w[12:]
        d = (X @ W + b - Y) / Y.size
        return np.concatenate([(X.T @ d).ravel(), d.sum(axis=0)])

    return X, Y, W0, b0, grad


def graph(W0, b0):
    xs, ys = pn.placeholder((None, 4), name="x"), pn.placeholder((None, 3), name="y")
    W, b = pn.Variable(W0, name="W"), pn.Variable(b0, name="b")
    loss = pn.MeanSquareLoss(pn.nn.FullConnection(xs, W, b), ys)
    return xs, ys, loss


# torch's rules, one function per optimizer: (w, g, state, t) -> None, updating w in place

def torch_sgd(lr):
    def step(w, g, state, t):
        w -= lr * g
    return step


def torch_momentum(lr, momentum):
    def step(w, g, state, t):
        # torch.optim.SGD, dampening 0, no nesterov: buf = g at the first step, then mu * buf + g
        state["buf"] = g.copy() if t == 1 else momentum * state["buf"] + g
        w -= lr * state["buf"]
    return step


def torch_adam(lr, beta1=0.9, beta2=0.999, eps=1e-8):
    def step(w, g, state, t):
        m = state["m"] = beta1 * state.get("m", 0) + (1 - beta1) * g
        v = state["v"] = beta2 * state.get("v", 0) + (1 - beta2) * g * g
        bias1, bias2 = 1 - beta1 ** t, 1 - beta2 ** t
        denom = np.sqrt(v) / np.sqrt(bias2) + eps
        w -= (lr / bias1) * m / denom
    return step


CASES = {
    "sgd": (lambda loss: pn.train.GradientDescentOptimizer(0.3, loss), torch_sgd(0.3)),
    "momentum-0.9": (lambda loss: pn.train.MomentumOptimizer(0.05, loss, momentum=0.9), torch_momentum(0.05, 0.9)),
    "momentum-0.5": (lambda loss: pn.train.MomentumOptimizer(0.2, loss, momentum=0.5), torch_momentum(0.2, 0.5)),
    "adam": (lambda loss: pn.train.AdamOptimizer(1e-2, loss), torch_adam(1e-2)),
    "adam-custom": (
        lambda loss: pn.train.AdamOptimizer(3e-2, loss, beta1=0.8, beta2=0.9, epsilon=1e-4),
        torch_adam(3e-2, 0.8, 0.9, 1e-4),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_torch_rules_step_by_step(case):
    make, ref_step = CASES[case]
    X, Y, W0, b0, grad = problem()
    xs, ys, loss = graph(W0, b0)
    opt = make(loss)
    sess = pn.Session(np.float64)
    w, state = np.concatenate([W0.ravel(), b0]), {}
    losses = []
    for t in range(1, STEPS + 1):
        losses.append(sess.run(opt, {xs: X, ys: Y}))
        ref_step(w, grad(w), state, t)
        np.testing.assert_allclose(sess.parameters(loss).values, w, rtol=1e-12, atol=1e-14, err_msg=f"step {t}")
    assert opt.steps == STEPS
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("case", CASES)
def test_float32_session_follows_the_rules(case):
    make, ref_step = CASES[case]
    X, Y, W0, b0, grad = problem(1)
    xs, ys, loss = graph(W0, b0)
    opt = make(loss)
    sess = pn.Session()
    w, state = np.concatenate([W0.ravel(), b0]), {}
    for t in range(1, STEPS + 1):
        sess.run(opt, {xs: X, ys: Y})
        ref_step(w, grad(w), state, t)
    params = sess.parameters(loss)
    assert params.values.dtype == np.float32 and all(a.dtype == np.float32 for a in opt.state_dict().values() if isinstance(a, np.ndarray))
    np.testing.assert_allclose(params.values, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_state_dict_round_trip_continues_identically(case, dtype):
    make, _ = CASES[case]
    X, Y, W0, b0, _ = problem(2)
    xs, ys, loss = graph(W0, b0)
    opt = make(loss)
    sess = pn.Session(dtype)
    for _ in range(5):
        sess.run(opt, {xs: X, ys: Y})
    saved_state = opt.state_dict()
    saved_values = sess.parameters(loss).values.copy()
    assert saved_state["steps"] == 5 and "tmp" not in saved_state
    for _ in range(5):  # keep going: the saved state must be a snapshot, not live arrays
        sess.run(opt, {xs: X, ys: Y})
    expected = sess.parameters(loss).values.copy()

    # a fresh replica and a fresh optimizer resume from the snapshot
    xs2, ys2, loss2 = graph(W0, b0)
    opt2 = make(loss2)
    sess2 = pn.Session(dtype)
    sess2.run(loss2, {xs2: X, ys2: Y})  # pack the buffers
    sess2.parameters(loss2).values[...] = saved_values
    opt2.load_state_dict(saved_state)
    assert opt2.steps == 5
    for _ in range(5):
        sess2.run(opt2, {xs2: X, ys2: Y})
    np.testing.assert_array_equal(sess2.parameters(loss2).values, expected)
    assert opt2.steps == opt.steps == 10


def test_state_loaded_in_another_dtype_is_kept():
    """A float32 checkpoint resumed in a float64 session keeps its moments (cast, not zeroed)."""
    X, Y, W0, b0, _ = problem(3)
    xs, ys, loss = graph(W0, b0)
    opt = pn.train.AdamOptimizer(1e-2, loss)
    sess = pn.Session(np.float32)
    for _ in range(3):
        sess.run(opt, {xs: X, ys: Y})
    state = opt.state_dict()
    values = sess.parameters(loss).values.copy()

    def resume(dtype, st):
        xs2, ys2, loss2 = graph(W0, b0)
        opt2 = pn.train.AdamOptimizer(1e-2, loss2)
        sess2 = pn.Session(dtype)
        sess2.run(loss2, {xs2: X, ys2: Y})
        sess2.parameters(loss2).values[...] = values
        opt2.load_state_dict(st)
        sess2.run(opt2, {xs2: X, ys2: Y})
        return sess2.parameters(loss2).values.astype(np.float64)

    kept = resume(np.float64, state)
    zeroed = resume(np.float64, {"steps": 3})
    same_dtype = resume(np.float32, state)
    np.testing.assert_allclose(kept, same_dtype, rtol=1e-5, atol=1e-6)
    assert not np.allclose(kept, zeroed, rtol=1e-7, atol=0)


def test_step_allocates_no_new_state_arrays():
    X, Y, W0, b0, _ = problem(4)
    xs, ys, loss = graph(W0, b0)
    opt = pn.train.AdamOptimizer(1e-2, loss)
    sess = pn.Session()
    sess.run(opt, {xs: X, ys: Y})
    ids = {k: id(v) for k, v in opt.state.items()}
    sess.run(opt, {xs: X, ys: Y})
    assert {k: id(v) for k, v in opt.state.items()} == ids


@pytest.mark.parametrize("make", [
    lambda loss: pn.train.GradientDescentOptimizer(0.1, loss),
    lambda loss: pn.train.MomentumOptimizer(0.05, loss, momentum=0.9),
    lambda loss: pn.train.AdamOptimizer(0.01, loss),
])
def test_grad_scale_is_the_same_as_scaling_the_gradient(make):
    """apply_gradients(params, grad_scale=s) on g equals apply_gradients on s * g (what the
    distributed layer relies on to fold the 1/P of the mean into the update)."""
    X, Y, W0, b0, _ = problem()
    runs = []
    for folded in (False, True):
        xs, ys, loss = graph(W0, b0)
        sess = pn.Session(np.float64)
        opt = make(loss)
        for _ in range(STEPS):
            sess.run(loss, {xs: X, ys: Y}, need_grad=True)
            params = sess.parameters(loss)
            params.grads *= 4.0  # as if four ranks had summed the same gradient
            if folded:
                opt.apply_gradients(params, grad_scale=0.25)
            else:
                params.grads *= 0.25
                opt.apply_gradients(params)
        runs.append(params.values.copy())
    np.testing.assert_allclose(runs[1], runs[0], rtol=1e-13, atol=1e-15)
    assert not np.allclose(runs[0], np.concatenate([W0.ravel(), b0]))  # it trained
