"""The tier check (tests/tiers.py) itself: a pytest session of its own, with the plugin, on
tests that start the jail or ask for a service's fixture with and without their markers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def run_pytest(folder: Path, source: str, *args: str,
               env: dict | None = None) -> subprocess.CompletedProcess:
    (folder / "test_inner.py").write_text(source)
    env = {**(os.environ if env is None else env), "PYTHONPATH": str(TESTS)}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "tiers", "-p",
                           "no:cacheprovider", "-q", "--rootdir", str(folder), *args,
                           str(folder / "test_inner.py")],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=120,
                          check=False)


def session_env() -> dict:
    """This process's environment for a pytest session of its own: not an xdist worker's."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}


JAIL = f"""
import subprocess
import pytest

def jail():  # a real bwrap job (not the probe): a shell in a read-only view of the host
    subprocess.run([{shutil.which("bwrap") or "bwrap"!r}, "--ro-bind", "/", "/", "sh", "-c",
                    "exit 0"], check=False)

def test_starts_the_jail_unmarked():
    jail()

@pytest.mark.sandbox
def test_starts_the_jail_marked():
    jail()

def test_starts_nothing():
    assert True
"""


def test_a_test_that_starts_the_jail_without_its_marker_fails(tmp_path):
    done = run_pytest(tmp_path, JAIL, "-rA")
    out = done.stdout
    assert done.returncode == 1, out
    assert "ERROR test_inner.py::test_starts_the_jail_unmarked" in out, out
    assert "@pytest.mark.sandbox: it ran `" in out and "bwrap --ro-bind / /" in out, out
    assert "PASSED test_inner.py::test_starts_the_jail_marked" in out, out
    assert "PASSED test_inner.py::test_starts_nothing" in out, out
    assert "3 passed, 1 error" in out, out


CHILD_JOB = """
import os, subprocess, sys
import pytest

# What a job that a child process ran (forge-train, a background job host) leaves behind:
# its log in its run folder, beside the manifest the host wrote (runner/jobs/launch.py). The
# child starts bwrap, not this test.
CHILD = ("import os, pathlib; run = pathlib.Path(os.environ['FORGE_HOME'], 'runs', 'alloc-1'); "
         "run.mkdir(parents=True); (run / 'job.log').write_text('phase jail_ready'); "
         "(run / 'manifest.json').write_text('{\\"output_dir\\": \\"/job/out\\"}')")

def child_job(home):
    subprocess.run([sys.executable, "-c", CHILD], env={**os.environ, "FORGE_HOME": str(home)},
                   check=True)

def test_a_child_runs_a_job_in_tmp_path_unmarked(tmp_path):
    child_job(tmp_path / "home")

def test_a_child_runs_a_job_in_the_tests_home_unmarked(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("elsewhere")
    monkeypatch.setenv("FORGE_HOME", str(home))
    child_job(home)

@pytest.mark.sandbox
def test_a_child_runs_a_job_marked(tmp_path):
    child_job(tmp_path / "home")

def test_a_child_runs_nothing(tmp_path):
    (tmp_path / "job.log").write_text("not a run folder's")

def test_a_run_folder_made_by_hand(tmp_path):  # a recovery test's: no manifest of the host's
    run = tmp_path / "home" / "runs" / "alloc-2"
    run.mkdir(parents=True)
    for name in ("job.log", "manifest.json"):
        (run / name).write_text(name)
"""


def test_a_test_whose_child_ran_a_job_without_its_marker_fails(tmp_path):
    """On the old tests/tiers.py such a test passed unmarked: only the test process's own
    children were seen."""
    done = run_pytest(tmp_path, CHILD_JOB, "-rA", env=session_env())
    out = done.stdout
    assert done.returncode == 1, out
    for name in ("in_tmp_path", "in_the_tests_home"):
        assert f"ERROR test_inner.py::test_a_child_runs_a_job_{name}_unmarked" in out, out
    assert "@pytest.mark.sandbox: it ran `a job, in a child process (its log " in out, out
    assert "PASSED test_inner.py::test_a_child_runs_a_job_marked" in out, out
    assert "PASSED test_inner.py::test_a_child_runs_nothing" in out, out
    assert "PASSED test_inner.py::test_a_run_folder_made_by_hand" in out, out
    assert "5 passed, 2 errors" in out, out


