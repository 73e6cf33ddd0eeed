"""Fixtures that run spendgate for real: policies, migrated ledgers, a gRPC server."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

import grpc
import pytest
import sqlalchemy
from sqlalchemy import Engine, Row, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from spendgate.ledger import Ledger, create_engine, migrate
from spendgate.policy import Policy, load_policy
from spendgate.server import PolicyHolder, Running, create_server
from spendgate.v1 import spendgate_pb2_grpc as pb_grpc

POSTGRES_URL_VARIABLE = "SPENDGATE_TEST_POSTGRES_URL"
REQUIRE_POSTGRES_VARIABLE = "SPENDGATE_REQUIRE_POSTGRES"

# Where every test clock starts, so tests know their budget windows.
START = datetime(2040, 6, 12, 12, 0, tzinfo=UTC)

# Long enough that the background sweeper never runs during a test: tests
# call sweep() themselves.
SWEEP_INTERVAL_SECONDS = 3600.0

PolicyWriter = Callable[[Mapping[str, str]], Path]


class Clock:
    """A server clock that tests set and advance instead of sleeping."""

    def __init__(self, now: datetime = START) -> None:
        self._now = _utc(now)

    def __call__(self) -> datetime:
        return self._now

    def set(self, when: datetime) -> None:
        """Move the clock to `when`, an aware datetime in any timezone."""
        self._now = _utc(when)

    def advance(self, delta: timedelta) -> None:
        """Move the clock forward by `delta`."""
        self._now += delta


def _utc(when: datetime) -> datetime:
    # The server's own clock returns UTC, so the test clock does the same.
    if when.tzinfo is None:
        raise ValueError(f"the clock needs an aware datetime, got {when!r}")
    return when.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class Gate:
    """A running spendgate server with a connected client and its ledger."""

    stub: pb_grpc.SpendGateStub
    channel: grpc.Channel
    running: Running
    clock: Clock
    policy: Policy
    ledger: Ledger
    engine: Engine
    database_url: str

    def audit_rows(self, request_id: str) -> list[Row[Any]]:
        """Read the audit rows of a request_id in the order they were written."""
        query = text(
            "SELECT event, decision, reason_code, rule, reservation_id,"
            " estimated_micros, actual_micros, overage_micros"
            " FROM audit_events WHERE request_id = :request_id ORDER BY id"
        )
        with self.engine.connect() as connection:
            rows = list(connection.execute(query, {"request_id": request_id}))
            connection.rollback()
        return rows

    def count(self, table: str) -> int:
        """Count the rows of a ledger table."""
        with self.engine.connect() as connection:
            found = connection.execute(text(f"SELECT count(*) FROM {table}")).scalar()
            connection.rollback()
        return int(found or 0)


ServeFactory = Callable[..., Gate]


@pytest.fixture
def write_policy(tmp_path: Path) -> PolicyWriter:
    """Return a function writing YAML strings, keyed by file name, to a new folder."""
    written = 0

    def write(files: Mapping[str, str]) -> Path:
        nonlocal written
        written += 1
        directory = tmp_path / f"policies-{written}"
        for name, content in files.items():
            path = directory / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content, encoding="utf-8")
        return directory

    return write


def _migrate(url: str) -> None:
    engine = create_engine(url)
    try:
        migrate(engine)
    finally:
        engine.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """Return the URL of a SQLite file in tmp_path, migrated to the newest revision."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    _migrate(url)
    return url


def _postgres_unavailable(reason: str) -> NoReturn:
    if os.environ.get(REQUIRE_POSTGRES_VARIABLE) == "1":
        pytest.fail(f"{reason}, but {REQUIRE_POSTGRES_VARIABLE}=1 requires PostgreSQL")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_admin() -> Iterator[Engine]:
    """Connect to the server named by SPENDGATE_TEST_POSTGRES_URL, or skip.

    The engine runs in autocommit mode, for CREATE SCHEMA and DROP SCHEMA.
    """
    url = os.environ.get(POSTGRES_URL_VARIABLE, "")
    if not url:
        _postgres_unavailable(f"{POSTGRES_URL_VARIABLE} is not set")
    safe_url = make_url(url).render_as_string(hide_password=True)
    engine = sqlalchemy.create_engine(
        url,
        poolclass=NullPool,
        isolation_level="AUTOCOMMIT",
        connect_args={"connect_timeout": 5},
    )
    problem = ""
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except OperationalError as error:
        problem = str(error.orig or error).splitlines()[0]
    if problem:
        # Outside the except block, so a failure does not print the driver's traceback.
        engine.dispose()
        _postgres_unavailable(f"cannot connect to PostgreSQL at {safe_url}: {problem}")
    yield engine
    engine.dispose()


@pytest.fixture
def postgres_url(postgres_admin: Engine) -> Iterator[str]:
    """Return a URL whose search_path is a new, migrated schema; drop it afterwards.

    Each test gets its own schema, so tests sharing one database never see
    each other's rows.
    """
    schema = f"sg_{secrets.token_hex(6)}"
    with postgres_admin.connect() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    base = make_url(os.environ[POSTGRES_URL_VARIABLE])
    options = f"{base.query.get('options', '')} -csearch_path={schema}".strip()
    url = base.update_query_dict({"options": options}).render_as_string(
        hide_password=False
    )
    try:
        _migrate(url)
        yield url
    finally:
        with postgres_admin.connect() as connection:
            # A connection that a failed test left open would block DROP, so the
            # drop gives up after 10 s.
            connection.execute(text("SET lock_timeout = '10s'"))
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
def ledger_url(request: pytest.FixtureRequest) -> str:
    """Return a migrated ledger URL, once on SQLite and once on PostgreSQL."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


@pytest.fixture
def serve() -> Iterator[ServeFactory]:
    """Return a function starting a server on a free port; every server stops after.

    The function takes the policy directory and the ledger URL, and
    optionally a Clock and the thread pool model on SQLite, and returns a
    Gate with a connected client.
    """
    started: list[Gate] = []

    def start(
        policy_dir: Path,
        database_url: str,
        *,
        clock: Clock | None = None,
        thread_pool_on_sqlite: bool = False,
    ) -> Gate:
        clock = clock or Clock()
        policy = load_policy(policy_dir)
        engine = create_engine(database_url)
        ledger = Ledger(engine)
        running = create_server(
            "127.0.0.1:0",
            PolicyHolder(policy),
            ledger,
            clock=clock,
            sweep_interval=SWEEP_INTERVAL_SECONDS,
            thread_pool_on_sqlite=thread_pool_on_sqlite,
        )
        channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
        # The generated stub class carries no type annotations.
        stub = pb_grpc.SpendGateStub(channel)  # type: ignore[no-untyped-call]
        gate = Gate(
            stub=stub,
            channel=channel,
            running=running,
            clock=clock,
            policy=policy,
            ledger=ledger,
            engine=engine,
            database_url=database_url,
        )
        started.append(gate)
        return gate

    yield start

    for gate in started:
        gate.channel.close()
        gate.running.stop(grace=1.0)
        gate.engine.dispose()
