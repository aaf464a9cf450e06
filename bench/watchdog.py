"""``python -m bench.watchdog``: what the stall watchdog (paranet/watchdog.py, --stall-timeout)
costs a training step, measured side by side in one ``mpiexec -n P`` job.

Each rank runs real MNIST MLP steps (``Trainer.step``: read, forward, backward, the sum over the
ranks, Adam) in blocks of ``--block`` steps, the watchdog attached and detached in alternate
blocks, so that both see the same machine load; it reports the median step time of each and
their ratio, plus the hook's own cost (``enter`` + ``leave``) timed alone.

Prints a table and one ``BENCH_JSON {...}`` line.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
JSON_TAG = "BENCH_JSON "


def worker(args):
    import numpy as np

    from paranet.distributed import init
    from paranet.models import build_model, load_builder
    from paranet.train import AdamOptimizer
    from paranet.trainer import Trainer
    from paranet.watchdog import Watchdog

    world = init(allreduce="auto")
    from paranet.data import default_data_path, ensure_default_dataset

    data = ensure_default_dataset() if world.rank == 0 and not default_data_path().exists() else default_data_path()
    data = world.bcast_object(data)
    model = build_model(load_builder("mlp"), (28, 28), 10, np.random.default_rng(0), name="mlp")
    trainer = Trainer(model, data, AdamOptimizer(1e-3, model.loss), world=world, batch_size=args.batch, verbose=False)
    trainer.open_data()
    wd = Watchdog(world, 600.0)
    times = {"off": [], "on": []}
    batches = iter(())
    for block in range(2 * args.blocks):
        mode = ("off", "on")[block % 2] if (block // 2) % 2 == 0 else ("on", "off")[block % 2]
        world.watchdog = wd if mode == "on" else None
        world.barrier()
        t0 = time.perf_counter()
        for _ in range(args.block):
            batch = next(batches, None)
            if batch is None:
                trainer.epoch += 1
                batches = iter(trainer.train_reader.epoch(trainer.epoch, 0))
                batch = next(batches)
            wd.step = trainer.global_step + 1
            trainer.step(batch)
            trainer.global_step += 1
        times[mode].append((time.perf_counter() - t0) / args.block)
    world.watchdog = None
    n = 200_000
    t0 = time.perf_counter()
    for _ in range(n):
        wd.enter("sum over the ranks")
        wd.leave()
    hook = (time.perf_counter() - t0) / n
    wd.close()
    ratios = [on / off for on, off in zip(times["on"], times["off"])]
    result = {"ranks": world.size, "batch": args.batch, "blocks": args.blocks, "block_steps": args.block,
              "step_ms_off": 1e3 * statistics.median(times["off"]), "step_ms_on": 1e3 * statistics.median(times["on"]),
              "median_ratio_on_off": statistics.median(ratios), "hook_ns": 1e9 * hook}
    result = world.gather_object(result)
    if world.rank == 0:
        print(JSON_TAG + json.dumps(result[0]), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.watchdog", description=__doc__.splitlines()[0])
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--blocks", type=int, default=20, help="blocks of each mode, alternated")
    p.add_argument("--block", type=int, default=25, help="steps a block")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    mpiexec = Path(sys.executable).parent / "mpiexec"
    cmd = [str(mpiexec), "-n", str(args.procs), sys.executable, "-m", "bench.watchdog", "--worker",
           "--batch", str(args.batch), "--blocks", str(args.blocks), "--block", str(args.block)]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
    result = json.loads(next(line for line in out.splitlines() if line.startswith(JSON_TAG))[len(JSON_TAG):])
    print(f"stall watchdog at P={result['ranks']}, batch {result['batch']}: step {result['step_ms_off']:.3f} ms off, "
          f"{result['step_ms_on']:.3f} ms on (median of {result['blocks']} alternated blocks of {result['block_steps']}); "
          f"on/off {result['median_ratio_on_off']:.4f}; hook {result['hook_ns']:.0f} ns a step")
    return result


# -- the README's tables (python -m bench.readme_tables rewrites them from bench.json) ------------

def markdown(result):
    """The README's cost line under "A stuck rank does not hang the job": the hook's cost a step
    against the step, and the on/off step time ratio measured side by side."""
    hook_us, step_ms = result["hook_ns"] / 1e3, result["step_ms_off"]
    return (f"Cost: {hook_us:.2f} µs a step for the hook against a {step_ms:.3g} ms step "
            f"({100 * hook_us / (1e3 * step_ms):.2f}%) at P={result['ranks']}, batch {result['batch']}; side by side in "
            f"one job (`python -m bench.watchdog`, {result['blocks']} alternated blocks of {result['block_steps']} steps "
            f"each way) the on/off step time ratio was {result['median_ratio_on_off']:.3f}.")


if __name__ == "__main__":
    main()
