"""Alembic environment for GenMill's SQL store.

``storage.db.upgrade(url)`` passes an open connection in ``config.attributes["connection"]`` (its
own transaction and lock around the whole run). The ``alembic`` command line works too, for
writing new revisions: ``alembic -c <cfg> -x url=sqlite:////tmp/x.db revision --autogenerate``,
or with ``GENMILL_DATABASE_URL`` set.
"""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

from storage.db import make_engine, normalize_url
from storage.models import Base

config = context.config
target_metadata = Base.metadata

if config.config_file_name is not None:  # the alembic CLI; storage.db.upgrade leaves logging alone
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _url() -> str:
    url = (
        context.get_x_argument(as_dictionary=True).get("url")
        or config.get_main_option("sqlalchemy.url")
        or os.environ.get("GENMILL_DATABASE_URL")
    )
    if not url:
        raise RuntimeError("no database URL: pass -x url=... or set GENMILL_DATABASE_URL")
    return normalize_url(url).render_as_string(hide_password=False)


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things: later revisions recreate tables in batch mode
        render_as_batch=connection.dialect.name == "sqlite",
        # storage.db makes SQLite emit BEGIN before DDL too, so a failed migration rolls back
        transactional_ddl=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    url = _url()
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=url.startswith("sqlite"),
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(_url(), poolclass=NullPool)
    try:
        with engine.connect() as connection:
            _run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
