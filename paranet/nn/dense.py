"""FullConnection: x @ W + b on inputs flattened per sample, then an activation."""
import math

import numpy as np

from ..graph import GraphError, Node, Variable, _fmt_shape
from ..ops import stack_groups


class Dense(Node):
    """x (n, ...) flattened in C order to (n, k), then x @ W + b with W (k, m) and b (m,)."""

    def __init__(self, x, W, b, name=None):
        super().__init__(x, W, b, name=name)
        if W.shape is None or len(W.shape) != 2:
            raise GraphError(f"{self!r}: expected a 2-D weight, got '{W.name}' {_fmt_shape(W.shape or ())}")
        k, m = W.shape
        if b.shape != (m,):
            raise GraphError(f"{self!r}: expected bias '{b.name}' of shape ({m},) to match weight '{W.name}' {_fmt_shape(W.shape)}, got {_fmt_shape(b.shape)}")
        if x.shape is not None and None not in x.shape[1:] and int(np.prod(x.shape[1:])) != k:
            raise GraphError(f"{self!r}: input '{x.name}' {_fmt_shape(x.shape)} has {int(np.prod(x.shape[1:]))} features per sample, weight '{W.name}' {_fmt_shape(W.shape)} expects {k}")
        self.shape = (x.shape[0] if x.shape else None, m)

    @property
    def groupable(self):
        """Stacked micro-shards (Session.forward's groups): one GEMM a micro-shard, in one call."""
        return self.last[0].root is not None and all(isinstance(n, Variable) for n in self.last[1:])

    def forward(self, x, W, b):
        k = math.prod(x.shape[1:])
        if k != W.shape[0]:
            raise GraphError(f"{self!r}: input has {k} features per sample, weight {_fmt_shape(W.shape)} expects {W.shape[0]}")
        x2 = x.reshape(x.shape[0], k)  # x2: (n, k); n may be 0
        y = self.buffer("out", (x2.shape[0], W.shape[1]), x.dtype)
        if self.groups is None:
            np.matmul(x2, W, out=y)
        else:  # G micro-shards: a GEMM each, as numpy's stacked matmul calls it
            np.matmul(stack_groups(x2, self.groups), W, out=stack_groups(y, self.groups))
        y += b
        return y  # y: (n, m)

    def backward(self, g, out):
        x, W = self.last[0].value, self.last[1].value
        x2 = x.reshape(x.shape[0], W.shape[0])
        # dx = g @ W.T (reshaped back), dW = x.T @ g, db = sum of g over the batch
        if self.groups is not None:  # per micro-shard: dW and db are (G, ...)
            G = self.groups
            gs = stack_groups(g, G)
            if out[0] is not None:
                np.matmul(gs, W.T, out=stack_groups(out[0].reshape(x2.shape), G))
            if out[1] is not None:
                np.matmul(stack_groups(x2, G).transpose(0, 2, 1), gs, out=out[1])
            if out[2] is not None:
                np.add.reduce(gs, axis=1, out=out[2])
            return
        if out[0] is not None:
            np.matmul(g, W.T, out=out[0].reshape(x2.shape))
        if out[1] is not None:
            np.matmul(x2.T, g, out=out[1])
        if out[2] is not None:
            np.add.reduce(g, axis=0, out=out[2])  # np.sum without its Python wrapper


def FullConnection(x, W, b, activation=None, name=None):
    """A fully connected layer: ``activation(x @ W + b)``.

    Args:
        x: input node (n, k), or (n, ...) which is flattened per sample in C order.
        W: weight Variable (k, m).
        b: bias Variable (m,).
        activation: a function of a node such as ``paranet.relu``; None or ``paranet.Line``
            for none.
    Returns:
        the activation's node (n, m), or the affine node when there is no activation.
    """
    y = Dense(x, W, b, name=name)
    return y if activation is None else activation(y)
