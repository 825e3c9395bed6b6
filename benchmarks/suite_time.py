"""Wall time of test commands, interleaved: `python benchmarks/suite_time.py --runs 3 'make
test-fast' 'make test WORKERS=0'` runs each command once per round, round after round (so a
noisy spell hits every command alike), then prints each one's times, median and pass/fail,
and the medians' ratio to the first command's.

A command's exit status is part of its figure: a failed run is printed as such, never
dropped (a suite that fails fast is not a fast suite); the script exits 1 when any run failed.
`--smoke` times `true` and `sleep 0.1` once: it checks the script itself, in a second.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("commands", nargs="*", help="shell commands, each quoted")
    ap.add_argument("--runs", type=int, default=3, help="rounds (default 3)")
    ap.add_argument("--smoke", action="store_true",
                    help="one round of `true` and `sleep 0.1`: checks the script itself")
    a = ap.parse_args()
    if not a.commands and not a.smoke:
        ap.error("give at least one command")
    commands, runs = (["true", "sleep 0.1"], 1) if a.smoke else (a.commands, a.runs)

    times: dict[str, list[float]] = {c: [] for c in commands}
    failed: dict[str, int] = dict.fromkeys(commands, 0)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for round_ in range(1, runs + 1):
        for command in commands:
            t0 = time.perf_counter()
            done = subprocess.run(command, shell=True, env=env, check=False,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            seconds = time.perf_counter() - t0
            times[command].append(seconds)
            failed[command] += done.returncode != 0
            print(f"round {round_}/{runs}: {command!r} {seconds:.1f}s "
                  f"(exit {done.returncode})", flush=True)

    first = statistics.median(times[commands[0]])
    print(f"\n{'median':>9}  {'ratio':>6}  runs  command")
    for command in commands:
        median = statistics.median(times[command])
        runs_text = " ".join(f"{s:.0f}" for s in times[command])
        verdict = "ok" if not failed[command] else f"{failed[command]} FAILED"
        print(f"{median:8.1f}s  {median / first:6.2f}  [{runs_text}] {verdict}  {command}")
    return 1 if any(failed.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
