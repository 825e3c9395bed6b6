"""The benchmarks CI runs in their --smoke mode, so a benchmark that breaks fails here
(a benchmark nothing runs rots). benchmarks/families.py: every family's row is `ok`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_families_benchmark_smoke_prints_every_family_ok():
    done = subprocess.run([sys.executable, "benchmarks/families.py", "--smoke"], cwd=REPO,
                          env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines()
            if line.split() and line.split()[0] in ("scgpt", "scvi", "linear")}
    assert set(rows) == {"scgpt", "scvi", "linear"}, done.stdout
    assert all(row[-1] == "ok" for row in rows.values()), done.stdout
    # the linear family is the baseline's own model: its test F1 is the baseline's
    assert rows["linear"][5] == rows["linear"][6], done.stdout
