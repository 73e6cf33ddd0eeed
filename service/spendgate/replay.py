"""Re-decide the Checks recorded in the audit log under a candidate policy.

A policy pull request changes the decisions that spendgate returns. `replay` reads the
audit log oldest first and asks the candidate policy every recorded Check
again, at the time it was made, with the recorded token counts and against
a simulated ledger that the candidate's own decisions fill. The result tells
a reviewer which decisions would change and how much spend that moves.

The simulated ledger follows the real one. An allowed or downgraded Check
reserves the candidate's estimate on the candidate's budget lines. The
recorded Commit of the same reservation moves it to spent, priced from the
recorded token usage with the candidate's catalog (the candidate's model may
differ from the one recorded). A Release frees it, and an expiry frees or
charges it as the candidate's `on_reservation_expiry` says. A call the
recorded policy denied but the candidate allows has no recorded settlement,
so its estimate is charged as spent at once, which is an upper bound.

Usage before `since`: events from the start of the earliest budget window
that contains `since` are read too, and their recorded outcomes (not the
candidate's) fill the simulated ledger. The windows in progress at `since`
therefore start from the spend that was really recorded in them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Engine, func, select, true

from spendgate import evaluator, reports
from spendgate.evaluator import BudgetLine, Decision, Outcome, Usage
from spendgate.ledger._tables import audit_events
from spendgate.money import token_cost_micros
from spendgate.policy import ExpiryAction, Model, Policy
from spendgate.reports import AuditEvent, AuditFilter
from spendgate.windows import Period

# Kinds of change, in the order reports list them. A decision change is named
# RECORDED->CANDIDATE. MODEL_CHANGE keeps the decision but not the model, and
# REASON_CHANGE keeps both but not the reason code.
TRANSITIONS = (
    "ALLOW->DENY",
    "ALLOW->DOWNGRADE",
    "DOWNGRADE->DENY",
    "DENY->ALLOW",
    "DOWNGRADE->ALLOW",
    "DENY->DOWNGRADE",
    "MODEL_CHANGE",
    "REASON_CHANGE",
)

# Stated in every report, because each one limits what a replay can show.
NOTES = (
    "The audit log keeps max_output_tokens after the recorded policy clamped "
    "it (for a downgrade, to the target model), not the value the client "
    "requested, so a candidate that raises an output limit is replayed with "
    "the old, lower bound.",
    "Input tokens are the recorded count of the model that was decided on; a "
    "prompt is not counted again with another model's tokenizer.",
    "A call that only the candidate allows is charged its estimate, since no "
    "settlement was recorded for it.",
    "Spend prevented counts only the reservations whose Commit, Release or "
    "expiry is among the replayed events, before --until.",
)

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class Verdict:
    """The parts of a decision that a replay compares."""

    decision: str
    model: str
    reason_code: str
    rule: str


@dataclass(frozen=True, slots=True)
class Example:
    """One recorded Check whose decision the candidate changes."""

    request_id: str
    occurred_at: datetime
    department: str
    team: str
    user: str
    application: str
    requested_model: str
    recorded: Verdict
    candidate: Verdict


@dataclass(slots=True)
class DepartmentSummary:
    """Counts and spend of the replayed Checks of one department."""

    replayed: int = 0
    transitions: dict[str, int] = field(default_factory=dict)
    # Recorded cost of calls the recorded policy allowed and the candidate denies.
    prevented_micros: int = 0
    # Candidate estimates of calls the recorded policy denied and it allows.
    allowed_micros: int = 0
    # Checks decided while the ledger was down: no budget was checked.
    unverified: int = 0
    # Checks of a model that was priced when recorded but the candidate lacks.
    model_not_in_catalog: int = 0
    # Checks denied before token counting that the candidate would price.
    no_token_count: int = 0
    examples: dict[str, list[Example]] = field(default_factory=dict)

    @property
    def changed(self) -> int:
        """Replayed Checks whose decision, model or reason code changes."""
        return sum(self.transitions.values())

    @property
    def not_replayed(self) -> int:
        """Checks counted but not compared, for the reasons counted above."""
        return self.unverified + self.model_not_in_catalog + self.no_token_count

    def add(self, other: DepartmentSummary) -> None:
        """Add the counts and spend of `other`, but not its examples."""
        self.replayed += other.replayed
        for name, count in other.transitions.items():
            self.transitions[name] = self.transitions.get(name, 0) + count
        self.prevented_micros += other.prevented_micros
        self.allowed_micros += other.allowed_micros
        self.unverified += other.unverified
        self.model_not_in_catalog += other.model_not_in_catalog
        self.no_token_count += other.no_token_count


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """Result of a replay, with summaries by department name in lower case."""

    policy_version: str
    since: datetime | None
    until: datetime | None
    # Start of the events read to rebuild the usage before `since`.
    usage_from: datetime | None
    events_read: int
    departments: Mapping[str, DepartmentSummary]

    def total(self) -> DepartmentSummary:
        """Sum the departments' counts and spend, without examples."""
        total = DepartmentSummary()
        for summary in self.departments.values():
            total.add(summary)
        return total


