"""Read-only reports on the ledger for finance review: the audit log and budgets."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from sqlalchemy import ColumnElement, Engine, Row, and_, func, or_, select
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from spendgate import ledger
from spendgate.errors import LedgerUnavailableError, SchemaOutdatedError
from spendgate.evaluator import BudgetLine, Decision
from spendgate.ledger._tables import audit_events, budget_usage
from spendgate.money import MICROS_PER_USD
from spendgate.policy import Budget, Department, Policy, Scope
from spendgate.windows import window_key

# Rows per read transaction. On SQLite every transaction holds the write lock
# (BEGIN IMMEDIATE), so a long export reads in short pages and lets the server
# write in between.
PAGE_SIZE = 1000
# Seconds psycopg waits for a PostgreSQL connection, so an unreachable host
# fails the command instead of hanging for the operating system's TCP timeout.
CONNECT_TIMEOUT_SECONDS = 10
# Table cells of client-chosen names (users, teams) longer than this are cut
# with an ellipsis. json and csv keep the whole value.
MAX_CELL_WIDTH = 32

_RELATIVE_TIME = re.compile(r"(\d+)\s*([smhdw])", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
# Spreadsheets run a cell that starts with one of these as a formula.
_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def parse_time(text: str, *, now: datetime, end_of_day: bool = False) -> datetime:
    """Parse an ISO 8601 date or datetime, or a relative time such as 24h, to UTC.

    A datetime without an offset is UTC. A date alone is midnight UTC at its
    start, or with `end_of_day` midnight at its end, so that an end bound
    given as a date includes that whole day. A relative time counts back from
    `now` in s, m, h, d or w units. Raises ValueError naming the bad value.
    """
    try:
        return _parse_time(text.strip(), now, end_of_day)
    except (ValueError, OverflowError):
        raise ValueError(
            f"invalid time {text!r}: use an ISO 8601 date or datetime such as "
            "2026-12-04 or 2026-12-04T09:30:00-05:00 (UTC when it has no offset), "
            "or a time back from now such as 30m, 24h or 7d"
        ) from None


def _parse_time(value: str, now: datetime, end_of_day: bool) -> datetime:
    relative = _RELATIVE_TIME.fullmatch(value)
    if relative:
        seconds = int(relative[1]) * _UNIT_SECONDS[relative[2].lower()]
        return now.astimezone(UTC) - timedelta(seconds=seconds)
    try:
        day = date.fromisoformat(value)
    except ValueError:
        parsed = datetime.fromisoformat(value)
        if parsed.tzinfo is None:
            return parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return start + timedelta(days=1) if end_of_day else start


def open_ledger(url: str) -> Engine:
    """Connect to an existing, migrated ledger database for reading.

    Raises LedgerUnavailableError when the URL is invalid, a SQLite file does
    not exist or the server cannot be reached, and SchemaOutdatedError when
    the schema is not at the newest revision.
    """
    try:
        parsed = make_url(url)
    except ArgumentError as error:
        raise _invalid_url(url, error) from None
    display_url = parsed.render_as_string(hide_password=True)
    missing = ledger.missing_sqlite_error(parsed)
    if missing is not None:
        # A report must not create an empty database where none was.
        raise LedgerUnavailableError(missing)
    if parsed.get_backend_name() == "postgresql":
        parsed = _with_connect_timeout(parsed)

    try:
        engine = ledger.create_engine(
            parsed.render_as_string(hide_password=False), pool_size=1
        )
    except (ArgumentError, ImportError) as error:
        # An unknown dialect, or a driver that is not installed.
        raise _invalid_url(display_url, error) from None
    try:
        ledger.check_schema(engine)
    except SQLAlchemyError as error:
        engine.dispose()
        raise LedgerUnavailableError(
            f"cannot read the ledger database at {display_url}: {_first_line(error)}"
        ) from None
    except SchemaOutdatedError:
        engine.dispose()
        raise
    return engine


def _invalid_url(url: str, error: Exception) -> LedgerUnavailableError:
    return LedgerUnavailableError(
        f"invalid database URL {url!r}: {error}. Use a SQLAlchemy URL such as "
        "sqlite:///var/spendgate.db or postgresql+psycopg://user@host/db"
    )


def _with_connect_timeout(url: URL) -> URL:
    if "connect_timeout" in url.query:
        return url
    return url.update_query_dict({"connect_timeout": str(CONNECT_TIMEOUT_SECONDS)})


def _first_line(error: SQLAlchemyError) -> str:
    original = getattr(error, "orig", None)
    text = str(original if original is not None else error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@dataclass(frozen=True, slots=True)
class AuditFilter:
    """Conditions on the audit events to read; a field left None matches all."""

    department: str | None = None
    decision: Decision | None = None
    event: str | None = None
    # Inclusive start and exclusive end, as aware datetimes.
    since: datetime | None = None
    until: datetime | None = None


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One row of the audit log, with money in integer micro-USD."""

    id: int
    occurred_at: datetime
    event: str
    request_id: str
    reservation_id: str | None
    department: str
    team: str
    user: str
    application: str
    requested_model: str
    effective_model: str
    # Empty on commit, release and expire events, which carry no decision.
    decision: str
    shadow_decision: str | None
    reason_code: str
    rule: str
    message: str
    policy_version: str
    input_tokens: int | None
    input_tokens_estimated: bool
    cached_input_tokens: int | None
    output_tokens: int | None
    max_output_tokens: int | None
    estimated_micros: int | None
    actual_micros: int | None
    overage_micros: int | None
    labels: dict[str, str]


