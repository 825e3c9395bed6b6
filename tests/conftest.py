"""Shared fixtures: a migrated registry on SQLite and on PostgreSQL.

PostgreSQL tests use the server named by FORGE_TEST_PG_URL (CI sets it, so they fail
rather than skip there); each test gets a fresh database, dropped afterwards.
"""

from __future__ import annotations

import os
import subprocess
import textwrap
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def _find_pg_url() -> str | None:
    """FORGE_TEST_PG_URL when set (CI: must work); else the local server if it answers."""
    url = os.environ.get("FORGE_TEST_PG_URL")
    if url:
        return url
    try:
        engine = sa.create_engine(DEFAULT_PG_URL)
        with engine.connect():
            pass
        engine.dispose()
        return DEFAULT_PG_URL
    except Exception:
        return None


PG_URL = _find_pg_url()


def _pg_admin_engine():
    return sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")


def make_pg_database() -> str:
    """Create an empty database on the test server and return its URL."""
    name = f"forge_t_{uuid.uuid4().hex[:12]}"
    admin = _pg_admin_engine()
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    admin.dispose()
    return sa.engine.make_url(PG_URL).set(database=name).render_as_string(hide_password=False)


def drop_pg_database(url: str) -> None:
    from runner.registry.db import _engine

    name = sa.engine.make_url(url).database
    _engine.cache_clear()  # forget pooled engines; DROP ... WITH (FORCE) ends their sessions
    admin = _pg_admin_engine()
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


@contextmanager
def migrated_registry(kind: str, tmp_path: Path, monkeypatch):
    """A migrated, empty registry; FORGE_DB_URL and FORGE_HOME point at it."""
    from runner.registry import db

    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'forge.db'}"
    else:
        if not PG_URL:
            pytest.skip("no PostgreSQL: set FORGE_TEST_PG_URL or start the local server")
        url = make_pg_database()
    monkeypatch.setenv("FORGE_DB_URL", url)
    monkeypatch.setenv("FORGE_HOME", str(tmp_path / "home"))
    db.upgrade(url)
    try:
        yield url
    finally:
        if kind == "postgresql":
            drop_pg_database(url)
        else:
            db._engine.cache_clear()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path, monkeypatch):
    with migrated_registry(request.param, tmp_path, monkeypatch) as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path, monkeypatch):
    with migrated_registry("sqlite", tmp_path, monkeypatch) as url:
        yield url


@pytest.fixture
def pg_url(tmp_path, monkeypatch):
    with migrated_registry("postgresql", tmp_path, monkeypatch) as url:
        yield url


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
ARCH_OVERRIDES = [f"parent.artifact_id={BASE_ID}", "parent.family=scgpt-test",
                  *(f"parent.{k}={v}" for k, v in ARCH.items())]


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


def seed_registry(checkpoint: Path) -> None:
    """Register the CBMC dataset and the tiny base; grant the agent 10 credits."""
    from runner.registry import catalog, ledger
    from runner.jobs import weights
    from runner.jobs.datasets import builtin_citation

    catalog.register_dataset(DATASET_ID, "CBMC CITE-seq", builtin_citation("cbmc"))
    catalog.register_model(
        artifact_id=BASE_ID, title="tiny scGPT base", created_by="test",
        metadata={"family": "scgpt-test", "framework": "scgpt", "task": "external",
                  "architecture": ARCH},
        origin_type="external", origin_url=checkpoint.as_uri(),
        content_hash=weights.tree_hash(weights.file_hashes(checkpoint)))
    ledger.grant(AGENT, "10")


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
    repo = Path(__file__).resolve().parents[1]
    clone = tmp_path_factory.mktemp("code") / "forge-runner"
    subprocess.run(["git", "clone", "-q", "--local", str(repo), str(clone)], check=True)
    return clone


def fake_code_repo(tmp_path: Path, body: str) -> Path:
    """A git repository whose trainers.entrypoint is `body`: a stand-in trainer."""
    repo = tmp_path / "fake-code"
    (repo / "trainers").mkdir(parents=True)
    (repo / "trainers" / "__init__.py").write_text("")
    (repo / "trainers" / "entrypoint.py").write_text(textwrap.dedent(body))
    for cmd in (["init", "-q"], ["add", "-A"],
                ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "fake"]):
        subprocess.run(["git", *cmd], cwd=repo, check=True)
    return repo


# A stand-in trainer: writes a checkpoint and result.json with METRICS in a blink.
STAND_IN_TRAINER = """
    import json, sys, pathlib
    m = json.load(open(sys.argv[1]))
    out = pathlib.Path(m["output_dir"])
    (out / "checkpoint").mkdir()
    (out / "checkpoint" / "best_model.pt").write_bytes(json.dumps(m["training"]).encode())
    print("trained", flush=True)
    json.dump({"status": "ok", "metrics": METRICS, "checkpoint": {"dir": "checkpoint"}},
              open(out / "result.json", "w"))
"""


# --- a registry for dry runs: the pilot's parent and dataset ids, a clean scratch repository ------

PILOT_PARENT, PILOT_DATASET = "model-scgpt-cbmc-base", "dataset-geo-GSE100866"


def pilot_dry_run_registry(tmp_path: Path, monkeypatch) -> Path:
    """The pilot's parent (no weights: dry runs never read them) and the CBMC dataset with its
    real citation, agent a1 with 10 credits, and a one-commit repository as the code to pin."""
    import git

    from runner.registry import catalog, ledger
    from runner.jobs.datasets import builtin_citation

    path = tmp_path / "code"
    repo = git.Repo.init(path, initial_branch="main")
    (path / "train.py").write_text("print('train')\n")
    repo.index.add(["train.py"])
    who = git.Actor("t", "t@example.org")
    repo.index.commit("initial", author=who, committer=who)
    monkeypatch.setenv("FORGE_CODE_REPO", str(path))
    catalog.register_model(artifact_id=PILOT_PARENT, title="scGPT CBMC base", created_by="test",
                           metadata={"family": "scgpt", "framework": "scgpt"})
    catalog.register_dataset(PILOT_DATASET, "CBMC", builtin_citation("cbmc"))
    ledger.grant("a1", "10")
    return path
