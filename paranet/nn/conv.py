"""Conv2D and MaxPool on NCHW arrays stored batch-last between them: im2col + one GEMM, col2im by strided slices."""
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..activations import relu, relu_into
from ..graph import GraphError, Node, _fmt_shape
from ..layout import batch_last, consumers_take_batch_last, layout_grad_buffer, nchw_buffer


def _pair(v, what):
    """(a, b) from an int or a pair of non-negative ints."""
    pair = (v, v) if np.ndim(v) == 0 else tuple(v)
    if len(pair) != 2 or not all(isinstance(p, (int, np.integer)) for p in pair):
        raise GraphError(f"expected {what} as an int or a pair of ints, got {v!r}")
    return int(pair[0]), int(pair[1])


def _out_size(size, window, stride, pad=0):
    """Output length along one axis, floored like torch; None when the input size is unknown."""
    return None if size is None else (size + 2 * pad - window) // stride + 1


# From C*kw = 32 on, one GEMM per kernel row over a (C, kw, H, Wo, N) matrix beats the full
# im2col matrix, kh times larger (measured, 16 channels 5x5 at batch 128: forward 2.3 against
# 2.9 ms, kernel gradient 2.2 against 2.4 ms, input gradient 2.4 against 2.8 ms; the CNN's step
# 12.8 against 14.0 ms); for fewer channels the GEMMs are too thin (K = C*kw).
ROWS_MIN = 32


def _pool_masks_relu(conv):
    """True when a relu-fused conv's only consumer is a MaxPool: the pool's gradient is non-zero
    only at window maxima, where the conv's output is the pooled value, so the pool applies relu's
    mask [y > 0] on its (smaller) output instead, and the conv skips it. Exact, ties included."""
    return conv.relu and len(conv.next) == 1 and isinstance(conv.next[0], MaxPoolOp)