@dataclass(frozen=True, slots=True)
class AuditSelection:
    """Matching events, oldest first, and whether the limit left older ones out."""

    events: Iterator[AuditEvent]
    truncated: bool


def read_audit(
    engine: Engine, audit_filter: AuditFilter, *, limit: int | None = None
) -> AuditSelection:
    """Select matching audit events oldest first, or only the newest `limit`.

    Events come in pages of PAGE_SIZE rows, each read in its own short
    transaction, so the iterator may raise SQLAlchemyError while it runs.
    Raises ValueError when `limit` is less than 1.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    conditions = _audit_conditions(audit_filter)
    start: tuple[datetime, int] | None = None
    truncated = False
    if limit is not None:
        # The output starts at the limit-th newest event. A row past it means
        # that older events were left out.
        query = (
            select(audit_events.c.occurred_at, audit_events.c.id)
            .where(*conditions)
            .order_by(audit_events.c.occurred_at.desc(), audit_events.c.id.desc())
            .offset(limit - 1)
            .limit(2)
        )
        with engine.connect() as connection:
            rows = connection.execute(query).all()
        if rows:
            start = (rows[0].occurred_at, rows[0].id)
            truncated = len(rows) == 2
    return AuditSelection(_pages(engine, conditions, start, limit), truncated)


def _audit_conditions(audit_filter: AuditFilter) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    if audit_filter.department is not None:
        # Policy lookups ignore the case that clients send, so this filter does too.
        department = audit_filter.department.strip().lower()
        conditions.append(func.lower(audit_events.c.department) == department)
    if audit_filter.decision is not None:
        conditions.append(audit_events.c.decision == audit_filter.decision.value)
    if audit_filter.event is not None:
        conditions.append(audit_events.c.event == audit_filter.event)
    # SQLite stores timestamps without an offset, written in UTC.
    if audit_filter.since is not None:
        since = audit_filter.since.astimezone(UTC)
        conditions.append(audit_events.c.occurred_at >= since)
    if audit_filter.until is not None:
        until = audit_filter.until.astimezone(UTC)
        conditions.append(audit_events.c.occurred_at < until)
    return conditions


def _pages(
    engine: Engine,
    conditions: Sequence[ColumnElement[bool]],
    start: tuple[datetime, int] | None,
    limit: int | None,
) -> Iterator[AuditEvent]:
    """Read events in (occurred_at, id) order, one page per transaction."""
    order = (audit_events.c.occurred_at, audit_events.c.id)
    remaining = limit
    after: tuple[datetime, int] | None = None
    while remaining is None or remaining > 0:
        size = PAGE_SIZE if remaining is None else min(PAGE_SIZE, remaining)
        query = select(audit_events).where(*conditions).order_by(*order).limit(size)
        if after is not None:
            query = query.where(_after(after, inclusive=False))
        elif start is not None:
            query = query.where(_after(start, inclusive=True))
        with engine.connect() as connection:
            rows = connection.execute(query).all()
        for row in rows:
            yield _audit_event(row)
        if len(rows) < size:
            return
        after = (rows[-1].occurred_at, rows[-1].id)
        if remaining is not None:
            remaining -= len(rows)


def _after(position: tuple[datetime, int], *, inclusive: bool) -> ColumnElement[bool]:
    occurred_at, event_id = position
    same_time_ids = (
        audit_events.c.id >= event_id if inclusive else audit_events.c.id > event_id
    )
    return or_(
        audit_events.c.occurred_at > occurred_at,
        and_(audit_events.c.occurred_at == occurred_at, same_time_ids),
    )


def _audit_event(row: Row[Any]) -> AuditEvent:
    try:
        labels = json.loads(row.labels or "{}")
    except ValueError:
        labels = {"_unparsed": row.labels}
    return AuditEvent(
        id=row.id,
        occurred_at=_utc(row.occurred_at),
        event=row.event,
        request_id=row.request_id,
        reservation_id=row.reservation_id,
        department=row.department,
        team=row.team,
        user=row.user,
        application=row.application,
        requested_model=row.requested_model,
        effective_model=row.effective_model,
        decision=row.decision,
        shadow_decision=row.shadow_decision,
        reason_code=row.reason_code,
        rule=row.rule,
        message=row.message,
        policy_version=row.policy_version,
        input_tokens=row.input_tokens,
        input_tokens_estimated=bool(row.input_tokens_estimated),
        cached_input_tokens=row.cached_input_tokens,
        output_tokens=row.output_tokens,
        max_output_tokens=row.max_output_tokens,
        estimated_micros=row.estimated_micros,
        actual_micros=row.actual_micros,
        overage_micros=row.overage_micros,
        labels=labels,
    )


def _utc(value: datetime) -> datetime:
    """Mark naive datetimes read back from SQLite as the UTC they were written in."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


