"""Engines, sessions and schema migrations for the SQL store (SQLite embedded, PostgreSQL service).

Schema changes go through Alembic only. The migration scripts live inside the package
(``storage/migrations``), and ``upgrade(url)`` builds the Alembic config in code, so an installed
GenMill can migrate its database without an ``alembic.ini`` on the user's side.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# how long a SQLite writer waits for another writer's lock before "database is locked"
SQLITE_BUSY_TIMEOUT_MS = 30_000

# connection execution option read by the SQLite "begin" hook: a transaction that will write asks
# for the write lock up front (BEGIN IMMEDIATE). A deferred transaction that reads, then writes,
# fails at once in WAL mode if another writer committed in between (SQLITE_BUSY_SNAPSHOT: the busy
# timeout does not apply), so read-modify-write code must start with the lock.
SQLITE_BEGIN_OPTION = "genmill_sqlite_begin"

# any fixed 64-bit number: serialises concurrent `upgrade` calls on one PostgreSQL database
_PG_MIGRATION_LOCK = 0x67656E6D696C6C  # "genmill"


def normalize_url(url: str | URL) -> URL:
    """Parse a database URL; plain ``postgresql://`` / ``postgres://`` URLs use psycopg 3."""
    if isinstance(url, str) and url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u


def _sqlite_path(u: URL) -> Path | None:
    db = u.database
    if not db or db == ":memory:" or db.startswith("file:"):
        return None
    return Path(db)


def make_engine(url: str | URL, **kwargs: Any) -> Engine:
    """A new engine for ``url``; extra keyword arguments go to ``create_engine``."""
    u = normalize_url(url)
    if u.get_backend_name() == "sqlite":
        path = _sqlite_path(u)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        connect_args = {"check_same_thread": False, **kwargs.pop("connect_args", {})}
        engine = create_engine(u, connect_args=connect_args, **kwargs)
        _install_sqlite_hooks(engine, file_backed=path is not None)
    elif u.get_backend_name() == "postgresql":
        kwargs.setdefault("pool_pre_ping", True)  # survive a database restart under a long-lived worker
        engine = create_engine(u, **kwargs)
    else:
        raise ValueError(f"unsupported database URL {u.render_as_string(hide_password=True)!r}")
    _ENGINES.add(engine)
    return engine


def _install_sqlite_hooks(engine: Engine, *, file_backed: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
        # take BEGIN away from the sqlite3 module (it never begins before DDL and cannot do
        # BEGIN IMMEDIATE); `_on_begin` emits it instead
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")  # first: the next ones may wait
        if file_backed:
            _set_wal(cur)  # readers do not block the writer
            cur.execute("PRAGMA synchronous=NORMAL")  # safe with WAL; fsync at checkpoints only
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        options = conn.get_execution_options()
        if options.get("isolation_level") == "AUTOCOMMIT":
            return
        mode = options.get(SQLITE_BEGIN_OPTION, "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {'IMMEDIATE' if mode == 'IMMEDIATE' else 'DEFERRED'}")


def _set_wal(cur: sqlite3.Cursor) -> None:
    """Switch a file database to WAL (a no-op once the file is WAL: the mode is stored in it).

    The switch needs an exclusive lock, and SQLite may answer SQLITE_BUSY at once instead of calling
    the busy handler when another connection opens the fresh file at the same moment (several
    processes starting on a new embedded database): retry for up to the busy timeout.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    delay = 0.005
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    # objects stay readable after commit: the repository returns them detached
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def write_session(db: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose transaction holds the write lock from its start on SQLite; commits on exit.

    For read-modify-write code. On PostgreSQL it is an ordinary transaction (use row locks or
    conditional UPDATEs there).
    """
    with db(expire_on_commit=False) as session:
        session.connection(execution_options={SQLITE_BEGIN_OPTION: "IMMEDIATE"})
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


@contextmanager
def read_session(db: sessionmaker[Session]) -> Iterator[Session]:
    """A short read-only transaction; objects loaded from it stay usable after it closes."""
    # closing (not rolling back) detaches the loaded objects without expiring their attributes
    with db(expire_on_commit=False) as session:
        yield session


# --- cached engines -------------------------------------------------------------------------

_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()
_CACHE: dict[str, Engine] = {}
_CACHE_LOCK = threading.Lock()


def get_engine(url: str | URL) -> Engine:
    """One shared engine (and connection pool) per database URL in this process."""
    key = normalize_url(url).render_as_string(hide_password=False)
    with _CACHE_LOCK:
        engine = _CACHE.get(key)
        if engine is None:
            engine = _CACHE[key] = make_engine(key)
        return engine


def dispose_engines() -> None:
    """Close and forget the cached engines (tests, shutdown)."""
    with _CACHE_LOCK:
        engines = list(_CACHE.values())
        _CACHE.clear()
    for engine in engines:
        engine.dispose()


def _after_fork_in_child() -> None:
    # pooled connections must not be shared with the parent process: drop them without closing
    # the parent's sockets (SQLAlchemy's recommended pattern for multiprocessing)
    for engine in list(_ENGINES):
        engine.dispose(close=False)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# --- migrations ------------------------------------------------------------------------------


def alembic_config(url: str | URL | None = None) -> Any:
    """An Alembic ``Config`` for the packaged migrations, built in code (no alembic.ini)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        # configparser interpolation: a percent-encoded password needs '%%'
        rendered = normalize_url(url).render_as_string(hide_password=False)
        cfg.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    return cfg


def _run_alembic(url: str | URL, fn: Any, revision: str) -> None:
    # a one-off engine that keeps no connection open afterwards: a PostgreSQL template database
    # must have none, and the caller may delete a SQLite file
    engine = make_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                # hold the write lock while Alembic reads the current version and migrates: two
                # processes starting on a fresh database then migrate one after the other
                conn = conn.execution_options(**{SQLITE_BEGIN_OPTION: "IMMEDIATE"})
            with conn.begin():
                if engine.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
                cfg = alembic_config(url)
                cfg.attributes["connection"] = conn
                fn(cfg, revision)
    finally:
        engine.dispose()


def head_revision() -> str:
    """The newest migration's revision id (what ``upgrade`` brings a database to)."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def upgrade(url: str | URL, revision: str = "head") -> None:
    """Migrate the database at ``url`` to ``revision`` (default: the newest)."""
    from alembic import command

    _run_alembic(url, command.upgrade, revision)


def downgrade(url: str | URL, revision: str) -> None:
    from alembic import command

    _run_alembic(url, command.downgrade, revision)


def ensure_schema(url: str | URL) -> None:
    """Embedded mode's first run (and every start): bring the schema up to date."""
    upgrade(url)


def current_revision(url: str | URL) -> str | None:
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
