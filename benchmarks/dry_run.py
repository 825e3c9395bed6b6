"""Dry-run latency: a cold `forge-train ... dry_run=true` process, and a warm in-process call.

    python benchmarks/dry_run.py [--cold 5] [--warm 20] [--compare TREE]
    python benchmarks/dry_run.py --smoke      # seconds: one of each; exit 1 if broken

Besides the same request again and again, it times requests that each set a new value
(`training.lr=...`, as an agent probing settings or a sweep's jobs do): a cold process each, and
warm calls in one process (in a child process per tree, so that --compare compares them too).

--compare TREE: the cold runs alternate with the same command run with TREE first on
PYTHONPATH (another checkout's runner/ and trainers/, e.g. `git worktree add /tmp/wt_before
HEAD~3`), on the same registry, and the ratio of the medians is printed.

Sets up a throwaway registry (SQLite under a temp FORGE_HOME) with the parent model, the
dataset and a funded agent, and a clean clone of this checkout's HEAD as the code to pin
(FORGE_CODE_REPO; a dirty tree is refused by default, so clean is the normal case). Prints
the median of the cold CLI runs (target <= 0.35 s, issue 30) and of the warm
train_model_version(dry_run=True) calls (target <= 30 ms); for information also the warm
median against this working tree with allow_dirty (which also hashes the uncommitted diff).
A first cold run, not counted, fills the composed-config cache in FORGE_HOME/cache (as
the first dry run after a config change does).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PARENT, DATASET = "model-scgpt-cbmc-base", "dataset-geo-GSE100866"
ARGS = ["parent=scgpt_cbmc_base", "dataset=cbmc", "training=finetune_celltype",
        "agent_id=bench", "dry_run=true"]
REPO = Path(__file__).resolve().parents[1]


def setup(home: Path) -> None:
    os.environ["FORGE_HOME"] = str(home)
    os.environ["FORGE_DB_URL"] = f"sqlite:///{home / 'forge.db'}"
    subprocess.run(["git", "clone", "--quiet", "--local", str(REPO), str(home / "code")],
                   check=True)
    os.environ["FORGE_CODE_REPO"] = str(home / "code")
    from runner.api import SKILLS
    from runner.registry import catalog, db, ledger
    from runner.tools import register_tools

    db.upgrade()
    register_tools(SKILLS)
    catalog.register_model(artifact_id=PARENT, title="scGPT CBMC base", created_by="bench",
                           metadata={"family": "scgpt", "framework": "scgpt"})
    from runner.jobs import weights

    folder = weights.weights_dir(PARENT)  # stand-in bytes: a dry run never unpickles them
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "best_model.pt").write_bytes(b"stand-in")
    from runner.jobs.datasets import builtin_citation

    catalog.register_dataset(DATASET, "CBMC CITE-seq", builtin_citation("cbmc"))
    ledger.grant("bench", "1000")


def forge_train_cmd() -> list[str]:
    script = Path(sys.executable).with_name("forge-train")
    return [str(script)] if script.exists() else [sys.executable, "-m", "runner.train_app"]


COLD_TARGET_S = 0.35


def new_value() -> list[str]:
    """An override no earlier request has set (in any process: they share the disk cache)."""
    return [f"training.lr={random.uniform(1e-5, 1e-3):.15f}"]


def cold_once(tree: Path | None = None, extra: list[str] = ()) -> float:
    """One cold `forge-train ... dry_run=true` process (with `tree` first on PYTHONPATH)."""
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    start = time.perf_counter()
    out = subprocess.run(forge_train_cmd() + ARGS + list(extra), capture_output=True, text=True,
                         env=env)
    elapsed = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"forge-train failed ({out.returncode}): {out.stderr[-3000:]}"
                         f"{out.stdout[-3000:]}")
    return elapsed


def cold(n: int, compare: Path | None = None, *, new_values: bool = False
         ) -> tuple[list[float], list[float]]:
    """n cold runs of this tree and, interleaved, of `compare`'s."""
    mine, theirs = [], []
    for _ in range(n):
        mine.append(cold_once(extra=new_value() if new_values else ()))
        if compare is not None:
            theirs.append(cold_once(compare, new_value() if new_values else ()))
    return mine, theirs


