"""The pointer-linked graph: Node, placeholder, Variable, the flat parameter buffers and Session.

Every node points at its inputs (``last``) and its consumers (``next``), as in the original
mytensor; ``root`` is the input placeholder upstream of a node and a loss's ``target`` is its
label placeholder. There is no graph registry: ``Session.run`` orders the work by a
topological walk over ``last`` pointers from the node it is asked for, and backward walks the
same order in reverse, accumulating gradients where a node feeds several consumers.
"""
import hashlib
import itertools

import numpy as np

DEFAULT_DTYPE = np.float32


class GraphError(ValueError):
    """A graph was wired or fed wrongly; the message names the node, expected and actual."""


def _fmt_shape(shape):
    return "(" + ", ".join("None" if d is None else str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def shapes_match(expected, actual):
    """True when ``actual`` fits ``expected``, where None in either stands for any size."""
    if expected is None or actual is None:
        return True
    if len(expected) != len(actual):
        return False
    for e, a in zip(expected, actual):  # a loop, not all(generator): every feed is checked here
        if e is not None and a is not None and e != a:
            return False
    return True


class Node:
    """A graph node.

    Subclasses (ops) set ``shape`` from their inputs' shapes and implement
    ``forward(*input_values) -> array`` and ``backward(grad, out)``, where ``out[i]`` is the
    preallocated array that input i's gradient must be written into, or None when input i
    needs no gradient.
    """

    value = None  # the array computed by the last forward pass
    # Grouped passes (Session.forward's ``groups``): an op that can run G equal micro-shards
    # stacked, each one's result the bits it would have alone whatever G, sets ``groupable``;
    # Session sets ``groups`` to G during such a pass and to None otherwise.
    groupable = False
    # rows above which a batch runs faster in pieces (its temporaries then stay in cache): the
    # trainer's step cuts a larger shard into pieces of at most this many rows; None: no limit
    chunk_rows = None
    groups = None

    def __init__(self, *inputs, name=None):
        for node in inputs:
            if not isinstance(node, Node):
                raise GraphError(f"{type(self).__name__}: input {node!r} is not a graph node")
        self.last = list(inputs)  # inputs, in argument order
        self.next = []  # consumers, in creation order
        for node in inputs:
            node.next.append(self)
        self.name = name or type(self).__name__
        self.root = next((n.root for n in inputs if n.root is not None), None)
        self.requires_grad = any(n.requires_grad for n in inputs)
        self.shape = None  # static shape; None entries are sizes known only at run time
        self._buffers = {}  # work arrays reused from step to step (see buffer())

    def __repr__(self):
        shape = "" if self.shape is None else " " + _fmt_shape(self.shape)
        return f"<{type(self).__name__} '{self.name}'{shape}>"

    def __add__(self, other):
        from .ops import add

        return add(self, other)

    def forward(self, *values):
        raise NotImplementedError(f"{type(self).__name__} has no forward")

    def backward(self, grad, out):
        raise NotImplementedError(f"{type(self).__name__} has no gradient")

    def grad_buffer(self):
        """The array this node's gradient is accumulated in during backward (C order, so that
        ops may reshape it in place), shaped like its value."""
        value = np.asarray(self.value)
        return self.buffer("grad", value.shape, value.dtype)

    def buffer(self, key, shape, dtype):
        """A work array kept on the node under ``key``, reallocated only when shape or dtype change.

        Ops write their outputs and temporaries into these, so a training step allocates
        nothing once the batch shape is steady.
        """
        buf = self._buffers.get(key)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = self._buffers[key] = np.empty(shape, dtype)
        return buf


class Placeholder(Node):
    """An input fed through ``feed_dict``; ``None`` in its shape accepts any size."""

    _unnamed = itertools.count(1)  # default names: placeholder_1, placeholder_2, ...

    def __init__(self, shape, name=None):
        super().__init__(name=name or f"placeholder_{next(Placeholder._unnamed)}")
        self.shape = tuple(shape)
        self.root = self

    def feed(self, value, dtype, check_finite=True):
        """Check a fed array against this placeholder and return it in ``dtype``."""
        arr = np.asarray(value)
        if arr.dtype != dtype and arr.dtype.kind not in "iuf":  # ints, unsigned ints, floats
            raise GraphError(f"placeholder '{self.name}': expected a numeric array, got dtype {arr.dtype}")
        if not shapes_match(self.shape, arr.shape):
            raise GraphError(
                f"placeholder '{self.name}': expected shape {_fmt_shape(self.shape)}, got {_fmt_shape(arr.shape)}"
            )
        arr = arr.astype(dtype, copy=False)
        # A sum of squares (one BLAS dot) is finite only when every element is, and costs less
        # than isfinite().all(); it can overflow on huge finite values, so a non-finite result is
        # checked element-wise.
        if not check_finite or all_finite(arr):
            return arr
        bad = np.argwhere(~np.isfinite(arr))
        if len(bad):
            raise GraphError(
                f"placeholder '{self.name}': expected finite values, got {arr[tuple(bad[0])]} at index {tuple(int(i) for i in bad[0])}"
            )
        return arr


def all_finite(a):
    """True when every element of ``a`` is finite: one BLAS dot (a sum of squares is finite only
    when every element is, and it costs less than isfinite().all()); the element-wise test only
    when the dot overflowed, as it may on huge finite values."""
    if a.size == 0:
        return True
    flat = np.ascontiguousarray(a).reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(np.vdot(flat, flat)) or np.isfinite(flat).all())


