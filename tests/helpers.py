"""Plain helpers the tests import (`from helpers import ...`); the fixtures are in conftest.

PostgreSQL: the server named by FORGE_TEST_PG_URL (CI sets it, so the tests fail rather
than skip there), else the local server if it answers.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import textwrap
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def _find_pg_url() -> str | None:
    """FORGE_TEST_PG_URL when set (CI: must work); else the local server if it answers."""
    url = os.environ.get("FORGE_TEST_PG_URL")
    if url:
        return url
    try:
        engine = sa.create_engine(DEFAULT_PG_URL, poolclass=sa.pool.NullPool)
        with engine.connect():
            pass
        return DEFAULT_PG_URL
    except (sa.exc.SQLAlchemyError, ImportError):
        return None


PG_URL = _find_pg_url()


def _pg_admin():
    """Autocommit (CREATE/DROP DATABASE refuse a transaction) and no pool: nothing stays
    connected between calls."""
    return sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)


def make_pg_database(*, template: str | None = None, prefix: str = "forge_t") -> str:
    """Create a database on the test server, empty or a copy of `template` (a URL), and return
    its URL. PostgreSQL copies a template only while nobody is connected to it."""
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:12]}"
    sql = f'CREATE DATABASE "{name}"'
    if template:
        sql += f' TEMPLATE "{sa.engine.make_url(template).database}"'
    with _pg_admin().connect() as conn:
        conn.exec_driver_sql(sql)
    return sa.engine.make_url(PG_URL).set(database=name).render_as_string(hide_password=False)


def drop_pg_database(url: str) -> None:
    """Drop the database at `url`; WITH (FORCE) ends the sessions still on it."""
    forget_engine(url)
    name = sa.engine.make_url(url).database
    with _pg_admin().connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def forget_engine(url: str) -> None:
    """Close the registry's pooled connections to `url` and drop its cached engines."""
    from runner.registry import db

    db.get_engine(url).dispose()
    db._engine.cache_clear()


def copy_sqlite(src_url: str, dest: Path) -> str:
    """A copy of the SQLite database at `src_url` in `dest`, by SQLite's online backup (the
    source's WAL included); returns its URL."""
    src = sqlite3.connect(sa.engine.make_url(src_url).database)
    out = sqlite3.connect(dest)
    try:
        src.backup(out)
    finally:
        out.close()
        src.close()
    return f"sqlite:///{dest}"


def count_rows(url: str) -> dict[str, int]:
    """Row count of every registry table: tests compare before and after a failure."""
    from runner.registry import db, schema

    with db.get_engine(url).connect() as conn:
        return {t.name: conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one()
                for t in schema.ALL_TABLES}


# --- a registry ready to train: tiny base, CBMC dataset, a funded agent -----------------------

BASE_ID = "model-test-base"
DATASET_ID = "dataset-geo-GSE100866"
AGENT = "agent-e2e"
ARCH = {"n_layers": 2, "d_model": 32, "n_heads": 4, "d_hid": 64, "n_bins": 51,
        "dropout": 0.0, "input_emb_style": "continuous"}
# The same architecture as overrides, for the forge-train command line.
ARCH_OVERRIDES = [f"parent.artifact_id={BASE_ID}", "parent.family=scgpt",
                  *(f"parent.{k}={v}" for k, v in ARCH.items())]


def seed_registry(checkpoint: Path) -> None:
    """Register the CBMC dataset and the tiny base; grant the agent 10 credits."""
    from runner.jobs.datasets import builtin_citation
    from runner.registry import catalog, ledger

    catalog.register_dataset(DATASET_ID, "CBMC CITE-seq", builtin_citation("cbmc"))
    register_by_hand(BASE_ID, checkpoint, family="scgpt", architecture=ARCH,
                     title="tiny scGPT base")
    ledger.grant(AGENT, "10")


def register_by_hand(artifact_id: str, folder: Path, *, family: str,
                     architecture: dict | None = None, title: str = "by hand") -> dict:
    """An external checkpoint folder registered the old way: catalog.register_model with the
    metadata written by hand (`architecture` or none), not runner.jobs.parents."""
    from runner.jobs import weights
    from runner.registry import catalog

    meta = {"family": family, "framework": "scgpt", "task": "external"}
    if architecture is not None:
        meta["architecture"] = architecture
    return catalog.register_model(
        artifact_id=artifact_id, title=title, created_by="test", metadata=meta,
        origin_type="external", origin_url=folder.as_uri(),
        content_hash=weights.tree_hash(weights.file_hashes(folder)))


