"""Decide on one model call from the compiled policy and the ledger's usage.

A decision has two phases. `plan` does everything that needs no ledger state:
department and model lookup, token counting, clamping, size and price checks,
and the list of models the request may fall back to. `decide` then takes the
locked usage of the applicable budgets and picks the outcome. The server runs
`decide` inside the ledger transaction, so the usage it reads cannot change
before the reservation is written; policy tests and replay feed it usage of
their own.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime

from spendgate import tokens
from spendgate.money import format_usd, token_cost_micros
from spendgate.policy import Budget, Department, Limits, Model, Policy, Scope, Team
from spendgate.windows import window_key


class Decision(enum.StrEnum):
    """The decision a Check returns."""

    ALLOW = "ALLOW"
    DENY = "DENY"
    DOWNGRADE = "DOWNGRADE"


class Reason(enum.StrEnum):
    """The closed set of reason codes a decision carries."""

    ALLOWED = "ALLOWED"
    UNKNOWN_DEPARTMENT = "UNKNOWN_DEPARTMENT"
    UNKNOWN_MODEL = "UNKNOWN_MODEL"
    MODEL_NOT_ALLOWED = "MODEL_NOT_ALLOWED"
    REQUEST_TOO_LARGE = "REQUEST_TOO_LARGE"
    REQUEST_TOO_EXPENSIVE = "REQUEST_TOO_EXPENSIVE"
    BUDGET_EXCEEDED = "BUDGET_EXCEEDED"
    BUDGET_THRESHOLD = "BUDGET_THRESHOLD"


@dataclass(frozen=True, slots=True)
class Request:
    """A Check request after field validation; exactly one input form is set."""

    department: str
    model: str
    team: str = ""
    user: str = ""
    application: str = ""
    prompt: str | None = None
    messages: Sequence[tokens.ChatMessage] | None = None
    input_tokens: int | None = None
    max_output_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class BudgetLine:
    """One budget applied to one subject in the current window."""

    budget: Budget
    scope: Scope
    subject: str
    window: str

    @property
    def key(self) -> str:
        """Ledger row key: the budget's rule, the subject and the window."""
        return f"{self.budget.rule}|{self.subject}|{self.window}"

    @property
    def label(self) -> str:
        """Scope as shown to users, such as "user:alice"."""
        return f"{self.scope.value}:{self.subject}"


@dataclass(frozen=True, slots=True)
class Usage:
    """Spent and reserved micro-USD of one ledger row."""

    spent_micros: int = 0
    reserved_micros: int = 0

    @property
    def used_micros(self) -> int:
        """Spent plus reserved: what counts against the limit."""
        return self.spent_micros + self.reserved_micros


@dataclass(frozen=True, slots=True)
class Candidate:
    """A model the request may use, with its token count and cost estimate."""

    model: Model
    input_tokens: int
    input_tokens_estimated: bool
    max_output_tokens: int
    estimate_micros: int


@dataclass(frozen=True, slots=True)
class Outcome:
    """The decision and everything the response and the audit row report."""

    decision: Decision
    reason: Reason
    rule: str
    message: str
    requested_model: str
    candidate: Candidate | None
    budgets: tuple[BudgetLine, ...] = ()
    # Decision the policy made before shadow mode; None when nothing was shadowed.
    shadow_decision: Decision | None = None
    shadow: bool = False

    @property
    def model(self) -> str:
        """Model the application should call; empty on DENY."""
        if self.decision is Decision.DENY or self.candidate is None:
            return ""
        return self.candidate.model.name

    @property
    def reserves(self) -> bool:
        """True when the outcome reserves money on the budgets."""
        return self.decision is not Decision.DENY and self.candidate is not None


