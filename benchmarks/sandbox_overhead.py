"""What the sandbox adds to a job's start and end.

Runs the same short job (a module that imports numpy and writes a JSON file) N times
directly and N times through gpu_launch(), interleaved, and prints the medians.
Target: the sandbox adds <= 100 ms.

    .venv/bin/python benchmarks/sandbox_overhead.py [N]
"""

from __future__ import annotations

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


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 7)
