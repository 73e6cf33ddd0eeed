"""Ledger statements compiled once and run on the driver's own cursor.

On SQLite, SQLAlchemy's Connection.execute costs more than the statement it
runs: the six statements of a Check took 0.41 ms through Connection.execute
and 0.11 ms on the sqlite3 cursor (docs/benchmarks.md). So the statements of
the Check, Commit, Release and expiry paths are declared with SQLAlchemy,
compiled once for the engine's dialect, and their SQL text and parameters
go straight to the DBAPI cursor. Driver errors are raised as SQLAlchemy's
exception classes, so callers handle one family of errors on every path.
"""

from __future__ import annotations

import sqlite3
import threading
from collections import deque, namedtuple
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from datetime import datetime
from typing import Any, Generic, NamedTuple, TypeVar

from sqlalchemy import Engine, Select, bindparam
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import BindParameter, ColumnElement

from spendgate.errors import LedgerUnavailableError
from spendgate.ledger._tables import Timestamp

Values = Mapping[str, Any]
T = TypeVar("T")

# Maximum units of work in one SQLite transaction. Later units wait for the next.
MAX_GROUP = 64

# Set by a caller that must not wait for SQLite's write lock, such as the
# server's event loop: Driver.run then raises WouldBlock where it would wait.
no_wait: ContextVar[bool] = ContextVar("spendgate_ledger_no_wait", default=False)


class WouldBlock(BaseException):
    """Driver.run would have waited for SQLite's write lock while no_wait is set.

    Nothing was written. It derives from BaseException so that handlers that
    turn every Exception into an error status let it reach the caller that
    set no_wait, which then runs the same work where waiting is fine.
    """


