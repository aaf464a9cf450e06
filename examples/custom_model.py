"""Your own network on your own data, trained by paranet's loop, data-parallel:

    mpirun -n 2 python examples/custom_model.py --data spirals.h5

The data: three interleaved spirals in the plane (float features, 3 classes), written once by
rank 0 with ``paranet.data.write_dataset`` (any arrays you hold work the same way). The model:
a graph of your own, two hidden layers of sigmoid units, returned as a ``paranet.Model``.
``paranet.fit`` does the rest: each rank reads its shard of every batch from the HDF5 file,
the gradients are summed over the ranks, and rank 0 logs, checkpoints and writes the CSV.
"""
import argparse
from pathlib import Path

import numpy as np

import paranet as pn
from paranet.callbacks import CSVLogger, EarlyStopping


def spirals(n, rng, classes=3):
    """n points on `classes` noisy spiral arms: X (n, 2) float32, y (n,) int."""
    y = rng.integers(classes, size=n)
    r = rng.uniform(0.1, 1.0, size=n)
    angle = 2 * np.pi * y / classes + 3.0 * r + rng.normal(0, 0.12, size=n)
    return np.stack([r * np.cos(angle), r * np.sin(angle)], axis=1).astype(np.float32), y


def build(sample_shape, num_classes, rng):
    """The user's graph: features -> 64 sigmoid -> 64 sigmoid -> softmax."""
    k = int(np.prod(sample_shape))
    x = pn.placeholder((None, k), name="points")
    y = pn.placeholder((None, num_classes), name="labels")
    h = x
    for i, (n_in, n_out) in enumerate([(k, 64), (64, 64)]):
        W = pn.Variable(rng.normal(0, np.sqrt(1 / n_in), (n_in, n_out)), name=f"hidden{i}/W")
        h = pn.nn.FullConnection(h, W, pn.Variable(np.zeros(n_out), name=f"hidden{i}/b"), pn.sigmoid)
    W = pn.Variable(rng.normal(0, 0.1, (64, num_classes)), name="out/W")
    p = pn.nn.FullConnection(h, W, pn.Variable(np.zeros(num_classes), name="out/b"), pn.softmax)
    return pn.Model(x, y, pn.SoftmaxCrossEntropy(p, y), name="spirals-mlp")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("runs/spirals.h5"))
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path("runs/spirals"), help="folder for the checkpoint and the CSV")
    args = ap.parse_args()

    world = pn.distributed.init()
    if world.rank == 0 and not args.data.exists():
        rng = np.random.default_rng(1)
        pn.data.write_dataset(args.data, train=spirals(6000, rng), val=spirals(1000, rng), test=spirals(1000, rng))
    world.barrier()  # the file is whole before any rank opens it

    model = build((2,), 3, np.random.default_rng(0))
    metrics = pn.fit(model, args.data, pn.train.AdamOptimizer(0.01, model.loss), batch_size=64, epochs=args.epochs,
                     checkpoint=args.out / "ckpt.h5", callbacks=[CSVLogger(args.out / "log.csv"),
                                                                EarlyStopping("val_loss", patience=5)])
    if world.rank == 0:
        print(f"spirals: test accuracy {100 * metrics['test_accuracy']:.1f}% after {metrics['steps']} steps")


if __name__ == "__main__":
    main()