@dataclass(slots=True)
class Plan:
    """Result of phase one: a final outcome, or candidates awaiting the budgets."""

    requested_model: str
    final: Outcome | None = None
    department: Department | None = None
    team: Team | None = None
    requested: Candidate | None = None
    candidates: tuple[Candidate, ...] = ()
    # Why the requested model is not the first candidate, when it is not,
    # with the figures behind it for the message.
    reason: Reason | None = None
    rule: str = ""
    detail: str = ""
    budgets: tuple[BudgetLine, ...] = ()
    trace: list[str] = field(default_factory=list)
    # Shadow rules that failed the requested model, and the plan with them
    # enforced, which decide() uses for the would-be decision.
    shadow_failures: list[str] = field(default_factory=list)
    enforced: Plan | None = None


Counter = Callable[[Model], tokens.TokenCount]


def normalize_name(name: str) -> str:
    """Trim and lowercase a department, team or user name from a request.

    Lookups and budget subjects use this form, so "Alice" and "alice" share
    one per-user budget. Audit rows keep the letter case the client sent.
    """
    return name.strip().lower()


def input_counter(request: Request) -> Counter:
    """Return a function counting the request's input for a model's tokenizer.

    Counts are cached per tokenizer, so trying a downgrade target that shares
    a tokenizer does not count the prompt again.
    """
    cache: dict[tuple[str, object], tokens.TokenCount] = {}

    def count(model: Model) -> tokens.TokenCount:
        if request.input_tokens is not None:
            return tokens.TokenCount(request.input_tokens, estimated=False)
        key = (model.tokenizer, model.chars_per_token)
        if key not in cache:
            if request.messages is not None:
                cache[key] = tokens.count_messages(
                    model.tokenizer, request.messages, model.chars_per_token
                )
            else:
                cache[key] = tokens.count_text(
                    model.tokenizer, request.prompt or "", model.chars_per_token
                )
        return cache[key]

    return count


def plan(
    policy: Policy,
    request: Request,
    now: datetime,
    count: Counter | None = None,
    *,
    enforce_shadow_rules: bool = False,
) -> Plan:
    """Run the decision steps that need no ledger state.

    A rule in the department's shadow_rules lets a model pass. When one
    fails the requested model, the plan carries a second plan with the
    shadow rules enforced, so decide() can record the would-be decision.
    """
    count = count or input_counter(request)
    result = Plan(requested_model=request.model)
    department = policy.departments.get(normalize_name(request.department))
    fallback = policy.organization.unknown_department
    if department is None and fallback is not None:
        result.trace.append(
            f"unknown department {request.department!r}: using {fallback!r}"
        )
        department = policy.departments[fallback]
    if department is None:
        result.final = _deny(
            Reason.UNKNOWN_DEPARTMENT,
            "organization/unknown_department",
            f"Department {request.department!r} is not defined in the policy.",
            request.model,
        )
        return result

    model = policy.resolve_model(request.model)
    if model is None:
        result.final = _deny(
            Reason.UNKNOWN_MODEL,
            "catalog",
            f"Model {request.model!r} is not in the catalog, so it cannot be priced.",
            request.model,
        )
        return result

    result.requested_model = model.name
    result.department = department
    result.team = department.teams.get(normalize_name(request.team))
    result.budgets = _budget_lines(policy, department, result.team, request, now)
    # A shadow department already decides everything in shadow.
    relaxed: frozenset[str] = frozenset()
    if not enforce_shadow_rules and not department.shadow:
        relaxed = department.shadow_rules
    _add_candidates(policy, result, model, request, count, relaxed)
    if result.shadow_failures:
        result.enforced = plan(policy, request, now, count, enforce_shadow_rules=True)
    if result.final is None and not result.candidates:
        assert result.reason is not None
        result.final = _deny(
            result.reason,
            result.rule,
            _message(result.reason, model.name, "", result.detail),
            model.name,
            result.requested,
        )
    if result.final is not None and department.shadow and result.requested is not None:
        result.final = _shadowed(result.final, result.requested)
    return result


def decide(plan: Plan, usage: Mapping[str, Usage]) -> Outcome:
    """Pick the outcome from the plan and the usage of its budget lines.

    `usage` maps BudgetLine.key to the row's usage; a missing key is an empty
    row. Shadow budgets never change the returned decision, but when they
    would have, the outcome's shadow_decision records it.
    """
    outcome = _decide(plan, usage)
    if plan.enforced is None:
        return outcome
    would_be = _decide(plan.enforced, usage)
    if would_be.decision is outcome.decision and would_be.model == outcome.model:
        return outcome
    rules = ", ".join(plan.shadow_failures)
    note = (
        f" Shadow rule {rules} would have answered {would_be.decision.value}"
        f" ({would_be.reason.value})."
    )
    return _replace_shadow(outcome, would_be.decision, note)


