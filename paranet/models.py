"""Models: ``Model`` (a built graph: input, labels, output, loss), the built-in builders ``mlp`` and
``cnn`` that adapt to a dataset's sample shape and class count, and ``load_builder`` for a user's
``--model pkg.module:function`` or ``--model path/to/file.py:function``.

A builder is a function ``build(sample_shape, num_classes, rng=None, **options) -> Model``
(``rng`` is optional: a builder that takes it gets a seeded ``numpy.random.Generator``).
"""
import importlib
import importlib.util
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import activations as act
from . import nn
from .graph import GraphError, Node, Placeholder, Variable, placeholder
from .losses import Loss, SoftmaxCrossEntropy


class ModelError(ValueError):
    """A model could not be found, built or used with the data; the message is one line."""


@dataclass
class Model:
    """A built graph.

    Args:
        x: the input placeholder, (None, ...) with the batch first.
        y: the label placeholder, one-hot (None, num_classes).
        loss: the scalar loss node.
        output: the node whose argmax is the prediction (default: the probabilities of a
            fused ``SoftmaxCrossEntropy``, else the loss's prediction input).
        name: shown in the log.
    """

    x: Placeholder
    y: Placeholder
    loss: Node
    output: Node = None
    name: str = "model"
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.x, Placeholder) or not isinstance(self.y, Placeholder):
            raise ModelError(f"Model: expected placeholders for x and y, got {self.x!r} and {self.y!r}")
        if not isinstance(self.loss, Node):
            raise ModelError(f"Model: expected a loss node, got {self.loss!r}")
        if self.output is None:
            self.output = getattr(self.loss, "probs", None) or (self.loss.last[0] if self.loss.last else self.loss)

    @property
    def probs(self):  # the trainer's older name for ``output``
        return self.output

    def input(self, batch_x):
        """A batch (n, *sample_shape) reshaped (a view) to the input placeholder's shape, when
        the per-sample sizes agree (e.g. (n, 28, 28) -> (n, 784) or (n, 1, 28, 28))."""
        want = self.x.shape[1:]
        if tuple(batch_x.shape[1:]) == tuple(want) or None in want:
            return batch_x
        return batch_x.reshape((batch_x.shape[0],) + tuple(want))

    def check_data(self, sample_shape, num_classes):
        """Raise ModelError unless samples of ``sample_shape`` and ``num_classes`` labels fit."""
        want = tuple(self.x.shape[1:])
        if None not in want and math.prod(want) != math.prod(sample_shape):
            raise ModelError(f"model '{self.name}': input '{self.x.name}' expects samples of shape {want}, "
                             f"the data has {tuple(sample_shape)}")
        classes = self.y.shape[-1] if self.y.shape else None
        if classes is not None and classes != num_classes:
            raise ModelError(f"model '{self.name}': labels '{self.y.name}' expect {classes} classes, "
                             f"the data has {num_classes}")


def as_model(obj):
    """A Model from a Model or a tuple (x, y, loss[, output])."""
    if isinstance(obj, Model):
        return obj
    if isinstance(obj, (tuple, list)) and len(obj) in (3, 4):
        return Model(*obj)
    raise ModelError(f"expected a paranet.Model or a tuple (x, y, loss[, output]), got {type(obj).__name__}")


def _he(rng, shape, fan_in, name):
    """He-normal initial weights, right for ReLU layers."""
    return Variable(rng.normal(0.0, np.sqrt(2.0 / fan_in), size=shape), name=name)


def _zeros(n, name):
    return Variable(np.zeros(n), name=name)


def mlp(sample_shape=(28, 28), num_classes=10, rng=None, hidden=(128,)):
    """Fully connected: the flattened sample -> hidden layers (ReLU) -> num_classes (softmax).
    The default is the seed network, 784-128-10."""
    rng = np.random.default_rng(0) if rng is None else rng
    hidden = (hidden,) if isinstance(hidden, int) else tuple(hidden)
    k = math.prod(sample_shape)
    x = placeholder((None, k), name="images")
    y = placeholder((None, num_classes), name="labels")
    h, fan_in = x, k
    for i, width in enumerate(hidden, start=1):
        h = nn.FullConnection(h, _he(rng, (fan_in, width), fan_in, f"fc{i}/W"), _zeros(width, f"fc{i}/b"), act.relu,
                              name=f"fc{i}")
        fan_in = width
    last = len(hidden) + 1
    p = nn.FullConnection(h, _he(rng, (fan_in, num_classes), fan_in, f"fc{last}/W"), _zeros(num_classes, f"fc{last}/b"),
                          act.softmax, name=f"fc{last}")
    return Model(x, y, SoftmaxCrossEntropy(p, y, name="loss"), name="mlp",
                 options={"hidden": list(hidden)})