AUDIT_FIELDS = (
    "id",
    "occurred_at",
    "event",
    "request_id",
    "reservation_id",
    "department",
    "team",
    "user",
    "application",
    "requested_model",
    "effective_model",
    "decision",
    "shadow_decision",
    "reason_code",
    "rule",
    "message",
    "policy_version",
    "input_tokens",
    "input_tokens_estimated",
    "cached_input_tokens",
    "output_tokens",
    "max_output_tokens",
    "estimated_micros",
    "estimated_usd",
    "actual_micros",
    "actual_usd",
    "overage_micros",
    "overage_usd",
    "labels",
)


def audit_record(event: AuditEvent) -> dict[str, Any]:
    """Return an event as a JSON-ready dict with AUDIT_FIELDS as keys.

    Money appears twice: exact integer micro-USD and a USD decimal string.
    """
    record: dict[str, Any] = {}
    for name in AUDIT_FIELDS:
        if name.endswith("_usd"):
            micros = getattr(event, name.removesuffix("_usd") + "_micros")
            record[name] = None if micros is None else usd_text(micros)
        elif name == "occurred_at":
            record[name] = event.occurred_at.isoformat()
        else:
            record[name] = getattr(event, name)
    return record


def render_audit(events: Iterable[AuditEvent], output_format: str) -> Iterator[str]:
    """Yield the output lines of `events` as table, json (one per line) or csv."""
    if output_format == "json":
        for event in events:
            yield json.dumps(audit_record(event), ensure_ascii=False)
    elif output_format == "csv":
        yield _csv_line(AUDIT_FIELDS)
        for event in events:
            record = audit_record(event)
            record["labels"] = json.dumps(event.labels, sort_keys=True)
            yield _csv_line([_csv_cell(record[name]) for name in AUDIT_FIELDS])
    elif output_format == "table":
        rows = [_audit_cells(event) for event in events]
        if rows:
            yield from format_table(_AUDIT_HEADERS, rows, right={7, 8, 9, 10})
    else:
        raise ValueError(f"unknown output format {output_format!r}")


_AUDIT_HEADERS = (
    "TIME (UTC)",
    "EVENT",
    "DEPARTMENT/TEAM",
    "USER",
    "MODEL",
    "DECISION",
    "REASON",
    "IN TOKENS",
    "OUT TOKENS",
    "ESTIMATED",
    "ACTUAL",
)


def _audit_cells(event: AuditEvent) -> list[str]:
    model = event.requested_model
    if event.effective_model and event.effective_model != model:
        model = f"{model} -> {event.effective_model}"
    decision = event.decision or "-"
    if event.shadow_decision and event.shadow_decision != event.decision:
        decision = f"{decision} (shadow {event.shadow_decision})"
    # A check shows the output bound of its estimate, a commit the tokens used.
    if event.event == "check" and event.max_output_tokens is not None:
        output = f"≤{event.max_output_tokens}"
    else:
        output = _optional(event.output_tokens)
    principal = event.department + (f"/{event.team}" if event.team else "")
    # Clients choose these names, so a long one is cut to keep the columns usable.
    return [
        event.occurred_at.strftime("%Y-%m-%d %H:%M:%S"),
        event.event,
        _clip(principal),
        _clip(event.user or "-"),
        model,
        decision,
        event.reason_code or "-",
        _optional(event.input_tokens),
        output,
        _optional_usd(event.estimated_micros),
        _optional_usd(event.actual_micros),
    ]


