"""Losses: MeanSquareLoss and SoftmaxCrossEntropy (fused with a preceding softmax)."""
import numpy as np

from .activations import Softmax
from .graph import GraphError, Node, Placeholder, _fmt_shape, shapes_match


class Loss(Node):
    """A scalar node comparing a prediction with a label node, its ``target``."""

    def __init__(self, pred, label, name=None):
        super().__init__(pred, label, name=name)
        if not shapes_match(pred.shape, label.shape):
            raise GraphError(f"{self!r}: prediction '{pred.name}' {_fmt_shape(pred.shape)} and label '{label.name}' {_fmt_shape(label.shape)} differ in shape")
        self.shape = ()
        self.target = label if isinstance(label, Placeholder) else label.root

    @property
    def groupable(self):
        """Stacked micro-shards (Session.forward's groups): the value is then one loss a
        micro-shard, each the mean over its rows, and backward seeds each with 1."""
        return all(n.root is not None for n in self.last)

    def rows_per_group(self, x):
        """The rows a mean is over: a micro-shard's under groups, else the batch's (1 when empty)."""
        n = x.shape[0] if x.ndim > 1 else 1
        return max(n // (self.groups or 1), 1)

    def group_means(self, a, b, factor, divisor):
        """factor * vdot(a_g, b_g) / divisor for each micro-shard g of the rows of a and b (the
        loss a micro-shard, as forward computes it for a whole batch), each by its own dot: the
        same bits whatever the number of micro-shards."""
        G = self.groups
        a2, b2 = a.reshape(G, -1), b.reshape(G, -1)
        return np.array([factor * np.vdot(a2[i], b2[i]) / divisor for i in range(G)], dtype=a.dtype)

    def check(self, pred, label):
        if pred.shape != label.shape:
            raise GraphError(f"{self!r}: prediction {_fmt_shape(pred.shape)} and label {_fmt_shape(label.shape)} differ in shape")


class MeanSquareLoss(Loss):
    """0.5 * mean over all elements of (yhat - y)**2."""

    def forward(self, yhat, y):
        self.check(yhat, y)
        d = np.subtract(yhat, y, out=self.buffer("diff", yhat.shape, yhat.dtype))
        if self.groups is not None:
            return self.group_means(d, d, 0.5, max(d.size // self.groups, 1))
        return np.asarray(0.5 * np.vdot(d, d) / max(d.size, 1), dtype=yhat.dtype)  # 0 for an empty batch

    def backward(self, g, out):
        # d loss / d yhat = (yhat - y) / size;  d loss / d y = -(yhat - y) / size
        d = self._buffers["diff"]
        scale = 1 / max(d.size // self.groups, 1) if self.groups is not None else g / max(d.size, 1)
        if out[0] is not None:
            np.multiply(d, scale, out=out[0])
        if out[1] is not None:
            np.multiply(d, -scale, out=out[1])


class SoftmaxCrossEntropy(Loss):
    """Batch mean of -sum(y * log p) over the last axis.

    Given a ``softmax`` node it reads the logits under it and computes log-softmax directly
    (stable for logits in the thousands); its gradient with respect to the logits is then the
    fused (p - y) / batch and the softmax node's ``value`` is set to p as a by-product. Given
    any other node it treats it as probabilities.
    """

    def __init__(self, pred, label, name=None):
        self.fused = isinstance(pred, Softmax)
        self.probs = pred
        super().__init__(pred.last[0] if self.fused else pred, label, name=name)
        if self.fused:
            self.root = pred.root

    def forward(self, x, y):
        self.check(x, y)
        n = self.rows_per_group(x)  # an empty batch: loss 0, gradient 0
        if self.fused:
            # log p = z - log(sum(exp(z))), z = x - max(x)
            logp = self.buffer("logp", x.shape, x.dtype)
            np.subtract(x, x.max(axis=-1, keepdims=True), out=logp)
            p = np.exp(logp, out=self.buffer("p", x.shape, x.dtype))
            total = p.sum(axis=-1, keepdims=True)
            p /= total
            logp -= np.log(total)
            self.probs.value = p
        else:
            if np.any(x < 0):
                raise GraphError(f"{self!r}: expected probabilities >= 0, got min {x.min()}")
            logp = np.log(np.maximum(x, np.finfo(x.dtype).tiny), out=self.buffer("logp", x.shape, x.dtype))
        if self.groups is not None:
            return self.group_means(y, logp, -1, n)
        return np.asarray(-np.vdot(y, logp) / n, dtype=x.dtype)

    def backward(self, g, out):
        x, y = self.last[0].value, self.last[1].value
        n = self.rows_per_group(x)
        if self.groups is not None:
            g = 1.0  # each micro-shard's loss seeds its own rows' gradient
        if out[0] is not None:
            if self.fused:
                # d loss / d logits = (p - y) / n
                np.subtract(self._buffers["p"], y, out=out[0])
            else:
                # d loss / d p = -y / p / n
                np.divide(y, np.maximum(x, np.finfo(x.dtype).tiny), out=out[0])
                np.negative(out[0], out=out[0])
            out[0] *= g / n
        if out[1] is not None:
            # d loss / d y = -log p / n
            np.multiply(self._buffers["logp"], -g / n, out=out[1])
