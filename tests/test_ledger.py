"""The ledger under concurrent Checks: hard budgets stay exact on both databases."""

from __future__ import annotations

import random
import signal
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import (
    Column,
    Engine,
    MetaData,
    String,
    Table,
    bindparam,
    event,
    literal,
    literal_column,
    select,
    text,
)
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from conftest import START, PolicyWriter, ServeFactory
from spendgate import evaluator
from spendgate.errors import ConflictError, LedgerUnavailableError, NotFoundError
from spendgate.evaluator import Decision, Reason
from spendgate.ledger import (
    CheckRecord,
    Ledger,
    Principal,
    WouldBlock,
    check_schema,
    create_engine,
    no_wait,
)
from spendgate.ledger._driver import Driver, Transaction
from spendgate.ledger._tables import audit_events, reservations
from spendgate.policy import ExpiryAction, Policy, Scope, load_policy
from spendgate.v1 import spendgate_pb2 as pb
from support import wait_for

# More threads than the server's 16 workers and the engine's 20 connections,
# so requests also queue for both.
THREADS = 48
LIMIT_MICROS = 1_000_000
USER_LIMIT_MICROS = 100_000

T = TypeVar("T")

POLICY = {
    "organization.yaml": """\
apiVersion: spendgate/v1
kind: Organization
name: test-org
timezone: UTC
reservation_ttl: 10m
""",
    # One micro-USD per input token, so N input tokens reserve N micro-USD.
    "catalog.yaml": """\
apiVersion: spendgate/v1
kind: ModelCatalog
models:
  - name: flat-1
    tokenizer: approximate
    price_per_million_tokens: {input: 1.00, output: 0}
    context_window: 2000000
    max_output_tokens: 1000
""",
    "research.yaml": """\
apiVersion: spendgate/v1
kind: Department
name: research
budgets:
  - {name: daily, period: day, limit_usd: 1.00}
  - {name: per-user-daily, period: day, limit_usd: 0.10, per: user}
""",
}


@pytest.fixture
def policy_dir(write_policy: PolicyWriter) -> Path:
    """Write a policy with a $1.00 department budget and $0.10 per user."""
    return write_policy(POLICY)


@pytest.fixture
def policy(policy_dir: Path) -> Policy:
    """Load the test policy."""
    return load_policy(policy_dir)


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[Ledger]:
    """Open a ledger on SQLite and again on PostgreSQL."""
    engine = create_engine(ledger_url)
    yield Ledger(engine)
    engine.dispose()


def check(
    ledger: Ledger,
    policy: Policy,
    request_id: str,
    micros: int,
    *,
    user: str = "",
    now: datetime = START,
) -> CheckRecord:
    """Decide on a flat-1 request of `micros` input tokens, as the server does."""
    request = evaluator.Request(
        department="research",
        model="flat-1",
        user=user,
        input_tokens=micros,
        max_output_tokens=0,
    )
    return ledger.check(
        request_id=request_id,
        principal=Principal(department="research", user=user),
        plan=evaluator.plan(policy, request, now),
        policy_version=policy.version,
        reservation_ttl=policy.organization.reservation_ttl,
        labels={},
        now=now,
    )


def run_together(count: int, work: Callable[[int], T]) -> list[T]:
    """Run work(0) .. work(count - 1) on `count` threads released at once."""
    barrier = threading.Barrier(count, timeout=30)

    def start(index: int) -> T:
        barrier.wait()
        return work(index)

    with ThreadPoolExecutor(max_workers=count) as pool:
        futures = [pool.submit(start, index) for index in range(count)]
        return [future.result(timeout=60) for future in futures]


def budget_key(policy: Policy, scope: Scope, user: str = "") -> str:
    """Return the ledger key of the research budget of `scope` at START."""
    lines = evaluator.budget_lines(policy, "research", "", user, START)
    assert lines is not None
    return next(line.key for line in lines if line.scope is scope)


def count_rows(engine: Engine, table: str) -> int:
    """Count the rows of a ledger table."""
    with engine.connect() as connection:
        found = connection.execute(text(f"SELECT count(*) FROM {table}")).scalar()
        connection.rollback()
    return int(found or 0)


