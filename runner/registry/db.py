"""Engines and migrations. One code path for SQLite (embedded default) and PostgreSQL."""

from __future__ import annotations

import functools
import threading

import sqlalchemy as sa

from runner import settings
from runner.errors import ForgeError

_lock = threading.Lock()


class DatabaseError(ForgeError):
    reason = "database_error"


@functools.lru_cache(maxsize=16)
def _engine(url: str) -> sa.Engine:
    if url.startswith("sqlite"):
        path = sa.engine.make_url(url).database
        if path and path != ":memory:":
            from pathlib import Path

            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 60})

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record):
            # Take over transaction control from pysqlite so BEGIN IMMEDIATE below is ours:
            # every transaction holds the write lock from its start, which is what makes
            # check-balance-then-debit atomic across processes.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

        @sa.event.listens_for(engine, "begin")
        def _on_begin(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    return sa.create_engine(url, pool_pre_ping=True)


def get_engine(url: str | None = None) -> sa.Engine:
    with _lock:
        return _engine(url or settings.db_url())


def alembic_config(url: str | None = None):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", "runner.registry:migrations")
    cfg.set_main_option("sqlalchemy.url", (url or settings.db_url()).replace("%", "%%"))
    return cfg


def upgrade(url: str | None = None, revision: str = "head") -> str | None:
    """Bring the registry schema to `revision`; a no-op when it is already there. At head it
    also writes the skills forge-runner exposes, so that every audit row names its skill."""
    from alembic import command

    engine = get_engine(url)
    cfg = alembic_config(url)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
        if revision == "head":
            from runner.tools import register_tools

            register_tools(conn=conn)
    return current_revision(url)


def current_revision(url: str | None = None) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with get_engine(url).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
