"""merge per-user budget rows by lowercase name

Per-user budgets are keyed by the lowercased user name since this
revision, so "Alice" and "alice" share one budget. Rows written before
under other letter cases are merged into the lowercase row: their spent
and reserved amounts are added up and their reservations point at the
merged row, so no money is lost and a hard budget holds across the
upgrade.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04 19:20:00.000000
"""

from collections import defaultdict
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Lightweight tables: the migration must not depend on the models of the
# spendgate version that runs it.
budget_usage = sa.table(
    "budget_usage",
    sa.column("id", sa.BigInteger),
    sa.column("budget_key", sa.String),
    sa.column("rule", sa.String),
    sa.column("scope", sa.String),
    sa.column("subject", sa.String),
    sa.column("window", sa.String),
    sa.column("spent_micros", sa.BigInteger),
    sa.column("reserved_micros", sa.BigInteger),
)
reservation_budgets = sa.table(
    "reservation_budgets",
    sa.column("reservation_id", sa.String),
    sa.column("usage_id", sa.BigInteger),
)


def upgrade() -> None:
    connection = op.get_bind()
    rows = connection.execute(
        sa.select(budget_usage).where(budget_usage.c.scope == "user")
    ).all()
    groups: dict[str, list[sa.Row]] = defaultdict(list)
    for row in rows:
        groups[f"{row.rule}|{row.subject.lower()}|{row.window}"].append(row)

    for key, members in groups.items():
        if len(members) == 1 and members[0].budget_key == key:
            continue
        # Keep the row already under the new key, or else the oldest one.
        keep = next((row for row in members if row.budget_key == key), None)
        keep = keep or min(members, key=lambda row: row.id)
        others = [row.id for row in members if row.id != keep.id]
        if others:
            connection.execute(
                reservation_budgets.update()
                .where(reservation_budgets.c.usage_id.in_(others))
                .values(usage_id=keep.id)
            )
            connection.execute(
                budget_usage.delete().where(budget_usage.c.id.in_(others))
            )
        connection.execute(
            budget_usage.update()
            .where(budget_usage.c.id == keep.id)
            .values(
                budget_key=key,
                subject=keep.subject.lower(),
                spent_micros=sum(row.spent_micros for row in members),
                reserved_micros=sum(row.reserved_micros for row in members),
            )
        )


def downgrade() -> None:
    # Merged rows cannot be split again; the older code reads the merged
    # row for the lowercase name only.
    pass