def test_concurrent_checks_exact(ledger: Ledger, policy: Policy) -> None:
    estimate = 30_000
    department = budget_key(policy, Scope.DEPARTMENT)
    lines = evaluator.budget_lines(policy, "research", "", "", START) or ()
    highest_used = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal highest_used
        while not done.is_set():
            usage = ledger.read_usage(lines)[department]
            highest_used = max(highest_used, usage.used_micros)
            time.sleep(0.002)

    def check_and_commit(index: int) -> Decision:
        record = check(ledger, policy, f"r{index}", estimate, user=f"user-{index}")
        if record.decision is Decision.ALLOW:
            ledger.commit(
                record.reservation_id,
                input_tokens=estimate,
                cached_input_tokens=0,
                output_tokens=0,
                now=START,
            )
        return record.decision

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        decisions = Counter(run_together(THREADS, check_and_commit))
    finally:
        done.set()
        watcher.join()

    usage = ledger.read_usage(lines)[department]
    admitted = LIMIT_MICROS // estimate
    assert decisions[Decision.ALLOW] == admitted
    assert decisions[Decision.DENY] == THREADS - admitted
    assert usage.spent_micros == admitted * estimate
    assert usage.reserved_micros == 0
    assert highest_used <= LIMIT_MICROS
    assert count_rows(ledger.engine, "reservations") == admitted


def test_concurrent_grpc_checks_exact(
    serve: ServeFactory, policy_dir: Path, ledger_url: str
) -> None:
    gate = serve(policy_dir, ledger_url)
    estimate = 30_000

    def check_rpc(index: int) -> pb.CheckResponse:
        request = pb.CheckRequest(
            request_id=f"r{index}",
            principal=pb.Principal(department="research", user=f"user-{index}"),
            model="flat-1",
            input_tokens=estimate,
            max_output_tokens=0,
        )
        response: pb.CheckResponse = gate.stub.Check(request, timeout=60)
        return response

    responses = run_together(THREADS, check_rpc)

    admitted = LIMIT_MICROS // estimate
    allowed = [a for a in responses if a.decision == pb.DECISION_ALLOW]
    denied = [a for a in responses if a.decision == pb.DECISION_DENY]
    status = gate.stub.GetBudget(
        pb.GetBudgetRequest(principal=pb.Principal(department="research"))
    ).budgets[0]
    assert len(allowed) == admitted
    assert len(denied) == THREADS - admitted
    assert {a.reason_code for a in denied} == {"BUDGET_EXCEEDED"}
    assert len({a.reservation_id for a in allowed}) == admitted
    assert status.scope == "department:research"
    assert status.reserved_micros == admitted * estimate
    assert status.reserved_micros + status.spent_micros <= status.limit_micros


def test_concurrent_new_user_denied(ledger: Ledger, policy: Policy) -> None:
    estimate = USER_LIMIT_MICROS + 50_000

    records = run_together(
        THREADS,
        lambda index: check(ledger, policy, f"r{index}", estimate, user="newcomer"),
    )

    usage = ledger.read_usage(
        evaluator.budget_lines(policy, "research", "", "newcomer", START) or ()
    )
    user_key = budget_key(policy, Scope.USER, "newcomer")
    assert {record.decision for record in records} == {Decision.DENY}
    assert {record.reason for record in records} == {Reason.BUDGET_EXCEEDED}
    assert {record.rule for record in records} == {
        "departments/research/budgets/per-user-daily"
    }
    assert usage[user_key].reserved_micros == 0
    assert usage[budget_key(policy, Scope.DEPARTMENT)].reserved_micros == 0
    assert count_rows(ledger.engine, "reservations") == 0
    assert count_rows(ledger.engine, "audit_events") == THREADS


def test_concurrent_user_case_variants_share(ledger: Ledger, policy: Policy) -> None:
    spellings = ("alice", "Alice", "ALICE", " aLiCe ")
    estimate = 30_000

    records = run_together(
        THREADS,
        lambda index: check(
            ledger,
            policy,
            f"r{index}",
            estimate,
            user=spellings[index % len(spellings)],
        ),
    )

    with ledger.engine.connect() as connection:
        user_rows = connection.execute(
            text("SELECT subject FROM budget_usage WHERE scope = 'user'")
        )
        subjects = list(user_rows.scalars())
        audit_rows = connection.execute(text('SELECT "user" FROM audit_events'))
        audited_users = set(audit_rows.scalars())
        connection.rollback()
    admitted = USER_LIMIT_MICROS // estimate
    decisions = Counter(record.decision for record in records)
    assert decisions[Decision.ALLOW] == admitted
    assert decisions[Decision.DENY] == THREADS - admitted
    assert subjects == ["alice"]
    # The audit log keeps each user name as the client sent it.
    assert audited_users == set(spellings)