def operator_conf(tmp_path: Path, monkeypatch, local_yaml: str) -> Path:
    """A copy of conf/ with `local_yaml` as the operator's conf/local/default.yaml (a
    `# @package _global_` file), made the config directory (FORGE_CONFIG_DIR). Called again
    in one test, it rewrites that file: a test on the tracking server passes its
    `tracking_store.operator_yaml` along with its own lines."""
    import shutil

    conf = tmp_path / "conf"
    shutil.copytree(Path(__file__).resolve().parents[1] / "conf", conf, dirs_exist_ok=True)
    (conf / "local").mkdir(exist_ok=True)
    (conf / "local" / "default.yaml").write_text("# @package _global_\n" + local_yaml)
    monkeypatch.setenv("FORGE_CONFIG_DIR", str(conf))
    return conf


def fake_code_repo(tmp_path: Path, body: str) -> Path:
    """A git repository whose trainers.entrypoint is `body`: a stand-in trainer. It carries
    this checkout's dataset loader and scoring, with which a stand-in predicts the held-out
    cells the host scores (STAND_IN_TRAINER)."""
    import shutil

    repo = tmp_path / "fake-code"
    trainers = Path(__file__).resolve().parents[1] / "trainers"
    shutil.copytree(trainers / "data", repo / "trainers" / "data",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("__init__.py", "scoring.py"):
        shutil.copy(trainers / name, repo / "trainers" / name)
    (repo / "trainers" / "entrypoint.py").write_text(textwrap.dedent(body))
    for cmd in (["init", "-q"], ["add", "-A"],
                ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "fake"]):
        subprocess.run(["git", *cmd], cwd=repo, check=True)
    return repo


# The real fine-tune, shrunk to seconds: one epoch of a few batches of short cells.
TINY = ["training.max_epochs=1", "training.batch_size=32", "training.max_seq_len=33",
        "training.limit_train_batches=4", "training.limit_eval_batches=2",
        "training.log_every_n_steps=2"]

# A stand-in trainer: writes a checkpoint and result.json with METRICS in a blink. A fine-tune
# also predicts every held-out cell, which the host scores (runner/jobs/truth.py): the
# first RIGHT of them (a fraction, in the split's order) right, the others wrong; METRICS'
# test_* values are claims the host replaces with its measurement.
STAND_IN_TRAINER = """
    import json, sys, pathlib
    m = json.load(open(sys.argv[1]))
    out = pathlib.Path(m["output_dir"])
    (out / "checkpoint").mkdir()
    (out / "checkpoint" / "best_model.pt").write_bytes(json.dumps(m["training"]).encode())
    RIGHT = 1.0
    if m["task"] == "finetune_celltype":
        from trainers.data.load import load, split_cells
        from trainers.scoring import write_predictions
        d, t = m["dataset"], m["training"]
        data = load(d["path"], d["format"], d.get("label_key"), d.get("gene_key"),
                    d.get("use_raw"))
        seed = m["seed"] if t.get("split_seed") is None else t["split_seed"]
        test = split_cells(data.n_cells, data.labels, t["val_fraction"], t["test_fraction"],
                           seed).test
        k, right = len(data.label_names), int(round(RIGHT * len(test)))
        pred = [int(c) if i < right else (int(c) + 1) % k
                for i, c in enumerate(data.labels[test])]
        write_predictions(out, test, {"candidate": pred}, data.label_names)
    print("trained", flush=True)
    json.dump({"status": "ok", "metrics": METRICS, "checkpoint": {"dir": "checkpoint"}},
              open(out / "result.json", "w"))
"""


# --- a registry for dry runs: the pilot's parent and dataset ids, a clean scratch repository ------

PILOT_PARENT, PILOT_DATASET = "model-scgpt-cbmc-base", "dataset-geo-GSE100866"


def scratch_code_repo(tmp_path: Path, monkeypatch) -> Path:
    """A clean one-commit repository as the code a dry run pins (FORGE_CODE_REPO)."""
    import git

    path = tmp_path / "code"
    repo = git.Repo.init(path, initial_branch="main")
    (path / "train.py").write_text("print('train')\n")
    repo.index.add(["train.py"])
    who = git.Actor("t", "t@example.org")
    repo.index.commit("initial", author=who, committer=who)
    monkeypatch.setenv("FORGE_CODE_REPO", str(path))
    return path


