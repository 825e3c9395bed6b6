"""Engines, transactions and migrations. One code path for SQLite (embedded default) and
PostgreSQL."""

from __future__ import annotations

import functools
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa

from runner import settings
from runner.errors import ForgeError, StoreHalfMigrated

log = logging.getLogger(__name__)
_lock = threading.Lock()


class DatabaseError(ForgeError):
    reason = "database_error"


class RegistryMissing(DatabaseError):
    """A SQLite registry whose file does not exist: never created by a read (it would be an
    empty registry in the wrong place); `forge init` and `forge db upgrade` create one."""
    reason = "no_registry"


def unavailable(exc: BaseException, doing: str = "read the registry") -> DatabaseError | None:
    """A typed error for a driver error that says the database is unreachable, missing or not
    migrated (SQLAlchemy's OperationalError, ProgrammingError); None for any other error."""
    if isinstance(exc, (sa.exc.OperationalError, sa.exc.ProgrammingError)):
        return DatabaseError(f"cannot {doing}: {str(exc.orig).strip()}",
                             fix=f"migrate it: forge db upgrade (migrates {_configured()})")
    return None


def _configured() -> str:
    """The configured registry, as `forge db upgrade` would name it."""
    try:
        return shown(settings.db_url())
    except ForgeError:  # no home: the fix still reads
        return "FORGE_DB_URL, else the forge home's forge.db"


def shown(url: str) -> str:
    """A registry URL for people: a SQLite file's path; another URL without its password."""
    path = sqlite_path(url)
    return str(path) if path else sa.engine.make_url(url).render_as_string(hide_password=True)


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL; None for another database or an in-memory one."""
    if not url.startswith("sqlite"):
        return None
    path = sa.engine.make_url(url).database
    return Path(path).resolve() if path and path != ":memory:" else None


def _refuse_missing(url: str) -> None:
    path = sqlite_path(url)
    if path is not None and not path.is_file():
        raise RegistryMissing(
            f"no registry at {path}", field="registry.db_url",
            fix=f"create it: `forge db upgrade` (creates {path}), or `forge init DIR` for a new "
                "home; or cd into your forge home, or set FORGE_HOME or FORGE_DB_URL")


def outage(exc: BaseException) -> bool:
    """The database is away or locked past its lock timeout (not a bad statement): a retry
    may succeed once it answers."""
    return isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError,
                            sa.exc.DisconnectionError))


def now() -> datetime:
    """The registry's clock: timezone-aware UTC."""
    return datetime.now(UTC)


def as_utc(stamp: datetime | None) -> datetime | None:
    """A timestamp read back from the registry, timezone-aware: SQLite hands back UTC
    timestamps without their offset; PostgreSQL with it."""
    if stamp is not None and stamp.tzinfo is None:
        return stamp.replace(tzinfo=UTC)
    return stamp


def row(result) -> dict | None:
    """The first row of a result as a plain dict, or None."""
    first = result.mappings().first()
    return dict(first) if first else None


def rows_where_in(conn, query, column, keys, size: int = 500) -> Iterator[dict]:
    """The rows of `query` whose `column` is one of `keys`, as dicts, `size` keys a query (a
    bounded IN list on both backends)."""
    keys = sorted(k for k in keys if k is not None)
    for i in range(0, len(keys), size):
        yield from (dict(r) for r in conn.execute(query.where(column.in_(keys[i:i + size])))
                    .mappings())