def _decide(plan: Plan, usage: Mapping[str, Usage]) -> Outcome:
    if plan.final is not None:
        return plan.final
    enforced = tuple(line for line in plan.budgets if not line.budget.shadow)
    outcome = _pick(plan, enforced, usage)
    department = plan.department
    assert department is not None
    assert plan.requested is not None

    if department.shadow:
        would_be = _pick(plan, plan.budgets, usage)
        return _shadowed(would_be, plan.requested)
    if len(enforced) != len(plan.budgets):
        would_be = _pick(plan, plan.budgets, usage)
        if would_be.decision is not outcome.decision or would_be.model != outcome.model:
            return _replace_shadow(outcome, would_be.decision)
    return outcome


def _pick(
    plan: Plan, lines: tuple[BudgetLine, ...], usage: Mapping[str, Usage]
) -> Outcome:
    requested = plan.requested
    assert requested is not None
    assert plan.department is not None
    empty = Usage()
    exceeded: BudgetLine | None = None
    chosen_index = -1
    for index, candidate in enumerate(plan.candidates):
        over = next(
            (
                line
                for line in lines
                if usage.get(line.key, empty).used_micros + candidate.estimate_micros
                > line.budget.limit_micros
            ),
            None,
        )
        if over is None:
            chosen_index = index
            break
        if exceeded is None:
            exceeded = over

    name = plan.requested_model
    requested_ok = bool(plan.candidates) and plan.candidates[0] is requested
    if chosen_index < 0:
        reason = plan.reason or Reason.BUDGET_EXCEEDED
        rule = plan.rule if plan.reason else _rule_of(exceeded)
        detail = plan.detail if plan.reason else ""
        return _deny(
            reason,
            rule,
            _message(reason, name, "", detail),
            name,
            requested,
            plan.budgets,
        )

    chosen = plan.candidates[chosen_index]
    if chosen_index == 0 and requested_ok:
        return _threshold(plan, lines, usage) or Outcome(
            Decision.ALLOW,
            Reason.ALLOWED,
            f"departments/{plan.department.name}",
            _message(Reason.ALLOWED, name, name),
            name,
            chosen,
            plan.budgets,
        )
    detail = ""
    if requested_ok:
        reason, rule = Reason.BUDGET_EXCEEDED, _rule_of(exceeded)
    else:
        assert plan.reason is not None
        reason, rule, detail = plan.reason, plan.rule, plan.detail
    target = chosen.model.name
    return Outcome(
        Decision.DOWNGRADE,
        reason,
        rule,
        _message(reason, name, target, detail),
        name,
        chosen,
        plan.budgets,
    )


def _threshold(
    plan: Plan, lines: tuple[BudgetLine, ...], usage: Mapping[str, Usage]
) -> Outcome | None:
    """Downgrade the requested model when a budget is past its threshold."""
    empty = Usage()
    crossed = next(
        (
            line
            for line in lines
            if line.budget.threshold_basis_points is not None
            and usage.get(line.key, empty).used_micros * 10_000
            >= line.budget.limit_micros * line.budget.threshold_basis_points
        ),
        None,
    )
    if crossed is None:
        return None
    for candidate in plan.candidates[1:]:
        fits = all(
            usage.get(line.key, empty).used_micros + candidate.estimate_micros
            <= line.budget.limit_micros
            for line in lines
        )
        if fits:
            name = plan.requested_model
            return Outcome(
                Decision.DOWNGRADE,
                Reason.BUDGET_THRESHOLD,
                crossed.budget.rule,
                _message(Reason.BUDGET_THRESHOLD, name, candidate.model.name),
                name,
                candidate,
                plan.budgets,
            )
    plan.trace.append(
        f"{crossed.budget.rule} is past its threshold, but no target fits"
    )
    return None


