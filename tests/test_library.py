"""paranet as a library: init/World, DistributedOptimizer through Session.run, the examples, the
Trainer with callbacks, and the user's own model and data through the CLI. Real mpiexec throughout."""
import csv
import difflib
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import paranet as pn
from launch import MPIEXEC, REPO, env, load_params, max_abs_diff, run_train

EXAMPLES = REPO / "examples"


def run(cmd, timeout=120, check=True, **extra_env):
    proc = subprocess.run([str(c) for c in cmd], cwd=REPO, env=env(**extra_env), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def mpi(nprocs, *args):
    return [MPIEXEC, "-n", nprocs, sys.executable, *args]


def script(tmp_path, text, name="user.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# -- 1. a single-process script becomes data-parallel in a few lines ---------------------------

def test_distributed_example_differs_from_the_seed_script_in_at_most_5_lines():
    seed = (EXAMPLES / "seed_mnist.py").read_text().splitlines()
    dist = (EXAMPLES / "seed_mnist_distributed.py").read_text().splitlines()
    diff = [d for d in difflib.unified_diff(seed, dist, lineterm="", n=0) if not d.startswith(("+++", "---", "@@"))]
    added, removed = [d for d in diff if d.startswith("+")], [d for d in diff if d.startswith("-")]
    assert 0 < len(added) <= 5 and len(removed) <= 5, diff
    assert all("# paranet:" in line for line in added)  # every distributed line is marked, as Horovod's are


@pytest.fixture(scope="module")
def seed_params(tmp_path_factory):
    """The single-process origin script: 30 steps of float64 SGD from seed 0."""
    out = tmp_path_factory.mktemp("seed") / "p.npz"
    run([sys.executable, EXAMPLES / "seed_mnist.py", "--steps", 30, "--dtype", "float64", "--seed", 0,
         "--save", out])
    return load_params(out)


@pytest.mark.mpi
@pytest.mark.parametrize("nprocs", [1, 2, 3, 4])
def test_distributed_example_reaches_the_single_process_parameters_from_different_weights(nprocs, tmp_path,
                                                                                         seed_params):
    """Rank r starts from seed 0 (rank 0) or seed 100 + r: only the broadcast of rank 0's weights
    can make the result equal the one-process run. Batch 100 splits unevenly at P = 3 and 4."""
    out = tmp_path / "p.npz"
    common = ["--steps", 30, "--dtype", "float64"]
    cmd = [MPIEXEC, "-n", 1, sys.executable, EXAMPLES / "seed_mnist_distributed.py", *common, "--seed", 0,
           "--save", out]
    for r in range(1, nprocs):
        cmd += [":", "-n", 1, sys.executable, EXAMPLES / "seed_mnist_distributed.py", *common, "--seed", 100 + r]
    proc = run(cmd)
    assert proc.stdout.count("test accuracy") == 1  # only rank 0 prints
    assert max_abs_diff(load_params(out), seed_params) <= 1e-10


def test_without_the_broadcast_the_ranks_would_differ(seed_params, tmp_path):
    """The guard of the test above: another seed really gives other weights."""
    out = tmp_path / "p.npz"
    run([sys.executable, EXAMPLES / "seed_mnist.py", "--steps", 30, "--dtype", "float64", "--seed", 101, "--save", out])
    assert max_abs_diff(load_params(out), seed_params) > 1e-3


USER_STEP = """
    import sys
    import numpy as np
    import paranet as pn

    world = pn.distributed.init()
    rng = np.random.default_rng(world.rank)            # every rank its own initial weights
    X = np.random.default_rng(7).normal(size=(GLOBAL, 6)); Y = np.eye(3)[np.arange(GLOBAL) % 3]
    xs = pn.placeholder((None, 6)); ys = pn.placeholder((None, 3))
    W = pn.Variable(rng.normal(size=(6, 3))); b = pn.Variable(np.zeros(3))
    loss = pn.SoftmaxCrossEntropy(pn.nn.FullConnection(xs, W, b, pn.softmax), ys)
    sess = pn.Session(np.float64)
    train = pn.DistributedOptimizer(pn.train.AdamOptimizer(0.1, loss))
    losses = [sess.run(train, {xs: world.shard(X), ys: world.shard(Y)}) for _ in range(5)]
    assert len(world.shard(X)) == len(np.array_split(X, world.size)[world.rank])
    if world.rank == 0:
        np.savez(sys.argv[1], W=W.value, b=b.value, losses=np.array(losses), m=train.optimizer.state["m"])
"""


@pytest.mark.mpi
@pytest.mark.parametrize("global_batch", [3, 7])
def test_a_rank_with_zero_rows_neither_crashes_nor_hangs(global_batch, tmp_path):
    """Batch 3 at P = 4 leaves rank 3 without rows every step; batch 7 splits 2+2+2+1. Adam's
    state, the parameters and the returned (global) losses equal one process on the whole batch."""
    user = script(tmp_path, USER_STEP.replace("GLOBAL", str(global_batch)))
    run([sys.executable, user, tmp_path / "one.npz"])
    run(mpi(4, user, tmp_path / "four.npz"), timeout=60)
    one, four = load_params(tmp_path / "one.npz"), load_params(tmp_path / "four.npz")
    assert max_abs_diff(one, four) <= 1e-12
    assert one["losses"][0] > one["losses"][-1]  # it trained


WORLD = """
    import json, sys
    import numpy as np
    import paranet as pn
    from threadpoolctl import threadpool_info

    world = pn.distributed.init()
    out = {"rank": world.rank, "size": world.size, "local_rank": world.local_rank, "local_size": world.local_size,
           "sum": world.allreduce(world.rank), "mean": world.mean(float(world.rank)),
           "vec": world.allreduce(np.arange(3) * (world.rank + 1)).tolist(),
           "shard": world.shard(np.arange(10)).tolist(),
           "threads": [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"],
           "blas": world.blas.describe()}
    rows = world.gather_object(out)  # one writer: the ranks' own prints could run together
    if world.rank == 0:
        print(json.dumps(rows))
"""


@pytest.mark.mpi
def test_world_collectives_and_shard_under_mpiexec(tmp_path):
    user = script(tmp_path, WORLD)
    proc = run(mpi(3, user), OMP_NUM_THREADS="2", OPENBLAS_NUM_THREADS="2", MKL_NUM_THREADS="2")
    rows = json.loads(proc.stdout)
    assert [r["rank"] for r in rows] == [0, 1, 2] and {r["size"] for r in rows} == {3}
    assert sorted(r["local_rank"] for r in rows) == [0, 1, 2] and {r["local_size"] for r in rows} == {3}
    for r in rows:
        assert r["sum"] == 0 + 1 + 2 and r["mean"] == 1.0
        assert r["vec"] == [0, 6, 12]  # (1 + 2 + 3) * [0, 1, 2]
        assert r["shard"] == np.array_split(np.arange(10), 3)[r["rank"]].tolist()
        assert r["threads"] == [2] and "_NUM_THREADS=2" in r["blas"]  # the user's setting wins


def test_init_without_mpi4py_or_a_launcher_is_a_world_of_one(tmp_path):
    user = script(tmp_path, """
        import sys, warnings
        sys.modules["mpi4py"] = None              # as if mpi4py were not installed
        warnings.simplefilter("ignore")
        import numpy as np, paranet as pn
        world = pn.distributed.init()
        x = pn.placeholder((None, 2)); y = pn.placeholder((None, 2))
        loss = pn.MeanSquareLoss(pn.nn.FullConnection(x, pn.Variable(np.ones((2, 2))), pn.Variable(np.zeros(2))), y)
        value = pn.Session(np.float64).run(pn.DistributedOptimizer(pn.train.GradientDescentOptimizer(0.1, loss)),
                                           {x: np.ones((4, 2)), y: np.zeros((4, 2))})
        print(world.size, world.rank, world.local_size, world.shard([1, 2, 3]).tolist(), world.allreduce(5), value)
    """)
    proc = run([sys.executable, user])
    assert proc.stdout.split() == ["1", "0", "1", "[1,", "2,", "3]", "5", "2.0"]  # 0.5 * mean((2)^2) = 2


# -- the engine: empty batches, lists of fetches, names ---------------------------------------

def _every_layer(batch):
    rng = np.random.default_rng(0)
    x = pn.placeholder((None, 2, 8, 8)); y = pn.placeholder((None, 3))
    h = pn.nn.MaxPool(pn.nn.Conv2D(x, pn.Variable(rng.normal(size=(4, 2, 3, 3))), pn.Variable(np.zeros(4)), pn.relu,
                                   padding=1), 2)
    h = pn.sigmoid(pn.exp(pn.sin(pn.cos(pn.square(h)))))
    out = pn.nn.FullConnection(h, pn.Variable(rng.normal(size=(64, 3))), pn.Variable(np.zeros(3)), pn.softmax)
    losses = [pn.SoftmaxCrossEntropy(out, y), pn.MeanSquareLoss(out, y),
              pn.SoftmaxCrossEntropy(pn.nn.FullConnection(h, pn.Variable(rng.normal(size=(64, 3))),
                                                          pn.Variable(np.zeros(3)), pn.sigmoid), y)]
    feed = {x: rng.normal(size=(batch, 2, 8, 8)), y: np.eye(3)[np.arange(batch) % 3]}
    return losses, out, feed


def test_every_op_accepts_an_empty_batch():
    losses, out, feed = _every_layer(0)
    sess = pn.Session(np.float64)
    assert sess.run(out, feed).shape == (0, 3)
    for loss in losses:
        assert sess.run(loss, feed, need_grad=True) == 0.0
        for v in sess.parameters(loss).variables:
            assert v.grad.shape == v.shape and not np.any(v.grad)


def test_run_of_a_list_sees_the_parameters_before_the_update():
    losses, out, feed = _every_layer(5)
    sess = pn.Session(np.float64)
    loss = losses[0]
    before_loss, before_out = sess.run(loss, feed), sess.run(out, feed)
    train = pn.train.GradientDescentOptimizer(0.5, loss)
    got_out, got_step, got_loss = sess.run([out, train, loss], feed)
    assert got_step == got_loss == before_loss and np.array_equal(got_out, before_out)
    assert sess.run(loss, feed) < before_loss  # and the update happened once


def test_default_placeholder_names_are_unique():
    names = {pn.placeholder((None, 2)).name for _ in range(5)}
    assert len(names) == 5


# -- 2 and 3: the loop as a library, the user's model and data through the CLI ----------------

@pytest.fixture(scope="module")
def colour_h5(tmp_path_factory):
    """3x32x32 uint8 colour images, 5 classes, written by write_dataset (the examples' stand-in)."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        import cifar_cnn
    finally:
        sys.path.pop(0)
    rng = np.random.default_rng(3)
    path = tmp_path_factory.mktemp("colour") / "colour.h5"
    pn.data.write_dataset(path, train=cifar_cnn.stand_in(600, rng), val=cifar_cnn.stand_in(100, rng),
                          test=cifar_cnn.stand_in(100, rng))
    return path


@pytest.mark.mpi
@pytest.mark.parametrize("model", ["mlp", "cnn", "examples/cifar_cnn.py:build"])
def test_colour_images_with_5_classes_train_through_the_cli(model, colour_h5, tmp_path):
    proc = run_train(2, "--data", colour_h5, "--model", model, "--epochs", 2, "--batch-size", 50,
                     "--checkpoint", tmp_path / "ck.h5", "--metrics", tmp_path / "m.json", "--hidden", "32")
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert "samples 3x32x32, 5 classes" in proc.stdout
    # 5 classes: chance is 0.2, the colour alone 0.6; above that the stripes were learned
    assert metrics["world_size"] == 2 and metrics["test_accuracy"] > 0.75


def test_the_builtin_models_adapt_to_the_data():
    mlp = pn.models.mlp((3, 32, 32), 5, np.random.default_rng(0), hidden=[16, 8])
    assert [v.shape for v in pn.Session().parameters(mlp.loss).variables] == [(3072, 16), (16,), (16, 8), (8,),
                                                                               (8, 5), (5,)]
    cnn = pn.models.cnn((3, 32, 32), 5, np.random.default_rng(0))
    shapes = [v.shape for v in pn.Session().parameters(cnn.loss).variables]
    assert shapes[0] == (16, 3, 5, 5) and shapes[4] == (32 * 5 * 5, 128) and shapes[-1] == (5,)


@pytest.mark.parametrize("spec, message", [
    ("resnet", "--model resnet: expected one of cnn, mlp"),
    ("nowhere/model.py:build", "--model nowhere/model.py:build: no such file"),
    ("examples/cifar_cnn.py:nothing", "has no function 'nothing'"),
    ("BROKEN", "model 'broken': the builder failed: RuntimeError: boom"),
    ("WRONG_CLASSES", "labels 'labels' expect 7 classes, the data has 10"),
])
def test_a_bad_model_is_one_line_and_exit_2(spec, message, tmp_path, mnist_h5):
    user = script(tmp_path, """
        import numpy as np, paranet as pn
        def broken(sample_shape, num_classes):
            raise RuntimeError("boom")
        def wrong(sample_shape, num_classes):
            return pn.models.mlp(sample_shape, 7)
    """, "mine.py")
    spec = spec.replace("BROKEN", f"{user}:broken").replace("WRONG_CLASSES", f"{user}:wrong")
    proc = run_train(2, "--data", mnist_h5, "--model", spec, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert message in lines[-1] and (len(lines) == 1 or lines[0].startswith("usage:")), proc.stderr  # argparse: usage first


@pytest.mark.mpi
def test_custom_model_example_trains_with_callbacks(tmp_path):
    proc = run(mpi(2, EXAMPLES / "custom_model.py", "--data", tmp_path / "spirals.h5", "--epochs", 6,
                   "--out", tmp_path / "run"))
    assert proc.stdout.count("spirals: test accuracy") == 1
    accuracy = float(proc.stdout.split("spirals: test accuracy ")[1].split("%")[0])
    assert accuracy > 60  # three classes: chance is 33%
    rows = list(csv.DictReader((tmp_path / "run" / "log.csv").open()))
    assert [int(r["epoch"]) for r in rows] == list(range(1, len(rows) + 1)) and len(rows) >= 2


def test_the_readmes_table_of_fit_keywords_matches_the_trainer():
    """Each keyword the README's table names is one of Trainer's, with the default it states."""
    import inspect

    signature = inspect.signature(pn.Trainer.__init__).parameters
    text = (REPO / "README.md").read_text()
    table = text.split("| keyword | default | what |")[1].split("\n\n")[0]
    rows = [line.split("|")[1:3] for line in table.strip().splitlines()[1:]]
    special = {"on a terminal": None, "float32": np.float32, "()": (), '"auto"': "auto"}
    seen = 0
    for names, defaults in rows:
        names = [n.strip(" `") for n in names.split(",")]
        defaults = [d.strip() for d in defaults.split(", ")] if "," in defaults else [defaults.strip()] * len(names)
        assert len(defaults) == len(names), (names, defaults)
        for name, default in zip(names, defaults):
            want = special[default] if default in special else {"None": None, "False": False, "True": True}.get(
                default, default)
            want = int(want) if isinstance(want, str) and want.isdigit() else want
            assert name in signature and signature[name].default == want, (name, default)
            seen += 1
    assert seen >= 20


@pytest.mark.mpi
def test_fit_refuses_a_model_that_does_not_fit_the_data_before_any_step(tmp_path, mnist_h5):
    """paranet.fit checks the model against the file as the CLI does: a model for 7 features, or
    for 7 classes, on MNIST (28x28, 10 classes) is a ModelError naming the placeholder and both
    shapes, on both ranks before any step: the job ends (no hang) and writes no checkpoint."""
    user = script(tmp_path, """
        import sys
        import numpy as np, paranet as pn
        model = (pn.models.mlp((7,), 10, hidden=[4]) if sys.argv[2] == "inputs"
                 else pn.models.mlp((28, 28), 7, hidden=[4]))
        try:
            pn.fit(model, sys.argv[1], pn.train.GradientDescentOptimizer(0.1, model.loss), checkpoint=sys.argv[3], verbose=False)
        except pn.models.ModelError as e:
            rank = pn.init().rank
            open(f"{sys.argv[3]}.rank{rank}", "w").write(f"rank {rank}: {e}")  # two ranks' prints can interleave
            raise SystemExit(3)
    """)
    for what, message in (("inputs", "model 'mlp': input 'images' expects samples of shape (7,), the data has (28, 28)"),
                          ("classes", "model 'mlp': labels 'labels' expect 7 classes, the data has 10")):
        message += f" ({mnist_h5})"
        proc = run(mpi(2, user, mnist_h5, what, tmp_path / f"{what}.h5"), check=False, timeout=60)
        assert proc.returncode != 0, proc.stdout + proc.stderr
        said = [(tmp_path / f"{what}.h5.rank{r}").read_text() for r in (0, 1)]
        assert said == [f"rank 0: {message}", f"rank 1: {message}"], proc.stdout + proc.stderr
        assert not (tmp_path / f"{what}.h5").exists()


@pytest.mark.mpi
def test_cifar_format_example_runs_under_mpiexec(tmp_path, colour_h5):
    proc = run(mpi(2, EXAMPLES / "cifar_cnn.py", "--data", colour_h5, "--epochs", 1))
    assert proc.stdout.count("colour.h5: test accuracy") == 1


CALLBACKS = """
    import json, sys
    import numpy as np
    import paranet as pn
    from paranet.callbacks import Callback, CSVLogger, EarlyStopping, TensorBoard

    class StopOnOneRank(Callback):   # a rank-dependent decision: must not hang the others
        def on_step_end(self, step, logs):
            self.steps = step
            if self.trainer.world.rank == 1 and step == 3:
                self.trainer.stop_training = True

    class Record(Callback):
        def __init__(self): self.epochs, self.lrs = [], []
        def on_step_begin(self, step, logs): self.lrs.append(self.trainer.optimizer.learning_rate)
        def on_epoch_end(self, epoch, logs): self.epochs.append(logs)

    world = pn.distributed.init()
    model = pn.models.mlp((28, 28), 10, np.random.default_rng(0), hidden=[16])
    mode, data, out = sys.argv[1], sys.argv[2], sys.argv[3]
    record = Record()
    if mode == "step":
        cbs = [StopOnOneRank(), record]
    else:  # patience 1 with an impossible min_delta: stop after the second epoch
        cbs = [EarlyStopping("val_loss", patience=1, min_delta=1e9), CSVLogger(out + ".csv"), TensorBoard(out + ".tb", every=1),
               pn.callbacks.CosineDecay(0.01, total_steps=20), record]
    metrics = pn.fit(model, data, pn.train.AdamOptimizer(0.01, model.loss), batch_size=500, epochs=4,
                     callbacks=cbs, verbose=False)
    if world.rank == 0:
        json.dump({"metrics": metrics, "lrs": record.lrs, "epochs": record.epochs}, open(out + ".json", "w"))
"""


@pytest.mark.mpi
def test_a_stop_asked_by_a_callback_on_one_rank_stops_every_rank_after_the_next_step(tmp_path, mnist_h5):
    user = script(tmp_path, CALLBACKS)
    run(mpi(2, user, "step", mnist_h5, tmp_path / "s"), timeout=60)
    got = json.loads((tmp_path / "s.json").read_text())
    assert got["metrics"]["steps"] == 4 and got["metrics"]["stopped_early"]  # asked after step 3, agreed in step 4


@pytest.mark.mpi
def test_early_stopping_csv_and_tensorboard_callbacks(tmp_path, mnist_h5):
    user = script(tmp_path, CALLBACKS)
    run(mpi(2, user, "epoch", mnist_h5, tmp_path / "e"), timeout=90)
    got = json.loads((tmp_path / "e.json").read_text())
    history = got["metrics"]["history"]
    assert len(history) == 2 and got["metrics"]["stopped_early"]  # EarlyStopping after epoch 2 of 4
    lrs = got["lrs"]  # the cosine schedule, set before every step
    assert lrs[0] == 0.01 and lrs[10] == pytest.approx(0.005) and lrs[-1] == 0 and len(lrs) == history[-1]["steps"]
    rows = list(csv.DictReader((tmp_path / "e.csv").open()))
    assert [float(r["val_loss"]) for r in rows] == [h["val_loss"] for h in history]
    scalars = _tensorboard_scalars(tmp_path / "e.tb")
    assert scalars["epoch/val_loss"] == [(e + 1, pytest.approx(h["val_loss"], rel=1e-6)) for e, h in enumerate(history)]
    assert scalars["test/accuracy"][0][1] == pytest.approx(got["metrics"]["test_accuracy"], rel=1e-6)
    assert [s for s, _ in scalars["step/loss"]] == list(range(1, history[-1]["steps"] + 1))


def _tensorboard_scalars(logdir):
    """{tag: [(step, value)]} read back from the event files (TFRecord framing, Event protos)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    scalars = {}
    for path in sorted(logdir.iterdir()):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack_from("<Q", data, at)
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars
