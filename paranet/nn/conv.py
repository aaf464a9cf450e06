"""Conv2D and MaxPool on NCHW arrays: im2col + one batched matmul, col2im by strided slices."""
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..graph import GraphError, Node, _fmt_shape


def _pair(v, what):
    """(a, b) from an int or a pair of non-negative ints."""
    pair = (v, v) if np.ndim(v) == 0 else tuple(v)
    if len(pair) != 2 or not all(isinstance(p, (int, np.integer)) for p in pair):
        raise GraphError(f"expected {what} as an int or a pair of ints, got {v!r}")
    return int(pair[0]), int(pair[1])


def _out_size(size, window, stride, pad=0):
    """Output length along one axis, floored like torch; None when the input size is unknown."""
    return None if size is None else (size + 2 * pad - window) // stride + 1


class Conv2DOp(Node):
    """Cross-correlation of x (N, C, H, W) with kernels K (O, C, kh, kw) plus bias b (O,),
    zero-padded, as ``torch.nn.functional.conv2d``; output (N, O, Ho, Wo)."""

    def __init__(self, x, K, b, stride=1, padding=0, name=None):
        super().__init__(x, K, b, name=name)
        self.stride = _pair(stride, f"{self!r}: stride")
        self.padding = _pair(padding, f"{self!r}: padding")
        if min(self.stride) < 1 or min(self.padding) < 0:
            raise GraphError(f"{self!r}: expected stride >= 1 and padding >= 0, got stride {self.stride}, padding {self.padding}")
        if K.shape is None or len(K.shape) != 4 or None in K.shape:
            raise GraphError(f"{self!r}: expected kernels '{K.name}' of shape (out_channels, in_channels, kh, kw), got {_fmt_shape(K.shape or ())}")
        O, C, kh, kw = K.shape
        if b.shape != (O,):
            raise GraphError(f"{self!r}: expected bias '{b.name}' of shape ({O},) to match kernels '{K.name}' {_fmt_shape(K.shape)}, got {_fmt_shape(b.shape or ())}")
        if x.shape is not None:
            if len(x.shape) != 4:
                raise GraphError(f"{self!r}: expected input '{x.name}' of shape (N, {C}, H, W), got {_fmt_shape(x.shape)}")
            if x.shape[1] is not None and x.shape[1] != C:
                raise GraphError(f"{self!r}: expected input '{x.name}' with {C} channels (N, {C}, H, W) for kernels '{K.name}' {_fmt_shape(K.shape)}, got {_fmt_shape(x.shape)}")
        N, _, H, W = x.shape if x.shape is not None else (None,) * 4
        (sh, sw), (ph, pw) = self.stride, self.padding
        self.shape = (N, O, _out_size(H, kh, sh, ph), _out_size(W, kw, sw, pw))
        if any(d is not None and d < 1 for d in self.shape[2:]):
            raise GraphError(f"{self!r}: kernels {kh}x{kw} with padding {self.padding} do not fit input '{x.name}' {_fmt_shape(x.shape)}")

    def _check(self, x, K):
        O, C, kh, kw = K.shape
        (ph, pw) = self.padding
        if x.ndim != 4 or x.shape[1] != C or x.shape[2] + 2 * ph < kh or x.shape[3] + 2 * pw < kw:
            raise GraphError(f"{self!r}: expected input (N, {C}, H >= {kh - 2 * ph}, W >= {kw - 2 * pw}), got {_fmt_shape(x.shape)}")

    def forward(self, x, K, b):
        self._check(x, K)
        N, C, H, W = x.shape
        O, _, kh, kw = K.shape
        (sh, sw), (ph, pw) = self.stride, self.padding
        Ho, Wo = _out_size(H, kh, sh, ph), _out_size(W, kw, sw, pw)
        if ph or pw:  # xp: (N, C, H + 2ph, W + 2pw), zero border
            xp = self.buffer("xpad", (N, C, H + 2 * ph, W + 2 * pw), x.dtype)
            xp[:, :, :ph] = 0
            xp[:, :, H + ph:] = 0
            xp[:, :, :, :pw] = 0
            xp[:, :, :, W + pw:] = 0
            xp[:, :, ph:ph + H, pw:pw + W] = x
        else:
            xp = x
        # windows: (N, C, Ho, Wo, kh, kw) view; col: (N, C, kh, kw, Ho, Wo) == (N, C*kh*kw, Ho*Wo)
        windows = sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
        col = self.buffer("col", (N, C, kh, kw, Ho, Wo), x.dtype)
        np.copyto(col, windows.transpose(0, 1, 4, 5, 2, 3))
        col = col.reshape(N, C * kh * kw, Ho * Wo)
        # y[n] = K2 @ col[n] + b, K2: (O, C*kh*kw)
        y = self.buffer("out", (N, O, Ho, Wo), x.dtype)
        np.matmul(K.reshape(O, -1), col, out=y.reshape(N, O, Ho * Wo))
        y += b.reshape(O, 1, 1)
        return y

    def backward(self, g, out):
        x, K = self.last[0].value, self.last[1].value
        N, C, H, W = x.shape
        O, _, kh, kw = K.shape
        (sh, sw), (ph, pw) = self.stride, self.padding
        Ho, Wo = g.shape[2:]
        g2 = g.reshape(N, O, Ho * Wo)
        if out[2] is not None:
            # db = sum of g over batch and positions
            np.sum(g2.sum(axis=2), axis=0, out=out[2])
        if out[1] is not None:
            # dK = sum_n g[n] @ col[n].T
            col = self._buffers["col"].reshape(N, C * kh * kw, Ho * Wo)
            dKn = self.buffer("dKn", (N, O, C * kh * kw), g.dtype)
            np.matmul(g2, col.transpose(0, 2, 1), out=dKn)
            np.sum(dKn, axis=0, out=out[1].reshape(O, -1))
        if out[0] is not None:
            # dcol = K2.T @ g, then col2im: dx[window of tap (u, v)] += dcol[u, v]. Both in a
            # batch-last layout, where each tap's strided slice has long contiguous rows.
            gt = self.buffer("gt", (O, Ho, Wo, N), g.dtype)  # gt: (O, Ho, Wo, N)
            np.copyto(gt, g.transpose(1, 2, 3, 0))
            dcol = self.buffer("dcol", (C, kh, kw, Ho, Wo, N), g.dtype)
            np.matmul(K.reshape(O, -1).T, gt.reshape(O, Ho * Wo * N), out=dcol.reshape(C * kh * kw, Ho * Wo * N))
            dxt = self.buffer("dxt", (C, H + 2 * ph, W + 2 * pw, N), g.dtype)
            dxt.fill(0)
            for u in range(kh):
                for v in range(kw):
                    dxt[:, u:u + sh * (Ho - 1) + 1:sh, v:v + sw * (Wo - 1) + 1:sw] += dcol[:, u, v]
            np.copyto(out[0], dxt[:, ph:ph + H, pw:pw + W].transpose(3, 0, 1, 2))


