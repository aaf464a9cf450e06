"""Batch-last storage of 4-D activations: arrays that read as (N, C, H, W) but lie in memory as (C, H, W, N).

The image ops (Conv2D, MaxPool, relu) take and give NCHW arrays; between two of them an
activation is stored batch-last, where every spatial shift of a window (im2col, col2im, the
pooling taps) moves whole contiguous runs of the batch, and a layer's N samples form one wide
GEMM operand. Such an array is a transposed view, so any other consumer still reads correct
NCHW values (numpy copies where it must). An op marks itself ``takes_batch_last = True`` when it
reads its inputs and writes their gradients in either layout at full speed; a node is stored
batch-last only when every one of its consumers says so, so a Dense layer, which flattens its
input and reshapes its gradient in place, always gets C-order NCHW arrays.
"""


def consumers_take_batch_last(node):
    """True when ``node`` has consumers and each of them takes batch-last arrays."""
    return bool(node.next) and all(getattr(n, "takes_batch_last", False) for n in node.next)


def batch_last(a):
    """The (C, H, W, N) C-contiguous view of a 4-D NCHW array stored batch-last, else None."""
    t = a.transpose(1, 2, 3, 0)
    return t if t.flags.c_contiguous else None


def nchw_buffer(node, key, shape, dtype, stored_batch_last):
    """A work array of ``node`` that reads as ``shape`` (N, C, H, W); stored batch-last if asked
    (then it is the transposed view of a C-contiguous (C, H, W, N) buffer)."""
    if not stored_batch_last:
        return node.buffer(key, shape, dtype)
    n, c, h, w = shape
    return node.buffer(key + "/batch-last", (c, h, w, n), dtype).transpose(3, 0, 1, 2)


def layout_grad_buffer(node):
    """``Node.grad_buffer`` for 4-D ops: batch-last when every consumer takes it, else C order."""
    value = node.value
    if getattr(value, "ndim", 0) != 4:
        return node.buffer("grad", value.shape, value.dtype)
    return nchw_buffer(node, "grad", value.shape, value.dtype, consumers_take_batch_last(node))