def stand_in_weights(artifact_id: str) -> None:
    """A few bytes as the stored weights of a model registered by hand with no content hash:
    a dry run finds weights there (a model without any is refused, weights_missing), and
    nothing here trains from them."""
    from runner.jobs import weights

    folder = weights.weights_dir(artifact_id)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "best_model.pt").write_bytes(b"stand-in")


def pilot_dry_run_registry(tmp_path: Path, monkeypatch) -> Path:
    """The pilot's parent (stand-in weights: dry runs never unpickle them) and the CBMC dataset
    with its real citation, agent a1 with 10 credits, and a one-commit repository as the code
    to pin."""
    from runner.jobs.datasets import builtin_citation
    from runner.registry import catalog, ledger

    path = scratch_code_repo(tmp_path, monkeypatch)
    catalog.register_model(artifact_id=PILOT_PARENT, title="scGPT CBMC base", created_by="test",
                           metadata={"family": "scgpt", "framework": "scgpt"})
    stand_in_weights(PILOT_PARENT)
    catalog.register_dataset(PILOT_DATASET, "CBMC", builtin_citation("cbmc"))
    ledger.grant("a1", "10")
    return path


# --- where runs are tracked: the local store or the MLflow tracking server ----------------------

# The operator's selection of the tracking server (conf/tracking/server.yaml), as a
# conf/local/default.yaml body; its port comes from FORGE_MLFLOW_PORT.
SERVER_OPERATOR_YAML = "defaults:\n  - override /tracking: server\n"


@dataclass(frozen=True)
class MlflowServer:
    """A server deploy/mlflow/up.sh started: its URL and where it keeps the artifacts."""
    url: str
    port: int
    artifacts: Path  # --artifacts-destination
    backend_url: str


@dataclass(frozen=True)
class TrackingStore:
    """The `tracking_store` fixture: "local" (the default SQLite store under FORGE_HOME) or
    "server" (the session's MLflow server, selected in the operator's conf/local)."""
    kind: str
    server: MlflowServer | None
    since_ms: int  # runs of this test started at or after this (the server is shared)

    @property
    def operator_yaml(self) -> str:
        """What the operator's conf/local/default.yaml needs for this store ("" for local)."""
        return SERVER_OPERATOR_YAML if self.server else ""


def assert_on_server(store: TrackingStore, client, run_id: str, *, files: tuple[str, ...] = ()
                     ) -> Path:
    """The run lives on the store's server and its artifacts (`files`, relative to the run's
    artifact root) were uploaded through it: they lie under the server's artifact destination,
    and no local MLflow store or artifact folder appeared under FORGE_HOME. Returns the run's
    artifact folder on the server's side."""
    assert store.server is not None
    assert client.tracking_uri == store.server.url
    run = client.get_run(run_id)
    prefix = "mlflow-artifacts:/"
    assert run.info.artifact_uri.startswith(prefix), run.info.artifact_uri
    folder = store.server.artifacts / run.info.artifact_uri.removeprefix(prefix)
    for name in files:
        assert (folder / name).is_file(), (name, sorted(p.name for p in folder.rglob("*")))
    home = Path(os.environ["FORGE_HOME"])
    assert not (home / "mlflow.db").exists() and not (home / "mlartifacts").exists()
    assert not list(home.rglob("MLmodel")) and not list(home.rglob("resolved.yaml"))
    return folder

# A stand-in trainer that says "working" once it runs, then sleeps until it is stopped.
SLEEPING_TRAINER = """
    import time
    print("working", flush=True)
    time.sleep(600)
""" + STAND_IN_TRAINER.replace("METRICS", '{"test_macro_f1": 0.5, "test_accuracy": 0.5}')


# --- stand-in candidates for the gate: a registered version with the real CBMC split ----------

def cbmc_split() -> dict:
    """The summary of CBMC's seed-0 split (fractions 0.1/0.1), as a trained version records it."""
    from runner.jobs import datasets
    from trainers.data.load import load, split_cells

    data = load(datasets.loader_input("cbmc", datasets.fetch("cbmc")), "cbmc_mat")
    return split_cells(data.n_cells, data.labels, 0.1, 0.1, 0).summary()


FRAMEWORKS = {"scgpt": "scgpt", "scvi": "scvi-tools", "linear": "scikit-learn"}


