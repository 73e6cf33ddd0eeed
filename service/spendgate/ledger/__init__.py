"""The SQL ledger of reservations and spend, with its audit log."""

from spendgate.ledger._driver import WouldBlock, no_wait
from spendgate.ledger._engine import (
    check_schema,
    create_engine,
    migrate,
    missing_sqlite_error,
)
from spendgate.ledger._ledger import (
    CheckRecord,
    CommitRecord,
    Ledger,
    Principal,
    ReleaseRecord,
)

__all__ = [
    "CheckRecord",
    "CommitRecord",
    "Ledger",
    "Principal",
    "ReleaseRecord",
    "WouldBlock",
    "check_schema",
    "create_engine",
    "migrate",
    "missing_sqlite_error",
    "no_wait",
]
