"""Schema migrations: the models match them, and serve checks the revision."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from alembic import command
from sqlalchemy import text

from spendgate.errors import SchemaOutdatedError
from spendgate.ledger import check_schema, create_engine, migrate
from spendgate.ledger._engine import alembic_config


def test_models_match_migrations(ledger_url: str) -> None:
    engine = create_engine(ledger_url)
    config = alembic_config()

    with engine.begin() as connection:
        config.attributes["connection"] = connection
        # Raises when the tables in _tables.py and the migrations disagree.
        command.check(config)
    engine.dispose()


def test_check_schema_at_head(sqlite_url: str) -> None:
    engine = create_engine(sqlite_url)

    revision = check_schema(engine)

    engine.dispose()
    assert revision == "0003"


def test_check_schema_behind(tmp_path: object) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/old.db")
    migrate(engine, "0001")

    with pytest.raises(SchemaOutdatedError, match="run `spendgate migrate"):
        check_schema(engine)
    engine.dispose()


def test_check_schema_newer_than_code(sqlite_url: str) -> None:
    engine = create_engine(sqlite_url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))

    with pytest.raises(SchemaOutdatedError, match="newer than this spendgate"):
        check_schema(engine)
    engine.dispose()


def test_merge_user_rows_by_lowercase_name(ledger_url: str) -> None:
    engine = create_engine(ledger_url)
    config = alembic_config()
    with engine.begin() as connection:
        # The fixture migrated to head; go back to the revision before the merge.
        config.attributes["connection"] = connection
        command.downgrade(config, "0002")
    rule = "departments/eng/budgets/per-user-daily"
    day = "2026-12-04"
    rows = [
        # id, subject, spent, reserved
        (1, "Alice", 100, 10),
        (2, "alice", 200, 20),
        (3, "ALICE", 300, 30),
        (4, "Bob", 50, 5),
        (5, "carol", 7, 0),
    ]
    insert_row = text(
        "INSERT INTO budget_usage (id, budget_key, rule, scope, subject, period, "
        '"window", spent_micros, reserved_micros, created_at, updated_at)'
        " VALUES (:id, :key, :rule, 'user', :subject, 'day', :day, :spent,"
        " :reserved, :now, :now)"
    )
    insert_link = text(
        "INSERT INTO reservations (id, request_id, state, department, team,"
        ' "user", application, model, estimated_micros, charged_micros,'
        " input_price_micros, cached_input_price_micros, output_price_micros,"
        " policy_version, created_at, expires_at)"
        " VALUES (:id, :id, 'open', 'eng', '', 'x', '', 'm', 1, 0, 1, 1, 1, 'v',"
        " :now, :now)"
    )
    now = datetime(2026, 12, 4, tzinfo=UTC)
    with engine.begin() as connection:
        for row_id, subject, spent, reserved in rows:
            connection.execute(
                insert_row,
                {
                    "id": row_id,
                    "key": f"{rule}|{subject}|{day}",
                    "rule": rule,
                    "subject": subject,
                    "day": day,
                    "spent": spent,
                    "reserved": reserved,
                    "now": now,
                },
            )
            connection.execute(insert_link, {"id": f"r{row_id}", "now": now})
            connection.execute(
                text("INSERT INTO reservation_budgets VALUES (:reservation, :usage)"),
                {"reservation": f"r{row_id}", "usage": row_id},
            )

    migrate(engine)
    with engine.connect() as connection:
        merged = connection.execute(
            text(
                "SELECT id, budget_key, subject, spent_micros, reserved_micros"
                " FROM budget_usage ORDER BY id"
            )
        ).all()
        links = connection.execute(
            text(
                "SELECT reservation_id, usage_id FROM reservation_budgets"
                " ORDER BY reservation_id"
            )
        ).all()
        connection.rollback()
    engine.dispose()

    assert [tuple(row) for row in merged] == [
        (2, f"{rule}|alice|{day}", "alice", 600, 60),
        (4, f"{rule}|bob|{day}", "bob", 50, 5),
        (5, f"{rule}|carol|{day}", "carol", 7, 0),
    ]
    assert [tuple(row) for row in links] == [
        ("r1", 2),
        ("r2", 2),
        ("r3", 2),
        ("r4", 4),
        ("r5", 5),
    ]
