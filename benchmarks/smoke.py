"""Every benchmark in its --smoke mode, so that none rots: a line each, exit 1 on any failure.

Runs each `benchmarks/*.py` but this one with `--smoke` (tiny sizes, one repetition), one
after another, each under a timeout, and prints its name, seconds and `ok` or `FAILED (why)`;
a failure also prints the tail of that script's output. A script whose argparse has no
`--smoke` option is a failure too, so a new benchmark cannot be left out: the scripts are
found by listing the folder, not by a list kept here.

    python benchmarks/smoke.py                      # all of them (CI runs this)
    python benchmarks/smoke.py tokenizer registry   # some, by name
    python benchmarks/smoke.py --timeout 60
"""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TAIL = 25  # lines of a failed script's output shown


def has_smoke(path: Path) -> bool:
    """Whether the script declares `--smoke` to argparse (an `add_argument("--smoke", ...)` call).

    Read from the source, not by running it: cheap, and a script that cannot even start
    still shows whether it has the option."""
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except SyntaxError:
        return False
    return any(isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
               and node.func.attr == "add_argument"
               and any(isinstance(arg, ast.Constant) and arg.value == "--smoke"
                       for arg in node.args)
               for node in ast.walk(tree))


def scripts(folder: Path = HERE) -> list[Path]:
    """The benchmark scripts of `folder`: every `*.py` but this runner (and `_private.py`)."""
    return sorted(p for p in folder.glob("*.py")
                  if p.name != Path(__file__).name and not p.name.startswith("_"))


def run(path: Path, timeout: float, cwd: Path) -> tuple[bool, str, str]:
    """(ok, verdict, output) of `python path --smoke`."""
    if not has_smoke(path):
        return False, "FAILED (no --smoke option)", ""
    env = {"MLFLOW_DISABLE_TELEMETRY": "true", **os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        done = subprocess.run([sys.executable, str(path), "--smoke"], cwd=cwd, env=env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout
        return False, f"FAILED (timeout after {timeout:.0f} s)", out or ""
    if done.returncode:
        return False, f"FAILED (exit {done.returncode})", done.stdout
    return True, "ok", done.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", help="run only these scripts (name without .py)")
    ap.add_argument("--timeout", type=float, default=150.0, help="seconds per script")
    ap.add_argument("--dir", type=Path, default=HERE, help=argparse.SUPPRESS)  # for its test
    a = ap.parse_args()
    found = scripts(a.dir)
    if a.names:
        unknown = set(a.names) - {p.stem for p in found}
        if unknown:
            ap.error(f"no such benchmark: {', '.join(sorted(unknown))}")
        found = [p for p in found if p.stem in a.names]
    cwd = a.dir.parent  # the repository root, where each script expects to run
    failed = 0
    t_all = time.perf_counter()
    for path in found:
        t0 = time.perf_counter()
        ok, verdict, out = run(path, a.timeout, cwd)
        print(f"{path.stem:<22} {time.perf_counter() - t0:6.1f} s  {verdict}", flush=True)
        if not ok:
            failed += 1
            for line in out.splitlines()[-TAIL:]:
                print(f"    | {line}")
    print(f"{len(found)} benchmarks, {failed} failed, {time.perf_counter() - t_all:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