def _optional(value: int | None) -> str:
    return "-" if value is None else str(value)


def _optional_usd(micros: int | None) -> str:
    return "-" if micros is None else format_usd_grouped(micros)


def _csv_line(cells: Sequence[object]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow(cells)
    return buffer.getvalue()


def _csv_cell(value: object) -> object:
    """Keep a spreadsheet from running a text cell as a formula (CSV injection).

    User, application, labels and messages come from clients, so a text cell
    that starts with =, +, -, @ or a control character gets a leading
    apostrophe. Numbers and None are written as they are.
    """
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(_FORMULA_PREFIXES):
        return "'" + value
    return value


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    """One budget of the policy for one subject in its current window."""

    department: str
    # Team that declares the budget; empty for a department budget.
    team: str
    budget: Budget
    scope: Scope
    subject: str
    window: str
    spent_micros: int
    reserved_micros: int

    @property
    def label(self) -> str:
        """Scope as shown to users, such as "user:alice"."""
        return f"{self.scope.value}:{self.subject}"

    @property
    def used_micros(self) -> int:
        """Spent plus reserved: what counts against the limit."""
        return self.spent_micros + self.reserved_micros

    @property
    def remaining_micros(self) -> int:
        """Limit minus spent and reserved, negative once overage passes the limit."""
        return self.budget.limit_micros - self.used_micros

    @property
    def used_percent(self) -> Decimal:
        """Used share of the limit in percent, rounded half up to 2 places."""
        exact = Decimal(self.used_micros * 100) / Decimal(self.budget.limit_micros)
        return exact.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def read_budgets(
    engine: Engine, policy: Policy, now: datetime, department: str | None = None
) -> list[BudgetStatus]:
    """List every budget of the policy in its window at `now`, with its usage.

    Department and team budgets appear even before the ledger has a row for
    them. Budgets per user, and department budgets per team, appear once per
    subject the ledger has a row for in the current window, because those
    subjects are stored only in the ledger.
    """
    departments = [
        policy.departments[name]
        for name in sorted(policy.departments)
        if department is None or name == department.strip().lower()
    ]
    owned = [(d, team, b) for d in departments for team, b in _owned_budgets(d)]
    timezone = policy.organization.timezone
    windows = {b.rule: window_key(b.period, now, timezone) for _, _, b in owned}
    rows = _usage_rows(engine, windows)
    by_key = {row.budget_key: row for row in rows}

    statuses: list[BudgetStatus] = []
    for owner, team, budget in owned:
        window = windows[budget.rule]
        fixed = _fixed_subject(owner, team, budget)
        if fixed is not None:
            row = by_key.get(BudgetLine(budget, budget.per, fixed, window).key)
            spent, reserved = (0, 0) if row is None else row.usage
            statuses.append(
                BudgetStatus(
                    owner.name, team, budget, budget.per, fixed, window, spent, reserved
                )
            )
            continue
        found = [
            BudgetStatus(
                owner.name, team, budget, budget.per, row.subject, window, *row.usage
            )
            for row in rows
            if row.rule == budget.rule
        ]
        found.sort(key=lambda status: (-status.used_micros, status.subject))
        statuses += found
    return statuses


def _owned_budgets(department: Department) -> Iterator[tuple[str, Budget]]:
    """Yield the department's budgets, then each team's, with the team name."""
    for budget in department.budgets:
        yield "", budget
    for team in department.teams.values():
        for budget in team.budgets:
            yield team.name, budget


def _fixed_subject(department: Department, team: str, budget: Budget) -> str | None:
    """Return the subject the policy itself names, or None when the ledger does."""
    if budget.per is Scope.DEPARTMENT:
        return department.name
    if budget.per is Scope.TEAM and team:
        return team
    return None


@dataclass(frozen=True, slots=True)
class _UsageRow:
    budget_key: str
    rule: str
    subject: str
    usage: tuple[int, int]


def _usage_rows(engine: Engine, windows: dict[str, str]) -> list[_UsageRow]:
    """Read the ledger rows of these budget rules in their current windows."""
    if not windows:
        return []
    query = select(
        budget_usage.c.budget_key,
        budget_usage.c.rule,
        budget_usage.c.subject,
        budget_usage.c.window,
        budget_usage.c.spent_micros,
        budget_usage.c.reserved_micros,
    ).where(
        budget_usage.c.rule.in_(list(windows)),
        budget_usage.c.window.in_(sorted(set(windows.values()))),
    )
    with engine.connect() as connection:
        rows = connection.execute(query).all()
    return [
        _UsageRow(
            row.budget_key,
            row.rule,
            row.subject,
            (int(row.spent_micros), int(row.reserved_micros)),
        )
        for row in rows
        # The query matched each rule against every current window, so keep
        # only the rows in the rule's own window.
        if windows[row.rule] == row.window
    ]


def budget_record(status: BudgetStatus) -> dict[str, Any]:
    """Return a budget status as a JSON-ready dict, money in micro-USD and USD."""
    budget = status.budget
    threshold = budget.threshold_basis_points
    record: dict[str, Any] = {
        "department": status.department,
        "team": status.team,
        "scope": status.scope.value,
        "subject": status.subject,
        "budget": budget.name,
        "rule": budget.rule,
        "period": budget.period.value,
        "window": status.window,
        "shadow": budget.shadow,
        "downgrade_at_percent": None
        if threshold is None
        else float(Decimal(threshold) / 100),
    }
    for name in ("limit", "spent", "reserved", "remaining"):
        micros = (
            budget.limit_micros
            if name == "limit"
            else getattr(status, f"{name}_micros")
        )
        record[f"{name}_micros"] = micros
        record[f"{name}_usd"] = usd_text(micros)
    record["used_percent"] = float(status.used_percent)
    return record


def render_budgets(
    statuses: Iterable[BudgetStatus], output_format: str
) -> Iterator[str]:
    """Yield the output lines of budget statuses as table or json (one per line)."""
    if output_format == "json":
        for status in statuses:
            yield json.dumps(budget_record(status), ensure_ascii=False)
    elif output_format == "table":
        rows = [_budget_cells(status) for status in statuses]
        if rows:
            yield from format_table(_BUDGET_HEADERS, rows, right={4, 5, 6, 7, 8})
    else:
        raise ValueError(f"unknown output format {output_format!r}")


_BUDGET_HEADERS = (
    "DEPARTMENT",
    "BUDGET",
    "SCOPE",
    "WINDOW",
    "LIMIT",
    "SPENT",
    "RESERVED",
    "REMAINING",
    "USED",
    "NOTE",
)


def _budget_cells(status: BudgetStatus) -> list[str]:
    budget = status.budget
    name = f"{status.team}/{budget.name}" if status.team else budget.name
    subject = status.subject or "(none)"
    return [
        status.department,
        name,
        _clip(f"{status.scope.value}:{subject}"),
        status.window,
        format_usd_grouped(budget.limit_micros),
        format_usd_grouped(status.spent_micros),
        format_usd_grouped(status.reserved_micros),
        format_usd_grouped(status.remaining_micros),
        f"{status.used_percent:.1f}%",
        _budget_note(status),
    ]


def _budget_note(status: BudgetStatus) -> str:
    budget = status.budget
    notes = []
    if budget.shadow:
        notes.append("shadow")
    threshold = budget.threshold_basis_points
    if status.used_micros > budget.limit_micros:
        notes.append("over limit")
    elif status.used_micros == budget.limit_micros:
        notes.append("limit reached")
    elif (
        threshold is not None
        and status.used_micros * 10_000 >= budget.limit_micros * threshold
    ):
        notes.append(f"past {Decimal(threshold) / 100:f}% threshold")
    return ", ".join(notes)


def usd_text(micros: int) -> str:
    """Format micro-USD as an exact USD decimal string such as "12.500000"."""
    sign = "-" if micros < 0 else ""
    whole, fraction = divmod(abs(micros), MICROS_PER_USD)
    return f"{sign}{whole}.{fraction:06d}"


def format_usd_grouped(micros: int) -> str:
    """Format micro-USD for reading, exact to the micro-USD: "$25,000.000000"."""
    sign = "-" if micros < 0 else ""
    whole, fraction = divmod(abs(micros), MICROS_PER_USD)
    return f"{sign}${whole:,}.{fraction:06d}"


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], *, right: set[int]
) -> Iterator[str]:
    """Yield aligned text rows; columns whose index is in `right` align right."""
    widths = [
        max(len(header), *(len(row[index]) for row in rows))
        for index, header in enumerate(headers)
    ]
    for row in [headers, *rows]:
        padded = [
            cell.rjust(width) if index in right else cell.ljust(width)
            for index, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        yield "  ".join(padded).rstrip()


def _clip(cell: str) -> str:
    if len(cell) <= MAX_CELL_WIDTH:
        return cell
    return cell[: MAX_CELL_WIDTH - 1] + "…"
