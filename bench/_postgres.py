"""A throwaway PostgreSQL database for one bench run, dropped afterwards."""

from __future__ import annotations

import secrets

import sqlalchemy
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DATABASE_PREFIX = "sg_bench_"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
CONNECT_TIMEOUT_SECONDS = 3


class PostgresUnavailableError(RuntimeError):
    """No PostgreSQL server accepts connections at the URL, or it rejected the setup."""


def _admin_engine(url: URL) -> sqlalchemy.Engine:
    return sqlalchemy.create_engine(
        url,
        isolation_level="AUTOCOMMIT",
        poolclass=sqlalchemy.NullPool,
        connect_args={"connect_timeout": CONNECT_TIMEOUT_SECONDS},
    )


def create_database(admin_url: str) -> tuple[URL, str]:
    """Create a database named sg_bench_<random hex>, return its URL and server version.

    `admin_url` names any existing database on the server, used only to run
    CREATE DATABASE. Only loopback hosts and Unix sockets are accepted, so a
    bench run never loads a shared server.
    """
    url = make_url(admin_url)
    host = url.host or ""
    if host and not host.startswith("/") and host not in LOOPBACK_HOSTS:
        raise PostgresUnavailableError(
            f"host {host!r} is not a loopback address. Point "
            "SPENDGATE_BENCH_POSTGRES_URL at 127.0.0.1 or a Unix socket."
        )
    name = DATABASE_PREFIX + secrets.token_hex(4)
    engine = _admin_engine(url)
    try:
        with engine.connect() as connection:
            version = connection.exec_driver_sql("SHOW server_version").scalar_one()
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except SQLAlchemyError as error:
        reason = str(error.orig) if hasattr(error, "orig") else str(error)
        raise PostgresUnavailableError(reason.strip().splitlines()[0]) from error
    finally:
        engine.dispose()
    return url.set(database=name), str(version)


def drop_database(admin_url: str, database: URL) -> None:
    """Drop the bench database, ending any session still connected to it."""
    name = database.database or ""
    if not name.startswith(DATABASE_PREFIX):
        raise ValueError(
            f"invalid bench database {name!r}: only {DATABASE_PREFIX}* databases "
            "are dropped"
        )
    engine = _admin_engine(make_url(admin_url))
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        engine.dispose()
