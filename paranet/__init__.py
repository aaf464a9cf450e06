"""paranet: a pointer-linked TF1-style graph engine in numpy, trained data-parallel with MPI.

    import paranet as pn
    xs = pn.placeholder((None, 784)); ys = pn.placeholder((None, 10))
    h = pn.nn.FullConnection(xs, pn.Variable(W), pn.Variable(b), pn.softmax)
    loss = pn.SoftmaxCrossEntropy(h, ys)
    pn.Session().run(pn.train.GradientDescentOptimizer(0.1, loss), {xs: X, ys: Y})

Data parallelism (``pn.distributed.init()``, ``pn.DistributedOptimizer``), the training loop
(``pn.Trainer``, ``pn.fit``, ``pn.callbacks``) and the data layer (``pn.data``) load on first
use, so ``import paranet`` needs neither mpi4py nor h5py.
"""
import importlib
import signal as _signal
import sys as _sys

# The trainer's command line records a SIGTERM from its very first moment, before numpy and the
# rest load (about 0.4 s): paranet.trainer.Trainer.fit then stops cleanly before its first
# step. Only for `python -m paranet.train` and `paranet-train`; a library user's signals are
# left alone.
_early_sigterm = [False]  # False, or the name of the stop signal that came


def _record_sigterm(signum, frame):
    _early_sigterm[0] = _signal.Signals(signum).name


def _is_trainer_cli(orig_argv, argv):
    """True when this process is ``python [options] -m paranet.train`` or ``paranet-train``."""
    for i, arg in enumerate(orig_argv[1:-1], start=1):
        if arg == "-m":
            return orig_argv[i + 1] == "paranet.train"
    return bool(argv) and argv[0].endswith("paranet-train")


if _is_trainer_cli(getattr(_sys, "orig_argv", []), _sys.argv):
    for _stop in (_signal.SIGTERM, _signal.SIGUSR1):  # paranet.trainer.STOP_SIGNALS
        _signal.signal(_stop, _record_sigterm)

from . import nn, train  # noqa: E402
from .activations import Line, relu, sigmoid, softmax
from .graph import GraphError, Node, Parameters, Session, Variable, placeholder
from .losses import MeanSquareLoss, SoftmaxCrossEntropy
from .ops import add, cos, exp, log, matmul, sin, square

__version__ = "0.1.0"

# name -> (module, attribute or None for the module itself), imported on first use
_LAZY = {
    "distributed": ("paranet.distributed", None),
    "DistributedOptimizer": ("paranet.distributed", "DistributedOptimizer"),
    "init": ("paranet.distributed", "init"),
    "data": ("paranet.data", None),
    "callbacks": ("paranet.callbacks", None),
    "models": ("paranet.models", None),
    "Model": ("paranet.models", "Model"),
    "Trainer": ("paranet.trainer", "Trainer"),
    "fit": ("paranet.trainer", "fit"),
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'paranet' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = importlib.import_module(module)
    return value if attr is None else getattr(value, attr)


def __dir__():  # the lazy names too, for dir(paranet) and tab completion
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "DistributedOptimizer", "GraphError", "Line", "MeanSquareLoss", "Model", "Node", "Parameters", "Session",
    "SoftmaxCrossEntropy", "Trainer", "Variable", "add", "callbacks", "cos", "data", "distributed", "exp", "fit",
    "init", "log", "matmul", "models", "nn", "placeholder", "relu", "sigmoid", "sin", "softmax", "square", "train",
]
