"""Element-wise math ops, ``+`` and ``matmul``: each op's forward, backward and constructor together."""
import numpy as np

from .graph import GraphError, Node, Variable, _fmt_shape, shapes_match


class Elementwise(Node):
    """Base of one-input ops whose output has the input's shape."""

    groupable = True  # element by element: a row's result never depends on the other rows

    def __init__(self, x, name=None):
        super().__init__(x, name=name)
        self.shape = x.shape

    def out(self, x):
        """This op's reusable output array, shaped like its input."""
        return self.buffer("out", x.shape, x.dtype)


class Exp(Elementwise):
    def forward(self, x):
        return np.exp(x, out=self.out(x))

    def backward(self, g, out):
        # d exp(x) = exp(x) dx
        np.multiply(g, self.value, out=out[0])


class Sin(Elementwise):
    def forward(self, x):
        return np.sin(x, out=self.out(x))

    def backward(self, g, out):
        # d sin(x) = cos(x) dx
        np.multiply(g, np.cos(self.last[0].value), out=out[0])


class Cos(Elementwise):
    def forward(self, x):
        return np.cos(x, out=self.out(x))

    def backward(self, g, out):
        # d cos(x) = -sin(x) dx
        np.multiply(g, np.sin(self.last[0].value), out=out[0])
        np.negative(out[0], out=out[0])


class Log(Elementwise):
    def forward(self, x):
        if np.any(x <= 0):
            raise GraphError(f"{self!r}: expected positive inputs, got min {x.min()}")
        return np.log(x, out=self.out(x))

    def backward(self, g, out):
        # d log(x) = dx / x
        np.divide(g, self.last[0].value, out=out[0])


class Square(Elementwise):
    def forward(self, x):
        return np.square(x, out=self.out(x))

    def backward(self, g, out):
        # d x^2 = 2x dx
        np.multiply(g, self.last[0].value, out=out[0])
        out[0] *= 2


def exp(x):
    """e**x, element-wise."""
    return Exp(x)


def sin(x):
    """sin(x), element-wise."""
    return Sin(x)


def cos(x):
    """cos(x), element-wise."""
    return Cos(x)


def log(x):
    """Natural logarithm, element-wise; non-positive inputs raise."""
    return Log(x)


def square(x):
    """x**2, element-wise."""
    return Square(x)


class Add(Node):
    """a + b of equal shapes: no silent broadcasting."""

    def __init__(self, a, b, name=None):
        super().__init__(a, b, name=name)
        if not shapes_match(a.shape, b.shape):
            raise GraphError(f"{self!r}: inputs '{a.name}' {_fmt_shape(a.shape)} and '{b.name}' {_fmt_shape(b.shape)} differ in shape")
        self.shape = a.shape if a.shape is not None else b.shape

    @property
    def groupable(self):
        return all(n.root is not None for n in self.last)  # both rows of the batch

    def forward(self, a, b):
        if a.shape != b.shape:
            raise GraphError(f"{self!r}: inputs '{self.last[0].name}' {_fmt_shape(a.shape)} and '{self.last[1].name}' {_fmt_shape(b.shape)} differ in shape")
        return np.add(a, b, out=self.buffer("out", a.shape, a.dtype))

    def backward(self, g, out):
        # d(a + b) = da + db
        for o in out:
            if o is not None:
                o[...] = g


def add(a, b):
    """a + b for nodes of the same shape (also written ``a + b``)."""
    return Add(a, b)


class MatMul(Node):
    """a @ b for 2-D a (n, k) and b (k, m)."""

    def __init__(self, a, b, name=None):
        super().__init__(a, b, name=name)
        if a.shape is not None and b.shape is not None:
            if len(a.shape) != 2 or len(b.shape) != 2 or not shapes_match(a.shape[1:], b.shape[:1]):
                raise GraphError(f"{self!r}: expected (n, k) @ (k, m), got '{a.name}' {_fmt_shape(a.shape)} @ '{b.name}' {_fmt_shape(b.shape)}")
            self.shape = (a.shape[0], b.shape[1])

    @property
    def groupable(self):
        """Rows of the batch times a Variable: one GEMM a micro-shard (Session.forward's groups)."""
        return self.last[0].root is not None and isinstance(self.last[1], Variable)

    def forward(self, a, b):
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise GraphError(f"{self!r}: expected (n, k) @ (k, m), got {_fmt_shape(a.shape)} @ {_fmt_shape(b.shape)}")
        y = self.buffer("out", (a.shape[0], b.shape[1]), a.dtype)
        if self.groups is None:
            return np.matmul(a, b, out=y)
        np.matmul(stack_groups(a, self.groups), b, out=stack_groups(y, self.groups))
        return y

    def backward(self, g, out):
        a, b = self.last[0].value, self.last[1].value
        # g: (n, m); da = g @ b.T, db = a.T @ g
        if self.groups is not None:  # per micro-shard: db is (G, k, m)
            gs = stack_groups(g, self.groups)
            if out[0] is not None:
                np.matmul(gs, b.T, out=stack_groups(out[0], self.groups))
            if out[1] is not None:
                np.matmul(stack_groups(a, self.groups).transpose(0, 2, 1), gs, out=out[1])
            return
        if out[0] is not None:
            np.matmul(g, b.T, out=out[0])
        if out[1] is not None:
            np.matmul(a.T, g, out=out[1])


def stack_groups(a, groups):
    """(n, k) rows as (G, n / G, k): G micro-shards of equal size (a view)."""
    return a.reshape(groups, a.shape[0] // groups, a.shape[1])


def matmul(a, b):
    """Matrix product of two 2-D nodes."""
    return MatMul(a, b)