def replay(
    engine: Engine,
    policy: Policy,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    department: str | None = None,
    examples: int = 5,
    progress: ProgressCallback | None = None,
) -> ReplayResult:
    """Replay the Checks recorded in [since, until) against `policy`.

    `department` keeps only events recorded under that department name,
    ignoring case. Up to `examples` Checks are kept per department and
    transition. `progress`, when given, is called after every event with the
    events processed and the total. Events are read in pages of short
    transactions, so this may raise SQLAlchemyError part way.
    """
    if since is not None and until is not None and since >= until:
        raise ValueError(
            f"since ({since.isoformat()}) must be before until ({until.isoformat()})"
        )
    usage_from = None if since is None else usage_start(policy, since)
    # NOTE: with `department`, Checks recorded under an undefined department
    # name that the candidate's unknown_department sends to this department
    # are not read, so their usage is missing from its budgets.
    audit_filter = AuditFilter(department=department, since=usage_from, until=until)
    total, last_id, unverified = _snapshot(engine, audit_filter)
    state = _Replay(policy, since, examples)
    done = 0
    for event in reports.read_audit(engine, audit_filter).events:
        # Events written after the snapshot are left for the next replay, so
        # the total is exact while the server goes on writing.
        if event.id > last_id:
            continue
        state.apply(event, unverified=event.id in unverified)
        done += 1
        if progress is not None:
            progress(done, total)
    return ReplayResult(
        policy_version=policy.version,
        since=since,
        until=until,
        usage_from=usage_from,
        events_read=done,
        departments=dict(sorted(state.departments.items())),
    )


def usage_start(policy: Policy, since: datetime) -> datetime:
    """Return the start of the earliest window of any budget that contains `since`."""
    timezone = policy.organization.timezone
    periods: set[Period] = set()
    for department in policy.departments.values():
        periods.update(budget.period for budget in department.budgets)
        for team in department.teams.values():
            periods.update(budget.period for budget in team.budgets)
    starts = [window_start(period, since, timezone) for period in periods]
    return min([since, *starts])


def window_start(period: Period, at: datetime, timezone: ZoneInfo) -> datetime:
    """Return the UTC instant at which the window of `period` containing `at` starts."""
    local = at.astimezone(timezone)
    midnight = local.replace(hour=0, minute=0, second=0, microsecond=0, tzinfo=None)
    if period is Period.DAY:
        start = midnight
    elif period is Period.WEEK:
        start = midnight - timedelta(days=local.weekday())
    else:
        start = midnight.replace(day=1)
    return start.replace(tzinfo=timezone).astimezone(UTC)


def _snapshot(engine: Engine, audit_filter: AuditFilter) -> tuple[int, int, set[int]]:
    """Count the matching events and find the last id and the unverified Checks.

    The audit reader does not return the `unverified` column, so the ids of
    those rows are read here, in the same short transaction as the count.
    """
    # The same conditions as the audit reader, so the count matches its rows.
    conditions = reports._audit_conditions(audit_filter)
    with engine.connect() as connection:
        count, last_id = connection.execute(
            select(func.count(), func.max(audit_events.c.id)).where(*conditions)
        ).one()
        unverified = connection.execute(
            select(audit_events.c.id).where(
                *conditions,
                audit_events.c.event == "check",
                audit_events.c.unverified == true(),
            )
        ).scalars()
        ids = set(unverified)
    return int(count), int(last_id or 0), ids


@dataclass(slots=True)
class _Reservation:
    """A replayed reservation: the money it reserves on its budget rows."""

    keys: tuple[str, ...]
    amount_micros: int
    # Candidate model that prices the Commit. None keeps the recorded cost,
    # for reservations that rebuild the usage before `since`.
    model: Model | None
    charged_micros: int = 0
    open: bool = True


@dataclass(slots=True)
class _Prevented:
    """A recorded reservation that the candidate denies, and its recorded spend."""

    department: str
    charged_micros: int = 0


