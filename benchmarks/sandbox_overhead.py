"""What the sandbox adds to a job's start and end, and how soon a real job gets to its data.

Default: runs the same short job (a module that imports numpy and writes a JSON file) N
times directly and N times through gpu_launch(), interleaved, and prints the medians.
Target: the sandbox adds <= 100 ms.

--startup: a linear-family fine-tune on the real CBMC cells (--family scgpt: the tiny scGPT
fine-tune of tests/test_trainer_entrypoint.py, one epoch of 4 batches, from scratch) through
gpu_launch() from the code snapshot (runner/jobs/codepin.py; built before the clock starts,
as once per commit), timed from the launch to the job log's first data line
(`finetune_celltype: N train / ...`, printed once the data is loaded and split) and to the
job's end. Target: launch to first data line <= 1.5 s. With --compare TREE, the same job
with TREE's code (its snapshot, its entrypoint; e.g. `git worktree add /tmp/wt_before
HEAD~3`) runs interleaved, each run in a fresh host process, and the ratios are printed.

    .venv/bin/python benchmarks/sandbox_overhead.py [N]
    .venv/bin/python benchmarks/sandbox_overhead.py --startup [N] [--compare TREE] [--family F]
    .venv/bin/python benchmarks/sandbox_overhead.py --smoke      # seconds; exit 1 if broken
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from runner.sandbox import SandboxJob, gpu_launch

JOB = '''\
import json, os, sys
import numpy as np
out = os.environ["BENCH_OUT"]
with open(os.path.join(out, "result.json"), "w") as f:
    json.dump({"sum": float(np.arange(1000).sum()), "python": sys.version}, f)
print("done")
'''


# One linear job from `tree`'s code, in a fresh process with `tree` first on sys.path: prints
# {"data_line_s", "end_s", "exit"} as JSON. Uses only what every version since the families
# seam has: codepin.pin_code/snapshot, SandboxJob, gpu_launch.
STARTUP_WORKER = r"""
import json, sys, time
from pathlib import Path
tree, cache, cbmc, tmp = (Path(a) for a in sys.argv[1:5])
family = sys.argv[5]
from runner.jobs import codepin
from runner.sandbox import SandboxJob, gpu_launch
snap = codepin.snapshot(codepin.pin_code(tree), cache)
manifest = tmp / "manifest.json"
doc = {"family": family, "task": "finetune_celltype", "seed": 0, "output_dir": "/job/out",
       "metrics_path": "/job/out/metrics.jsonl", "device": "cpu",
       "dataset": {"name": "cbmc", "path": "/job/in/dataset", "format": "cbmc_mat"}}
if family == "scgpt":  # tests/test_trainer_entrypoint.py's tiny model, one short epoch
    doc["model"] = {"n_layers": 2, "d_model": 32, "n_heads": 4, "d_hid": 64}
    doc["training"] = {"max_epochs": 1, "batch_size": 32, "max_seq_len": 33, "precision": "32",
                       "limit_train_batches": 4, "limit_eval_batches": 2, "lr": 1e-3}
manifest.write_text(json.dumps(doc))
seen = {}
t0 = time.perf_counter()
def on_line(line):
    if "data_line_s" not in seen and line.startswith("finetune_celltype:"):
        seen["data_line_s"] = time.perf_counter() - t0
    if line.startswith("phase "):
        seen.setdefault(line.split()[1] + "_s", time.perf_counter() - t0)
result = gpu_launch(SandboxJob(module="trainers.entrypoint", args=["/job/in/manifest.json"],
                               code_dir=snap, output_dir=tmp / "out",
                               inputs={"manifest.json": manifest, "dataset": cbmc},
                               on_line=on_line, wall_time_cap_s=300))
seen.update(end_s=time.perf_counter() - t0, exit=result.exit_code)
print(json.dumps(seen))
"""


def startup_run(tree: Path, cache: Path, cbmc: Path, family: str = "linear") -> dict:
    """One timed job of `family` from `tree`'s code (its snapshot cached under `cache`)."""
    with tempfile.TemporaryDirectory(prefix="forge-startup-") as tmp:
        env = {**os.environ, "PYTHONPATH": str(tree)}
        done = subprocess.run([sys.executable, "-c", STARTUP_WORKER, str(tree), str(cache),
                               str(cbmc), tmp, family], env=env, capture_output=True, text=True,
                              timeout=600, check=False)
    if done.returncode != 0 or not done.stdout.strip():
        raise SystemExit(f"the startup job of {tree} failed: {done.stderr[-3000:]}")
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    if seen["exit"] != 0 or "data_line_s" not in seen:
        raise SystemExit(f"the {family} job of {tree} did not finish well: {seen}")
    return seen


