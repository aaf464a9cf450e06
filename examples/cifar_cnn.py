"""A small CNN on 3x32x32 colour images (CIFAR-10's format), data-parallel:

    python -m paranet.data cifar10 --out cifar10.h5            # the real data (a download)
    mpirun -n 2 python examples/cifar_cnn.py --data cifar10.h5

Without --data it writes a small stand-in first: 5 classes of 3x32x32 uint8 images, each
class a colour and a stripe direction (classes 0 and 1 share a colour, as do 2 and 3, so the
colour alone gets at most 60% right), so the example runs offline in seconds. ``build`` is
also a builder for the trainer: ``python -m paranet.train --model examples/cifar_cnn.py:build``.
"""
import argparse
from pathlib import Path

import numpy as np

import paranet as pn


def stand_in(n, rng, classes=5):
    """n images (n, 3, 32, 32) uint8 and labels: class c is colour c // 2 with stripes of direction c % 2."""
    y = rng.integers(classes, size=n)
    colours = np.array([[220, 40, 40], [40, 200, 40], [40, 40, 220]], float)[np.arange(classes) // 2]
    ii, jj = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    stripes = np.where(y[:, None, None] % 2 == 0, (ii[None] // 4) % 2, (jj[None] // 4) % 2)  # (n, 32, 32)
    images = colours[y][:, :, None, None] * (0.5 + 0.5 * stripes[:, None]) + rng.normal(0, 20, (n, 3, 32, 32))
    return np.clip(images, 0, 255).astype(np.uint8), y


def build(sample_shape, num_classes, rng):
    """conv 5x5 (8) - ReLU - pool 2 - conv 5x5 (16) - ReLU - pool 2 - fc 64 - ReLU - softmax."""
    c, h, w = sample_shape
    x = pn.placeholder((None, c, h, w), name="images")
    y = pn.placeholder((None, num_classes), name="labels")

    def he(shape, fan_in, name):
        return pn.Variable(rng.normal(0, np.sqrt(2 / fan_in), shape), name=name)

    z = pn.nn.MaxPool(pn.nn.Conv2D(x, he((8, c, 5, 5), 25 * c, "conv1/K"), pn.Variable(np.zeros(8), name="conv1/b"),
                                   pn.relu), 2)
    z = pn.nn.MaxPool(pn.nn.Conv2D(z, he((16, 8, 5, 5), 200, "conv2/K"), pn.Variable(np.zeros(16), name="conv2/b"),
                                   pn.relu), 2)
    k = int(np.prod(z.shape[1:]))
    z = pn.nn.FullConnection(z, he((k, 64), k, "fc1/W"), pn.Variable(np.zeros(64), name="fc1/b"), pn.relu)
    p = pn.nn.FullConnection(z, he((64, num_classes), 64, "fc2/W"), pn.Variable(np.zeros(num_classes), name="fc2/b"),
                             pn.softmax)
    return pn.Model(x, y, pn.SoftmaxCrossEntropy(p, y), name="small-cnn")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None, help="a paranet HDF5 file of 3x32x32 images")
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()

    world = pn.distributed.init()
    data = args.data or Path("runs/colour-stripes.h5")
    if args.data is None and world.rank == 0 and not data.exists():
        rng = np.random.default_rng(2)
        pn.data.write_dataset(data, train=stand_in(2000, rng), val=stand_in(300, rng), test=stand_in(300, rng))
    world.barrier()

    with pn.data.BatchReader(data, "train", prefetch=False) as r:  # the model adapts to the data
        shape, classes = r.sample_shape, r.num_classes
    model = build(shape, classes, np.random.default_rng(0))
    metrics = pn.fit(model, data, pn.train.AdamOptimizer(2e-3, model.loss), batch_size=64, epochs=args.epochs)
    if world.rank == 0:
        print(f"{data.name}: test accuracy {100 * metrics['test_accuracy']:.1f}%")


if __name__ == "__main__":
    main()
