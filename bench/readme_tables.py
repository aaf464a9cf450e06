"""``python -m bench.readme_tables``: rewrite the README's benchmark tables from bench/results/bench.json.

Each table sits between ``<!-- bench:KEY -->`` and ``<!-- /bench:KEY -->`` in README.md and is
made by ``markdown(results[KEY])`` of the bench module that measured it, so the README shows what
the last ``make bench`` measured, never figures edited by hand. A table whose results are missing
or skipped in the JSON is left as it is, and the command says so.
"""
import argparse
import importlib
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# results key -> the bench module whose markdown() renders it
TABLES = {"trainer_e2e": "bench.trainer_e2e", "cnn": "bench.cnn", "reproducible": "bench.reproducible",
          "threads": "bench.threads", "watchdog": "bench.watchdog", "memory": "bench.suite"}


def render(readme, results):
    """The README text with every marked table replaced; returns (text, {key: what happened})."""
    done = {}
    for key, module_name in TABLES.items():
        pattern = re.compile(rf"(<!-- bench:{key} -->\n)(.*?)(<!-- /bench:{key} -->)", re.S)
        if not pattern.search(readme):
            continue
        section = results.get(key)
        module = importlib.import_module(module_name)
        if section is None or (isinstance(section, dict) and "skipped" in section) or not hasattr(module, "markdown"):
            done[key] = "kept (no results in the JSON)"
            continue
        table = module.markdown(section).rstrip("\n") + "\n"
        readme = pattern.sub(lambda m: m.group(1) + table + m.group(3), readme)
        done[key] = "rewritten"
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