class _Replay:
    """The simulated ledger and the running summaries of one replay."""

    def __init__(self, policy: Policy, since: datetime | None, examples: int) -> None:
        self.policy = policy
        self.since = since
        self.examples = examples
        self.spent: dict[str, int] = {}
        self.reserved: dict[str, int] = {}
        self.reservations: dict[str, _Reservation] = {}
        self.prevented: dict[str, _Prevented] = {}
        self.departments: dict[str, DepartmentSummary] = {}

    def apply(self, event: AuditEvent, *, unverified: bool) -> None:
        """Apply one audit event to the simulated ledger and the summaries."""
        if event.event == "check":
            if self.since is not None and event.occurred_at < self.since:
                self._rebuild(event, unverified)
            else:
                self._check(event, unverified)
        elif event.event == "commit":
            self._commit(event)
        elif event.event == "release":
            self._release(event)
        elif event.event == "expire":
            self._expire(event)

    def _summary(self, department: str) -> DepartmentSummary:
        name = department.strip().lower()
        return self.departments.setdefault(name, DepartmentSummary())

    def _usage(self, lines: Iterable[BudgetLine]) -> dict[str, Usage]:
        return {
            line.key: Usage(self.spent.get(line.key, 0), self.reserved.get(line.key, 0))
            for line in lines
        }

    def _move(self, keys: Iterable[str], reserved: int, spent: int) -> None:
        for key in keys:
            self.reserved[key] = self.reserved.get(key, 0) + reserved
            self.spent[key] = self.spent.get(key, 0) + spent

    def _rebuild(self, event: AuditEvent, unverified: bool) -> None:
        """Reserve a recorded Check from before `since` as it was recorded."""
        if unverified or not event.reservation_id or event.decision == Decision.DENY:
            return
        lines = evaluator.budget_lines(
            self.policy, event.department, event.team, event.user, event.occurred_at
        )
        if lines is None:
            return
        keys = tuple(dict.fromkeys(line.key for line in lines))
        amount = event.estimated_micros or 0
        self._move(keys, amount, 0)
        self.reservations[event.reservation_id] = _Reservation(keys, amount, model=None)

    def _check(self, event: AuditEvent, unverified: bool) -> None:
        summary = self._summary(event.department)
        if unverified:
            summary.unverified += 1
            return
        has_token_count = event.input_tokens is not None
        if has_token_count and self.policy.resolve_model(event.requested_model) is None:
            summary.model_not_in_catalog += 1
            return
        request = evaluator.Request(
            department=event.department,
            model=event.requested_model,
            team=event.team,
            user=event.user,
            application=event.application,
            input_tokens=event.input_tokens or 0,
            max_output_tokens=event.max_output_tokens,
        )
        plan = evaluator.plan(self.policy, request, event.occurred_at)
        if not has_token_count and plan.requested is not None:
            # The recorded policy denied before counting tokens, so there is
            # no count to price the candidate's decision with.
            summary.no_token_count += 1
            return
        outcome = evaluator.decide(plan, self._usage(plan.budgets))
        self._reserve(event, plan.budgets, outcome)
        self._compare(summary, event, outcome)

    def _reserve(
        self, event: AuditEvent, lines: Iterable[BudgetLine], outcome: Outcome
    ) -> None:
        candidate = outcome.candidate
        if not outcome.reserves or candidate is None:
            return
        keys = tuple(dict.fromkeys(line.key for line in lines))
        amount = candidate.estimate_micros
        if event.reservation_id:
            self._move(keys, amount, 0)
            self.reservations[event.reservation_id] = _Reservation(
                keys, amount, candidate.model
            )
        else:
            self._move(keys, 0, amount)

    def _compare(
        self, summary: DepartmentSummary, event: AuditEvent, outcome: Outcome
    ) -> None:
        recorded = Verdict(
            event.decision, event.effective_model, event.reason_code, event.rule
        )
        candidate = Verdict(
            outcome.decision.value, outcome.model, outcome.reason.value, outcome.rule
        )
        summary.replayed += 1
        recorded_allows = event.decision != Decision.DENY
        if recorded_allows and not outcome.reserves and event.reservation_id:
            department = event.department.strip().lower()
            self.prevented[event.reservation_id] = _Prevented(department)
        if not recorded_allows and outcome.reserves and outcome.candidate:
            summary.allowed_micros += outcome.candidate.estimate_micros

        transition = _transition(recorded, candidate)
        if transition is None:
            return
        summary.transitions[transition] = summary.transitions.get(transition, 0) + 1
        stored = summary.examples.setdefault(transition, [])
        if len(stored) < self.examples:
            stored.append(
                Example(
                    request_id=event.request_id,
                    occurred_at=event.occurred_at,
                    department=event.department,
                    team=event.team,
                    user=event.user,
                    application=event.application,
                    requested_model=event.requested_model,
                    recorded=recorded,
                    candidate=candidate,
                )
            )

    def _commit(self, event: AuditEvent) -> None:
        reservation_id = event.reservation_id or ""
        reservation = self.reservations.pop(reservation_id, None)
        if reservation is not None:
            if reservation.model is None:
                cost = event.actual_micros or 0
            else:
                cost = _commit_cost(reservation.model, event)
            still_reserved = reservation.amount_micros if reservation.open else 0
            self._move(
                reservation.keys, -still_reserved, cost - reservation.charged_micros
            )
        prevented = self.prevented.pop(reservation_id, None)
        if prevented is not None:
            recorded = (event.actual_micros or 0) - prevented.charged_micros
            self._summary(prevented.department).prevented_micros += recorded

    def _release(self, event: AuditEvent) -> None:
        reservation_id = event.reservation_id or ""
        reservation = self.reservations.pop(reservation_id, None)
        if reservation is not None:
            still_reserved = reservation.amount_micros if reservation.open else 0
            self._move(reservation.keys, -still_reserved, -reservation.charged_micros)
        prevented = self.prevented.pop(reservation_id, None)
        if prevented is not None:
            summary = self._summary(prevented.department)
            summary.prevented_micros -= prevented.charged_micros

    def _expire(self, event: AuditEvent) -> None:
        reservation_id = event.reservation_id or ""
        reservation = self.reservations.get(reservation_id)
        if reservation is not None and reservation.open:
            if reservation.model is None:
                charge = event.actual_micros or 0
            elif self.policy.organization.on_reservation_expiry is ExpiryAction.CHARGE:
                charge = reservation.amount_micros
            else:
                charge = 0
            self._move(reservation.keys, -reservation.amount_micros, charge)
            reservation.open = False
            reservation.charged_micros = charge
        prevented = self.prevented.get(reservation_id)
        if prevented is not None:
            charge = event.actual_micros or 0
            self._summary(prevented.department).prevented_micros += charge
            prevented.charged_micros = charge