class Statement:
    """One statement compiled for one dialect, with its parameter order."""

    __slots__ = ("_fixed", "_names", "_row", "sql")

    def __init__(self, statement: ClauseElement, dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        assert isinstance(compiled, SQLCompiler)
        self.sql = compiled.string
        # qmark drivers (sqlite3) take a tuple in this order, and pyformat
        # drivers (psycopg) take the mapping itself.
        self._names: tuple[str, ...] | None = (
            tuple(compiled.positiontup or ()) if compiled.positional else None
        )
        # Values written into the statement itself, such as state="open".
        self._fixed = {
            name: bind.effective_value
            for name, bind in compiled.binds.items()
            if not bind.required
        }
        self._row: Callable[[Sequence[Any]], Any] | None = None
        if isinstance(statement, Select):
            keys = [str(column.key) for column in statement.selected_columns]
            # A namedtuple built at run time is opaque to mypy.
            self._row = namedtuple("Row", keys, rename=True)._make  # type: ignore[attr-defined]

    def parameters(self, values: Values) -> Sequence[Any] | Values:
        """Return `values` in the form the driver takes for this statement."""
        if self._fixed:
            values = {**self._fixed, **values}
        if self._names is None:
            return values
        return tuple(values[name] for name in self._names)

    def row(self, fetched: Sequence[Any]) -> Any:
        """Return a fetched row with its columns as attributes."""
        assert self._row is not None, "only a SELECT returns rows"
        return self._row(fetched)


class SizedStatements:
    """A statement with a list of parameters, compiled once for each length used.

    `build(size)` returns the statement for `size` items: an IN list of
    in_list(size), or the rows of VALUES of values_rows(columns, size).
    """

    __slots__ = ("_build", "_by_size", "_dialect")

    def __init__(self, build: Callable[[int], ClauseElement], dialect: Dialect) -> None:
        self._build = build
        self._dialect = dialect
        self._by_size: dict[int, Statement] = {}

    def sized(self, size: int) -> Statement:
        """Return the statement for `size` items."""
        found = self._by_size.get(size)
        if found is None:
            found = self._by_size[size] = Statement(self._build(size), self._dialect)
        return found


def in_list(size: int) -> list[ColumnElement[Any]]:
    """Return the parameters of an IN list of `size` items, for items()."""
    return [bindparam(f"item{index}") for index in range(size)]


def items(values: Sequence[Any]) -> dict[str, Any]:
    """Name the values of an IN list as in_list() numbers them."""
    return {f"item{index}": value for index, value in enumerate(values)}


def values_rows(
    columns: Sequence[str], size: int
) -> list[dict[str, BindParameter[Any]]]:
    """Return `size` rows of parameters for a multi-row VALUES, for numbered()."""
    return [
        {column: bindparam(f"{column}_{index}") for column in columns}
        for index in range(size)
    ]


def numbered(rows: Sequence[Values]) -> dict[str, Any]:
    """Name the values of each row as values_rows() numbers them."""
    return {
        f"{column}_{index}": value
        for index, row in enumerate(rows)
        for column, value in row.items()
    }


class Transaction:
    """A transaction on one pooled DBAPI connection."""

    __slots__ = ("_connection", "_cursor", "statement")

    def __init__(self, connection: Any, cursor: Any) -> None:
        self._connection = connection
        self._cursor = cursor
        # The statement running, named in the error if it fails.
        self.statement = ""

    @property
    def active(self) -> bool:
        """Whether the transaction is still open (SQLite ends it on some errors)."""
        return bool(self._connection.in_transaction)

    def savepoint(self) -> None:
        """Mark a point that rollback_to() returns to."""
        self._cursor.execute("SAVEPOINT job")

    def release(self) -> None:
        """Keep the work done since savepoint()."""
        self._cursor.execute("RELEASE job")

    def rollback_to(self) -> None:
        """Undo the work done since savepoint(), and keep the rest."""
        self._cursor.execute("ROLLBACK TO job")
        self._cursor.execute("RELEASE job")

    def execute(self, statement: Statement, values: Values) -> int:
        """Run `statement` and return the number of rows it changed."""
        self.statement = statement.sql
        self._cursor.execute(statement.sql, statement.parameters(values))
        return int(self._cursor.rowcount)

    def rows(self, statement: Statement, values: Values) -> list[Any]:
        """Run a SELECT and return every row."""
        self.execute(statement, values)
        return [statement.row(fetched) for fetched in self._cursor.fetchall()]

    def first(self, statement: Statement, values: Values) -> Any | None:
        """Run a SELECT and return its first row, or None."""
        self.execute(statement, values)
        fetched = self._cursor.fetchone()
        return None if fetched is None else statement.row(fetched)


class Driver:
    """Open transactions on an engine's pool, bypassing SQLAlchemy's Connection."""

    def __init__(self, engine: Engine, *, max_group: int = MAX_GROUP) -> None:
        self.engine = engine
        self.dialect = engine.dialect
        self._errors: type[Exception] = engine.dialect.loaded_dbapi.Error
        sqlite = self.dialect.name == "sqlite"
        # SQLite: take the write lock before the first read (see create_engine).
        self._begin = "BEGIN IMMEDIATE" if sqlite else None
        # SQLite has one writer at a time, so this process's units of work
        # queue here and share transactions (group commit). PostgreSQL runs
        # each in its own transaction, in parallel, under row locks.
        self._group = _GroupCommit(self, max_group) if sqlite else None
        # The engine's SQLite busy_timeout, read when first needed.
        self._busy_timeout_ms: int | None = None
        # The form SQLAlchemy writes timestamps in: a string on SQLite, so rows
        # written here read back the same through SQLAlchemy.
        timestamp = Timestamp.dialect_impl(self.dialect)
        self.timestamp: Callable[[datetime], Any] = (
            timestamp.bind_processor(self.dialect) or _unchanged
        )
        self.read_timestamp: Callable[[Any], datetime | None] = (
            timestamp.result_processor(self.dialect, None) or _unchanged
        )

    def compile(self, statement: ClauseElement) -> Statement:
        """Compile `statement` for this engine's dialect."""
        return Statement(statement, self.dialect)

    def compile_sized(self, build: Callable[[int], ClauseElement]) -> SizedStatements:
        """Compile `build(size)` for each length when first used."""
        return SizedStatements(build, self.dialect)

    def run(self, work: Callable[[Transaction], T]) -> T:
        """Run `work` in a transaction and return its result once committed.

        On SQLite, the work of threads that call at the same time runs in one
        transaction, each unit under its own savepoint: a unit that raises is
        undone alone and its caller gets the exception, the others commit
        together. A failed commit fails every unit of the transaction.
        """
        if self._group is not None:
            if no_wait.get():
                return self._group.run_now(work)
            return self._group.run(work)
        with self.transaction() as transaction:
            return work(transaction)

    def group_counts(self) -> GroupCounts:
        """Return how many transactions and units group commit has run so far."""
        return GroupCounts(0, 0, 0) if self._group is None else self._group.counts()

    @contextmanager
    def transaction(self, *, wait: bool = True) -> Iterator[Transaction]:
        """Run the block in one transaction: commit at its end, roll back on error.

        A driver error is raised as the matching sqlalchemy.exc class, for
        example IntegrityError or OperationalError. A connection the error
        broke is dropped from the pool. With wait=False, SQLite's BEGIN
        raises WouldBlock when another connection holds the write lock.
        """
        try:
            connection = self.engine.raw_connection()
        except self._errors as error:
            raise self.translate(error, "", False) from error
        transaction: Transaction | None = None
        try:
            cursor = connection.cursor()
            if self._begin is not None:
                if wait:
                    cursor.execute(self._begin)
                else:
                    self._begin_now(cursor)
            transaction = Transaction(connection, cursor)
            yield transaction
            connection.commit()
        except self._errors as error:
            broken = bool(self.dialect.is_disconnect(error, connection, None))  # type: ignore[arg-type]
            _rollback(connection, self._errors)
            if broken:
                connection.invalidate(error)
            statement = transaction.statement if transaction else ""
            raise self.translate(error, statement, broken) from error
        except BaseException:
            _rollback(connection, self._errors)
            raise
        finally:
            connection.close()

    def _begin_now(self, cursor: Any) -> None:
        """BEGIN with SQLite's busy handler off, then turn it back on."""
        if self._busy_timeout_ms is None:
            # Every connection of the pool has the engine's busy_timeout.
            self._busy_timeout_ms = int(
                cursor.execute("PRAGMA busy_timeout").fetchone()[0]
            )
        cursor.execute("PRAGMA busy_timeout=0")
        try:
            cursor.execute(self._begin)
        except self._errors as error:
            if getattr(error, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_BUSY:
                raise WouldBlock from None
            raise
        finally:
            cursor.execute(f"PRAGMA busy_timeout={self._busy_timeout_ms}")

    @property
    def errors(self) -> type[Exception]:
        """The driver's base exception class."""
        return self._errors

    def translate(
        self, error: Exception, statement: str, broken: bool = False
    ) -> StatementError:
        """Return the sqlalchemy.exc error that matches a driver error."""
        return DBAPIError.instance(
            statement,
            None,
            error,
            self._errors,
            # Parameters contain principals and labels: errors name the SQL only.
            hide_parameters=True,
            connection_invalidated=broken,
            dialect=self.dialect,
        )


class GroupCounts(NamedTuple):
    """Work done by group commit since the driver was created."""

    transactions: int
    units: int
    # Units waiting for a later transaction than the one running now.
    queued: int


class _Unit(Generic[T]):
    """One caller's work waiting in the group commit queue."""

    __slots__ = ("error", "lead", "ready", "result", "work")

    def __init__(self, work: Callable[[Transaction], T]) -> None:
        self.work = work
        self.ready = threading.Event()
        # Set when this caller is to run the next group for everyone queued.
        self.lead = False
        self.result: T | None = None
        self.error: BaseException | None = None

    def outcome(self) -> T:
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]


class _GroupCommit:
    """Run the units of work of concurrent callers in shared SQLite transactions.

    The first caller to find no group running becomes the leader: it takes
    every queued unit (up to `max_group`), runs them in one transaction and
    commits once. Callers arriving meanwhile queue; when the group ends, the
    first of them leads the next group. Each commit writes its pages to the
    write-ahead log once for the whole group instead of once per unit.
    """

    def __init__(self, driver: Driver, max_group: int) -> None:
        self._driver = driver
        self._max_group = max_group
        self._lock = threading.Lock()
        self._queue: deque[_Unit[Any]] = deque()
        self._running = False
        self._transactions = 0
        self._units = 0

    def counts(self) -> GroupCounts:
        with self._lock:
            return GroupCounts(self._transactions, self._units, len(self._queue))

    def run(self, work: Callable[[Transaction], T]) -> T:
        unit = _Unit(work)
        with self._lock:
            self._queue.append(unit)
            lead = not self._running
            self._running = True
        if not lead:
            try:
                unit.ready.wait()
            except BaseException:
                # A signal handler of the main thread raised while it waited.
                self._withdraw(unit)
                raise
            if not unit.lead:
                return unit.outcome()
        self._lead()
        return unit.outcome()

    def run_now(self, work: Callable[[Transaction], T]) -> T:
        """Run `work` alone at once, or raise WouldBlock without waiting.

        It raises WouldBlock while another unit of this process is queued
        or running, or while another connection holds SQLite's write lock.
        Units that queue while it runs wait for it, as for any leader.
        """
        with self._lock:
            if self._running:
                raise WouldBlock
            self._running = True
        ran = False
        try:
            with self._driver.transaction(wait=False) as transaction:
                ran = True
                return work(transaction)
        finally:
            with self._lock:
                if ran:
                    self._transactions += 1
                    self._units += 1
                following = self._hand_on()
            if following is not None:
                following.ready.set()

    def _withdraw(self, unit: _Unit[Any]) -> None:
        """Take the unit of a caller that stopped waiting out of the queue.

        A unit made leader hands leadership to the next queued unit, or the
        queue would wait forever for a group no thread runs. A unit already in a
        group runs and commits without its caller.
        """
        with self._lock:
            if unit not in self._queue:
                return
            self._queue.remove(unit)
            if not unit.lead:
                return
            following = self._hand_on()
        if following is not None:
            following.ready.set()

    def _lead(self) -> None:
        with self._lock:
            group = [
                self._queue.popleft()
                for _ in range(min(self._max_group, len(self._queue)))
            ]
        try:
            self._run_group(group)
        finally:
            with self._lock:
                self._transactions += 1
                self._units += len(group)
                following = self._hand_on()
            for unit in group:
                unit.ready.set()
            if following is not None:
                following.ready.set()

    def _hand_on(self) -> _Unit[Any] | None:
        """Make the first queued unit the next leader; call with the lock held.

        Returns that unit, for the caller to wake once the lock is released,
        or None when the queue is empty and no group is running any more.
        """
        following = self._queue[0] if self._queue else None
        self._running = following is not None
        if following is not None:
            # Set under the lock, so _withdraw reads who leads next.
            following.lead = True
        return following

    def _run_group(self, group: list[_Unit[Any]]) -> None:
        driver = self._driver
        try:
            with driver.transaction() as transaction:
                if len(group) == 1:
                    group[0].result = group[0].work(transaction)
                    return
                for unit in group:
                    self._run_unit(transaction, unit)
        except BaseException as error:
            # BEGIN, a broken transaction or the commit failed: nothing of
            # the group was written, so every unit reports the failure.
            for unit in group:
                unit.result = None
                unit.error = error
                if unit is not group[0] and not isinstance(error, Exception):
                    # KeyboardInterrupt and the like belong to the leader's
                    # thread. Other callers get an error they can retry on.
                    unit.error = LedgerUnavailableError(
                        "the ledger transaction was interrupted before it "
                        "committed; retry the request"
                    )

    def _run_unit(self, transaction: Transaction, unit: _Unit[Any]) -> None:
        transaction.savepoint()
        try:
            unit.result = unit.work(transaction)
        except Exception as error:
            if not transaction.active:
                # SQLite rolled back the whole transaction (a full disk, an
                # I/O error): the group cannot go on.
                raise
            transaction.rollback_to()
            unit.error = (
                self._driver.translate(error, transaction.statement)
                if isinstance(error, self._driver.errors)
                else error
            )
        else:
            transaction.release()


def _rollback(connection: Any, errors: type[Exception]) -> None:
    """Roll back, ignoring the error of a connection that is already broken."""
    with suppress(errors):
        connection.rollback()


def _unchanged(value: Any) -> Any:
    return value
