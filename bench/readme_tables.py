"""``python -m bench.readme_tables``: rewrite the README's benchmark tables from bench/results/bench.json.

Each table sits between ``<!-- bench:MARKER -->`` and ``<!-- /bench:MARKER -->`` in README.md and is
made from the JSON by the function of the bench module that measured it (TABLES), so the README
shows what the last ``make bench`` measured, never figures edited by hand. A table whose results
are missing or skipped in the JSON is left as it is, and the command says so. Markers may be
indented (inside a list item): the text between them is indented alike.
"""
import argparse
import importlib
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# marker -> (key of bench.json, bench module, its function that renders the marker's text from that key);
# a function returns None when its part of the key was not measured
TABLES = {
    "cases": ("cases", "bench.suite", "markdown_cases"),
    "scaling": ("scaling", "bench.suite", "markdown_scaling"),
    "memory": ("memory", "bench.suite", "markdown_memory"),
    "time_to_accuracy": ("time_to_accuracy", "bench.suite", "markdown_time_to_accuracy"),
    "targets": ("targets", "bench.suite", "markdown_targets"),
    "trainer_e2e": ("trainer_e2e", "bench.trainer_e2e", "markdown"),
    "threads_bound": ("threads", "bench.threads", "markdown_bound"),
    "threads_two_hosts": ("threads", "bench.threads", "markdown_two_hosts"),
    "cnn": ("cnn", "bench.cnn", "markdown"),
    "cnn_ops": ("cnn", "bench.cnn", "markdown_ops"),
    "cnn_pieces": ("cnn_pieces", "bench.cnn_pieces", "markdown"),
    "reproducible_accuracy": ("reproducible", "bench.reproducible", "markdown_accuracy"),
    "reproducible_cost": ("reproducible", "bench.reproducible", "markdown_throughput"),
    "watchdog": ("watchdog", "bench.watchdog", "markdown"),
}


def table_text(marker, results):
    """The text TABLES gives ``marker`` from ``results``, or None where the JSON has none for it."""
    key, module_name, function = TABLES[marker]
    section = results.get(key)
    if section is None or (isinstance(section, dict) and "skipped" in section):
        return None
    make = getattr(importlib.import_module(module_name), function, None)
    return None if make is None else make(section)


def render(readme, results):
    """The README text with every marked table replaced; returns (text, {marker: what happened})."""
    done = {m: "unknown marker (not in bench.readme_tables.TABLES): kept" for m in
            re.findall(r"<!-- bench:(\w+) -->", readme) if m not in TABLES}
    for marker in TABLES:
        pattern = re.compile(rf"^([ \t]*)(<!-- bench:{marker} -->\n).*?^\1(<!-- /bench:{marker} -->)", re.S | re.M)
        if not pattern.search(readme):
            continue
        table = table_text(marker, results)
        if table is None:
            done[marker] = "kept (no results in the JSON)"
            continue

        def put(m, table=table):
            indent = m.group(1)
            body = "".join(indent + line if line.strip() else line for line in table.rstrip("\n").splitlines(True))
            return indent + m.group(2) + body + "\n" + indent + m.group(3)
        readme = pattern.sub(put, readme)
        done[marker] = "rewritten"
    return readme, done


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.readme_tables", description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "bench.json")
    p.add_argument("--readme", type=Path, default=REPO / "README.md")
    p.add_argument("--force", action="store_true", help="use a --quick run's results too")
    p.add_argument("--check", action="store_true", help="exit 1 if the README differs from what the JSON gives")
    args = p.parse_args(argv)
    results = json.loads(args.json.read_text())
    if results.get("config", {}).get("quick") and not args.force:
        print(f"{args.json} holds a --quick run (figures not meaningful): README left as it is (--force to use it)")
        return 0
    old = args.readme.read_text()
    new, done = render(old, results)
    for key, what in done.items():
        print(f"{key}: {what}")
    if args.check:
        return int(new != old)
    if new != old:
        args.readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
