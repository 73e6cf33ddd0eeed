"""Database engines and schema migrations for SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, event
from sqlalchemy import create_engine as sqlalchemy_create_engine
from sqlalchemy.engine import URL, make_url

from spendgate.errors import SchemaOutdatedError

# NOTE: migrations are found beside the source tree, so spendgate runs from an
# editable install (make install) or a checkout, not from a built wheel.
MIGRATIONS_DIR = Path(__file__).resolve().parents[3] / "migrations"

# How long a request may wait for the ledger before it fails (and, under
# fail_mode: closed, gets UNAVAILABLE). Chosen to stay well under the
# timeouts applications put on a model call.
SQLITE_BUSY_TIMEOUT_MS = 5_000
POSTGRES_CONNECT_TIMEOUT_S = 3
POSTGRES_STATEMENT_TIMEOUT_MS = 5_000
POSTGRES_IDLE_IN_TRANSACTION_TIMEOUT_MS = 5_000
POOL_TIMEOUT_S = 5
# libpq settings: TCP keepalives and a send timeout make a connection to a
# server that vanished without a reset fail within seconds, not hang.
_POSTGRES_CONNECT_ARGS = {
    "connect_timeout": POSTGRES_CONNECT_TIMEOUT_S,
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,
}


def create_engine(
    url: str,
    *,
    pool_size: int = 10,
    echo: bool = False,
    sqlite_synchronous: str = "normal",
    sqlite_busy_timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS,
) -> Engine:
    """Create an engine tuned for short write transactions on SQLite or PostgreSQL.

    SQLite transactions start with BEGIN IMMEDIATE, so a transaction takes
    the write lock before it reads a budget and two writers never both read
    the old value. PostgreSQL uses row locks (SELECT ... FOR UPDATE) instead.

    `sqlite_synchronous` is SQLite's synchronous setting in WAL mode: "normal"
    survives a crash of the process (SIGKILL included) but a power loss may
    drop the last transactions; "full" syncs every commit to disk, which cost
    about 4.5 ms a Check on the benchmark machine (docs/benchmarks.md).
    """
    if sqlite_synchronous not in ("normal", "full"):
        raise ValueError(
            f'sqlite_synchronous must be "normal" or "full", got {sqlite_synchronous!r}'
        )
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database in ("", ":memory:"):
            raise ValueError(
                "an in-memory SQLite database keeps nothing; use a file such as "
                "sqlite:///var/spendgate.db"
            )
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = sqlalchemy_create_engine(
            parsed,
            echo=echo,
            pool_size=pool_size,
            max_overflow=pool_size,
            connect_args={
                "timeout": sqlite_busy_timeout_ms / 1000,
                "check_same_thread": False,
            },
        )
        _configure_sqlite(engine, sqlite_synchronous.upper(), sqlite_busy_timeout_ms)
        return engine
    engine = sqlalchemy_create_engine(
        parsed,
        echo=echo,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_timeout=POOL_TIMEOUT_S,
        connect_args=_POSTGRES_CONNECT_ARGS
        if parsed.get_backend_name() == "postgresql"
        else {},
    )
    if parsed.get_backend_name() == "postgresql":
        _configure_postgres(engine)
    return engine


def _configure_postgres(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def on_connect(connection: Any, _record: Any) -> None:
        # A lock wait or a hung server fails the request instead of hanging it.
        cursor = connection.cursor()
        cursor.execute(f"SET statement_timeout = {POSTGRES_STATEMENT_TIMEOUT_MS}")
        # A replica cut off mid-transaction would otherwise keep its budget row
        # locks until the server notices the dead connection. No transaction of
        # ours sits idle this long.
        cursor.execute(
            "SET idle_in_transaction_session_timeout = "
            f"{POSTGRES_IDLE_IN_TRANSACTION_TIMEOUT_MS}"
        )
        cursor.close()
        connection.commit()


def _configure_sqlite(engine: Engine, synchronous: str, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def on_connect(connection: Any, _record: Any) -> None:
        # Hand transaction control to the "begin" hook below.
        connection.isolation_level = None
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def missing_sqlite_error(url: str | URL) -> str | None:
    """Return an error message when a SQLite URL's file does not exist, else None.

    Opening a missing file would create an empty database, so commands that
    need an existing ledger check this first. Raises ArgumentError for an
    invalid URL.
    """
    parsed = make_url(url)
    database = parsed.database or ""
    if parsed.get_backend_name() != "sqlite" or database in ("", ":memory:"):
        return None
    if Path(database).is_file():
        return None
    shown = parsed.render_as_string(hide_password=True)
    return (
        f"database file {database} not found. Check --database, or create the "
        f"ledger with `spendgate migrate --database {shown}`"
    )


def alembic_config(url: str | None = None) -> Config:
    """Return an alembic Config pointing at the shipped migrations."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def migrate(engine: Engine, revision: str = "head") -> None:
    """Upgrade the database of `engine` to `revision`."""
    config = alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def check_schema(engine: Engine) -> str:
    """Raise SchemaOutdatedError unless the database is at the newest revision.

    Returns the current revision.
    """
    scripts = ScriptDirectory.from_config(alembic_config())
    heads = set(scripts.get_heads())
    with engine.connect() as connection:
        current = set(MigrationContext.configure(connection).get_current_heads())
        connection.rollback()
    known = {revision.revision for revision in scripts.walk_revisions()}
    unknown = current - known
    if unknown:
        raise SchemaOutdatedError(
            f"database schema is at revision {', '.join(sorted(unknown))}, which is "
            "newer than this spendgate; run the spendgate release that migrated it"
        )
    if current != heads:
        have = ", ".join(sorted(current)) or "none"
        want = ", ".join(sorted(heads))
        shown = engine.url.render_as_string(hide_password=True)
        raise SchemaOutdatedError(
            f"database schema is at revision {have}, but this spendgate needs {want}; "
            f"run `spendgate migrate --database {shown}` first"
        )
    return next(iter(current))
