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

from collections import namedtuple
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, Select, bindparam
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ColumnElement

from spendgate.ledger._tables import Timestamp

Values = Mapping[str, Any]


class Statement:
    """One statement compiled for one dialect, with its parameter order."""

    __slots__ = ("_fixed", "_names", "_row", "sql")

    def __init__(self, statement: ClauseElement, dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        assert isinstance(compiled, SQLCompiler)
        self.sql = compiled.string
        # qmark drivers (sqlite3) take a tuple in this order; pyformat drivers
        # (psycopg) take the mapping itself.
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
    """A statement with an IN list, compiled once for each list length used."""

    __slots__ = ("_build", "_by_size", "_dialect")

    def __init__(
        self,
        build: Callable[[Sequence[ColumnElement[Any]]], ClauseElement],
        dialect: Dialect,
    ) -> None:
        self._build = build
        self._dialect = dialect
        self._by_size: dict[int, Statement] = {}

    def sized(self, size: int) -> Statement:
        """Return the statement whose IN list has `size` parameters item0...."""
        found = self._by_size.get(size)
        if found is None:
            marks: list[ColumnElement[Any]] = [
                bindparam(f"item{index}") for index in range(size)
            ]
            found = self._by_size[size] = Statement(self._build(marks), self._dialect)
        return found


def items(values: Sequence[Any]) -> dict[str, Any]:
    """Name the values of an IN list as SizedStatements numbers them."""
    return {f"item{index}": value for index, value in enumerate(values)}


class Transaction:
    """A transaction on one pooled DBAPI connection."""

    __slots__ = ("_cursor", "statement")

    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor
        # The statement running, named in the error if it fails.
        self.statement = ""

    def execute(self, statement: Statement, values: Values) -> int:
        """Run `statement`; return the number of rows it changed."""
        self.statement = statement.sql
        self._cursor.execute(statement.sql, statement.parameters(values))
        return int(self._cursor.rowcount)

    def execute_many(self, statement: Statement, rows: Sequence[Values]) -> None:
        """Run `statement` once for each mapping in `rows`."""
        self.statement = statement.sql
        self._cursor.executemany(
            statement.sql, [statement.parameters(row) for row in rows]
        )

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

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect
        self._errors: type[Exception] = engine.dialect.loaded_dbapi.Error
        # SQLite: take the write lock before the first read (see create_engine).
        self._begin = "BEGIN IMMEDIATE" if self.dialect.name == "sqlite" else None
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

    def compile_sized(
        self, build: Callable[[Sequence[ColumnElement[Any]]], ClauseElement]
    ) -> SizedStatements:
        """Compile `build(marks)` for each IN-list length when first used."""
        return SizedStatements(build, self.dialect)

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """Run the block in one transaction: commit at its end, roll back on error.

        A driver error leaves as the matching sqlalchemy.exc class (for example
        IntegrityError or OperationalError); a connection the error broke is
        dropped from the pool.
        """
        try:
            connection = self.engine.raw_connection()
        except self._errors as error:
            raise self._translate(error, "", False) from error
        transaction: Transaction | None = None
        try:
            cursor = connection.cursor()
            if self._begin is not None:
                cursor.execute(self._begin)
            transaction = Transaction(cursor)
            yield transaction
            connection.commit()
        except self._errors as error:
            broken = bool(self.dialect.is_disconnect(error, connection, None))  # type: ignore[arg-type]
            _rollback(connection, self._errors)
            if broken:
                connection.invalidate(error)
            statement = transaction.statement if transaction else ""
            raise self._translate(error, statement, broken) from error
        except BaseException:
            _rollback(connection, self._errors)
            raise
        finally:
            connection.close()

    def _translate(
        self, error: Exception, statement: str, broken: bool
    ) -> StatementError:
        return DBAPIError.instance(
            statement,
            None,
            error,
            self._errors,
            # Parameters hold principals and labels; errors name the statement only.
            hide_parameters=True,
            connection_invalidated=broken,
            dialect=self.dialect,
        )


def _rollback(connection: Any, errors: type[Exception]) -> None:
    """Roll back, ignoring the error of a connection that is already broken."""
    with suppress(errors):
        connection.rollback()


def _unchanged(value: Any) -> Any:
    return value