def warm(n: int, allow_dirty: bool = False, new_values: bool = False) -> list[float]:
    from runner.api import train_model_version

    def call():
        result = train_model_version(PARENT, DATASET, agent_id="bench", dry_run=True,
                                     allow_dirty=allow_dirty,
                                     overrides=new_value() if new_values else None)
        assert result["would_launch"], result["reasons"]

    call()  # first call: imports, Hydra init, engine, git repo
    times = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def warm_new_values(n: int, tree: Path | None = None) -> float:
    """Median of n warm calls with a new value each, in a child process running `tree`'s code
    (this one's without it), on this run's registry."""
    env = dict(os.environ, **({"PYTHONPATH": str(tree)} if tree is not None else {}))
    out = subprocess.run([sys.executable, __file__, "--warm-new-values-child", str(n)],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"warm calls failed ({out.returncode}): {out.stderr[-3000:]}")
    return float(out.stdout.split()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cold", type=int, default=5, help="cold CLI runs (default 5)")
    parser.add_argument("--warm", type=int, default=20, help="warm in-process calls")
    parser.add_argument("--compare", type=Path, help="another tree's code, interleaved")
    parser.add_argument("--smoke", action="store_true",
                        help="one cold run and one warm call: checks the benchmark works")
    parser.add_argument("--warm-new-values-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warm_new_values_child:  # warm_new_values()'s child, on the parent's registry
        print(statistics.median(warm(args.warm_new_values_child, new_values=True)))
        return 0
    if args.smoke:
        args.cold, args.warm, args.compare = 1, 1, None
    home = Path(tempfile.mkdtemp(prefix="forge-bench-"))
    try:
        setup(home)
        cold_once()  # fills the composed-config cache in FORGE_HOME/cache (not counted)
        if args.compare is not None:
            cold_once(args.compare)
        cold_times, compare_times = cold(args.cold, args.compare)
        cold_new, compare_new = cold(args.cold, args.compare, new_values=True)
        warm_new, compare_warm_new = [], []  # medians of child processes, interleaved
        for _ in range(3 if args.compare is not None else 1):
            warm_new.append(warm_new_values(args.warm))
            if args.compare is not None:
                compare_warm_new.append(warm_new_values(args.warm, args.compare))
        warm_times = warm(args.warm)
        os.environ["FORGE_CODE_REPO"] = str(REPO)
        dirty_times = warm(args.warm, allow_dirty=True)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    c, w = statistics.median(cold_times), statistics.median(warm_times)
    print(f"cold CLI dry run  (forge-train, {args.cold} processes): median {c:.3f} s "
          f"[{', '.join(f'{t:.3f}' for t in cold_times)}]  target <= {COLD_TARGET_S} s  "
          f"{'ok' if c <= COLD_TARGET_S else 'MISSED'}")
    if compare_times:
        other = statistics.median(compare_times)
        print(f"  compare ({args.compare}), interleaved: median {other:.3f} s "
              f"[{', '.join(f'{t:.3f}' for t in compare_times)}]  ratio this/compare "
              f"{c / other:.2f}")
    new = statistics.median(cold_new)
    print(f"cold CLI dry run, a new training.lr each: median {new:.3f} s "
          f"[{', '.join(f'{t:.3f}' for t in cold_new)}]"
          + (f"  compare: median {statistics.median(compare_new):.3f} s, ratio this/compare "
             f"{new / statistics.median(compare_new):.2f}" if compare_new else ""))
    new = statistics.median(warm_new)
    theirs = statistics.median(compare_warm_new) if compare_warm_new else None
    print(f"warm dry run, a new training.lr each ({args.warm} calls a process, "
          f"{len(warm_new)} processes): median {new * 1000:.1f} ms"
          + (f"  compare: median {theirs * 1000:.1f} ms, ratio this/compare {new / theirs:.2f}"
             if theirs else ""))
    print(f"warm in-process dry run ({args.warm} calls): median {w * 1000:.1f} ms "
          f"[min {min(warm_times) * 1000:.1f}, max {max(warm_times) * 1000:.1f}]  "
          f"target <= 30 ms  {'ok' if w <= 0.030 else 'MISSED'}")
    print(f"  (warm, this working tree with allow_dirty: median "
          f"{statistics.median(dirty_times) * 1000:.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