def test_concurrent_retries_reserve_once(ledger: Ledger, policy: Policy) -> None:
    request_ids = 8
    # Eight requests of alice together stay under her $0.10 a day.
    estimate = 12_000

    records = run_together(
        THREADS,
        lambda index: check(
            ledger, policy, f"r{index % request_ids}", estimate, user="alice"
        ),
    )

    by_request: dict[int, list[CheckRecord]] = {}
    for index, record in enumerate(records):
        by_request.setdefault(index % request_ids, []).append(record)
    usage = ledger.read_usage(
        evaluator.budget_lines(policy, "research", "", "alice", START) or ()
    )
    for responses in by_request.values():
        assert len({record.reservation_id for record in responses}) == 1
        assert responses[0].reservation_id != ""
        assert sum(not record.replayed for record in responses) == 1
    assert {record.decision for record in records} == {Decision.ALLOW}
    department = usage[budget_key(policy, Scope.DEPARTMENT)]
    assert department.reserved_micros == request_ids * estimate
    assert count_rows(ledger.engine, "reservations") == request_ids
    assert count_rows(ledger.engine, "audit_events") == request_ids


@pytest.mark.parametrize(
    "ledger_url",
    [
        pytest.param(
            "sqlite",
            id="sqlite",
        ),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ],
    indirect=True,
)
def test_check_non_utc_now(ledger: Ledger, policy: Policy) -> None:
    now = datetime(2040, 6, 12, 21, 0, tzinfo=ZoneInfo("Asia/Tokyo"))
    first = check(ledger, policy, "r", 30_000, now=now)
    expired_at = (now + timedelta(minutes=10, seconds=1)).astimezone(UTC)

    replay = check(ledger, policy, "r", 30_000, now=now)
    settled = ledger.expire(ExpiryAction.RELEASE, now=expired_at)

    assert replay.replayed is True
    assert replay.expires_at == first.expires_at
    assert settled == 1


def test_rows_read_back_through_sqlalchemy(ledger: Ledger, policy: Policy) -> None:
    # The ledger writes on the driver's cursor; reports and the audit CLI read
    # the same rows through SQLAlchemy, which must see the values written.
    now = START + timedelta(seconds=1, microseconds=250)
    record = check(ledger, policy, "r", 30_000, now=now)
    ledger.commit(
        record.reservation_id,
        input_tokens=20_000,
        cached_input_tokens=0,
        output_tokens=0,
        now=now,
    )

    with ledger.engine.connect() as connection:
        reservation = connection.execute(
            select(reservations).where(reservations.c.id == record.reservation_id)
        ).one()
        events = connection.execute(
            select(audit_events).order_by(audit_events.c.id)
        ).all()
        connection.rollback()

    def utc(value: datetime) -> datetime:
        return value if value.tzinfo else value.replace(tzinfo=UTC)

    assert reservation.state == "committed"
    assert reservation.actual_micros == 20_000
    assert utc(reservation.created_at) == now
    assert utc(reservation.expires_at) == record.expires_at
    assert [event.event for event in events] == ["check", "commit"]
    assert [utc(event.occurred_at) for event in events] == [now, now]
    assert [event.labels for event in events] == ["{}", "{}"]
    assert [event.input_tokens_estimated for event in events] == [False, False]


def test_driver_error_is_sqlalchemy_error(ledger: Ledger) -> None:
    driver = Driver(ledger.engine)
    missing = driver.compile(select(literal_column("1")).select_from(text("nowhere")))
    one = driver.compile(select(literal(1).label("one")))

    with pytest.raises(DBAPIError) as raised, driver.transaction() as transaction:
        transaction.first(missing, {})
    # The failed transaction was rolled back, so its connection serves again.
    with driver.transaction() as transaction:
        row = transaction.first(one, {})

    assert "nowhere" in str(raised.value)
    assert raised.value.connection_invalidated is False
    assert row is not None
    assert row.one == 1