SERVICE = """
import pytest

@pytest.fixture
def pg_url():  # the name of conftest's PostgreSQL fixture
    return "postgresql://"

def test_asks_for_postgres_unmarked(pg_url):
    assert pg_url

@pytest.mark.postgres
def test_asks_for_postgres_marked(pg_url):
    assert pg_url
"""


def test_a_fixture_of_a_service_without_its_marker_stops_the_collection(tmp_path):
    done = run_pytest(tmp_path, SERVICE)
    assert done.returncode == pytest.ExitCode.USAGE_ERROR, done.stdout + done.stderr
    said = done.stdout + done.stderr
    assert "test_inner.py::test_asks_for_postgres_unmarked: needs marker(s) postgres" in said
    assert "test_asks_for_postgres_marked" not in said.split("tests/tiers.py")[-1]
    assert "passed" not in done.stdout  # nothing ran


def test_the_fast_tier_deselects_every_marked_test(tmp_path):
    done = run_pytest(tmp_path, JAIL, "-m", "not sandbox", "-rA")
    assert done.returncode == 1, done.stdout  # the unmarked one still runs, and still fails
    assert "test_starts_the_jail_marked" not in done.stdout.split("short test summary")[-1]
    assert "2 passed, 1 deselected, 1 error" in done.stdout, done.stdout


PINNED = """
import os
import subprocess
import sys
import pytest
import torch

torch.set_num_threads(2)  # the pool a worker made before it pinned (an earlier in-process fit)

@pytest.mark.train
def test_a_training_test_and_what_it_starts_run_on_one_cpu():
    child = subprocess.run([sys.executable, "-c", "import os; print(len(os.sched_getaffinity(0)))"],
                           capture_output=True, text=True, check=True)
    assert (len(os.sched_getaffinity(0)), child.stdout.strip()) == (1, "1")
    assert os.environ["OMP_NUM_THREADS"] == "1"

@pytest.mark.train
def test_an_in_process_fit_runs_one_torch_thread():
    assert torch.get_num_threads() == 1  # two spun on the other CPU at every barrier

def test_a_unit_test_keeps_every_cpu():
    assert len(os.sched_getaffinity(0)) > 1 and "OMP_NUM_THREADS" not in os.environ
"""


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning needs two CPUs to show")
def test_each_xdist_worker_and_its_jobs_get_one_cpu(tmp_path):
    """tests/worker_cpus.py: while a training test runs on a worker, the jobs it starts
    inherit one CPU (their trainers size their thread pools from it), and torch in the worker
    itself runs one thread; other tests, and a sequential run, keep every CPU."""
    # this test may itself run on a pinned worker: its sessions start from every CPU, unpinned
    os.sched_setaffinity(0, range(os.cpu_count()))  # (the plugin restores the worker's after)
    env = {k: v for k, v in session_env().items() if not k.endswith("_NUM_THREADS")}
    pinned = run_pytest(tmp_path, PINNED, "-p", "worker_cpus", "-n", "2", env=env)
    assert pinned.returncode == 0, pinned.stdout[-3000:]
    assert "3 passed" in pinned.stdout, pinned.stdout[-3000:]
    sequential = run_pytest(tmp_path, PINNED, "-p", "worker_cpus", env=env)
    assert "2 failed, 1 passed" in sequential.stdout, sequential.stdout[-3000:]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning needs two CPUs to show")
def test_pinned_workers_take_the_cpus_no_other_worker_holds(monkeypatch):
    """Two workers that pin at once get two CPUs, whatever their numbers: with three workers
    on two CPUs, gw0 and gw2 both took CPU 0 by number, and CPU 1 could idle beside them
    (the eight-job sweep test took 156 s in the suite against 45 s alone; 82 s after)."""
    import uuid

    import worker_cpus

    monkeypatch.setenv("PYTEST_XDIST_TESTRUNUID", uuid.uuid4().hex)
    monkeypatch.setenv("FORGE_TEST_PIN_CPUS", "1")
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    with worker_cpus.claim() as first:
        monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw2")
        with worker_cpus.claim() as second:
            assert first != second and {first, second} <= os.sched_getaffinity(0)
        with worker_cpus.claim() as again:  # CPU 1 is free again: gw2 takes it, not gw0's
            assert again == second
    monkeypatch.delenv("PYTEST_XDIST_WORKER")
    with worker_cpus.claim() as sequential:  # a run without workers pins nothing
        assert sequential is None