def placeholder(shape, name=None):
    """An input node; feed it with ``Session.run(..., {node: array})``.

    Args:
        shape: the expected shape, with None for sizes that vary (the batch).
        name: shown in error messages.
    """
    return Placeholder(shape, name)


class Variable(Node):
    """A parameter. Once a Session has run a graph that uses it, ``value`` and ``grad`` are
    views into that graph's flat buffers (see ``Parameters``)."""

    def __init__(self, value, trainable=True, name=None):
        super().__init__(name=name or "Variable")
        arr = np.array(value)
        if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
            raise GraphError(f"Variable '{self.name}': expected a numeric array, got dtype {arr.dtype}")
        self._value = arr
        self.shape = arr.shape
        self.grad = None
        self.trainable = trainable
        self.requires_grad = trainable
        self.params = None  # the Parameters whose buffers hold this Variable

    @property
    def value(self):
        return self._value

    @value.setter
    def value(self, new):
        new = np.asarray(new)
        if new.shape != self.shape:
            raise GraphError(f"Variable '{self.name}': expected shape {_fmt_shape(self.shape)}, got {_fmt_shape(new.shape)}")
        if self.params is None:
            self._value = np.array(new)
        else:
            self._value[...] = new  # write through the view into the flat buffer

    def grad_buffer(self):
        return self.grad if self.params is not None else super().grad_buffer()


class Parameters:
    """All trainable Variables of a graph in one contiguous value buffer and one gradient buffer.

    ``values`` and ``grads`` are 1-D arrays; each Variable's ``value``/``grad`` is a view into
    them. The order is the topological order of the walk from the loss, which depends only on
    how the graph was built, so every replica computes the same layout. ``grad_storage`` is
    ``grads`` followed by ``tail`` spare slots: the distributed layer puts its per-step counters
    there so that they are summed by the same Allreduce as the gradients.
    """

    tail = 4

    def __init__(self, variables, dtype=DEFAULT_DTYPE):
        self.variables = list(variables)
        self.dtype = np.dtype(dtype)
        sizes = [v.value.size for v in self.variables]
        self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(int)
        n = int(self.offsets[-1])
        self.values = np.empty(n, dtype=self.dtype)
        self.grad_storage = np.zeros(n + self.tail, dtype=self.dtype)
        self.grads = self.grad_storage[:n]
        names = set()
        for i, v in enumerate(self.variables):
            lo, hi = self.offsets[i], self.offsets[i + 1]
            self.values[lo:hi] = np.asarray(v.value, dtype=self.dtype).ravel()
            v._value = self.values[lo:hi].reshape(v.shape)
            v.grad = self.grads[lo:hi].reshape(v.shape)
            v.params = self
            if v.name in names:  # names key checkpoints: make them unique and stable
                v.name = f"{v.name}_{i}"
            names.add(v.name)

    @property
    def size(self):
        return self.values.size

    def use_grad_storage(self, storage):
        """Move the gradients (and the tail) into ``storage``, e.g. a buffer in memory shared
        between ranks, and point every Variable's ``grad`` at it; returns ``storage``."""
        storage = np.asarray(storage)
        if storage.shape != self.grad_storage.shape or storage.dtype != self.dtype:
            raise GraphError(f"gradient storage: expected shape {_fmt_shape(self.grad_storage.shape)} {self.dtype}, "
                             f"got {_fmt_shape(storage.shape)} {storage.dtype}")
        storage[...] = self.grad_storage
        self.grad_storage, self.grads = storage, storage[: self.size]
        for i, v in enumerate(self.variables):
            v.grad = self.grads[self.offsets[i] : self.offsets[i + 1]].reshape(v.shape)
        return storage

    def group_view(self, variable, rows):
        """``variable``'s part of every row of ``rows`` (G x size, the flat layout), as (G, *shape)."""
        i = self.variables.index(variable)
        return rows[:, self.offsets[i]:self.offsets[i + 1]].reshape(rows.shape[0], *variable.shape)

    def named(self):
        """(name, Variable) pairs in buffer order."""
        return [(v.name, v) for v in self.variables]

    def digest(self):
        """A SHA-256 of the values' bytes: equal digests mean bit-identical parameters."""
        return hashlib.sha256(self.values.tobytes()).hexdigest()

    @staticmethod
    def of(variables, dtype):
        """The Parameters holding exactly these Variables, reusing the current one if it fits."""
        current = variables[0].params if variables else None
        if current is not None and current.variables == variables and current.dtype == np.dtype(dtype):
            return current
        return Parameters(variables, dtype)