@pytest.mark.postgres
def test_migrate_postgres_schema(postgres_url: str) -> None:
    engine = create_engine(postgres_url)
    try:
        revision = check_schema(engine)
        with engine.connect() as connection:
            schema = connection.execute(text("SELECT current_schema()")).scalar_one()
            tables = set(
                connection.execute(
                    text(
                        "SELECT table_name FROM information_schema.tables"
                        " WHERE table_schema = :schema"
                    ),
                    {"schema": schema},
                ).scalars()
            )
            connection.rollback()
    finally:
        engine.dispose()

    assert revision != ""
    assert schema.startswith("sg_")
    assert {
        "alembic_version",
        "audit_events",
        "budget_usage",
        "reservation_budgets",
        "reservations",
    } <= tables


UNITS = Table("units", MetaData(), Column("name", String(20), primary_key=True))


class BlockingUnit:
    """A unit of work that writes one row, then keeps its group open until released."""

    def __init__(self, driver: Driver, name: str) -> None:
        self.insert = driver.compile(UNITS.insert().values(name=bindparam("name")))
        self.name = name
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, transaction: Transaction) -> str:
        transaction.execute(self.insert, {"name": self.name})
        self.entered.set()
        assert self.release.wait(timeout=30)
        return self.name


def run_grouped(
    sqlite_url: str, names: list[str]
) -> tuple[Driver, list[str | BaseException]]:
    """Hold a group open with a first unit, queue one unit per name, then let go.

    The queued units all wait while the first group runs, so they meet in
    the next group. Returns the driver and each queued unit's result or error.
    """
    engine = create_engine(sqlite_url)
    UNITS.metadata.create_all(engine)
    return run_grouped_on(Driver(engine), names)


def run_grouped_on(
    driver: Driver, names: list[str]
) -> tuple[Driver, list[str | BaseException]]:
    """Run names through `driver` in one group, as run_grouped() does."""
    UNITS.metadata.create_all(driver.engine)
    insert = driver.compile(UNITS.insert().values(name=bindparam("name")))
    blocker = BlockingUnit(driver, "first")
    outcomes: list[str | BaseException] = [""] * len(names)

    def queue(index: int) -> None:
        name = names[index]
        try:
            outcomes[index] = driver.run(
                lambda transaction: transaction.execute(insert, {"name": name}) and name
            )
        except BaseException as error:
            outcomes[index] = error

    with ThreadPoolExecutor(max_workers=len(names) + 1) as pool:
        first = pool.submit(driver.run, blocker)
        assert blocker.entered.wait(timeout=30)
        queued = [pool.submit(queue, index) for index in range(len(names))]
        wait_for(lambda: driver.group_counts().queued == len(names), "units to queue")
        blocker.release.set()
        assert first.result(timeout=30) == "first"
        for future in queued:
            future.result(timeout=30)
    return driver, outcomes


def stored_units(driver: Driver) -> list[str]:
    with driver.engine.connect() as connection:
        names = connection.execute(select(UNITS.c.name).order_by(UNITS.c.name))
        found = list(names.scalars())
        connection.rollback()
    return found


def test_group_commit_shares_one_transaction(sqlite_url: str) -> None:
    driver, outcomes = run_grouped(sqlite_url, ["b", "c", "d"])

    assert outcomes == ["b", "c", "d"]
    assert driver.group_counts() == (2, 4, 0)
    assert stored_units(driver) == ["b", "c", "d", "first"]


def test_group_commit_undoes_only_the_failing_unit(sqlite_url: str) -> None:
    driver, outcomes = run_grouped(sqlite_url, ["b", "first", "d"])

    assert outcomes[0] == "b"
    assert isinstance(outcomes[1], IntegrityError)
    assert outcomes[2] == "d"
    assert driver.group_counts() == (2, 4, 0)
    assert stored_units(driver) == ["b", "d", "first"]


class Interrupted(Exception):
    """Raised by the test's signal handler in the main thread."""