def _commit_cost(model: Model, event: AuditEvent) -> int:
    """Price a recorded Commit's token usage with the candidate's model."""
    input_tokens = event.input_tokens or 0
    cached = event.cached_input_tokens or 0
    return token_cost_micros(
        tokens_and_prices=(
            (input_tokens - cached, model.input_price_micros),
            (cached, model.cached_input_price_micros),
            (event.output_tokens or 0, model.output_price_micros),
        )
    )


def _transition(recorded: Verdict, candidate: Verdict) -> str | None:
    if recorded.decision != candidate.decision:
        return f"{recorded.decision}->{candidate.decision}"
    if recorded.model != candidate.model:
        return "MODEL_CHANGE"
    if recorded.reason_code != candidate.reason_code:
        return "REASON_CHANGE"
    return None


def summary_record(summary: DepartmentSummary) -> dict[str, Any]:
    """Return a summary as a JSON-ready dict, money in micro-USD and USD."""
    return {
        "replayed": summary.replayed,
        "changed": summary.changed,
        "unchanged": summary.replayed - summary.changed,
        "transitions": {name: summary.transitions.get(name, 0) for name in TRANSITIONS},
        "prevented_micros": summary.prevented_micros,
        "prevented_usd": reports.usd_text(summary.prevented_micros),
        "allowed_micros": summary.allowed_micros,
        "allowed_usd": reports.usd_text(summary.allowed_micros),
        "not_replayed": {
            "unverified": summary.unverified,
            "model_not_in_catalog": summary.model_not_in_catalog,
            "no_token_count": summary.no_token_count,
        },
    }


def example_record(example: Example) -> dict[str, Any]:
    """Return an example as a JSON-ready dict."""
    return {
        "request_id": example.request_id,
        "occurred_at": example.occurred_at.isoformat(),
        "department": example.department,
        "team": example.team,
        "user": example.user,
        "application": example.application,
        "requested_model": example.requested_model,
        "recorded": _verdict_record(example.recorded),
        "candidate": _verdict_record(example.candidate),
    }


def _verdict_record(verdict: Verdict) -> dict[str, str]:
    return {
        "decision": verdict.decision,
        "model": verdict.model,
        "reason_code": verdict.reason_code,
        "rule": verdict.rule,
    }


def result_record(result: ReplayResult) -> dict[str, Any]:
    """Return a whole replay as one JSON-ready dict."""

    def when(value: datetime | None) -> str | None:
        return None if value is None else value.isoformat()

    departments = {}
    for name, summary in result.departments.items():
        record = summary_record(summary)
        record["examples"] = {
            transition: [example_record(example) for example in found]
            for transition, found in summary.examples.items()
        }
        departments[name] = record
    return {
        "policy_version": result.policy_version,
        "since": when(result.since),
        "until": when(result.until),
        "usage_from": when(result.usage_from),
        "events_read": result.events_read,
        "total": summary_record(result.total()),
        "departments": departments,
        "notes": list(NOTES),
    }
