"""Alembic environment: uses the connection handed over by ``latency_service.db.migrate`` when there is one, else
the URL from ``-x db_url=...``, the alembic config, or the service settings (``FIGS_DB_URL``)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

import latency_service.kernel_models  # noqa: F401  (registers issue 3's tables on Base for autogenerate)
from latency_service.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("db_url") or config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from latency_service.config import Settings

    return Settings().database_url


def _run(connection: Connection) -> None:
    # render_as_batch lets later migrations alter columns on SQLite, which has no ALTER COLUMN.
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from latency_service.db import make_engine

    engine = make_engine(_url())
    try:
        with engine.begin() as own_connection:
            _run(own_connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
