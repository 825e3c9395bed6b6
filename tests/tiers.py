"""The suite's tiers: what a test needs beyond Python, and the check that it says so.

A test that needs one of these carries its marker (registered in pyproject.toml);
`make test-fast` deselects them all, `make test` runs everything:

- sandbox: it starts bubblewrap;  train: real training in the jail;  postgres: PostgreSQL;
- slurm: the one-node SLURM cluster;  browser: headless Chromium;
- mlflow_server: the session's MLflow tracking server (deploy/mlflow/up.sh).

Two checks keep the markers true, so the fast tier stays fast and a missing service never
hides in it:
- at collection, a test that asks for a fixture that starts one of these (FIXTURES) without
  its marker stops the session before anything runs;
- while a test runs, an audit hook (PEP 578) sees every process the test process starts: a
  `bwrap` job, `chromium` or SLURM command without the test's marker fails the test. (`train`
  is said by hand: a stand-in trainer in the jail is a job, not training.) The dry run's
  probe that bwrap can build the jail (`/usr/bin/true` in it, once per process) is not a
  job: unit tests need bwrap installed.
  Processes that a child starts are the child's: such a test (a `forge` subprocess, a
  background job) is marked by hand, and a job it ran is found by what every job leaves: its
  log beside the manifest the host wrote, in a run folder (`runs/<allocation>/`), under
  FORGE_HOME or the test's tmp_path.
  A test that left one without `sandbox` fails as if it had started bwrap itself.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

NEEDS = ("sandbox", "train", "postgres", "slurm", "browser", "mlflow_server")

# fixture -> what it starts (for any test that asks for it, directly or through others)
FIXTURES = {
    "pg_url": {"postgres"},
    "pg_registry": {"postgres"},
    "mlflow_server": {"mlflow_server", "postgres"},
    "chromium": {"browser"},
    "smoke_demo": {"sandbox", "train", "browser"},
    "slurm_cluster": {"slurm"},
}

# program -> what running it means
PROGRAMS = {"bwrap": "sandbox", "chromium": "browser",
            **{name: "slurm" for name in ("sbatch", "srun", "squeue", "scontrol", "sinfo",
                                          "scancel", "sacct")}}
PROBE = ["--", "/usr/bin/true"]  # runner/sandbox/supervisor.py: bwrap can build the jail

TIER_ORDER = ("slurm", "browser", "mlflow_server", "train", "sandbox", "postgres")  # a test's
#   tier in the summary: the first of its markers here, else "unit"
_started: list[tuple[str, str]] = []  # (need, command) seen while the current test runs
_SESSION_HOME = os.environ.get("FORGE_HOME")  # the environment's own, before any test set one
_watching = False


def _argv(args) -> list[str]:
    if isinstance(args, (str, bytes, os.PathLike)):
        args = [args]
    return [os.fsdecode(a) for a in (args or [])]


def _audit(event: str, args: tuple) -> None:
    if not _watching or event not in ("subprocess.Popen", "os.posix_spawn", "os.exec"):
        return
    argv = _argv(args[1])
    # the program itself, or one it execs: the jail is `sh -c ... prlimit ... bwrap ...`
    need = next((PROGRAMS[p] for p in map(os.path.basename, argv) if p in PROGRAMS), None)
    if need is None or argv[-2:] == PROBE:  # the dry run's one probe that the jail can be built
        return
    command = " ".join(argv)[:160]
    _started.append((need, command))


def marked(item: pytest.Item) -> set[str]:
    return {m.name for m in item.iter_markers() if m.name in NEEDS}


def pytest_configure(config: pytest.Config) -> None:
    for need in NEEDS:
        config.addinivalue_line("markers", f"{need}: see tests/tiers.py")
    if not getattr(sys, "_forge_tiers_hook", False):  # an audit hook cannot be removed: one
        sys.addaudithook(_audit)
        sys._forge_tiers_hook = True


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    wrong = []
    for item in items:
        needed = set().union(*(FIXTURES.get(f, set()) for f in getattr(item, "fixturenames", ())))
        if missing := needed - marked(item):
            wrong.append(f"{item.nodeid}: needs marker(s) {', '.join(sorted(missing))} "
                         f"(fixtures {', '.join(sorted(set(item.fixturenames) & set(FIXTURES)))})")
    if wrong:
        raise pytest.UsageError("tests without the markers of what they start "
                                "(tests/tiers.py):\n  " + "\n  ".join(wrong))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    global _watching
    _started.clear()
    _watching = True


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """After the test body: the logs of jobs that the test's children ran (see above)."""
    yield
    if "sandbox" in marked(item):
        return
    home = os.environ.get("FORGE_HOME")  # one the test set: not the developer's own home
    logs = [*Path(home).glob("runs/*/job.log")] if home and home != _SESSION_HOME else []
    if tmp_path := getattr(item, "funcargs", {}).get("tmp_path"):
        logs += (p for p in Path(tmp_path).rglob("job.log") if p.parent.parent.name == "runs")
    if log := next((p for p in logs if _launched(p.parent)), None):
        _started.append(("sandbox", f"a job, in a child process (its log {log})"))


def _launched(run: Path) -> bool:
    """A run folder the host made for a job: beside the log, the manifest it wrote for the
    jail (a JSON object naming the job's output folder), not a test's stand-in files."""
    try:
        manifest = json.loads((run / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "output_dir" in manifest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    outcome = yield
    if call.when != "teardown":
        return
    global _watching
    _watching = False
    missing = {}
    for need, command in _started:
        if need not in marked(item):
            missing.setdefault(need, command)
    _started.clear()
    report = outcome.get_result()
    if missing and report.outcome != "failed":
        report.outcome = "failed"
        report.longrepr = ("tests/tiers.py: this test started what its markers do not say:\n" +
                           "\n".join(f"  @pytest.mark.{need}: it ran `{command}`"
                                     for need, command in sorted(missing.items())))


# --- the five slowest tests of each tier and the ten slowest files, at the end of the run -----

_seconds: dict[str, float] = {}
_tier: dict[str, str] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Every phase of every test (under xdist, as the workers report them)."""
    _seconds[report.nodeid] = _seconds.get(report.nodeid, 0.0) + report.duration
    _tier[report.nodeid] = next((t for t in TIER_ORDER if t in report.keywords), "unit")


def pytest_terminal_summary(terminalreporter) -> None:
    if not _seconds:
        return
    write = terminalreporter.write_line
    terminalreporter.section("slowest per tier (setup + call + teardown)")
    for tier in ("unit", *reversed(TIER_ORDER)):
        tests = sorted(((s, n) for n, s in _seconds.items() if _tier[n] == tier), reverse=True)
        if tests:
            write(f"{tier}: {len(tests)} tests, {sum(s for s, _ in tests):.1f}s")
            for seconds, nodeid in tests[:5]:
                write(f"  {seconds:7.2f}s {nodeid}")
    files: dict[str, float] = {}
    for nodeid, seconds in _seconds.items():
        name = nodeid.partition("::")[0]
        files[name] = files.get(name, 0.0) + seconds
    write(f"the ten slowest files, of {sum(files.values()):.0f}s in all:")
    for name, seconds in sorted(files.items(), key=lambda kv: -kv[1])[:10]:
        write(f"  {seconds:7.1f}s {name}")
