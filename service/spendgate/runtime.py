"""State shared by a running server's threads: the policy in force and the clock."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from spendgate.policy import Policy

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    """Return the current time in UTC; the default Clock."""
    return datetime.now(UTC)


class PolicyHolder:
    """The policy in force; a reload swaps the whole object in one assignment."""

    def __init__(self, policy: Policy) -> None:
        self._policy = policy

    @property
    def current(self) -> Policy:
        """Return the policy to decide with; callers keep this one snapshot."""
        return self._policy

    def replace(self, policy: Policy) -> None:
        """Make `policy` the one in force for every request that starts after."""
        self._policy = policy