def cnn(sample_shape=(28, 28), num_classes=10, rng=None, channels=(16, 32), hidden=128):
    """LeNet-style: [conv 5x5 - ReLU - max-pool 2] per entry of ``channels`` - fc hidden - fc classes.

    Samples are images: (H, W) (one channel) or (C, H, W) (channels first)."""
    rng = np.random.default_rng(0) if rng is None else rng
    if len(sample_shape) == 2:
        c, hgt, wid = 1, *sample_shape
    elif len(sample_shape) == 3:
        c, hgt, wid = sample_shape
    else:
        raise ModelError(f"model 'cnn': expected image samples (H, W) or (C, H, W), the data has {tuple(sample_shape)}")
    hidden = hidden[0] if isinstance(hidden, (tuple, list)) else hidden
    x = placeholder((None, c, hgt, wid), name="images")
    y = placeholder((None, num_classes), name="labels")
    h = x
    for i, out in enumerate(channels, start=1):
        if h.shape[2] < 5 or h.shape[3] < 5:
            raise ModelError(f"model 'cnn': samples {tuple(sample_shape)} are too small for {len(channels)} "
                             f"conv 5x5 + pool 2 blocks")
        h = nn.Conv2D(h, _he(rng, (out, c, 5, 5), 25 * c, f"conv{i}/K"), _zeros(out, f"conv{i}/b"), act.relu,
                      name=f"conv{i}")
        h = nn.MaxPool(h, 2)
        c = out
    k = math.prod(h.shape[1:])
    h = nn.FullConnection(h, _he(rng, (k, hidden), k, "fc1/W"), _zeros(hidden, "fc1/b"), act.relu, name="fc1")
    p = nn.FullConnection(h, _he(rng, (hidden, num_classes), hidden, "fc2/W"), _zeros(num_classes, "fc2/b"),
                          act.softmax, name="fc2")
    return Model(x, y, SoftmaxCrossEntropy(p, y, name="loss"), name="cnn",
                 options={"channels": list(channels), "hidden": hidden})


MODELS = {"mlp": mlp, "cnn": cnn}


def load_builder(spec):
    """The builder named by ``spec``: "mlp", "cnn", "pkg.module:function" or "path/file.py:function"."""
    if spec in MODELS:
        return MODELS[spec]
    if ":" not in spec:
        raise ModelError(f"--model {spec}: expected mlp, cnn, pkg.module:function or path/to/file.py:function")
    where, _, name = spec.rpartition(":")
    try:
        if where.endswith(".py") or "/" in where:
            path = Path(where)
            if not path.is_file():
                raise ModelError(f"--model {spec}: no such file {path}")
            mod_spec = importlib.util.spec_from_file_location(f"paranet_user_model_{path.stem}", path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ModelError:
        raise
    except Exception as e:  # the user's module failed to import: one line, the cause named
        raise ModelError(f"--model {spec}: cannot import {where}: {type(e).__name__}: {e}") from None
    builder = getattr(module, name, None)
    if not callable(builder):
        raise ModelError(f"--model {spec}: {where} has no function {name!r}")
    return builder


def build_model(builder, sample_shape, num_classes, rng, name=None, **options):
    """Call ``builder`` for the data and check what it returns; errors are one-line ModelErrors."""
    label = name or getattr(builder, "__name__", "model")
    try:
        params = inspect.signature(builder).parameters
        kwargs = dict(options)
        if "rng" in params or any(p.kind == p.VAR_KEYWORD for p in params.values()):
            kwargs["rng"] = rng
        model = builder(tuple(sample_shape), int(num_classes), **kwargs)
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(f"model '{label}': the builder failed: {type(e).__name__}: {' '.join(str(e).split())}") from None
    model = as_model(model)
    if model.name == "model":
        model.name = label
    if not isinstance(model.loss, Loss) and np.ndim(getattr(model.loss, "shape", ())) and model.loss.shape != ():
        raise ModelError(f"model '{label}': expected a scalar loss, got {model.loss!r}")
    model.check_data(sample_shape, num_classes)
    return model


__all__ = ["Model", "ModelError", "MODELS", "as_model", "build_model", "cnn", "load_builder", "mlp", "GraphError"]