def test_group_commit_survives_interrupted_wait(sqlite_url: str) -> None:
    # A signal handler that raises ends the main thread's wait for its group.
    # Its unit was next in line to lead, so the unit queued behind it must
    # lead instead, or every later caller waits forever.
    engine = create_engine(sqlite_url)
    UNITS.metadata.create_all(engine)
    driver = Driver(engine)
    insert = driver.compile(UNITS.insert().values(name=bindparam("name")))
    blocker = BlockingUnit(driver, "first")
    main = threading.get_ident()
    results: dict[str, object] = {}

    def run_unit(name: str) -> None:
        results[name] = driver.run(
            lambda transaction: transaction.execute(insert, {"name": name})
        )

    def interrupt_main() -> None:
        wait_for(lambda: driver.group_counts().queued == 1, "the main unit to queue")
        behind.start()
        wait_for(lambda: driver.group_counts().queued == 2, "a unit behind it")
        signal.pthread_kill(main, signal.SIGUSR1)

    def on_signal(_signum: int, _frame: object) -> None:
        raise Interrupted

    first = threading.Thread(target=driver.run, args=(blocker,), daemon=True)
    behind = threading.Thread(target=run_unit, args=("behind",), daemon=True)
    later = threading.Thread(target=run_unit, args=("later",), daemon=True)
    previous = signal.signal(signal.SIGUSR1, on_signal)
    try:
        first.start()
        assert blocker.entered.wait(timeout=30)
        threading.Thread(target=interrupt_main, daemon=True).start()
        with pytest.raises(Interrupted):
            driver.run(
                lambda transaction: transaction.execute(insert, {"name": "main"})
            )
    finally:
        signal.signal(signal.SIGUSR1, previous)
        blocker.release.set()
    behind.join(timeout=10)
    later.start()
    later.join(timeout=10)

    assert not behind.is_alive(), "the unit behind the interrupted one never ran"
    assert not later.is_alive(), "a later unit never ran"
    assert results == {"behind": 1, "later": 1}
    assert stored_units(driver) == ["behind", "first", "later"]
    engine.dispose()


def test_group_commit_full_database_fails_group(sqlite_url: str) -> None:
    # SQLite ends the whole transaction on SQLITE_FULL here, so every unit
    # of the group fails and none of their rows is stored.
    engine = create_engine(sqlite_url)
    UNITS.metadata.create_all(engine)
    with engine.connect() as connection:
        pages = connection.exec_driver_sql("PRAGMA page_count").scalar_one()
        connection.rollback()
    engine.dispose()

    def limit_size(connection: Any, _record: Any) -> None:
        connection.execute(f"PRAGMA max_page_count = {pages + 3}")

    event.listen(engine, "connect", limit_size)
    too_large = "x" * 200_000
    driver, outcomes = run_grouped_on(Driver(engine), ["b", too_large, "d"])
    after = driver.run(
        lambda transaction: transaction.execute(
            driver.compile(UNITS.insert().values(name=bindparam("name"))),
            {"name": "after"},
        )
    )

    assert all(isinstance(outcome, OperationalError) for outcome in outcomes)
    assert "full" in str(outcomes[1])
    assert after == 1
    assert stored_units(driver) == ["after", "first"]
    engine.dispose()


def settle_randomly(ledger: Ledger, record: CheckRecord, chooser: random.Random) -> str:
    """Commit, release or abandon a reservation, retrying and crossing calls."""
    reservation = record.reservation_id
    choice = chooser.random()
    if choice < 0.45:
        tokens = chooser.randrange(record.estimated_micros + 1)

        def commit() -> int:
            return ledger.commit(
                reservation,
                input_tokens=tokens,
                cached_input_tokens=0,
                output_tokens=0,
                now=START,
            ).cost_micros

        assert commit() == commit() == tokens
        with pytest.raises(ConflictError):
            ledger.release(reservation, now=START)
        return "commit"
    if choice < 0.75:
        assert ledger.release(reservation, now=START).already_released is False
        assert ledger.release(reservation, now=START).already_released is True
        with pytest.raises(ConflictError):
            ledger.commit(
                reservation,
                input_tokens=1,
                cached_input_tokens=0,
                output_tokens=0,
                now=START,
            )
        return "release"
    return "abandon"


