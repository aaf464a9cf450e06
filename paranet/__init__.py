"""paranet: a pointer-linked TF1-style graph engine in numpy, trained data-parallel with MPI.

    import paranet as pn
    xs = pn.placeholder((None, 784)); ys = pn.placeholder((None, 10))
    h = pn.nn.FullConnection(xs, pn.Variable(W), pn.Variable(b), pn.softmax)
    loss = pn.SoftmaxCrossEntropy(h, ys)
    pn.Session().run(pn.train.GradientDescentOptimizer(0.1, loss), {xs: X, ys: Y})
"""
from . import nn, train
from .activations import Line, relu, sigmoid, softmax
from .graph import GraphError, Node, Parameters, Session, Variable, placeholder
from .losses import MeanSquareLoss, SoftmaxCrossEntropy
from .ops import add, cos, exp, log, matmul, sin, square

__version__ = "0.1.0"
__all__ = [
    "GraphError", "Line", "MeanSquareLoss", "Node", "Parameters", "Session", "SoftmaxCrossEntropy",
    "Variable", "add", "cos", "exp", "log", "matmul", "nn", "placeholder", "relu", "sigmoid",
    "sin", "softmax", "square", "train",
]
