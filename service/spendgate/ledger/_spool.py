"""A local file of audit rows written while the ledger database was unreachable.

With fail_mode: open, Check decides without the database, so its audit row
cannot be inserted at once. Each such row is appended to this file and
flushed to the database when it is back; the file is synced on every
append, so a crash loses no row.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from spendgate.ledger._tables import audit_events


class AuditSpool:
    """Append-only JSON-lines file of audit rows awaiting the database."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def append(self, row: Mapping[str, Any]) -> None:
        """Write one row and sync it to disk before returning."""
        line = json.dumps(dict(row), default=str, sort_keys=True) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as spool:
                spool.write(line)
                spool.flush()
                os.fsync(spool.fileno())

    def pending(self) -> int:
        """Count the rows waiting in the file."""
        with self._lock:
            if not self.path.exists():
                return 0
            with self.path.open(encoding="utf-8") as spool:
                return sum(1 for line in spool if line.strip())

    def flush(self, engine: Engine) -> int:
        """Insert every waiting row in one transaction, then empty the file.

        Returns the number of rows inserted.
        """
        with self._lock:
            if not self.path.exists():
                return 0
            rows = [
                _decode(json.loads(line))
                for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip()
            ]
            if rows:
                with engine.begin() as connection:
                    connection.execute(audit_events.insert(), rows)
            # NOTE: a crash between the commit above and this truncation makes
            # the next flush insert these rows a second time.
            self.path.write_text("", encoding="utf-8")
            return len(rows)


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    row["occurred_at"] = datetime.fromisoformat(row["occurred_at"])
    return row
