"""The trainer's models: the seed's 784-128-10 MLP and a small LeNet-style CNN, as graphs."""
from dataclasses import dataclass

import numpy as np

from . import activations as act
from . import nn
from .graph import Node, Placeholder, Variable, placeholder
from .losses import SoftmaxCrossEntropy


@dataclass
class Model:
    """A built graph: its input and label placeholders, output probabilities and loss."""

    name: str
    x: Placeholder  # images, shaped as the model wants them
    y: Placeholder  # one-hot labels (n, 10)
    probs: Node  # softmax output (n, 10); set as a by-product of the fused loss
    loss: SoftmaxCrossEntropy

    def input(self, images):
        """Reshape a batch of (n, 28, 28) images to this model's input shape (a view)."""
        return images.reshape((images.shape[0],) + self.x.shape[1:])


def _he(rng, shape, fan_in, name):
    """He-normal initial weights, right for ReLU layers."""
    return Variable(rng.normal(0.0, np.sqrt(2.0 / fan_in), size=shape), name=name)


def _zeros(n, name):
    return Variable(np.zeros(n), name=name)


def mlp(rng, hidden=128):
    """The seed network: 784 -> hidden (ReLU) -> 10 (softmax)."""
    x = placeholder((None, 784), name="images")
    y = placeholder((None, 10), name="labels")
    h = nn.FullConnection(x, _he(rng, (784, hidden), 784, "fc1/W"), _zeros(hidden, "fc1/b"), act.relu, name="fc1")
    p = nn.FullConnection(h, _he(rng, (hidden, 10), hidden, "fc2/W"), _zeros(10, "fc2/b"), act.softmax, name="fc2")
    return Model("mlp", x, y, p, SoftmaxCrossEntropy(p, y, name="loss"))


def cnn(rng, c1=16, c2=32, hidden=128):
    """LeNet-style: conv 5x5 (c1) - pool 2 - conv 5x5 (c2) - pool 2 - fc hidden - fc 10."""
    x = placeholder((None, 1, 28, 28), name="images")
    y = placeholder((None, 10), name="labels")
    h = nn.Conv2D(x, _he(rng, (c1, 1, 5, 5), 25, "conv1/K"), _zeros(c1, "conv1/b"), act.relu, name="conv1")  # (n, c1, 24, 24)
    h = nn.MaxPool(h, 2)  # (n, c1, 12, 12)
    h = nn.Conv2D(h, _he(rng, (c2, c1, 5, 5), 25 * c1, "conv2/K"), _zeros(c2, "conv2/b"), act.relu, name="conv2")  # (n, c2, 8, 8)
    h = nn.MaxPool(h, 2)  # (n, c2, 4, 4)
    h = nn.FullConnection(h, _he(rng, (16 * c2, hidden), 16 * c2, "fc1/W"), _zeros(hidden, "fc1/b"), act.relu, name="fc1")
    p = nn.FullConnection(h, _he(rng, (hidden, 10), hidden, "fc2/W"), _zeros(10, "fc2/b"), act.softmax, name="fc2")
    return Model("cnn", x, y, p, SoftmaxCrossEntropy(p, y, name="loss"))


MODELS = {"mlp": mlp, "cnn": cnn}
