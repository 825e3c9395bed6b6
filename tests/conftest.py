"""Shared fixtures: a migrated registry on SQLite and on PostgreSQL.

PostgreSQL tests use the server named by FORGE_TEST_PG_URL (CI sets it, so they fail
rather than skip there); each test gets a fresh database, dropped afterwards.
"""

from __future__ import annotations

import os
import uuid

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
    from runner.db import _engine

    name = sa.engine.make_url(url).database
    _engine.cache_clear()  # forget pooled engines; DROP ... WITH (FORCE) ends their sessions
    admin = _pg_admin_engine()
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path, monkeypatch):
    """A migrated, empty registry; FORGE_DB_URL and FORGE_HOME point at it."""
    from runner import db

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'forge.db'}"
    else:
        if not PG_URL:
            pytest.skip("no PostgreSQL: set FORGE_TEST_PG_URL or start the local server")
        url = make_pg_database()
    monkeypatch.setenv("FORGE_DB_URL", url)
    monkeypatch.setenv("FORGE_HOME", str(tmp_path / "home"))
    db.upgrade(url)
    yield url
    if request.param == "postgresql":
        drop_pg_database(url)
    else:
        db._engine.cache_clear()


def count_rows(url: str) -> dict[str, int]:
    """Row count of every registry table: tests compare before and after a failure."""
    from runner import db, schema

    with db.get_engine(url).connect() as conn:
        return {t.name: conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one()
                for t in schema.ALL_TABLES}