@functools.lru_cache(maxsize=16)
def _engine(url: str) -> sa.Engine:
    if url.startswith("sqlite"):
        if (path := sqlite_path(url)) is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        wait_s = settings.db_lock_timeout_s()
        engine = sa.create_engine(url, connect_args={"timeout": wait_s})

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record):
            # Take over transaction control from pysqlite so BEGIN IMMEDIATE below is ours:
            # every transaction holds the write lock from its start, which is what makes
            # check-balance-then-debit atomic across processes.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={int(wait_s * 1000)}")
            _use_wal(cur, wait_s)
            cur.close()

        @sa.event.listens_for(engine, "begin")
        def _on_begin(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    engine = sa.create_engine(url, pool_pre_ping=True)
    lock_ms = int(settings.db_lock_timeout_s() * 1000)

    @sa.event.listens_for(engine, "connect")
    def _on_connect_pg(dbapi_conn, _record):
        # A lock held past this fails the statement (an outage the caller can retry) instead
        # of hanging it; set for the session, outside any transaction that could undo it.
        autocommit, dbapi_conn.autocommit = dbapi_conn.autocommit, True
        with dbapi_conn.cursor() as cur:
            cur.execute(f"SET lock_timeout = {lock_ms}")
        dbapi_conn.autocommit = autocommit

    return engine


def _use_wal(cur, wait_s: float) -> None:
    """Switch the file to WAL (kept in the file: once is enough). SQLite answers a switch that
    meets another process's switch of a new file with an immediate "database is locked",
    bypassing the busy timeout, so it is retried here within that timeout."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")  # an in-memory database stays in memory
            return
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def get_engine(url: str | None = None, *, create: bool = False) -> sa.Engine:
    """The pooled engine of `url` (the configured registry by default). A SQLite file that
    does not exist is RegistryMissing unless `create` (db.upgrade: `forge init`, `forge db
    upgrade`, the demo), so no read ever leaves an empty registry behind."""
    url = url or settings.db_url()
    if not create:
        _refuse_missing(url)
    with _lock:
        return _engine(url)


@contextmanager
def transaction(conn: sa.Connection | None = None, *,
                url: str | None = None) -> Iterator[sa.Connection]:
    """Join the caller's transaction `conn` when given one; else open our own on `url` (the
    configured registry by default), committed when the block ends, rolled back if it raises.
    Every registry function that takes `conn=` runs its statements in one of these."""
    if conn is not None:
        yield conn
        return
    with get_engine(url).begin() as c:
        yield c


def alembic_config(url: str | None = None):
    from alembic.config import Config  # lazy: alembic is ~150 ms, not on the dry run's path

    cfg = Config()
    cfg.set_main_option("script_location", "runner.registry:migrations")
    cfg.set_main_option("sqlalchemy.url", (url or settings.db_url()).replace("%", "%%"))
    return cfg


def upgrade(url: str | None = None, revision: str = "head") -> str | None:
    """Bring the registry schema to `revision` (a no-op when it is already there) and, at
    head, write the skills rows in the same transaction: what `forge db upgrade` runs."""
    from alembic import command  # lazy: alembic is ~150 ms, not on the dry run's path

    cfg = alembic_config(url)
    # one transaction, DDL included, on both backends; the one path that creates a registry
    with get_engine(url, create=True).begin() as conn:
        if conn.dialect.name == "postgresql":
            # concurrent upgrades take turns (on SQLite, BEGIN IMMEDIATE already makes them)
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
        _refuse_half_migrated(conn)
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
        if revision == "head":
            _register_skills(conn)
    return current_revision(url)


def _register_skills(conn: sa.Connection) -> None:
    """The skills rows (runner.api's calls), so that audit rows link to their skill. The
    skills are declared above this layer, which must not import them: the installed package
    names their writer as its `forge_runner.skills` entry point (pyproject.toml)."""
    from importlib.metadata import entry_points

    writers = entry_points(group="forge_runner.skills")
    if not writers:
        log.warning("no forge_runner.skills entry point: the skills rows were not written "
                    "(install the package: pip install -e .)")
    for writer in writers:
        writer.load()(conn=conn)


_MIGRATION_LOCK = 0x666F726765  # "forge": the advisory lock key of registry migrations


def _refuse_half_migrated(conn: sa.Connection) -> None:
    """Registry tables without a migration record: Alembic would create them again and fail
    half-way, so say what the store is instead."""
    from alembic.runtime.migration import MigrationContext  # lazy: alembic, ~150 ms

    if MigrationContext.configure(conn).get_current_revision() is not None:
        return
    tables = set(sa.inspect(conn).get_table_names())
    if "artifacts" in tables or "resource_allocations" in tables:
        raise StoreHalfMigrated(
            f"the registry {conn.engine.url.render_as_string(hide_password=True)} has "
            f"{len(tables)} tables but no migration record (alembic_version)",
            field="registry.db_url",
            fix="back it up, then restore it from a backup taken before the migration "
                "stopped, or start a new registry (FORGE_DB_URL) and run `forge db upgrade`")


@contextmanager
def _other_store(url: str) -> Iterator[sa.Connection | None]:
    """A connection of its own to another store (the MLflow one), disposed after; None for a
    SQLite file that does not exist, which is never created. SQLAlchemyError is the caller's."""
    if url.startswith("sqlite"):
        path = sa.engine.make_url(url).database
        if not path or not Path(path).is_file():
            yield None
            return
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            yield conn
    finally:
        engine.dispose()


def migration_state(url: str) -> tuple[list[str], str | None]:
    """Another store's tables (Alembic's aside) and its Alembic revision: runner/jobs/tracking.py
    asks why the MLflow store would not open. ([], None) when it cannot be read."""
    from alembic.runtime.migration import MigrationContext  # lazy: alembic, ~150 ms

    try:
        with _other_store(url) as conn:
            if conn is None:
                return [], None
            tables = [t for t in sa.inspect(conn).get_table_names()
                      if not t.startswith("alembic")]
            return tables, MigrationContext.configure(conn).get_current_revision()
    except sa.exc.SQLAlchemyError:
        return [], None


def store_revision(url: str) -> str | None:
    """Another store's Alembic revision(s), read without Alembic in one query: None when it
    has no migration record or cannot be read."""
    try:
        with _other_store(url) as conn:
            if conn is None:
                return None
            found = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars()
            return ",".join(sorted(found)) or None
    except sa.exc.SQLAlchemyError:
        return None


def current_revision(url: str | None = None) -> str | None:
    from alembic.runtime.migration import MigrationContext  # lazy: alembic, ~150 ms

    with get_engine(url).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