CLOSES_A_CAPTURE_FILE = """
import io
import sys

def closes_the_buffer():
    io.TextIOWrapper(sys.stderr.buffer)  # garbage at once: closing it closes what it wraps

def test_closes_stderr_by_a_wrapper():
    closes_the_buffer()

def test_closes_stdout():
    sys.stdout.close()

def test_runs_after():
    print("still captured")
"""


@pytest.mark.slow  # pytest sessions of its own, on xdist workers too
@pytest.mark.parametrize("workers", [[], ["-n", "1"]], ids=["sequential", "xdist"])
def test_a_test_that_closes_a_capture_file_leaves_the_session_working(tmp_path, workers):
    """tests/capture_guard.py: pytest's capture files refuse to close; each attempt is a
    warning naming the code that tried, and the tests after it run (without the guard the
    first close fails every later test of the worker, or ends a sequential session)."""
    env = session_env()
    guarded = run_pytest(tmp_path, CLOSES_A_CAPTURE_FILE, "-p", "capture_guard", *workers,
                         "-W", "default", env=env)
    assert guarded.returncode == 0, guarded.stdout[-3000:]
    assert "3 passed" in guarded.stdout and "error" not in guarded.stdout, guarded.stdout[-3000:]
    for culprit in ("in closes_the_buffer", "sys.stdout.close()"):  # each attempt, named
        assert culprit in guarded.stdout, guarded.stdout[-3000:]
    unguarded = run_pytest(tmp_path, CLOSES_A_CAPTURE_FILE, *workers, env=env)
    assert unguarded.returncode != 0  # what the guard is for


FLUSHES_DENORMALS = """
import torch
from hypothesis import given, strategies as st

def test_flushes_denormals_as_the_scgpt_recipe_does():
    torch.set_flush_denormal(True)

@given(st.floats())
def test_draws_floats_after(x):
    assert x == x or x != x
"""


@pytest.mark.slow  # pytest sessions of its own, each importing torch
def test_a_test_that_flushes_denormals_leaves_the_next_drawing_floats(tmp_path):
    """tests/float_guard.py: a recipe run in a worker turns flushing of denormal floats on for
    the whole process; the tests after it draw floats as usual (without the guard hypothesis
    refuses to: FloatingPointError)."""
    env = session_env()
    guarded = run_pytest(tmp_path, FLUSHES_DENORMALS, "-p", "float_guard", env=env)
    assert guarded.returncode == 0 and "2 passed" in guarded.stdout, guarded.stdout[-3000:]
    unguarded = run_pytest(tmp_path, FLUSHES_DENORMALS, env=env)
    assert unguarded.returncode != 0 and "FloatingPointError" in unguarded.stdout, \
        unguarded.stdout[-3000:]


GROUPED = """
import os
import pytest

pytestmark = pytest.mark.xdist_group("one")

@pytest.mark.parametrize("i", range(4))
def test_grouped(i):
    print("worker", os.environ["PYTEST_XDIST_WORKER"])

@pytest.mark.parametrize("i", range(4))
def test_grouped_too(i):
    pass
"""


@pytest.mark.slow  # a pytest session on three xdist workers
def test_loadgroup_keeps_a_group_on_one_worker(tmp_path):
    """`make test` runs `--dist loadgroup` so that the smoke demo's browser tests share the one
    worker that makes the demo (a session fixture: made once per worker that asks). pytest 9.2
    dropped the group from the node ids xdist sends (pytest-xdist#1386): each test went to any
    worker, and three workers made the demo, 111 s each. pyproject.toml pins pytest below 9.2."""
    env = session_env()
    done = run_pytest(tmp_path, GROUPED, "-n", "3", "--dist", "loadgroup", "-vv", env=env)
    assert done.returncode == 0, done.stdout[-3000:]
    workers = {line.split()[0] for line in done.stdout.splitlines() if "PASSED" in line}
    assert len(workers) == 1 and done.stdout.count("@one") >= 8, done.stdout[-3000:]