def Conv2D(x, K, b, activation=None, stride=1, padding=0, name=None):
    """A 2-D convolution layer (cross-correlation, like ``torch.nn.functional.conv2d``).

    Args:
        x: input node (N, C, H, W).
        K: kernel Variable (out_channels, C, kh, kw).
        b: bias Variable (out_channels,).
        activation: a function of a node such as ``paranet.relu``, or None.
        stride: an int or a (sh, sw) pair.
        padding: zeros added on each side, an int or a (ph, pw) pair.
        name: shown in error messages.
    Returns:
        the activation's node, or the convolution node (N, out_channels, Ho, Wo) with
        Ho = (H + 2 ph - kh) // sh + 1 and likewise Wo.
    """
    y = Conv2DOp(x, K, b, stride=stride, padding=padding, name=name)
    return y if activation is None else activation(y)


class MaxPoolOp(Node):
    """Max over (kh, kw) windows of x (N, C, H, W) moved by (sh, sw); sizes are floored like torch.

    Backward routes each window's gradient to exactly one position, its argmax; on ties that is
    the first maximum in row-major order within the window (as torch does).
    """

    def __init__(self, x, size=2, stride=None, name=None):
        super().__init__(x, name=name)
        self.size = _pair(size, f"{self!r}: size")
        self.stride = self.size if stride is None else _pair(stride, f"{self!r}: stride")
        if min(self.size) < 1 or min(self.stride) < 1:
            raise GraphError(f"{self!r}: expected size and stride >= 1, got size {self.size}, stride {self.stride}")
        if x.shape is not None and len(x.shape) != 4:
            raise GraphError(f"{self!r}: expected input '{x.name}' of shape (N, C, H, W), got {_fmt_shape(x.shape)}")
        N, C, H, W = x.shape if x.shape is not None else (None,) * 4
        (kh, kw), (sh, sw) = self.size, self.stride
        self.shape = (N, C, _out_size(H, kh, sh), _out_size(W, kw, sw))
        if any(d is not None and d < 1 for d in self.shape[2:]):
            raise GraphError(f"{self!r}: window {kh}x{kw} does not fit input '{x.name}' {_fmt_shape(x.shape)}")
        self.tiled = self.size == self.stride  # non-overlapping windows: the reshape fast path

    def taps(self, a, Ho, Wo):
        """The kh*kw strided views a[n, c, i*sh + u, j*sw + v] over (i, j), tap (u, v) in row-major order."""
        (kh, kw), (sh, sw) = self.size, self.stride
        N, C = a.shape[:2]
        if self.tiled:  # non-overlapping windows: (N, C, Ho, kh, Wo, kw) is a reshape of the crop
            a6 = a[:, :, :Ho * kh, :Wo * kw].reshape(N, C, Ho, kh, Wo, kw)
            return [a6[:, :, :, u, :, v] for u in range(kh) for v in range(kw)]
        return [a[:, :, u:u + sh * (Ho - 1) + 1:sh, v:v + sw * (Wo - 1) + 1:sw] for u in range(kh) for v in range(kw)]

    def forward(self, x):
        (kh, kw), (sh, sw) = self.size, self.stride
        if x.ndim != 4 or x.shape[2] < kh or x.shape[3] < kw:
            raise GraphError(f"{self!r}: expected input (N, C, H >= {kh}, W >= {kw}), got {_fmt_shape(x.shape)}")
        N, C, H, W = x.shape
        Ho, Wo = _out_size(H, kh, sh), _out_size(W, kw, sw)
        taps = self.taps(x, Ho, Wo)
        y = self.buffer("out", (N, C, Ho, Wo), x.dtype)
        np.copyto(y, taps[0])
        for t in taps[1:]:
            np.maximum(y, t, out=y)
        return y

    def backward(self, g, out):
        # dx[argmax position of each window] = g; other positions get 0 (or, with overlapping
        # windows, the sum over the windows whose argmax they are). The argmax is the first tap,
        # in row-major order, equal to the window's maximum: ``taken`` marks windows routed.
        x, y, dx = self.last[0].value, self.value, out[0]
        Ho, Wo = g.shape[2:]
        kh, kw = self.size
        if not self.tiled or dx.shape[2] != Ho * kh or dx.shape[3] != Wo * kw:
            dx.fill(0)  # overlapping windows add up; floored rows/columns get no gradient
        mask = self.buffer("mask", g.shape, bool)
        taken = self.buffer("taken", g.shape, bool)
        taken.fill(False)
        tap = self.buffer("tap", g.shape, g.dtype)
        for x_tap, dx_tap in zip(self.taps(x, Ho, Wo), self.taps(dx, Ho, Wo)):
            np.equal(x_tap, y, out=mask)
            np.greater(mask, taken, out=mask)  # mask and not taken
            taken |= mask
            if self.tiled:
                np.multiply(g, mask, out=dx_tap)
            else:
                np.multiply(g, mask, out=tap)
                dx_tap += tap


def MaxPool(x, size=2, stride=None, name=None):
    """Max pooling over NCHW input.

    Args:
        x: input node (N, C, H, W).
        size: window, an int or a (kh, kw) pair.
        stride: step, an int or pair; defaults to ``size`` (non-overlapping windows).
        name: shown in error messages.
    Returns:
        the pooled node (N, C, Ho, Wo), Ho = (H - kh) // sh + 1 (floored, like torch).
        Its gradient goes to one position per window, the first maximum in row-major order.
    """
    return MaxPoolOp(x, size=size, stride=stride, name=name)