def _rule_of(line: BudgetLine | None) -> str:
    return "" if line is None else line.budget.rule


def _add_candidates(
    policy: Policy,
    result: Plan,
    model: Model,
    request: Request,
    count: Counter,
    shadow_rules: frozenset[str],
) -> None:
    """Check the requested model and its downgrade chain against steps 3 to 6."""
    department, team = result.department, result.team
    assert department is not None
    allowed = team.allowed_models if team else department.allowed_models
    # A model the department allows but the team does not is the team rule's doing.
    models_rule = department.models_rule
    if team is not None and model.name in department.allowed_models:
        models_rule = team.models_rule
    limits = team.limits if team else department.limits
    prefix = f"departments/{department.name}/limits"
    chain = (model.name, *department.chains.get(model.name, ()))
    candidates = []

    for position, name in enumerate(chain):
        target = policy.models[name]
        counted = count(target)
        maximum = target.max_output_tokens
        if limits.max_output_tokens is not None:
            maximum = min(maximum, limits.max_output_tokens)
        output = maximum
        if request.max_output_tokens is not None:
            output = min(request.max_output_tokens, maximum)
        estimate = token_cost_micros(
            tokens_and_prices=(
                (counted.tokens, target.input_price_micros),
                (output, target.output_price_micros),
            )
        )
        candidate = Candidate(
            target, counted.tokens, counted.estimated, output, estimate
        )
        if position == 0:
            result.requested = candidate

        failure = _failure(
            candidate, name in allowed, models_rule, limits, prefix, shadow_rules
        )
        if failure is not None and failure[1] in shadow_rules:
            reason, rule = failure
            result.trace.append(
                f"{name}: {reason.value} by shadow rule {rule}, not enforced"
            )
            if position == 0:
                # NOTE: _failure returns one rule, so when the requested model
                # fails two shadow rules, the message names only the first.
                result.shadow_failures.append(rule)
            failure = None
        if failure is None:
            result.trace.append(
                f"{name}: passes model rules and limits: {counted.tokens} input, "
                f"{output} output tokens, estimate {estimate} micro-USD"
            )
            candidates.append(candidate)
            continue
        reason, rule = failure
        result.trace.append(f"{name}: {reason.value} by {rule}")
        if position == 0:
            detail = _failure_detail(reason, rule, candidate, limits)
            result.reason, result.rule, result.detail = reason, rule, detail
            if reason is Reason.REQUEST_TOO_LARGE:
                result.final = _deny(
                    reason, rule, _message(reason, name, "", detail), name, candidate
                )
                return
    result.candidates = tuple(candidates)


def _failure(
    candidate: Candidate,
    allowed: bool,
    models_rule: str,
    limits: Limits,
    prefix: str,
    shadow_rules: frozenset[str],
) -> tuple[Reason, str] | None:
    """Return the first model rule or limit the candidate fails, with its rule id.

    A failed shadow rule is returned too, unless an enforced rule also
    fails: that one decides.
    """
    name = candidate.model.name
    failures: list[tuple[Reason, str]] = []
    if not allowed:
        failures.append((Reason.MODEL_NOT_ALLOWED, models_rule))
    if limits.max_input_tokens is not None and (
        candidate.input_tokens > limits.max_input_tokens
    ):
        failures.append((Reason.REQUEST_TOO_LARGE, f"{prefix}/max_input_tokens"))
    if candidate.input_tokens > candidate.model.context_window:
        failures.append((Reason.REQUEST_TOO_LARGE, f"models/{name}/context_window"))
    if limits.max_request_micros is not None and (
        candidate.estimate_micros > limits.max_request_micros
    ):
        failures.append((Reason.REQUEST_TOO_EXPENSIVE, f"{prefix}/max_request_usd"))
    enforced = [failure for failure in failures if failure[1] not in shadow_rules]
    if enforced:
        return enforced[0]
    return failures[0] if failures else None