def stand_in_candidate(parent_id: str, artifact_id: str, split: dict | None = None, *,
                       family: str = "scgpt", weights_file: bytes = b"stand-in") -> str:
    """A registered candidate of `parent_id` (of `family`) with the training record the gate
    reads (the real CBMC split of seed 0, or `split`) and `weights_file` as its weights."""
    from runner.jobs import weights
    from runner.registry import catalog, ledger

    alloc = ledger.reserve(AGENT, "0.01", f"stand-in-{artifact_id}", wall_time_cap_min=1,
                           vram_cap_gb=1, price_per_hour="0.5")
    ledger.settle(alloc["id"], 1.0, artifact_id=artifact_id)
    folder = weights.weights_dir(artifact_id)
    folder.mkdir(parents=True)
    (folder / "best_model.pt").write_bytes(weights_file)
    catalog.register_model(
        artifact_id=artifact_id, title="stand-in candidate", created_by=AGENT,
        parent_artifact_id=parent_id, training_dataset_artifact_id=DATASET_ID,
        eval_dataset_artifact_id=DATASET_ID,
        content_hash=weights.tree_hash(weights.file_hashes(folder)),
        metadata={"family": family, "framework": FRAMEWORKS[family], "task": "finetune_celltype",
                  "split": split or cbmc_split()},
        version={"code_repo_url": "file:///stand-in", "code_commit_sha": "0" * 40,
                 "gpu_allocation_id": alloc["id"], "eval_metrics_json": {"test_macro_f1": 0.5},
                 "training_params_json": {"training": {
                     "seed": 0, "split_seed": None, "val_fraction": 0.1, "test_fraction": 0.1,
                     "max_seq_len": 33, "batch_size": 32, "precision": "32"}}})
    return artifact_id


# --- stand-in eval jobs for the real gate (tests/test_gate.py, tests/test_improvements.py) --------

# A stand-in job's start: the real held-out cells of its manifest (an eval manifest's split, or
# a training manifest's seed and fractions) and their labels, read with the real loader, as
# any job can. The host scores what it writes against its own rebuild of the same cells.
GATE_HELD_OUT = """
    import json, sys, pathlib
    from trainers.data.load import load, split_cells
    from trainers.scoring import write_predictions
    m = json.load(open(sys.argv[1]))
    out = pathlib.Path(m["output_dir"])
    d = m["dataset"]
    s = m.get("split") or {**m["training"], "seed": m["seed"]}
    data = load(d["path"], d["format"], d.get("label_key"))
    split = split_cells(data.n_cells, data.labels, s["val_fraction"], s["test_fraction"],
                        s["seed"])
    cells, k = split.test, len(data.label_names)
    true = data.labels[cells].tolist()
"""


def stand_in_gate_repo(repo: Path, body: str, entrypoint: str | None = None) -> Path:
    """A code repository at `repo` with this checkout's dataset loader and scoring (what
    GATE_HELD_OUT needs), whose trainers.gate_eval is `body` (and trainers.entrypoint, when
    given, `entrypoint`)."""
    import shutil

    checkout = Path(__file__).resolve().parents[1]
    shutil.copytree(checkout / "trainers" / "data", repo / "trainers" / "data",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("__init__.py", "scoring.py"):
        shutil.copy(checkout / "trainers" / name, repo / "trainers" / name)
    (repo / "trainers" / "gate_eval.py").write_text(textwrap.dedent(body))
    if entrypoint is not None:
        (repo / "trainers" / "entrypoint.py").write_text(textwrap.dedent(entrypoint))
    for cmd in (["init", "-q"], ["add", "-A"],
                ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "stand-in"]):
        subprocess.run(["git", *cmd], cwd=repo, check=True)
    return repo


# --- concurrency and servers --------------------------------------------------------------------

def race(code: str, argvs: list[list[str]], env: dict, go: Path) -> list[str]:
    """Run `python -c code ARGV... GO` once per argv, released together when `go` appears (each
    worker waits for it), and return their stripped stdouts, in order; a worker that fails
    fails the test."""
    import sys
    import time

    procs = [subprocess.Popen([sys.executable, "-c", code, *argv, str(go)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for argv in argvs]
    time.sleep(1.0)  # every interpreter up and waiting
    go.touch()
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        outs.append(out.strip())
    return outs


@contextmanager
def serving(app):
    """`app` served by uvicorn on a free loopback port in a thread; yields its base URL."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def http_status(request) -> int:
    """The HTTP status a URL or urllib Request answers, error statuses included."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
