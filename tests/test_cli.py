"""Tests for the audit, budgets and validate commands and examples/simulate_day.py."""

from __future__ import annotations

import csv
import functools
import importlib.util
import io
import json
import os
import secrets
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import sqlalchemy
import structlog
from click.testing import CliRunner, Result
from jsonschema import Draft202012Validator
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from spendgate import evaluator, reports
from spendgate.cli import main
from spendgate.ledger import CheckRecord, Ledger, Principal, create_engine, migrate
from spendgate.policy import Policy, load_policy
from spendgate.policy._yaml import read_documents
from spendgate.server import PolicyHolder, create_server

REPO = Path(__file__).resolve().parents[1]
SIMULATOR = REPO / "examples" / "simulate_day.py"

# Prices in USD per million tokens. With 1,000 input tokens and 500 output
# tokens, a "small" call is estimated at 1,000 + 1,000 = 2,000 micro-USD, and a
# commit of 1,000 input (200 of them cached) and 300 output tokens costs
# 800 + 20 + 600 = 1,420 micro-USD.
POLICY_FILES = {
    "organization.yaml": """\
apiVersion: spendgate/v1
kind: Organization
name: test-corp
timezone: UTC
unknown_department: deny
""",
    "catalog.yaml": """\
apiVersion: spendgate/v1
kind: ModelCatalog
models:
  - name: small
    tokenizer: approximate
    price_per_million_tokens: {input: 1.00, cached_input: 0.10, output: 2.00}
    context_window: 100000
    max_output_tokens: 1000
  - name: large
    tokenizer: approximate
    price_per_million_tokens: {input: 10.00, cached_input: 1.00, output: 30.00}
    context_window: 100000
    max_output_tokens: 1000
""",
    "engineering.yaml": """\
apiVersion: spendgate/v1
kind: Department
name: engineering
downgrades:
  large: small
budgets:
  - {name: monthly, period: month, limit_usd: 1, downgrade_at_percent: 80}
  - {name: per-user-daily, period: day, limit_usd: 0.01, per: user}
teams:
  - name: platform
    models:
      allow: [small]
    budgets:
      - {name: monthly, period: month, limit_usd: 0.005}
""",
    "support.yaml": """\
apiVersion: spendgate/v1
kind: Department
name: support
budgets:
  - {name: monthly, period: month, limit_usd: 1}
  - {name: per-team-daily, period: day, limit_usd: 0.002, per: team}
  - {name: pace, period: week, limit_usd: 0.001, shadow: true}
""",
}
USAGE = (1000, 200, 300)
COMMIT_COST = 1420
SMALL_ESTIMATE = 2000

POSTGRES_URL_VARIABLE = "SPENDGATE_TEST_POSTGRES_URL"
REQUIRE_POSTGRES_VARIABLE = "SPENDGATE_REQUIRE_POSTGRES"

EXIT_DATABASE = 1
EXIT_USAGE = 2
EXIT_INVALID_POLICY = 3