def budget_lines(
    policy: Policy, department: str, team: str, user: str, now: datetime
) -> tuple[BudgetLine, ...] | None:
    """List the budgets that apply to a principal; None for an unknown department."""
    found = policy.departments.get(normalize_name(department))
    fallback = policy.organization.unknown_department
    if found is None and fallback is not None:
        found = policy.departments[fallback]
    if found is None:
        return None
    request = Request(department=found.name, model="", team=team, user=user)
    return _budget_lines(
        policy, found, found.teams.get(normalize_name(team)), request, now
    )


def _budget_lines(
    policy: Policy,
    department: Department,
    team: Team | None,
    request: Request,
    now: datetime,
) -> tuple[BudgetLine, ...]:
    timezone = policy.organization.timezone
    team_name = normalize_name(request.team)
    user = normalize_name(request.user)
    budgets = department.budgets + (team.budgets if team else ())
    lines = []
    for budget in budgets:
        if budget.per is Scope.USER:
            subject = user
        elif budget.per is Scope.TEAM:
            subject = team_name
        else:
            subject = department.name
        window = window_key(budget.period, now, timezone)
        lines.append(BudgetLine(budget, budget.per, subject, window))
    return tuple(lines)


def _deny(
    reason: Reason,
    rule: str,
    message: str,
    requested: str,
    candidate: Candidate | None = None,
    budgets: tuple[BudgetLine, ...] = (),
) -> Outcome:
    return Outcome(Decision.DENY, reason, rule, message, requested, candidate, budgets)


def _shadowed(would_be: Outcome, requested: Candidate) -> Outcome:
    """Turn a decision into shadow mode's ALLOW of the requested model."""
    note = f"Shadow mode: the policy would have answered {would_be.decision.value}. "
    return Outcome(
        Decision.ALLOW,
        would_be.reason,
        would_be.rule,
        note + would_be.message,
        would_be.requested_model,
        requested,
        would_be.budgets,
        shadow_decision=would_be.decision,
        shadow=True,
    )


def _replace_shadow(outcome: Outcome, would_be: Decision, note: str = "") -> Outcome:
    """Record the decision a shadow budget or rule would have made, and a note."""
    return replace(outcome, message=outcome.message + note, shadow_decision=would_be)


_MESSAGES = {
    Reason.ALLOWED: "{requested} is allowed.",
    Reason.MODEL_NOT_ALLOWED: "{requested} is not allowed for this department or team",
    Reason.REQUEST_TOO_LARGE: "The input is larger than the limit for {requested}",
    Reason.REQUEST_TOO_EXPENSIVE: (
        "The estimated cost of {requested} is over the per-request cap"
    ),
    Reason.BUDGET_EXCEEDED: "The estimated cost of {requested} does not fit a budget",
    Reason.BUDGET_THRESHOLD: "A budget is past its downgrade threshold",
}


def _failure_detail(
    reason: Reason, rule: str, candidate: Candidate, limits: Limits
) -> str:
    """Return the figures behind a failed limit, such as "20,000 input tokens"."""
    tokens = candidate.input_tokens
    if rule.endswith("/context_window"):
        window = candidate.model.context_window
        return f"{tokens:,} input tokens, context window {window:,}"
    if reason is Reason.REQUEST_TOO_LARGE and limits.max_input_tokens is not None:
        return f"{tokens:,} input tokens, limit {limits.max_input_tokens:,}"
    if reason is Reason.REQUEST_TOO_EXPENSIVE and limits.max_request_micros:
        estimate = format_usd(candidate.estimate_micros)
        return f"estimate {estimate}, cap {format_usd(limits.max_request_micros)}"
    return ""


def _message(reason: Reason, requested: str, target: str, detail: str = "") -> str:
    """Write the one-sentence explanation of a decision."""
    text = _MESSAGES[reason].format(requested=requested)
    if detail:
        text = f"{text} ({detail})"
    if reason is Reason.REQUEST_TOO_LARGE:
        return f"{text}."
    if reason is Reason.ALLOWED:
        return text
    if target:
        return f"{text}, so {target} is used instead."
    return f"{text}, and no downgrade target fits."
