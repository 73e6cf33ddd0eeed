"""The compiled policy: frozen values built once at load time for fast decisions.

Globs are expanded against the catalog when the policy loads, so a decision
only looks names up in sets and dicts.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

from spendgate.errors import Problem
from spendgate.windows import Period


class Scope(enum.StrEnum):
    """The group of requests that shares one budget."""

    DEPARTMENT = "department"
    TEAM = "team"
    USER = "user"


class FailMode(enum.StrEnum):
    """Check's behaviour while the ledger database is unreachable."""

    CLOSED = "closed"
    OPEN = "open"


class ExpiryAction(enum.StrEnum):
    """The settlement of an expired reservation."""

    CHARGE = "charge"
    RELEASE = "release"


@dataclass(frozen=True, slots=True)
class Model:
    """A priced model of the catalog; prices are micro-USD per million tokens."""

    name: str
    provider: str
    aliases: tuple[str, ...]
    tokenizer: str
    chars_per_token: Decimal | None
    input_price_micros: int
    cached_input_price_micros: int
    output_price_micros: int
    context_window: int
    max_output_tokens: int


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-request limits; None means no limit."""

    max_input_tokens: int | None = None
    max_output_tokens: int | None = None
    max_request_micros: int | None = None


@dataclass(frozen=True, slots=True)
class Budget:
    """A spending limit per calendar window."""

    rule: str
    name: str
    period: Period
    limit_micros: int
    per: Scope
    # downgrade_at_percent in hundredths of a percent, so 80 is 8000.
    threshold_basis_points: int | None
    shadow: bool


@dataclass(frozen=True, slots=True)
class Team:
    """A team inside a department: narrower models and limits, extra budgets."""

    name: str
    allowed_models: frozenset[str]
    models_rule: str
    limits: Limits
    budgets: tuple[Budget, ...]


@dataclass(frozen=True, slots=True)
class Department:
    """A department's compiled rules."""

    name: str
    shadow: bool
    allowed_models: frozenset[str]
    models_rule: str
    # Downgrade chain of every model that has one, without the model itself.
    chains: Mapping[str, tuple[str, ...]]
    limits: Limits
    budgets: tuple[Budget, ...]
    teams: Mapping[str, Team]
    # Full ids of the rules that decide and audit but never enforce.
    shadow_rules: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Organization:
    """Organisation-wide settings."""

    name: str
    timezone: ZoneInfo
    reservation_ttl: timedelta
    on_reservation_expiry: ExpiryAction
    # Department used for unknown ones; None denies them.
    unknown_department: str | None
    fail_mode: FailMode = FailMode.CLOSED


@dataclass(frozen=True, slots=True)
class Policy:
    """One loaded, validated and compiled policy directory."""

    organization: Organization
    models: Mapping[str, Model]
    # Lower-cased names and aliases to canonical model names.
    model_names: Mapping[str, str]
    departments: Mapping[str, Department]
    version: str
    content_hash: str
    loaded_at: datetime
    files: tuple[str, ...]
    warnings: tuple[Problem, ...]

    def resolve_model(self, name: str) -> Model | None:
        """Find a model by canonical name or alias, ignoring case."""
        canonical = self.model_names.get(name.strip().lower())
        return None if canonical is None else self.models[canonical]

    def rules(self) -> tuple[str, ...]:
        """List every rule id a decision can name, for coverage reports.

        A models rule is listed only where it narrows the models: a department
        that allows the whole catalog, or a team that allows all its
        department's models, can never deny one.
        """
        ids = ["organization/unknown_department", "catalog"]
        catalog = frozenset(self.models)
        for department in self.departments.values():
            prefix = f"departments/{department.name}"
            ids.append(prefix)
            if department.allowed_models != catalog:
                ids.append(department.models_rule)
            # Decisions name the department's limit rule even when a team set it.
            limit_keys = set(_limit_keys(department.limits))
            for team in department.teams.values():
                limit_keys.update(_limit_keys(team.limits))
            ids += [f"{prefix}/limits/{key}" for key in sorted(limit_keys)]
            ids += [budget.rule for budget in department.budgets]
            for team in department.teams.values():
                if team.allowed_models != department.allowed_models:
                    ids.append(team.models_rule)
                ids += [budget.rule for budget in team.budgets]
        ids += [f"models/{name}/context_window" for name in self.models]
        return tuple(ids)


def _limit_keys(limits: Limits) -> list[str]:
    keys = []
    if limits.max_input_tokens is not None:
        keys.append("max_input_tokens")
    if limits.max_request_micros is not None:
        keys.append("max_request_usd")
    return keys
