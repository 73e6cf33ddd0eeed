"""The ledger's SQL tables, declared once for the queries and for alembic's checks."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    false,
)

# Deterministic constraint names, so migrations can refer to them on every database.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# SQLite only autoincrements INTEGER PRIMARY KEY, PostgreSQL wants BIGINT.
Id = BigInteger().with_variant(Integer(), "sqlite")
Timestamp = DateTime(timezone=True)

budget_usage = Table(
    "budget_usage",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    # Budget rule id, subject and window joined by "|": one row per window.
    Column("budget_key", String(512), nullable=False, unique=True),
    Column("rule", String(300), nullable=False),
    Column("scope", String(16), nullable=False),
    Column("subject", String(200), nullable=False),
    Column("period", String(8), nullable=False),
    Column("window", String(16), nullable=False),
    Column("spent_micros", BigInteger, nullable=False, server_default="0"),
    Column("reserved_micros", BigInteger, nullable=False, server_default="0"),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
)

reservations = Table(
    "reservations",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("request_id", String(200), nullable=False, unique=True),
    # open, committed, released or expired.
    Column("state", String(16), nullable=False),
    Column("department", String(100), nullable=False),
    Column("team", String(100), nullable=False),
    Column("user", String(200), nullable=False),
    Column("application", String(200), nullable=False),
    Column("model", String(128), nullable=False),
    Column("estimated_micros", BigInteger, nullable=False),
    Column("actual_micros", BigInteger, nullable=True),
    # What expiry charged to the budgets, so a late commit can correct it.
    Column("charged_micros", BigInteger, nullable=False, server_default="0"),
    # Prices in force at Check time, micro-USD per million tokens.
    Column("input_price_micros", BigInteger, nullable=False),
    Column("cached_input_price_micros", BigInteger, nullable=False),
    Column("output_price_micros", BigInteger, nullable=False),
    Column("input_tokens", BigInteger, nullable=True),
    Column("cached_input_tokens", BigInteger, nullable=True),
    Column("output_tokens", BigInteger, nullable=True),
    Column("policy_version", String(120), nullable=False),
    Column("created_at", Timestamp, nullable=False),
    Column("expires_at", Timestamp, nullable=False),
    Column("settled_at", Timestamp, nullable=True),
    Index("ix_reservations_state_expires_at", "state", "expires_at"),
)

reservation_budgets = Table(
    "reservation_budgets",
    metadata,
    Column(
        "reservation_id",
        String(32),
        ForeignKey("reservations.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("usage_id", Id, ForeignKey("budget_usage.id"), primary_key=True),
)

audit_events = Table(
    "audit_events",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("occurred_at", Timestamp, nullable=False, index=True),
    # check, commit, release or expire.
    Column("event", String(16), nullable=False),
    Column("request_id", String(200), nullable=False),
    # Set on check events only, so a retried Check finds its first response.
    Column("check_request_id", String(200), nullable=True, unique=True),
    Column("reservation_id", String(32), nullable=True, index=True),
    Column("department", String(100), nullable=False),
    Column("team", String(100), nullable=False),
    Column("user", String(200), nullable=False),
    Column("application", String(200), nullable=False),
    Column("requested_model", String(128), nullable=False),
    Column("effective_model", String(128), nullable=False),
    Column("decision", String(16), nullable=False),
    # The decision before shadow mode, where a shadow department or budget changed it.
    Column("shadow_decision", String(16), nullable=True),
    Column("reason_code", String(32), nullable=False),
    Column("rule", String(300), nullable=False),
    Column("message", String(500), nullable=False),
    Column("policy_version", String(120), nullable=False),
    Column("input_tokens", BigInteger, nullable=True),
    Column("input_tokens_estimated", Boolean, nullable=False, server_default=false()),
    Column("cached_input_tokens", BigInteger, nullable=True),
    Column("output_tokens", BigInteger, nullable=True),
    Column("max_output_tokens", BigInteger, nullable=True),
    Column("estimated_micros", BigInteger, nullable=True),
    Column("actual_micros", BigInteger, nullable=True),
    Column("overage_micros", BigInteger, nullable=True),
    # True for a decision made while the ledger was unreachable (fail_mode: open):
    # no budget was checked and nothing was reserved.
    Column("unverified", Boolean, nullable=False, server_default=false()),
    # Client labels as a JSON object.
    Column("labels", Text, nullable=False, server_default="{}"),
    Index("ix_audit_events_department_occurred_at", "department", "occurred_at"),
)
