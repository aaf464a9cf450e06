"""Optimizers: plain SGD, SGD with momentum and Adam, updating the flat parameter buffer in place.

``Session.run(optimizer, feed)`` runs forward and backward on ``optimizer.loss``, then calls
``optimizer.apply_gradients(params)``. The update rules are PyTorch's (``torch.optim.SGD`` and
``torch.optim.Adam``). State lives in flat arrays shaped like ``params.values`` so that it can
be checkpointed as it is, and a step allocates nothing.
"""
import math

import numpy as np


class Optimizer:
    """Base class: holds the loss and the learning rate, and the state arrays by name."""

    def __init__(self, learning_rate, loss):
        self.learning_rate = learning_rate
        self.loss = loss
        self.steps = 0
        self.state = {}  # name -> flat array shaped like params.values

    def slot(self, name, params):
        """The state array ``name``, created as zeros on first use."""
        arr = self.state.get(name)
        if arr is not None and arr.shape == params.values.shape and arr.dtype != params.dtype:
            arr = self.state[name] = arr.astype(params.dtype)  # loaded in another dtype: keep it
        if arr is None or arr.shape != params.values.shape:
            arr = self.state[name] = np.zeros_like(params.values)
        return arr

    def apply_gradients(self, params, grad_scale=1.0, grads=None):
        """Update ``params.values`` from the gradient ``grad_scale * grads``.

        ``grads`` defaults to ``params.grads``; the distributed layer passes the sum over the
        ranks where it lies (in shared memory, say) so that it need not be copied back.
        ``grad_scale`` lets a caller that holds a sum of gradients fold the averaging into the
        update instead of spending a pass over the buffer on it.
        """
        self.steps += 1
        self.update(params.values, params.grads if grads is None else grads, params, grad_scale)

    def update(self, w, g, params, scale):
        raise NotImplementedError

    def state_dict(self):
        """Everything needed to resume: the step count and copies of the state arrays (not scratch).

        Copies, so that the snapshot stays consistent with ``steps`` while training goes on.
        """
        return {"steps": self.steps, **{k: v.copy() for k, v in self.state.items() if k != "tmp"}}

    def load_state_dict(self, state):
        self.steps = int(state["steps"])
        for name, arr in state.items():
            if name != "steps":
                self.state[name] = np.array(arr)


class GradientDescentOptimizer(Optimizer):
    """w -= lr * g."""

    def update(self, w, g, params, scale):
        tmp = self.slot("tmp", params)
        np.multiply(g, self.learning_rate * scale, out=tmp)
        w -= tmp


class MomentumOptimizer(Optimizer):
    """PyTorch's SGD with momentum: buf = momentum * buf + g (buf = g at the first step); w -= lr * buf."""

    def __init__(self, learning_rate, loss, momentum=0.9):
        super().__init__(learning_rate, loss)
        self.momentum = momentum

    def update(self, w, g, params, scale):
        buf, tmp = self.slot("momentum", params), self.slot("tmp", params)
        if self.steps == 1:
            np.multiply(g, scale, out=buf)
        else:
            buf *= self.momentum
            if scale == 1:
                buf += g
            else:
                np.multiply(g, scale, out=tmp)
                buf += tmp
        np.multiply(buf, self.learning_rate, out=tmp)
        w -= tmp


class AdamOptimizer(Optimizer):
    """PyTorch's Adam: m, v moving averages of g and g**2 with bias correction;
    w -= lr * m_hat / (sqrt(v_hat) + epsilon)."""

    def __init__(self, learning_rate, loss, beta1=0.9, beta2=0.999, epsilon=1e-8):
        super().__init__(learning_rate, loss)
        self.beta1, self.beta2, self.epsilon = beta1, beta2, epsilon

    def update(self, w, g, params, scale):
        m, v, tmp = self.slot("m", params), self.slot("v", params), self.slot("tmp", params)
        t = self.steps
        # m = beta1 m + (1 - beta1) g';  v = beta2 v + (1 - beta2) g'^2, with g' = scale * g
        m *= self.beta1
        np.multiply(g, (1 - self.beta1) * scale, out=tmp)
        m += tmp
        v *= self.beta2
        np.multiply(g, g, out=tmp)
        tmp *= (1 - self.beta2) * scale * scale
        v += tmp
        # torch: w -= lr / c1 * m / (sqrt(v) / c2 + eps), c1 = 1 - beta1^t, c2 = sqrt(1 - beta2^t);
        # the same as w -= (lr c2 / c1) * m / (sqrt(v) + eps c2), one pass over the buffer fewer.
        # (Python floats throughout: a numpy float64 scalar would make numpy buffer-cast.)
        c1, c2 = 1 - self.beta1**t, math.sqrt(1 - self.beta2**t)
        np.sqrt(v, out=tmp)
        tmp += self.epsilon * c2
        np.divide(m, tmp, out=tmp)
        tmp *= self.learning_rate * c2 / c1
        w -= tmp
