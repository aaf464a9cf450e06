"""The blog's MNIST example on paranet's engine: a 784-128-10 network, plain SGD, one process.

seed_mnist_distributed.py is this script with the lines marked "# paranet:" changed: run it
under `mpirun -n 4` and every rank trains on its shard of each batch, the replicas identical.
The learning rate is 0.5, not the blog's 1e-4: paranet's loss is the batch mean (the blog's
was a sum), and at 1e-4 the mean barely trains in a few hundred steps.
"""
import argparse
import gzip
from pathlib import Path

import numpy as np

import paranet as pn

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--steps", type=int, default=600)
p.add_argument("--batch-size", type=int, default=100)
p.add_argument("--lr", type=float, default=0.5)
p.add_argument("--seed", type=int, default=None, help="the initial weights (default: new ones every run)")
p.add_argument("--order-seed", type=int, default=0, help="the batch order (the same on every rank)")
p.add_argument("--dtype", default="float32")
p.add_argument("--save", default=None, help=".npz of the final parameters")
args = p.parse_args()


def idx(name, header):  # an IDX file: a big-endian header, then the uint8 data
    with gzip.open(Path(__file__).resolve().parents[1] / "datasets" / "mnist" / f"{name}.gz") as f:
        return np.frombuffer(f.read(), np.uint8, offset=header)


X = idx("train-images-idx3-ubyte", 16).reshape(-1, 784) / 255.0
Y = np.eye(10)[idx("train-labels-idx1-ubyte", 8)]
X_test, y_test = idx("t10k-images-idx3-ubyte", 16).reshape(-1, 784) / 255.0, idx("t10k-labels-idx1-ubyte", 8)

rng = np.random.default_rng(args.seed)
xs = pn.placeholder((None, 784), name="xs"); ys = pn.placeholder((None, 10), name="ys")
W1 = pn.Variable(rng.normal(0, 0.05, (784, 128)), name="W1"); b1 = pn.Variable(np.zeros(128), name="b1")
W2 = pn.Variable(rng.normal(0, 0.05, (128, 10)), name="W2"); b2 = pn.Variable(np.zeros(10), name="b2")
h1 = pn.nn.FullConnection(xs, W1, b1, pn.relu)
h2 = pn.nn.FullConnection(h1, W2, b2, pn.softmax)
loss = pn.SoftmaxCrossEntropy(h2, ys)
sess = pn.Session(np.dtype(args.dtype))
train = pn.train.GradientDescentOptimizer(args.lr, loss)
log = print

order = np.random.default_rng(args.order_seed).permutation(len(X))
for step in range(args.steps):
    batch = order[(step * args.batch_size) % len(X):][:args.batch_size]
    value = sess.run(train, {xs: X[batch], ys: Y[batch]})
    if step % 100 == 0 or step == args.steps - 1:
        log(f"step {step:4d}  loss {value:.4f}")

accuracy = np.mean(sess.run(h2, {xs: X_test}).argmax(axis=1) == y_test)
log(f"test accuracy {100 * accuracy:.2f}%")
if args.save:
    np.savez(args.save, W1=W1.value, b1=b1.value, W2=W2.value, b2=b2.value)
