"""Run the trainer (``python -m bench.rss [trainer flags]`` under mpiexec), then report this rank's peak RSS.

Each rank writes ``{"rank", "size", "vm_hwm_kib", "exit_code"}`` to
``$PARANET_BENCH_RSS_DIR/rank<R>.json`` after ``paranet.cli.main`` returns; VmHWM is the
kernel's high-water mark of the resident set, read from /proc/self/status.
"""
import json
import os
import sys
from pathlib import Path

from bench.engine import vm_hwm_kib


def main(argv=None):
    from paranet.cli import _env_rank, main as train_main

    code = train_main(argv)
    folder = os.environ.get("PARANET_BENCH_RSS_DIR")
    if folder:
        rank = _env_rank()
        size = int(os.environ.get("PMI_SIZE", os.environ.get("OMPI_COMM_WORLD_SIZE", "1")))
        Path(folder, f"rank{rank}.json").write_text(
            json.dumps({"rank": rank, "size": size, "vm_hwm_kib": vm_hwm_kib(), "exit_code": code}))
    return code


if __name__ == "__main__":
    sys.exit(main())
