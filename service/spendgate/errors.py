"""Exceptions raised by spendgate, all derived from one base.

SpendgateError
 +-- PolicyError            a policy directory failed to load; carries every problem
 +-- RequestError           malformed request (gRPC INVALID_ARGUMENT)
 +-- NotFoundError          unknown reservation id (gRPC NOT_FOUND)
 +-- ConflictError          reservation in the wrong state (gRPC FAILED_PRECONDITION)
 +-- SchemaOutdatedError    database schema behind the migrations
 +-- LedgerUnavailableError database unreachable or too slow (gRPC UNAVAILABLE)
 +-- TokenizerError         tokenizer unknown or its file damaged (in tokens.py)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class SpendgateError(Exception):
    """Base class of every error spendgate raises on purpose."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One problem found in a policy file, located by file, line and key path."""

    file: str
    line: int
    column: int
    path: str
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}"
        if self.path:
            return f"{where}: {self.path}: {self.message}"
        return f"{where}: {self.message}"


def count_errors(count: int) -> str:
    """Return "1 error" or "N errors", for summary lines."""
    return f"{count} error" if count == 1 else f"{count} errors"


class PolicyError(SpendgateError):
    """A policy directory is invalid; `problems` lists every error found."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        lines = "\n".join(str(problem) for problem in self.problems)
        count = count_errors(len(self.problems))
        super().__init__(f"policy set is invalid ({count}):\n{lines}")


class RequestError(SpendgateError):
    """A request field is missing or invalid."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class NotFoundError(SpendgateError):
    """A reservation id names no reservation."""


class ConflictError(SpendgateError):
    """A reservation is in a state that does not allow the operation."""


class SchemaOutdatedError(SpendgateError):
    """The database schema does not match the migrations this version ships."""


class LedgerUnavailableError(SpendgateError):
    """The ledger database could not be reached or timed out."""
