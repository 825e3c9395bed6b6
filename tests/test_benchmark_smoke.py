"""CI runs every benchmark in its --smoke mode (benchmarks/smoke.py), so a benchmark that
breaks fails CI (a benchmark nothing runs rots): every script has a --smoke option, and
benchmarks/smoke.py fails on one without it or one whose smoke run fails."""

import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _smoke_runner():
    spec = importlib.util.spec_from_file_location("benchmarks_smoke",
                                                  REPO / "benchmarks" / "smoke.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_benchmark_script_has_a_smoke_option():
    """benchmarks/smoke.py (CI) runs every script with --smoke: a script without one fails it,
    and this says so in the fast tier, by reading each script's argparse calls."""
    smoke = _smoke_runner()
    found = smoke.scripts()
    assert {"trainer_throughput", "tokenizer", "families"} <= {p.stem for p in found}
    assert "smoke" not in {p.stem for p in found}
    missing = [p.name for p in found if not smoke.has_smoke(p)]
    assert not missing, f"benchmarks without a --smoke option: {missing}"


def test_smoke_runner_fails_on_a_script_without_smoke_or_one_that_fails(tmp_path):
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    parse = "import argparse, sys\nap = argparse.ArgumentParser()\n"
    (bench / "good.py").write_text(parse + 'ap.add_argument("--smoke", action="store_true")\n'
                                   "print('fine' if ap.parse_args().smoke else 'full')\n")
    (bench / "broken.py").write_text(parse + 'ap.add_argument("--smoke", action="store_true")\n'
                                     "ap.parse_args()\nprint('the last words')\nsys.exit(3)\n")
    (bench / "bare.py").write_text(parse + "ap.parse_args()\n")  # runs fine, but has no --smoke
    (bench / "mentions.py").write_text('"""Has no --smoke yet."""\nprint("--smoke")\n')

    def smoke(*names):
        return subprocess.run([sys.executable, str(REPO / "benchmarks" / "smoke.py"),
                               "--dir", str(bench), *names], capture_output=True, text=True,
                              timeout=120, check=False)

    done = smoke()
    assert done.returncode == 1, done.stdout + done.stderr
    lines = {line.split()[0]: line for line in done.stdout.splitlines()
             if line and not line.startswith(" ")}
    assert lines["good"].endswith(" ok"), done.stdout
    assert "FAILED (exit 3)" in lines["broken"], done.stdout
    assert "FAILED (no --smoke option)" in lines["bare"], done.stdout
    assert "FAILED (no --smoke option)" in lines["mentions"], done.stdout
    assert "    | the last words" in done.stdout  # a failure shows its output's tail
    assert "4 benchmarks, 3 failed" in done.stdout

    only_good = smoke("good")
    assert only_good.returncode == 0, only_good.stdout + only_good.stderr
    assert "1 benchmarks, 0 failed" in only_good.stdout