def _copy_out(value):
    """A fetched value for the caller: ops reuse their output arrays from run to run."""
    return float(value) if np.ndim(value) == 0 else np.array(value)


def topological_order(node):
    """Ancestors of ``node`` (itself included), inputs before consumers, by walking ``last``."""
    order, seen = [], set()
    stack = [(node, False)]
    while stack:
        n, expanded = stack.pop()
        if expanded:
            order.append(n)
            continue
        if id(n) in seen:
            continue
        seen.add(id(n))
        stack.append((n, True))
        for parent in reversed(n.last):  # first input is walked first: the order is stable
            if id(parent) not in seen:
                stack.append((parent, False))
    return order


class Plan:
    """What Session.run needs to evaluate one node: its walk order, feeds and parameters.

    Which input of which op receives the first gradient contribution, and which a second one
    (fan-out), depends only on the walk order, so backward's routing is worked out here once:
    ``routes`` holds, per op in reverse order, one entry per input: None (no gradient), FIRST
    (write into the input's own gradient buffer) or FAN_OUT (write into a scratch buffer of the
    op's, then add it to the input's). An op that nothing downstream of it reaches is left out.
    """

    FIRST, FAN_OUT = 1, 2

    def __init__(self, node):
        self.order = topological_order(node)
        self.placeholders = [n for n in self.order if isinstance(n, Placeholder)]
        self.variables = [n for n in self.order if isinstance(n, Variable) and n.trainable]
        self.ops = [n for n in self.order if not isinstance(n, (Placeholder, Variable))]
        self.forward_calls = [(op, op.last) for op in self.ops]
        reached, self.routes = {id(node)}, []
        for op in reversed(self.ops):
            if not op.requires_grad or id(op) not in reached:
                continue
            kinds = []
            for inp in op.last:
                if not inp.requires_grad:
                    kinds.append(None)
                elif id(inp) not in reached:
                    kinds.append(self.FIRST)
                    reached.add(id(inp))
                else:
                    kinds.append(self.FAN_OUT)
            self.routes.append((op, kinds))
        self.unreached = [v for v in self.variables if id(v) not in reached]
        self.backward_key = self.backward_calls = None  # Session.backward's lookups, per feed shape
        # every op can run grouped and works on rows of the batch (a Variable feeds an op
        # directly, never through an op of its own): then Session.forward(groups=G) applies
        self.groupable = bool(self.ops) and all(op.groupable and op.root is not None for op in self.ops)
        # the fewest rows an op of the plan would rather run at once (Node.chunk_rows), or None
        self.chunk_rows = min((op.chunk_rows for op in self.ops if op.chunk_rows), default=None)
        self.params = None  # the Parameters packing ``variables``, set by Session.plan