def test_mixed_load_exact(ledger_url: str, policy: Policy) -> None:
    # Checks, retries, Commits, Releases, unknown ids, expiry sweeps and
    # reads race on 64 threads. A quarter of the Checks are already past
    # their TTL, so the sweepers race the Commits and Releases of those.
    # On SQLite this runs through group commit. On PostgreSQL it covers a
    # sweep racing a retried Check of the reservation it expires.
    threads, rounds, users = 64, 12, 16
    # A connection for every thread and helper, so none waits for the pool.
    engine = create_engine(ledger_url, pool_size=threads)
    ledger = Ledger(engine)
    stale = START - timedelta(minutes=11)
    lines = [
        line
        for user in range(users)
        for line in evaluator.budget_lines(policy, "research", "", f"u{user}", START)
        or ()
    ]
    done = threading.Event()
    highest_used: dict[str, int] = Counter()

    def watch() -> None:
        while not done.is_set():
            for key, usage in ledger.read_usage(lines).items():
                highest_used[key] = max(highest_used[key], usage.used_micros)

    def sweep() -> None:
        while not done.is_set():
            ledger.expire(ExpiryAction.CHARGE, now=START, limit=7)

    def work(index: int) -> Counter[str]:
        chooser = random.Random(index)
        seen: Counter[str] = Counter()
        for round_index in range(rounds):
            user = f"u{chooser.randrange(users)}"
            request_id = f"r{index}-{round_index}"
            estimate = chooser.randrange(2_000, 15_000)
            now = stale if chooser.random() < 0.25 else START
            record = check(ledger, policy, request_id, estimate, user=user, now=now)
            retry = check(ledger, policy, request_id, estimate, user=user, now=now)
            with pytest.raises(ConflictError):
                check(ledger, policy, request_id, estimate, user=f"{user}-x", now=now)
            with pytest.raises(NotFoundError):
                ledger.release(f"missing-{request_id}", now=START)
            assert retry.replayed is True
            assert retry.reservation_id == record.reservation_id
            if record.decision is Decision.ALLOW:
                seen[settle_randomly(ledger, record, chooser)] += 1
            else:
                seen[record.decision.value] += 1
        return seen

    helpers = [threading.Thread(target=watch)]
    helpers += [threading.Thread(target=sweep) for _ in range(2)]
    for helper in helpers:
        helper.start()
    try:
        seen = sum(run_together(threads, work), Counter())
    finally:
        done.set()
        for helper in helpers:
            helper.join()
    ledger.expire(ExpiryAction.CHARGE, now=START + timedelta(hours=1), limit=10_000)

    assert seen["commit"] > 0
    assert seen["release"] > 0
    assert seen["abandon"] > 0
    assert_ledger_matches_audit(engine, highest_used)
    engine.dispose()


def assert_ledger_matches_audit(engine: Engine, highest_used: dict[str, int]) -> None:
    """Check every budget row against its reservations and their audit rows."""
    with engine.connect() as connection:
        usage_rows = connection.execute(text("SELECT * FROM budget_usage")).all()
        reservation_rows = connection.execute(text("SELECT * FROM reservations")).all()
        links = connection.execute(text("SELECT * FROM reservation_budgets")).all()
        audit_rows = connection.execute(
            text("SELECT * FROM audit_events ORDER BY id")
        ).all()
        connection.rollback()
    events: dict[str, Counter[str]] = {row.id: Counter() for row in reservation_rows}
    charged: Counter[str] = Counter()
    for row in audit_rows:
        if row.reservation_id:
            events[row.reservation_id][row.event] += 1
            if row.event in ("commit", "expire"):
                charged[row.reservation_id] = row.actual_micros
    spent: Counter[int] = Counter()
    reserved: Counter[int] = Counter()
    states = {row.id: row for row in reservation_rows}
    for link in links:
        row = states[link.reservation_id]
        if row.state == "open":
            reserved[link.usage_id] += row.estimated_micros
        elif row.state in ("committed", "expired"):
            spent[link.usage_id] += charged[row.id]
    check_ids = Counter(
        row.check_request_id for row in audit_rows if row.check_request_id
    )

    assert set(check_ids.values()) == {1}
    for reservation_id, counted in events.items():
        state = states[reservation_id].state
        assert counted["check"] == 1, reservation_id
        assert max(counted.values()) == 1, (reservation_id, counted)
        assert counted["commit"] == (state == "committed"), (reservation_id, counted)
        assert counted["release"] == (state == "released"), (reservation_id, counted)
    for row in usage_rows:
        limit = USER_LIMIT_MICROS if "per-user" in row.budget_key else LIMIT_MICROS
        assert row.spent_micros == spent[row.id], row.budget_key
        assert row.reserved_micros == reserved[row.id], row.budget_key
        assert row.spent_micros + row.reserved_micros <= limit, row.budget_key
        assert highest_used.get(row.budget_key, 0) <= limit, row.budget_key


