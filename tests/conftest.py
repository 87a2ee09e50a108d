"""Shared fixtures. Servers (Redis, PostgreSQL, moto S3) are started by the tests themselves, on
free ports, once per session and only when a test asks for them (see ``tests/servers.py``)."""

from __future__ import annotations

import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # a checkout run without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from storage.db import head_revision, make_engine, session_factory, upgrade
from storage.models import Base
from tests.servers import S3_TEST_ENV, MotoServer, PostgresServer, RedisServer

DB_BACKENDS = ["sqlite", "postgresql"]

# --- servers ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with RedisServer() as server:
        yield server.url


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """An empty database (no schema: call ``storage.db.upgrade`` on it), shared by the session."""
    return postgres_server.create_database("genmill_test")


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto S3 endpoint URL; dummy AWS credentials are set for the session (and subprocesses)."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in S3_TEST_ENV.items():
            mp.setenv(name, value)
        mp.delenv("AWS_PROFILE", raising=False)
        with MotoServer() as server:
            yield server.endpoint_url


# --- migrated databases ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "genmill.db"
    upgrade(f"sqlite:///{path}")  # its engine is closed afterwards: the file is self-contained
    return path


@pytest.fixture(scope="session")
def _pg_template(postgres_server: PostgresServer) -> str:
    name = "genmill_template"
    upgrade(postgres_server.create_database(name))  # leaves no connection open, as CREATE ... TEMPLATE needs
    return name


def _reset_pg(url: str) -> bool:
    """Empty every table of a database migrated to head; False if it is not (a test changed the
    schema) or a lock stays held."""
    engine = make_engine(url, poolclass=NullPool)
    tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
    try:
        with engine.begin() as conn:
            conn.execute(text("SET LOCAL lock_timeout = '5s'"))
            if conn.execute(text("SELECT version_num FROM alembic_version")).scalar() != head_revision():
                return False
            conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
        return True
    except DBAPIError:
        return False
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def _pg_shared_db(postgres_server: PostgresServer, _pg_template: str) -> dict[str, str]:
    # CREATE DATABASE costs ~0.3 s; emptying the tables of one shared database ~10 ms
    return {"name": "genmill_shared", "url": postgres_server.create_database("genmill_shared", _pg_template)}


@pytest.fixture(params=DB_BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database migrated to head, on each store: a copy of a template file (SQLite), or
    a shared database whose tables are emptied first (PostgreSQL; recreated from the template if
    a test left its schema changed). Tests that migrate or alter the schema use ``empty_db_url``."""
    if request.param == "sqlite":
        path = tmp_path / "genmill.db"
        shutil.copyfile(request.getfixturevalue("_sqlite_template"), path)
        yield f"sqlite:///{path}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    shared: dict[str, str] = request.getfixturevalue("_pg_shared_db")
    if not _reset_pg(shared["url"]):
        server.drop_database(shared["name"])
        server.create_database(shared["name"], template=request.getfixturevalue("_pg_template"))
    yield shared["url"]


@pytest.fixture(params=DB_BACKENDS)
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database without any schema, on each store (for migration tests)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh' / 'genmill.db'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    name = f"empty_{uuid.uuid4().hex[:12]}"
    yield server.create_database(name)
    server.drop_database(name)


@pytest.fixture
def db(db_url: str) -> Iterator[sessionmaker[Session]]:
    """A sessionmaker on ``db_url``, as the repository functions take it."""
    engine = make_engine(db_url)
    yield session_factory(engine)
    engine.dispose()


# --- models ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Llama checkpoint folder (safetensors + SentencePiece tokenizer), built once."""
    from workers.llm.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("models") / "tiny-llama", arch="llama")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> Iterator[None]:
    """The tests' models are tiny: intra-op threads gain nothing, and on a busy 2-core machine the
    thread hand-offs make them several times slower. Worker subprocesses set their own threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