class Conv2DOp(Node):
    """Cross-correlation of x (N, C, H, W) with kernels K (O, C, kh, kw) plus bias b (O,),
    zero-padded, as ``torch.nn.functional.conv2d``; output (N, O, Ho, Wo), then max(., 0) when
    ``relu`` (the activation fused: no separate node, no extra pass over the output).

    Storage is batch-last (see paranet.layout): the input is read as (C, H, W, N), im2col builds
    one (C*kh*kw + 1, Ho*Wo*N) matrix whose last row is ones, and one GEMM [K | b] @ col gives
    the output as (O, Ho, Wo, N); the kernel and bias gradients are one GEMM g @ col.T. With many
    channels (C*kw >= ROWS_MIN, stride 1 down the rows) a kh times smaller matrix of the kw shifts
    serves all kernel rows, one GEMM each, and the input gradient is built as that matrix's
    gradient first (kh GEMMs and shifted adds), then kw strided adds.
    """

    takes_batch_last = True
    # A shard above 128 rows runs in pieces (Node.chunk_rows): im2col's matrix for 128 MNIST rows
    # is 7 MB, for 1024 rows 60 MB, out of every cache. The trainer, batch 1024 (P = 1, 2): 1.2-1.4x
    # samples/s (python -m bench.cnn_pieces); at 32-128 rows a piece the GEMMs stay as fast.
    chunk_rows = 128

    def __init__(self, x, K, b, stride=1, padding=0, relu=False, name=None):
        super().__init__(x, K, b, name=name)
        self.relu = bool(relu)
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

    grad_buffer = layout_grad_buffer

    def _check(self, x, K):
        O, C, kh, kw = K.shape
        (ph, pw) = self.padding
        if x.ndim != 4 or x.shape[1] != C or x.shape[2] + 2 * ph < kh or x.shape[3] + 2 * pw < kw:
            raise GraphError(f"{self!r}: expected input (N, {C}, H >= {kh - 2 * ph}, W >= {kw - 2 * pw}), got {_fmt_shape(x.shape)}")

    def _rows(self, u, Ho):
        """The im2col rows (c, u, v) for kernel row u, all c and v: a (C*kw, Ho*Wo*N) view of colv."""
        colv = self._buffers["colv"]
        C, kw, _, Wo, N = colv.shape
        return colv[:, :, u:u + Ho].reshape(C * kw, Ho * Wo * N)

    def forward(self, x, K, b):
        self._check(x, K)
        N, C, H, W = x.shape
        O, _, kh, kw = K.shape
        (sh, sw), (ph, pw) = self.stride, self.padding
        Ho, Wo = _out_size(H, kh, sh, ph), _out_size(W, kw, sw, pw)
        ckk, cols = C * kh * kw, Ho * Wo * N
        xp = batch_last(x)  # xp: (C, H + 2ph, W + 2pw, N), zero border
        if xp is None or ph or pw:
            xp = self.buffer("xpad", (C, H + 2 * ph, W + 2 * pw, N), x.dtype)
            if ph or pw:
                xp[:, :ph] = 0
                xp[:, H + ph:] = 0
                xp[:, :, :pw] = 0
                xp[:, :, W + pw:] = 0
            np.copyto(xp[:, ph:ph + H, pw:pw + W], x.transpose(1, 2, 3, 0))
        yt = self.buffer("out/batch-last", (O, Ho, Wo, N), x.dtype)  # y: (O, Ho, Wo, N) batch-last
        y2 = yt.reshape(O, cols)
        self.by_rows = sh == 1 and C * kw >= ROWS_MIN
        if self.by_rows:
            # colv: (C, kw, H + 2ph, Wo, N), colv[c, v, h, j, n] = xp[c, h, j*sw + v, n]; its rows
            # u .. u + Ho are the im2col rows (c, u, v) of every c and v: a strided (C*kw, Ho*Wo*N)
            # matrix. y = sum over u of K[:, :, u, :] @ those rows, + b
            colv = self.buffer("colv", (C, kw, H + 2 * ph, Wo, N), x.dtype)
            np.copyto(colv, sliding_window_view(xp, kw, axis=2)[:, :, ::sw].transpose(0, 4, 1, 2, 3))
            kr = self.buffer("kr", (kh, O, C * kw), x.dtype)  # kr[u] = K[:, :, u, :] as (O, C*kw)
            np.copyto(kr.reshape(kh, O, C, kw), K.transpose(2, 0, 1, 3))
            part = self.buffer("part", (O, cols), x.dtype)
            for u in range(kh):
                np.matmul(kr[u], self._rows(u, Ho), out=y2 if u == 0 else part)
                if u:
                    y2 += part
            y2 += b.reshape(O, 1)
        else:
            # col: (C*kh*kw + 1, Ho*Wo*N); row (c, u, v) holds xp[c, i*sh + u, j*sw + v, n] over
            # (i, j, n), each (j, n) run contiguous at stride 1; the last row is ones, the bias's input
            col = self.buffer("col", (ckk + 1, cols), x.dtype)
            windows = sliding_window_view(xp, (kh, kw), axis=(1, 2))[:, ::sh, ::sw]  # (C, Ho, Wo, N, kh, kw)
            np.copyto(col[:ckk].reshape(C, kh, kw, Ho, Wo, N), windows.transpose(0, 4, 5, 1, 2, 3))
            col[ckk] = 1
            kb = self.buffer("kb", (O, ckk + 1), x.dtype)  # [K2 | b], K2: (O, C*kh*kw)
            kb[:, :ckk] = K.reshape(O, ckk)
            kb[:, ckk] = b
            np.matmul(kb, col, out=y2)  # y = [K2 | b] @ col
        if self.relu:
            relu_into(self, y2, y2)
        if consumers_take_batch_last(self):
            return yt.transpose(3, 0, 1, 2)
        y = self.buffer("out", (N, O, Ho, Wo), x.dtype)  # a consumer that wants C order (a Dense layer)
        np.copyto(y, yt.transpose(3, 0, 1, 2))
        return y

    def backward(self, g, out):
        x, K = self.last[0].value, self.last[1].value
        N, C, H, W = x.shape
        O, _, kh, kw = K.shape
        (sh, sw), (ph, pw) = self.stride, self.padding
        Ho, Wo = g.shape[2:]
        ckk, cols = C * kh * kw, Ho * Wo * N
        gt = batch_last(g)  # gt: (O, Ho, Wo, N)
        if gt is None:
            gt = self.buffer("gt", (O, Ho, Wo, N), g.dtype)
            np.copyto(gt, g.transpose(1, 2, 3, 0))
        g2 = gt.reshape(O, cols)
        if self.relu and not _pool_masks_relu(self):
            # relu: the gradient passes where the output is positive; g2 = g * [y > 0]
            y2 = self._buffers["out/batch-last"].reshape(O, cols)
            mask = np.greater(y2, 0, out=self.buffer("mask", (O, cols), np.bool_))
            g2 = np.multiply(g2, mask, out=self.buffer("g-relu", (O, cols), g.dtype))
        if self.by_rows:
            # dK[:, :, u, :] = g2 @ (colv rows u .. u + Ho).T; db = sum of g over batch and positions
            if out[1] is not None:
                dkr = self.buffer("dkr", (kh, O, C * kw), g.dtype)
                for u in range(kh):
                    np.matmul(g2, self._rows(u, Ho).T, out=dkr[u])
                np.copyto(out[1], dkr.reshape(kh, O, C, kw).transpose(1, 2, 0, 3))
            if out[2] is not None:
                np.add.reduce(g2, axis=1, out=out[2])
        elif out[1] is not None or out[2] is not None:
            # [dK | db] = g2 @ col.T: the ones row of col sums g over the batch and the positions
            dkb = self.buffer("dkb", (O, ckk + 1), g.dtype)
            np.matmul(g2, self._buffers["col"].T, out=dkb)
            if out[1] is not None:
                out[1].reshape(O, ckk)[...] = dkb[:, :ckk]
            if out[2] is not None:
                out[2][...] = dkb[:, ckk]
        if out[0] is not None and self.by_rows:
            # the gradient of colv, shifted down by each kernel row u:
            # dcolv[:, :, u + i] += (K[:, :, u, :] as (O, C*kw)).T @ g2[:, i]; then dx[:, :, j*sw + v] += dcolv[:, v]
            Hp = H + 2 * ph
            dcolv = self.buffer("dcolv", (C, kw, Hp, Wo, N), g.dtype)
            dv = dcolv.reshape(C * kw, Hp, Wo * N)
            kr, part = self._buffers["kr"], self.buffer("dpart", (C * kw, cols), g.dtype)
            np.matmul(kr[0].T, g2, out=dv[:, :Ho].reshape(C * kw, cols))
            dv[:, Ho:] = 0
            for u in range(1, kh):
                np.matmul(kr[u].T, g2, out=part)
                dv[:, u:u + Ho] += part.reshape(C * kw, Ho, Wo * N)
            self._col2im([(dcolv[:, v], slice(None), v) for v in range(kw)], out[0], Hp, W + 2 * pw, N)
        elif out[0] is not None:
            # dcol = K2.T @ g2, then col2im: dx[window of tap (u, v)] += dcol[(c, u, v)], batch-last,
            # where each tap's strided slice moves contiguous runs of the batch
            dcol = self.buffer("dcol", (ckk, cols), g.dtype)
            np.matmul(K.reshape(O, ckk).T, g2, out=dcol)
            dcol = dcol.reshape(C, kh, kw, Ho, Wo, N)
            self._col2im([(dcol[:, u, v], slice(u, u + sh * (Ho - 1) + 1, sh), v) for u in range(kh) for v in range(kw)],
                         out[0], H + 2 * ph, W + 2 * pw, N)

    def _col2im(self, pieces, dx, Hp, Wp, N):
        """dx = the sum of each piece (C, rows, Wo, N) added at (rows, v + j*sw) of the padded,
        batch-last gradient, cropped to dx (N, C, H, W); in dx itself when it is batch-last."""
        (ph, pw), sw, Wo = self.padding, self.stride[1], pieces[0][0].shape[2]
        C, H, W = dx.shape[1:]
        direct = None if ph or pw else batch_last(dx)  # accumulate in place when dx is batch-last
        dxt = direct if direct is not None else self.buffer("dxt", (C, Hp, Wp, N), dx.dtype)
        dxt.fill(0)
        for piece, rows, v in pieces:
            dxt[:, rows, v:v + sw * (Wo - 1) + 1:sw] += piece
        if direct is None:
            np.copyto(dx, dxt[:, ph:ph + H, pw:pw + W].transpose(3, 0, 1, 2))


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
        Ho = (H + 2 ph - kh) // sh + 1 and likewise Wo; with ``paranet.relu`` the convolution
        node itself, the relu fused into it.
    """
    if activation is relu:  # fused into the convolution: one node, relu applied in place
        return Conv2DOp(x, K, b, stride=stride, padding=padding, relu=True, name=name)
    y = Conv2DOp(x, K, b, stride=stride, padding=padding, name=name)
    return y if activation is None else activation(y)


class MaxPoolOp(Node):
    """Max over (kh, kw) windows of x (N, C, H, W) moved by (sh, sw); sizes are floored like torch.

    Backward routes each window's gradient to exactly one position, its argmax; on ties that is
    the first maximum in row-major order within the window (as torch does). The work runs in the
    input's layout: on a batch-last input every tap is a strided view of contiguous batch runs.
    """

    takes_batch_last = True

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
        self.tiled = self.size == self.stride  # non-overlapping windows: each position in one window at most

    grad_buffer = layout_grad_buffer

    def taps(self, a, Ho, Wo, axis):
        """The kh*kw strided views a[..., i*sh + u, j*sw + v, ...] over (i, j) of the spatial axes
        ``axis`` and ``axis + 1``, tap (u, v) in row-major order."""
        (kh, kw), (sh, sw) = self.size, self.stride
        lead = (slice(None),) * axis
        return [a[lead + (slice(u, u + sh * (Ho - 1) + 1, sh), slice(v, v + sw * (Wo - 1) + 1, sw))]
                for u in range(kh) for v in range(kw)]

    @staticmethod
    def _work_order(a, batch_last_order):
        """``a`` (N, C, H, W) indexed as the work runs: (C, H, W, N) on batch-last input, else as is."""
        return a.transpose(1, 2, 3, 0) if batch_last_order else a

    def forward(self, x):
        (kh, kw), (sh, sw) = self.size, self.stride
        if x.ndim != 4 or x.shape[2] < kh or x.shape[3] < kw:
            raise GraphError(f"{self!r}: expected input (N, C, H >= {kh}, W >= {kw}), got {_fmt_shape(x.shape)}")
        N, C, H, W = x.shape
        Ho, Wo = _out_size(H, kh, sh), _out_size(W, kw, sw)
        bl = batch_last(x) is not None and N > 1  # work batch-last (spatial axes 1, 2) or NCHW (2, 3)
        axis = 1 if bl else 2
        taps = self.taps(self._work_order(x, bl), Ho, Wo, axis)
        y = nchw_buffer(self, "out", (N, C, Ho, Wo), x.dtype, bl and consumers_take_batch_last(self))
        ya = self._work_order(y, bl)
        m = ya if ya.flags.c_contiguous else self.buffer("max", ya.shape, x.dtype)  # a contiguous max, then one copy
        if len(taps) == 1:
            np.copyto(m, taps[0])
        else:
            np.maximum(taps[0], taps[1], out=m)
        for t in taps[2:]:
            np.maximum(m, t, out=m)
        if m is not ya:
            np.copyto(ya, m)
        return y

    def backward(self, g, out):
        # dx[argmax position of each window] = g; other positions get 0 (or, with overlapping
        # windows, the sum over the windows whose argmax they are). The argmax is the first tap,
        # in row-major order, equal to the window's maximum.
        x, y, dx = self.last[0].value, self.value, out[0]
        N, C, Ho, Wo = g.shape
        kh, kw = self.size
        bl = batch_last(x) is not None and N > 1
        axis = 1 if bl else 2
        xa, ya, dxa = (self._work_order(a, bl) for a in (x, y, dx))
        ga = self._work_order(g, bl)
        if not ga.flags.c_contiguous:
            ga = self.buffer("g", ga.shape, g.dtype)
            np.copyto(ga, self._work_order(g, bl))
        if not ya.flags.c_contiguous:
            ya = self._buffers["max"]  # the forward's contiguous copy of the maximum
        if not self.tiled or dx.shape[2] != Ho * kh or dx.shape[3] != Wo * kw:
            dx.fill(0)  # overlapping windows add up; floored rows/columns get no gradient
        if isinstance(self.last[0], Conv2DOp) and _pool_masks_relu(self.last[0]):
            # the input conv's relu: g * [max > 0] here, not on the conv's 4x larger gradient
            mask = np.greater(ya, 0, out=self.buffer("relu-mask", ga.shape, np.bool_))
            ga = np.multiply(ga, mask, out=self.buffer("g-relu", ga.shape, g.dtype))
        eq = self.buffer("eq", ga.shape, np.bool_)
        x_taps, dx_taps = self.taps(xa, Ho, Wo, axis), self.taps(dxa, Ho, Wo, axis)
        if self.tiled:
            # rest: the gradient of the windows not routed yet; a tap equal to the maximum takes
            # it all, and the last tap takes what is left (it holds the maximum there)
            rest = self.buffer("rest", ga.shape, g.dtype)
            for t, (x_tap, dx_tap) in enumerate(zip(x_taps, dx_taps)):
                src = ga if t == 0 else rest
                if t == len(x_taps) - 1:
                    np.copyto(dx_tap, src)
                    break
                np.equal(x_tap, ya, out=eq)
                np.multiply(src, eq, out=dx_tap)
                np.subtract(src, dx_tap, out=rest)
            return
        taken = self.buffer("taken", ga.shape, np.bool_)
        taken.fill(False)
        tap = self.buffer("tap", ga.shape, g.dtype)
        for x_tap, dx_tap in zip(x_taps, dx_taps):
            np.equal(x_tap, ya, out=eq)
            np.greater(eq, taken, out=eq)  # equal and not taken
            taken |= eq
            np.multiply(ga, eq, out=tap)
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