class Session:
    """Runs graphs: forward, and backward plus an optimizer step when asked.

    Args:
        dtype: the training dtype of parameters and feeds, float32 by default; float64 for
            gradient checks.
        check_finite: check every feed for NaN and infinity (one pass over the data). A caller
            whose data is finite by construction, like the trainer reading uint8 images, may
            turn it off; shapes and dtypes are checked regardless.
    """

    def __init__(self, dtype=DEFAULT_DTYPE, check_finite=True):
        self.dtype = np.dtype(dtype)
        self.check_finite = check_finite
        if not np.issubdtype(self.dtype, np.floating):
            raise GraphError(f"Session: expected a floating dtype, got {self.dtype}")
        self._plans = {}

    def plan(self, node):
        """The cached Plan for ``node``; its parameters are packed into flat buffers."""
        plan = self._plans.get(id(node))
        if plan is None or plan.order[-1] is not node:
            plan = self._plans[id(node)] = Plan(node)
            for n in plan.order:  # constants take the session's dtype once
                if isinstance(n, Variable) and not n.trainable:
                    n._value = n._value.astype(self.dtype, copy=False)
        plan.params = Parameters.of(plan.variables, self.dtype) if plan.variables else None
        return plan

    def parameters(self, node):
        """The flat Parameters of the graph under ``node`` (a loss or an optimizer)."""
        return self.plan(getattr(node, "loss", node)).params

    def run(self, fetch, feed_dict=None, need_grad=False):
        """Evaluate ``fetch`` and return its value.

        ``fetch`` is a node; or an optimizer, which runs forward, backward and one update and
        returns the loss (a distributed optimizer returns the mean loss over all ranks); or a
        list of them, evaluated in one call against the same parameters (those before the
        update), returning a list. With ``need_grad=True`` the gradient of the (scalar) node
        with respect to every trainable Variable is left in ``Variable.grad``.

        An optimizer may define ``prepare(params)``, called before forward (the distributed
        one broadcasts rank 0's parameters on its first run), and its ``apply_gradients``
        may return the loss to report instead of the node's value. One that defines
        ``run_step(session, plan, feed_dict)`` (not None) runs forward, backward and the update
        itself and returns the loss (the reproducible distributed optimizer: per micro-shard).
        """
        if isinstance(fetch, (list, tuple)):
            return self._run_list(list(fetch), feed_dict, need_grad)
        step = getattr(fetch, "apply_gradients", None)
        node = fetch.loss if step is not None else fetch
        if not isinstance(node, Node):
            raise GraphError(f"Session.run: expected a node, an optimizer or a list of them, got {fetch!r}")
        plan = self.plan(node)
        prepare = getattr(fetch, "prepare", None) if step is not None else None
        if prepare is not None and plan.params is not None:
            prepare(plan.params)
        run_step = getattr(fetch, "run_step", None) if step is not None else None
        if run_step is not None:  # the optimizer runs forward and backward itself (reproducible: per micro-shard)
            return float(run_step(self, plan, feed_dict or {}))
        self.forward(plan, feed_dict or {})
        if step is not None or need_grad:
            self.backward(plan)
        if step is not None:
            reported = step(plan.params)
            if reported is not None:
                return float(reported)
        return _copy_out(node.value)

    def _run_list(self, fetches, feed_dict, need_grad):
        """Session.run of a list: nodes outside the optimizer's graph first, then the step."""
        steps = [f for f in fetches if hasattr(f, "apply_gradients")]
        if len(steps) > 1:
            raise GraphError(f"Session.run: expected at most one optimizer in a list of fetches, got {len(steps)}")
        covered = {id(n) for n in self.plan(steps[0].loss).order} if steps else set()
        results = {}
        for f in fetches:  # forward before the update: every fetch sees the same parameters
            if f not in steps and id(f) not in covered:
                results[id(f)] = self.run(f, feed_dict, need_grad=need_grad and not steps)
        if steps:
            results[id(steps[0])] = self.run(steps[0], feed_dict)
            for f in fetches:
                if id(f) in covered:  # computed by the step's forward, before its update
                    results[id(f)] = _copy_out(f.value)
        return [results[id(f)] for f in fetches]

    def forward(self, plan, feed_dict, groups=None):
        """Feed the placeholders and evaluate every op of ``plan`` in order.

        ``groups``: the fed rows are G equal micro-shards, evaluated stacked (one GEMM call a
        layer for all of them, each micro-shard's rows computed as if alone): the loss's value
        is then one number a micro-shard. Only for a ``plan.groupable`` plan."""
        if groups is not None:
            if not plan.groupable:
                raise GraphError(f"{plan.order[-1]!r}: its graph cannot run micro-shards stacked (an op is not groupable)")
            if not isinstance(groups, (int, np.integer)) or groups < 1:
                raise GraphError(f"{plan.order[-1]!r}: groups must be a positive number of micro-shards, got {groups!r}")
        for op in plan.ops:
            op.groups = None  # until every feed is checked
        for ph in plan.placeholders:
            if ph not in feed_dict:
                raise GraphError(
                    f"placeholder '{ph.name}' of shape {_fmt_shape(ph.shape)} is needed but missing from feed_dict"
                )
            ph.value = ph.feed(feed_dict[ph], self.dtype, self.check_finite)
            if groups is not None and (ph.value.ndim == 0 or len(ph.value) % groups):
                raise GraphError(f"placeholder '{ph.name}': {groups} equal micro-shards need a row count divisible by "
                                 f"{groups}, got shape {_fmt_shape(ph.value.shape)}")
        for op in plan.ops:
            op.groups = groups
        for op, inputs in plan.forward_calls:
            op.value = op.forward(*[n.value for n in inputs])

    def backward(self, plan, into=None):
        """Backpropagate from the scalar last node of ``plan`` into the Variables' ``grad``.

        After a grouped forward (G micro-shards), ``into`` is a (G, parameters) array: row i
        receives micro-shard i's gradient (in the flat buffer's layout), the Variables' ``grad``
        is left alone."""
        out_node = plan.order[-1]
        groups = plan.ops[-1].groups if plan.ops else None
        if groups is None and np.size(out_node.value) != 1:
            raise GraphError(f"{out_node!r}: gradients need a scalar node, got shape {np.shape(out_node.value)}")
        if groups is not None:
            size = plan.params.size if plan.params is not None else 0
            if into is None or into.shape != (groups, size) or into.dtype != self.dtype:
                got = None if into is None else f"{_fmt_shape(into.shape)} {into.dtype}"
                raise GraphError(f"{out_node!r}: a grouped backward needs a {self.dtype} array of shape "
                                 f"({groups}, {size}) for the gradients, got {got}")
        seed, calls = self._backward_calls(plan, into if groups is not None else None)
        seed.fill(1)
        for op, g, outs, fan_outs in calls:
            op.backward(g, outs)
            for acc, scratch in fan_outs:  # an input with several consumers: add this one's share
                acc += scratch
        for v in plan.unreached:  # (a plan without Variables has none)
            if groups is None:
                v.grad[...] = 0
            else:
                plan.params.group_view(v, into)[...] = 0

    @staticmethod
    def _backward_calls(plan, into=None):
        """The arrays each op's backward reads and writes, looked up once per feed shape.

        They depend only on the fed shapes and on where the parameters' gradients live, so a
        training step at a steady batch size reuses the list instead of asking every node for
        its buffers again.
        """
        shapes = tuple(ph.value.shape for ph in plan.placeholders)
        storage = plan.params.grad_storage if plan.params is not None else None
        where = None if into is None else (into.__array_interface__["data"][0], into.shape, into.strides, into.dtype)
        key = plan.backward_key
        if key is not None and key[0] == shapes and key[1] is storage and key[2] == where:
            return plan.backward_calls
        key = (shapes, storage, where)
        fan_out, calls = Plan.FAN_OUT, []

        def grad_of(node):
            if into is not None and isinstance(node, Variable):
                return plan.params.group_view(node, into)
            return node.grad_buffer()

        for op, kinds in plan.routes:
            outs = [None if kind is None else grad_of(inp) for inp, kind in zip(op.last, kinds)]
            fan_outs = []
            for slot, kind in enumerate(kinds):
                if kind == fan_out:  # this input already holds another consumer's gradient
                    scratch = op.buffer(("fan-out", slot), outs[slot].shape, outs[slot].dtype)
                    fan_outs.append((outs[slot], scratch))
                    outs[slot] = scratch
            calls.append((op, op.grad_buffer(), outs, fan_outs))
        plan.backward_key, plan.backward_calls = key, (plan.order[-1].grad_buffer(), calls)
        return plan.backward_calls
