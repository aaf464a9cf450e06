"""Run the trainer (``python -m bench.rss [trainer flags]`` under mpiexec), then report this rank's peak RSS.

Each rank writes ``{"rank", "size", "vm_hwm_kib", "rss_shmem_kib", "exit_code"}`` to
``$PARANET_BENCH_RSS_DIR/rank<R>.json`` after ``paranet.cli.main`` returns; VmHWM is the
kernel's high-water mark of the resident set, read from /proc/self/status, and RssShmem the
part of the resident set in shared memory at the end (the data staged once per machine, as far
as this rank touched it).
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
            json.dumps({"rank": rank, "size": size, "vm_hwm_kib": vm_hwm_kib(), "rss_shmem_kib": _status_kib("RssShmem"),
                        "exit_code": code}))
    return code


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


if __name__ == "__main__":
    sys.exit(main())