def write_policy(directory: Path, files: Mapping[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (directory / name).write_text(content, encoding="utf-8")
    return directory


@pytest.fixture(autouse=True)
def restore_structlog() -> Iterator[None]:
    """Undo the structlog set-up that every command runs.

    The commands configure structlog globally, with loggers cached on first
    use and bound to CliRunner's stream, which would break log capture in
    the tests that run after these.
    """
    saved = structlog.get_config()
    yield
    structlog.reset_defaults()
    structlog.configure(**saved)


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    """Write the test policy to a new folder."""
    return write_policy(tmp_path / "policies", POLICY_FILES)


def migrate_url(url: str) -> None:
    engine = create_engine(url)
    try:
        migrate(engine)
    finally:
        engine.dispose()


@pytest.fixture
def sqlite_database(tmp_path: Path) -> str:
    """Return the URL of a SQLite file migrated to the newest revision."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    migrate_url(url)
    return url


@pytest.fixture
def postgres_database() -> Iterator[str]:
    """Return a URL whose search_path is a new, migrated schema; drop it after.

    The server is the one SPENDGATE_TEST_POSTGRES_URL names. Without it the
    test is skipped, unless SPENDGATE_REQUIRE_POSTGRES=1 makes that a failure.
    """
    base = os.environ.get(POSTGRES_URL_VARIABLE, "")
    if not base:
        if os.environ.get(REQUIRE_POSTGRES_VARIABLE) == "1":
            pytest.fail(f"{POSTGRES_URL_VARIABLE} is not set")
        pytest.skip(f"{POSTGRES_URL_VARIABLE} is not set")
    admin = sqlalchemy.create_engine(
        base,
        poolclass=NullPool,
        isolation_level="AUTOCOMMIT",
        connect_args={"connect_timeout": 5},
    )
    schema = f"sg_cli_{secrets.token_hex(6)}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    parsed = make_url(base)
    options = f"{parsed.query.get('options', '')} -csearch_path={schema}".strip()
    url = parsed.update_query_dict({"options": options}).render_as_string(
        hide_password=False
    )
    try:
        migrate_url(url)
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
def database_url(request: pytest.FixtureRequest) -> str:
    """Return a migrated ledger URL, once on SQLite and once on PostgreSQL."""
    url: str = request.getfixturevalue(f"{request.param}_database")
    return url


@pytest.fixture
def ledger(database_url: str) -> Iterator[Ledger]:
    engine = create_engine(database_url)
    yield Ledger(engine)
    engine.dispose()


def record(
    ledger: Ledger,
    policy: Policy,
    *,
    at: datetime,
    department: str,
    team: str = "",
    user: str = "",
    model: str = "small",
    settle: str = "",
    labels: Mapping[str, str] | None = None,
) -> CheckRecord:
    """Check one call of 1,000 input and 500 output tokens, then settle it."""
    request = evaluator.Request(
        department=department,
        model=model,
        team=team,
        user=user,
        application="tests",
        input_tokens=1000,
        max_output_tokens=500,
    )
    checked = ledger.check(
        request_id=uuid.uuid4().hex,
        principal=Principal(department, team, user, "tests"),
        plan=evaluator.plan(policy, request, at),
        policy_version=policy.version,
        reservation_ttl=policy.organization.reservation_ttl,
        labels=labels or {},
        now=at,
    )
    later = at + timedelta(seconds=1)
    if settle == "commit":
        input_tokens, cached, output = USAGE
        ledger.commit(
            checked.reservation_id,
            input_tokens=input_tokens,
            cached_input_tokens=cached,
            output_tokens=output,
            now=later,
        )
    elif settle == "release":
        ledger.release(checked.reservation_id, now=later)
    return checked


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def json_lines(result: Result) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture
def audit_log(
    policy_dir: Path, ledger: Ledger, database_url: str
) -> dict[str, datetime]:
    """Fill the audit log with 7 events over 3 days; return the check times.

    Events by id: 1 check and 2 commit 3 days ago, 3 check and 4 release 30
    hours ago, and 5 downgraded check 2 hours ago. One hour ago, 6 is a
    denied check of an unknown department and 7 a check with text that
    looks like a spreadsheet formula.
    """
    policy = load_policy(policy_dir)
    now = datetime.now(UTC).replace(microsecond=0)
    times = {
        "3d": now - timedelta(days=3),
        "30h": now - timedelta(hours=30),
        "2h": now - timedelta(hours=2),
        "1h": now - timedelta(hours=1),
    }
    record(
        ledger,
        policy,
        at=times["3d"],
        department="engineering",
        team="platform",
        user="alice",
        settle="commit",
    )
    record(
        ledger,
        policy,
        at=times["30h"],
        department="support",
        user="bob",
        settle="release",
    )
    record(
        ledger,
        policy,
        at=times["2h"],
        department="Engineering",
        team="platform",
        user="carol",
        model="large",
    )
    record(ledger, policy, at=times["1h"], department="Sales", user="dave")
    record(
        ledger,
        policy,
        at=times["1h"],
        department="engineering",
        user='=HYPERLINK("x")',
        labels={"ticket": "+1", "source": "tests"},
    )
    return times


def event_ids(result: Result) -> list[int]:
    return [event["id"] for event in json_lines(result)]


def test_audit_json_fields(audit_log: dict[str, datetime], database_url: str) -> None:
    result = run("audit", "--database", database_url, "--format", "json")

    assert result.exit_code == 0, result.stderr
    events = json_lines(result)
    assert [event["id"] for event in events] == [1, 2, 3, 4, 5, 6, 7]
    assert [event["event"] for event in events] == [
        "check",
        "commit",
        "check",
        "release",
        "check",
        "check",
        "check",
    ]
    assert set(events[0]) == set(reports.AUDIT_FIELDS)
    commit = events[1]
    assert commit["actual_micros"] == COMMIT_COST
    assert commit["actual_usd"] == "0.001420"
    assert commit["estimated_micros"] == SMALL_ESTIMATE
    assert commit["estimated_usd"] == "0.002000"
    assert commit["overage_micros"] == 0
    assert commit["input_tokens"] == USAGE[0]
    assert commit["cached_input_tokens"] == USAGE[1]
    assert commit["output_tokens"] == USAGE[2]
    assert commit["occurred_at"] == (audit_log["3d"] + timedelta(seconds=1)).isoformat()
    assert events[0]["decision"] == "ALLOW"
    assert events[0]["actual_micros"] is None
    assert events[0]["actual_usd"] is None
    assert events[2]["shadow_decision"] == "DENY"
    assert events[4]["decision"] == "DOWNGRADE"
    assert events[4]["reason_code"] == "MODEL_NOT_ALLOWED"
    assert events[4]["effective_model"] == "small"
    assert events[5]["reason_code"] == "UNKNOWN_DEPARTMENT"
    assert events[6]["labels"] == {"source": "tests", "ticket": "+1"}


def test_audit_csv_header(audit_log: dict[str, datetime], database_url: str) -> None:
    result = run("audit", "--database", database_url, "--format", "csv")

    assert result.exit_code == 0, result.stderr
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert tuple(rows[0]) == reports.AUDIT_FIELDS
    assert len(rows) == 8
    by_field = [dict(zip(rows[0], row, strict=True)) for row in rows[1:]]
    assert by_field[1]["actual_micros"] == str(COMMIT_COST)
    assert by_field[1]["actual_usd"] == "0.001420"
    assert by_field[0]["actual_micros"] == ""
    assert by_field[6]["user"] == '\'=HYPERLINK("x")'
    assert json.loads(by_field[6]["labels"]) == {"source": "tests", "ticket": "+1"}


def test_audit_table_aligned(audit_log: dict[str, datetime], database_url: str) -> None:
    result = run("audit", "--database", database_url)

    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["TIME", "(UTC)", "EVENT"]
    assert len(lines) == 8
    # The last column is right-aligned, so aligned rows all have one length.
    assert len({len(line) for line in lines}) == 1
    event_column = lines[0].index("EVENT")
    assert [line[event_column:].split()[0] for line in lines[1:]] == [
        "check",
        "commit",
        "check",
        "release",
        "check",
        "check",
        "check",
    ]
    assert lines[2].rstrip().endswith("$0.002000  $0.001420")
    assert "ALLOW (shadow DENY)" in lines[3]
    assert "large -> small" in lines[5]
    assert "≤500" in lines[1]
    assert audit_log["3d"].strftime("%Y-%m-%d %H:%M:%S") in lines[1]


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        pytest.param(["--department", "engineering"], [1, 2, 5, 7], id="department"),
        pytest.param(["--department", "SALES"], [6], id="department-case"),
        pytest.param(["--decision", "allow"], [1, 3, 7], id="decision-allow"),
        pytest.param(["--decision", "DOWNGRADE"], [5], id="decision-downgrade"),
        pytest.param(["--decision", "deny"], [6], id="decision-deny"),
        pytest.param(["--event", "commit"], [2], id="event-commit"),
        pytest.param(["--event", "release"], [4], id="event-release"),
        pytest.param(["--event", "expire"], [], id="event-expire"),
        pytest.param(
            ["--department", "engineering", "--event", "check"],
            [1, 5, 7],
            id="department-and-event",
        ),
        pytest.param(["--since", "24h"], [5, 6, 7], id="since-hours"),
        pytest.param(["--since", "2d"], [3, 4, 5, 6, 7], id="since-days"),
        pytest.param(["--since", "90m"], [6, 7], id="since-minutes"),
        pytest.param(["--until", "24h"], [1, 2, 3, 4], id="until-hours"),
        pytest.param(["--since", "2d", "--until", "24h"], [3, 4], id="window"),
        pytest.param(["--since", "2000-01-01"], [1, 2, 3, 4, 5, 6, 7], id="since-date"),
        pytest.param(["--until", "2000-01-01"], [], id="until-date"),
        pytest.param(["--limit", "2"], [6, 7], id="limit"),
        pytest.param(["--limit", "0"], [1, 2, 3, 4, 5, 6, 7], id="limit-none"),
        pytest.param(["--event", "check", "--limit", "2"], [6, 7], id="limit-filter"),
    ],
)
def test_audit_filters(
    audit_log: dict[str, datetime],
    database_url: str,
    options: list[str],
    expected: list[int],
) -> None:
    result = run("audit", "--database", database_url, "--format", "json", *options)

    assert result.exit_code == 0, result.stderr
    assert event_ids(result) == expected


@pytest.mark.parametrize(
    ("form", "offset"),
    [
        pytest.param("naive", None, id="naive-utc"),
        pytest.param("z", None, id="z-suffix"),
        pytest.param("offset", timedelta(hours=5), id="plus-five"),
        pytest.param("offset", timedelta(hours=-8), id="minus-eight"),
        pytest.param("space", None, id="space-separator"),
    ],
)
def test_audit_since_iso(
    audit_log: dict[str, datetime],
    database_url: str,
    form: str,
    offset: timedelta | None,
) -> None:
    # One minute before the check 30 hours ago: events 3 to 7 match.
    since = audit_log["30h"] - timedelta(minutes=1)
    if form == "naive":
        text = since.replace(tzinfo=None).isoformat()
    elif form == "z":
        text = since.strftime("%Y-%m-%dT%H:%M:%SZ")
    elif form == "space":
        text = since.strftime("%Y-%m-%d %H:%M:%S")
    else:
        assert offset is not None
        text = since.astimezone(timezone(offset)).isoformat()

    result = run(
        "audit", "--database", database_url, "--format", "json", "--since", text
    )

    assert result.exit_code == 0, result.stderr
    assert event_ids(result) == [3, 4, 5, 6, 7]


def test_audit_until_date(audit_log: dict[str, datetime], database_url: str) -> None:
    # A date alone in --until includes that whole day.
    today = audit_log["1h"].date().isoformat()

    result = run(
        "audit", "--database", database_url, "--format", "json", "--until", today
    )

    assert result.exit_code == 0, result.stderr
    assert event_ids(result)[-1] == 7


def test_audit_limit_notice(audit_log: dict[str, datetime], database_url: str) -> None:
    result = run(
        "audit", "--database", database_url, "--limit", "3", "--format", "json"
    )

    assert result.exit_code == 0
    assert event_ids(result) == [5, 6, 7]
    assert "showing the newest 3 matching events" in result.stderr


def test_audit_empty_notice(audit_log: dict[str, datetime], database_url: str) -> None:
    result = run(
        "audit", "--database", database_url, "--event", "expire", "--format", "csv"
    )

    assert result.exit_code == 0
    assert result.stdout.splitlines() == [",".join(reports.AUDIT_FIELDS)]
    assert "no audit events match" in result.stderr


def test_audit_pages_same_time(
    policy_dir: Path,
    ledger: Ledger,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Five checks share one timestamp, so pages of 2 must continue by id.
    policy = load_policy(policy_dir)
    at = datetime.now(UTC)
    for number in range(5):
        record(ledger, policy, at=at, department="support", user=f"user-{number}")
    monkeypatch.setattr(reports, "PAGE_SIZE", 2)

    everything = run("audit", "--database", database_url, "--format", "json")
    newest = run(
        "audit", "--database", database_url, "--format", "json", "--limit", "3"
    )

    assert event_ids(everything) == [1, 2, 3, 4, 5]
    assert event_ids(newest) == [3, 4, 5]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param(["--since", "yesterday"], "invalid time 'yesterday'", id="word"),
        pytest.param(
            ["--since", "2026-13-01"], "invalid time '2026-13-01'", id="month"
        ),
        pytest.param(["--until", "24"], "invalid time '24'", id="no-unit"),
        pytest.param(["--since", "-3h"], "invalid time '-3h'", id="negative"),
        pytest.param(["--since", "99999999999d"], "invalid time", id="overflow"),
        pytest.param(
            ["--since", "1h", "--until", "2h"], "must be before --until", id="reversed"
        ),
        pytest.param(["--decision", "maybe"], "'maybe' is not one of", id="decision"),
        pytest.param(["--event", "reserve"], "'reserve' is not one of", id="event"),
        pytest.param(["--limit", "-1"], "-1 is not in the range", id="limit"),
        pytest.param(["--format", "xml"], "'xml' is not one of", id="format"),
    ],
)
def test_audit_bad_input(database_url: str, options: list[str], message: str) -> None:
    result = run("audit", "--database", database_url, *options)

    assert result.exit_code == EXIT_USAGE
    assert message in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", ["audit", "budgets"])
def test_missing_database_file(tmp_path: Path, policy_dir: Path, command: str) -> None:
    missing = tmp_path / "absent" / "ledger.db"
    options = ["--policies", str(policy_dir)] if command == "budgets" else []

    result = run(command, "--database", f"sqlite:///{missing}", *options)

    assert result.exit_code == EXIT_DATABASE
    assert f"database file {missing} not found" in result.stderr
    assert not missing.parent.exists()
    assert "Traceback" not in result.output


def test_audit_unmigrated_database(tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    empty.touch()

    result = run("audit", "--database", f"sqlite:///{empty}")

    assert result.exit_code == EXIT_DATABASE
    assert (
        f"run `spendgate migrate --database sqlite:///{empty}` first" in result.stderr
    )
    assert "Traceback" not in result.output


def test_audit_unreachable_server() -> None:
    # Port 1 on the loopback interface has no PostgreSQL server.
    url = "postgresql+psycopg://nobody:secret@127.0.0.1:1/ledger"

    result = run("audit", "--database", url)

    assert result.exit_code == EXIT_DATABASE
    assert "cannot read the ledger database at" in result.stderr
    assert "secret" not in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        pytest.param("not a url", "not a url", id="syntax"),
        pytest.param("nosuchdb://host/x", "nosuchdb://host/x", id="dialect"),
        pytest.param(
            "mysql://user:secret@127.0.0.1:1/x",
            "mysql://user:***@127.0.0.1:1/x",
            id="driver",
        ),
    ],
)
def test_audit_invalid_url(url: str, shown: str) -> None:
    result = run("audit", "--database", url)

    assert result.exit_code == EXIT_DATABASE
    assert f"invalid database URL {shown!r}" in result.stderr
    assert "Traceback" not in result.output


NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "end_of_day", "expected"),
    [
        pytest.param("2026-12-01", False, datetime(2026, 12, 1, tzinfo=UTC), id="date"),
        pytest.param(
            "2026-12-01", True, datetime(2026, 12, 2, tzinfo=UTC), id="date-until"
        ),
        pytest.param(
            "2026-12-01T09:30:00",
            False,
            datetime(2026, 12, 1, 9, 30, tzinfo=UTC),
            id="naive",
        ),
        pytest.param(
            "2026-12-01T09:30:00",
            True,
            datetime(2026, 12, 1, 9, 30, tzinfo=UTC),
            id="naive-until",
        ),
        pytest.param(
            "2026-12-01T09:30:00-05:00",
            False,
            datetime(2026, 12, 1, 14, 30, tzinfo=UTC),
            id="offset",
        ),
        pytest.param(
            "2026-12-01T09:30Z", False, datetime(2026, 12, 1, 9, 30, tzinfo=UTC), id="z"
        ),
        pytest.param("24h", False, NOW - timedelta(hours=24), id="hours"),
        pytest.param(" 7D ", False, NOW - timedelta(days=7), id="days-upper"),
        pytest.param("30m", False, NOW - timedelta(minutes=30), id="minutes"),
        pytest.param("45s", False, NOW - timedelta(seconds=45), id="seconds"),
        pytest.param("2w", True, NOW - timedelta(weeks=2), id="weeks"),
    ],
)
def test_parse_time_forms(text: str, end_of_day: bool, expected: datetime) -> None:
    parsed = reports.parse_time(text, now=NOW, end_of_day=end_of_day)

    assert parsed == expected
    assert parsed.tzinfo == UTC


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("now", id="word"),
        pytest.param("7", id="no-unit"),
        pytest.param("7y", id="unit"),
        pytest.param("2026-02-30", id="date"),
        pytest.param("2026-12-01T25:00", id="hour"),
    ],
)
def test_parse_time_invalid(text: str) -> None:
    with pytest.raises(ValueError, match="invalid time"):
        reports.parse_time(text, now=NOW)


@pytest.fixture
def budget_ledger(policy_dir: Path, ledger: Ledger, tmp_path: Path) -> None:
    """Record calls in the current windows, and two that the report must skip.

    engineering: alice committed 1,420 and bob of platform has 2,000
    reserved. support: carol (no team) committed 1,420, and dan of team
    Tier1, which the policy does not define, released his call. erin has
    rows in last month's windows, and a row of per-user-daily in this
    month's window, written under an earlier policy where that budget was
    monthly. Her check there was denied, so it moved no money.
    """
    policy = load_policy(policy_dir)
    now = datetime.now(UTC)
    record(
        ledger, policy, at=now, department="engineering", user="alice", settle="commit"
    )
    record(
        ledger, policy, at=now, department="engineering", team="platform", user="bob"
    )
    record(ledger, policy, at=now, department="support", user="carol", settle="commit")
    record(
        ledger,
        policy,
        at=now,
        department="support",
        team="Tier1",
        user="dan",
        settle="release",
    )
    record(
        ledger,
        policy,
        at=now - timedelta(days=40),
        department="engineering",
        user="erin",
        settle="commit",
    )
    monthly_files = {
        **POLICY_FILES,
        "engineering.yaml": POLICY_FILES["engineering.yaml"].replace(
            "{name: per-user-daily, period: day, limit_usd: 0.01",
            "{name: per-user-daily, period: month, limit_usd: 0.000001",
        ),
    }
    earlier = load_policy(write_policy(tmp_path / "earlier", monthly_files))
    denied = record(ledger, earlier, at=now, department="engineering", user="erin")
    assert denied.reason is evaluator.Reason.BUDGET_EXCEEDED


def budget_rows(result: Result) -> list[tuple[str, str, str, int, int, int]]:
    return [
        (
            row["department"],
            row["budget"],
            f"{row['scope']}:{row['subject']}",
            row["limit_micros"],
            row["spent_micros"],
            row["reserved_micros"],
        )
        for row in json_lines(result)
    ]


def test_budgets_json_rows(
    budget_ledger: None, policy_dir: Path, database_url: str
) -> None:
    result = run(
        "budgets",
        "--database",
        database_url,
        "--policies",
        str(policy_dir),
        "--format",
        "json",
    )

    assert result.exit_code == 0, result.stderr
    assert budget_rows(result) == [
        ("engineering", "monthly", "department:engineering", 1_000_000, 1420, 2000),
        ("engineering", "per-user-daily", "user:bob", 10_000, 0, 2000),
        ("engineering", "per-user-daily", "user:alice", 10_000, 1420, 0),
        ("engineering", "monthly", "team:platform", 5000, 0, 2000),
        ("support", "monthly", "department:support", 1_000_000, 1420, 0),
        ("support", "per-team-daily", "team:", 2000, 1420, 0),
        ("support", "per-team-daily", "team:tier1", 2000, 0, 0),
        ("support", "pace", "department:support", 1000, 1420, 0),
    ]


def test_budgets_json_money(
    budget_ledger: None, policy_dir: Path, database_url: str
) -> None:
    result = run(
        "budgets",
        "--database",
        database_url,
        "--policies",
        str(policy_dir),
        "--format",
        "json",
    )

    rows = json_lines(result)
    monthly = rows[0]
    assert monthly["limit_usd"] == "1.000000"
    assert monthly["spent_usd"] == "0.001420"
    assert monthly["reserved_usd"] == "0.002000"
    assert monthly["remaining_micros"] == 1_000_000 - 3420
    assert monthly["remaining_usd"] == "0.996580"
    assert monthly["used_percent"] == 0.34
    assert monthly["downgrade_at_percent"] == 80.0
    assert monthly["rule"] == "departments/engineering/budgets/monthly"
    assert monthly["team"] == ""
    assert rows[3]["team"] == "platform"
    assert rows[3]["rule"] == "departments/engineering/teams/platform/budgets/monthly"
    assert rows[3]["used_percent"] == 40.0
    pace = rows[7]
    assert pace["shadow"] is True
    assert pace["remaining_micros"] == -420
    assert pace["remaining_usd"] == "-0.000420"
    assert pace["used_percent"] == 142.0
    assert {row["window"] for row in rows if row["period"] == "month"} == {
        datetime.now(UTC).strftime("%Y-%m")
    }


def test_budgets_table(
    budget_ledger: None, policy_dir: Path, database_url: str
) -> None:
    result = run("budgets", "--database", database_url, "--policies", str(policy_dir))

    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["DEPARTMENT", "BUDGET", "SCOPE"]
    assert len(lines) == 9
    # USED is right-aligned: every percentage ends where its header ends.
    used_end = lines[0].index("USED") + len("USED")
    assert [line[:used_end].split()[-1] for line in lines[1:]] == [
        "0.3%",
        "20.0%",
        "14.2%",
        "40.0%",
        "0.1%",
        "71.0%",
        "0.0%",
        "142.0%",
    ]
    assert "$1.000000" in lines[1]
    assert "$0.996580" in lines[1]
    assert "platform/monthly" in lines[4]
    assert "team:(none)" in lines[6]
    assert lines[8].endswith("shadow, over limit")


def test_budgets_department_filter(
    budget_ledger: None, policy_dir: Path, database_url: str
) -> None:
    result = run(
        "budgets",
        "--database",
        database_url,
        "--policies",
        str(policy_dir),
        "--department",
        "Support",
        "--format",
        "json",
    )

    assert result.exit_code == 0, result.stderr
    assert {row[0] for row in budget_rows(result)} == {"support"}
    assert len(budget_rows(result)) == 4


def test_budgets_empty_ledger(policy_dir: Path, database_url: str) -> None:
    result = run(
        "budgets",
        "--database",
        database_url,
        "--policies",
        str(policy_dir),
        "--format",
        "json",
    )

    assert result.exit_code == 0, result.stderr
    # Per-user and per-team budgets have no subjects before the first call.
    assert [row[2] for row in budget_rows(result)] == [
        "department:engineering",
        "team:platform",
        "department:support",
        "department:support",
    ]
    assert {row[4] for row in budget_rows(result)} == {0}


def test_budgets_unknown_department(policy_dir: Path, database_url: str) -> None:
    result = run(
        "budgets",
        "--database",
        database_url,
        "--policies",
        str(policy_dir),
        "--department",
        "sales",
    )

    assert result.exit_code == EXIT_USAGE
    assert "department 'sales' is not defined" in result.stderr
    assert "Use one of: engineering, support" in result.stderr


def test_budgets_invalid_policy(tmp_path: Path, database_url: str) -> None:
    broken = write_policy(
        tmp_path / "broken",
        {**POLICY_FILES, "support.yaml": POLICY_FILES["support.yaml"] + "mode: loud\n"},
    )

    result = run("budgets", "--database", database_url, "--policies", str(broken))

    assert result.exit_code == EXIT_INVALID_POLICY
    assert "support.yaml" in result.stderr


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        pytest.param(POLICY_FILES, 0, id="valid"),
        pytest.param(
            {
                **POLICY_FILES,
                "support.yaml": POLICY_FILES["support.yaml"] + "mode: x\n",
            },
            EXIT_INVALID_POLICY,
            id="bad-mode",
        ),
        pytest.param(
            {
                **POLICY_FILES,
                "engineering.yaml": POLICY_FILES["engineering.yaml"].replace(
                    "large: small", "large: huge"
                ),
            },
            EXIT_INVALID_POLICY,
            id="unknown-model",
        ),
        pytest.param(
            {k: v for k, v in POLICY_FILES.items() if k != "organization.yaml"},
            EXIT_INVALID_POLICY,
            id="no-organization",
        ),
    ],
)
def test_validate_exit_codes(
    tmp_path: Path, files: Mapping[str, str], expected: int
) -> None:
    directory = write_policy(tmp_path / "policies", files)

    result = run("validate", str(directory))

    assert result.exit_code == expected, result.output


def test_validate_missing_directory(tmp_path: Path) -> None:
    result = run("validate", str(tmp_path / "absent"))

    assert result.exit_code == EXIT_USAGE
    assert "is not a directory" in result.stderr


@functools.cache
def load_simulator() -> ModuleType:
    """Import examples/simulate_day.py, which is a script outside any package."""
    spec = importlib.util.spec_from_file_location("simulate_day", SIMULATOR)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class is built.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("address", "accepted"),
    [
        pytest.param("127.0.0.1:50051", True, id="ipv4"),
        pytest.param("127.8.9.10:443", True, id="ipv4-range"),
        pytest.param("[::1]:50051", True, id="ipv6"),
        pytest.param("localhost:50051", True, id="localhost"),
        pytest.param("LOCALHOST:1", True, id="localhost-case"),
        pytest.param("192.0.2.10:50051", False, id="remote-ipv4"),
        pytest.param("0.0.0.0:50051", False, id="any"),
        pytest.param("[2001:db8::1]:50051", False, id="remote-ipv6"),
        pytest.param("spendgate.example.com:50051", False, id="hostname"),
        pytest.param("localhost.example.com:50051", False, id="localhost-prefix"),
        pytest.param("dns:///127.0.0.1:50051", False, id="scheme"),
        pytest.param("unix:/tmp/spendgate.sock", False, id="unix"),
        pytest.param("127.0.0.1", False, id="no-port"),
        pytest.param("127.0.0.1:0", False, id="port-zero"),
        pytest.param("127.0.0.1:70000", False, id="port-range"),
    ],
)
def test_simulator_loopback_only(address: str, accepted: bool) -> None:
    simulator = load_simulator()

    if accepted:
        assert simulator.loopback_address(address) == address
    else:
        with pytest.raises(ValueError, match="address"):
            simulator.loopback_address(address)


def test_simulator_rejects_remote(capsys: pytest.CaptureFixture[str]) -> None:
    simulator = load_simulator()

    with pytest.raises(SystemExit) as exit_info:
        simulator.main(["--address", "192.0.2.10:50051", "--requests", "1"])

    assert exit_info.value.code == EXIT_USAGE
    assert "is not a loopback address" in capsys.readouterr().err


def test_simulator_same_seed_same_calls() -> None:
    simulator = load_simulator()

    first = simulator.plan_calls(200, 11)
    second = simulator.plan_calls(200, 11)
    other = simulator.plan_calls(200, 12)

    assert first == second
    assert first != other
    assert {call.department for call in first} >= {
        "engineering",
        "finance",
        "legal",
        "marketing",
        "research",
        "support",
    }


def summary_table(lines: Sequence[str]) -> dict[str, list[str]]:
    """Return the summary rows by department, from the header to the blank line."""
    start = next(i for i, line in enumerate(lines) if line.startswith("department"))
    rows: dict[str, list[str]] = {}
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        name, *cells = line.split()
        rows[name] = cells
    return rows


def test_simulator_summary(sqlite_database: str) -> None:
    policy = load_policy(REPO / "policies")
    engine = create_engine(sqlite_database)
    running = create_server(
        "127.0.0.1:0", PolicyHolder(policy), Ledger(engine), max_workers=8
    )
    try:
        completed = subprocess.run(
            [
                sys.executable,
                str(SIMULATOR),
                "--address",
                f"127.0.0.1:{running.port}",
                "--requests",
                "60",
                "--seed",
                "5",
                "--concurrency",
                "4",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        running.stop(grace=1.0)
        engine.dispose()

    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert lines[0].startswith("Simulated 60 calls in ")
    assert "errors 0." in lines[1]
    table = summary_table(lines)
    assert sum(int(cells[0]) for cells in table.values()) == 60
    for name, cells in table.items():
        checks, allowed, downgraded, denied = (int(cell) for cell in cells[:4])
        assert allowed + downgraded + denied == checks, name
        assert cells[-1].startswith("$"), name
    budget_lines = {
        line.split(":")[0].strip(): line
        for line in lines[lines.index("Department budgets now (GetBudget):") + 1 :]
        if line.startswith("  ") and "spent of" in line
    }
    for name in set(table) & set(policy.departments):
        assert "monthly" in budget_lines[name], name
    assert "Top reason codes:" in lines
    assert "60/60 calls" in completed.stderr

    audited = run(
        "audit",
        "--database",
        sqlite_database,
        "--event",
        "check",
        "--limit",
        "0",
        "--format",
        "json",
    )
    assert len(json_lines(audited)) == 60


@pytest.mark.parametrize(
    ("url", "message"),
    [
        pytest.param("garbage", "Could not parse", id="unparsable"),
        pytest.param("sqlite://", "in-memory SQLite", id="memory"),
        pytest.param(
            "postgresql+psycopg://someone:hunter2@127.0.0.1:1/x",
            "connection failed",
            id="refused-with-password",
        ),
    ],
)
def test_migrate_bad_database_url(url: str, message: str) -> None:
    result = CliRunner().invoke(main, ["migrate", "--database", url])

    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output
    assert "hunter2" not in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(
            ["--spend", "monthly=1e999999999"], "is not a USD amount", id="huge-spend"
        ),
        pytest.param(
            ["--at", "0001-01-01T00:00:00+14:00"],
            "limits of the calendar",
            id="at-edge",
        ),
    ],
)
def test_explain_hostile_values(args: list[str], message: str) -> None:
    result = run(
        "explain",
        "policies",
        "--department",
        "engineering",
        "--model",
        "gpt-4o",
        "--input-tokens",
        "5",
        *args,
    )

    assert result.exit_code == 2
    assert message in result.output


def json_ready(value: Any) -> Any:
    """Turn the loader's Decimals into the ints and floats a JSON document has."""
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_ready(item) for item in value]
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


def test_schema_accepts_shipped_files() -> None:
    # An editor pointed at policies/**/*.yaml checks the test files too.
    result = run("schema")
    validator = Draft202012Validator(json.loads(result.stdout))
    documents = []
    for path in sorted((REPO / "policies").rglob("*.yaml")):
        parsed, problems = read_documents(path, path.name)
        assert problems == []
        documents += [(path.name, json_ready(document.data)) for document in parsed]
    kinds = {document["kind"] for _, document in documents}
    rejected = {
        name: [error.message for error in validator.iter_errors(document)][:3]
        for name, document in documents
        if not validator.is_valid(document)
    }

    assert result.exit_code == 0
    assert kinds == {"Organization", "ModelCatalog", "Department", "PolicyTest"}
    assert rejected == {}


def test_schema_rejects_invalid_documents() -> None:
    validator = Draft202012Validator(json.loads(run("schema").stdout))
    department = {
        "apiVersion": "spendgate/v1",
        "kind": "Department",
        "name": "legal",
        "budgets": [{"name": "monthly", "period": "month", "limit_usd": "ten"}],
    }
    policy_test = {
        "apiVersion": "spendgate/v1",
        "kind": "PolicyTest",
        "name": "no cases",
        "now": "2026-03-31T23:30:00-04:00",
    }

    assert not validator.is_valid(department)
    assert not validator.is_valid(policy_test)


def test_check_prints_plain_json(policy_dir: Path, sqlite_database: str) -> None:
    engine = create_engine(sqlite_database)
    running = create_server(
        "127.0.0.1:0", PolicyHolder(load_policy(policy_dir)), Ledger(engine)
    )
    try:
        # A process of its own: the command configures structlog with cached
        # loggers, which would keep this server's loggers from later captures.
        completed = subprocess.run(
            [
                sys.executable,
                "-m",
                "spendgate",
                "check",
                "--address",
                f"127.0.0.1:{running.port}",
                "--department",
                "engineering",
                "--model",
                "small",
                "--input-tokens",
                "1000",
                "--max-output-tokens",
                "500",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        running.stop(grace=1.0)
        engine.dispose()

    assert completed.returncode == 0, completed.stderr
    answer = json.loads(completed.stdout)
    assert answer["decision"] == "ALLOW"
    assert answer["shadow_decision"] is None
    assert isinstance(answer["estimated_cost_micros"], int)
    assert answer["input_tokens"] == 1000