class Interrupt(BaseException):
    """Stands for KeyboardInterrupt, raised inside a unit of work."""


def test_group_commit_interrupt_stays_with_leader(sqlite_url: str) -> None:
    engine = create_engine(sqlite_url)
    UNITS.metadata.create_all(engine)
    driver = Driver(engine)
    insert = driver.compile(UNITS.insert().values(name=bindparam("name")))
    blocker = BlockingUnit(driver, "first")

    def interrupt(_transaction: Transaction) -> str:
        raise Interrupt

    def write(name: str) -> Callable[[Transaction], str]:
        def work(transaction: Transaction) -> str:
            transaction.execute(insert, {"name": name})
            return name

        return work

    with ThreadPoolExecutor(max_workers=4) as pool:
        first = pool.submit(driver.run, blocker)
        assert blocker.entered.wait(timeout=30)
        # Queued first, so it leads the next group.
        leader = pool.submit(driver.run, interrupt)
        wait_for(lambda: driver.group_counts().queued == 1, "the leader to queue")
        others = [pool.submit(driver.run, write(name)) for name in ("c", "d")]
        wait_for(lambda: driver.group_counts().queued == 3, "units to queue")
        blocker.release.set()
        first_result = first.result(timeout=30)
        leader_error = leader.exception(timeout=30)
        other_errors = [future.exception(timeout=30) for future in others]

    assert first_result == "first"
    assert isinstance(leader_error, Interrupt)
    assert [type(error) for error in other_errors] == [LedgerUnavailableError] * 2
    assert stored_units(driver) == ["first"]
    engine.dispose()


def insert_unit(driver: Driver, name: str) -> Callable[[Transaction], str]:
    insert = driver.compile(UNITS.insert().values(name=bindparam("name")))
    return lambda transaction: transaction.execute(insert, {"name": name}) and name


def run_without_waiting(driver: Driver, work: Callable[[Transaction], T]) -> T:
    token = no_wait.set(True)
    try:
        return driver.run(work)
    finally:
        no_wait.reset(token)


def test_no_wait_runs_alone_at_once(sqlite_url: str) -> None:
    engine = create_engine(sqlite_url)
    UNITS.metadata.create_all(engine)
    driver = Driver(engine)

    assert run_without_waiting(driver, insert_unit(driver, "a")) == "a"
    assert driver.group_counts() == (1, 1, 0)
    assert stored_units(driver) == ["a"]


def test_no_wait_would_block_behind_another_connection(sqlite_url: str) -> None:
    engine = create_engine(sqlite_url, sqlite_busy_timeout_ms=10_000)
    UNITS.metadata.create_all(engine)
    driver = Driver(engine)
    database = engine.url.database
    assert database is not None
    # Timer threads end the blocker's transaction, so it may change threads.
    blocker = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        with pytest.raises(WouldBlock):
            run_without_waiting(driver, insert_unit(driver, "refused"))
        raised_after = time.monotonic() - started
        # The same connection waits again once no_wait is off: the busy
        # timeout came back after the refused BEGIN.
        threading.Timer(0.5, lambda: blocker.execute("ROLLBACK")).start()
        waited = driver.run(insert_unit(driver, "waited"))
    finally:
        blocker.close()

    assert raised_after < 1.0
    assert waited == "waited"
    assert stored_units(driver) == ["waited"]


def test_no_wait_would_block_behind_a_running_group(sqlite_url: str) -> None:
    engine = create_engine(sqlite_url)
    UNITS.metadata.create_all(engine)
    driver = Driver(engine)
    holder = BlockingUnit(driver, "first")

    with ThreadPoolExecutor(max_workers=1) as pool:
        first = pool.submit(driver.run, holder)
        assert holder.entered.wait(timeout=30)
        try:
            with pytest.raises(WouldBlock):
                run_without_waiting(driver, insert_unit(driver, "refused"))
        finally:
            holder.release.set()
        assert first.result(timeout=30) == "first"
    after = run_without_waiting(driver, insert_unit(driver, "after"))

    assert after == "after"
    assert stored_units(driver) == ["after", "first"]
    assert driver.group_counts().queued == 0
