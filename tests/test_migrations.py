"""Schema migrations: the models match them, and serve checks the revision."""

from __future__ import annotations

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
    assert revision == "0002"


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