def startup(n: int, compare: Path | None, family: str = "linear") -> bool:
    from runner.jobs import datasets

    cbmc = datasets.loader_input("cbmc", datasets.fetch("cbmc"))
    trees = {"this tree": ROOT, **({f"compare ({compare})": compare} if compare else {})}
    times: dict[str, list[dict]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory(prefix="forge-startup-cache-") as caches:
        for name, tree in trees.items():  # the snapshot, once per commit: not timed
            startup_run(tree, Path(caches) / name.split()[0], cbmc, family)
        for _ in range(n):
            for name, tree in trees.items():
                times[name].append(startup_run(tree, Path(caches) / name.split()[0], cbmc,
                                               family))
    medians = {}
    print(f"{family} fine-tune on CBMC in the jail, {n} runs each, interleaved")
    for name, runs in times.items():
        first = statistics.median(r["data_line_s"] for r in runs)
        end = statistics.median(r["end_s"] for r in runs)
        medians[name] = (first, end)
        each = ", ".join(f"{r['data_line_s']:.2f}" for r in runs)
        print(f"{name:>40}: launch -> first data line median {first:.3f} s [{each}], "
              f"launch -> end median {end:.3f} s")
        phases = [p for p in ("jail_ready", "imports_done", "data_ready", "first_step")
                  if all(f"{p}_s" in r for r in runs)]
        if phases:  # the job log's phases, as the host received them
            print(" " * 42 + "launch -> " + ", ".join(
                f"{p} {statistics.median(r[f'{p}_s'] for r in runs):.3f} s" for p in phases))
    mine = medians["this tree"][0]
    if compare:
        other = medians[f"compare ({compare})"]
        print(f"ratio this/compare: first data line {mine / other[0]:.2f}, "
              f"end {medians['this tree'][1] / other[1]:.2f}")
    ok = mine <= 1.5
    print(f"target launch -> first data line <= 1.5 s: {'ok' if ok else 'MISSED'}")
    return ok


def main(n: int = 7) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        code = tmp / "code"
        code.mkdir()
        (code / "bench_job.py").write_text(JOB)
        plain_out = tmp / "plain"
        plain_out.mkdir()
        env = {"PYTHONPATH": str(code), "HOME": str(tmp), "PYTHONUNBUFFERED": "1",
               "PYTHONDONTWRITEBYTECODE": "1", "BENCH_OUT": str(plain_out),
               "PATH": os.environ.get("PATH", "/usr/bin:/bin")}

        def plain() -> float:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "bench_job"], env=env, cwd=plain_out,
                           check=True, capture_output=True)
            return time.perf_counter() - t0

        def sandboxed(i: int) -> float:
            job = SandboxJob(module="bench_job", code_dir=code, output_dir=tmp / f"out{i}",
                             log_path=tmp / f"out{i}.log", env={"BENCH_OUT": "/job/out"},
                             wall_time_cap_s=60, on_line=lambda line: None)
            t0 = time.perf_counter()
            result = gpu_launch(job)
            elapsed = time.perf_counter() - t0
            assert result.reason == "ok", (tmp / f"out{i}.log").read_text()
            assert (tmp / f"out{i}" / "result.json").exists()
            return elapsed

        plain(), sandboxed(-1)  # warm the page cache and the bwrap probe
        outside, inside = [], []
        for i in range(n):
            outside.append(plain())
            inside.append(sandboxed(i))

    med_out, med_in = statistics.median(outside), statistics.median(inside)
    print(f"runs: {n} each, interleaved; job: python -m bench_job (imports numpy)")
    print(f"outside  median {med_out * 1000:7.1f} ms   "
          f"[{', '.join(f'{t * 1000:.0f}' for t in outside)}]")
    print(f"sandbox  median {med_in * 1000:7.1f} ms   "
          f"[{', '.join(f'{t * 1000:.0f}' for t in inside)}]")
    diff = med_in - med_out
    print(f"overhead {diff * 1000:+7.1f} ms (target <= 100 ms): "
          f"{'OK' if diff <= 0.100 else 'OVER TARGET'}")


ROOT = Path(__file__).resolve().parents[1]


def cli() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", nargs="?", type=int, default=None, help="runs of each (7; 5)")
    parser.add_argument("--startup", action="store_true", help="a fine-tune's start")
    parser.add_argument("--family", choices=("linear", "scgpt"), default="linear",
                        help="--startup: the linear job, or the tiny scGPT one")
    parser.add_argument("--compare", type=Path, help="another tree's code, interleaved")
    parser.add_argument("--smoke", action="store_true",
                        help="one run of each part: checks that the benchmark works")
    args = parser.parse_args()
    if args.smoke:
        main(1)
        startup(1, None)  # its target is not the smoke's: the machine may be loaded
        return 0
    if args.startup:
        startup(args.n or 5, args.compare, args.family)
        return 0
    main(args.n or 7)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
