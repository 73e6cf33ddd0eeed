"""Policy tests: YAML cases that run requests through the server's own evaluator.

A `kind: PolicyTest` document sets a clock and the ledger's usage, then lists
requests with the decision each should get. `spendgate test` loads every such
document under a policy directory, checks it as strictly as the policy itself,
and runs each case through `evaluator.plan` and `evaluator.decide`, so a
passing test shows the decision the server would make. `spendgate explain` uses the
same evaluation for one request.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from spendgate import evaluator, tokens
from spendgate.errors import Problem
from spendgate.evaluator import (
    BudgetLine,
    Decision,
    Outcome,
    Plan,
    Reason,
    Request,
    Usage,
    normalize_name,
)
from spendgate.money import format_usd, usd_to_micros
from spendgate.policy import Budget, Department, Policy, Scope, policy_files
from spendgate.policy._schema import (
    API_VERSION,
    NAME,
    Key,
    ListOf,
    Number,
    Object,
    Reporter,
    Shape,
    Text,
    suggest,
)
from spendgate.policy._yaml import Document, PathKey, read_documents
from spendgate.windows import window_key

KIND = "PolicyTest"
# Fields a case may expect, in the order reports show them.
EXPECT_FIELDS = (
    "decision",
    "model",
    "reason_code",
    "rule",
    "max_output_tokens",
    "estimated_cost_usd",
    "shadow_decision",
)
INPUT_KEYS = ("prompt", "messages", "input_tokens")
NO_SHADOW_DECISION = "none"


@dataclass(slots=True)
class Nullable(Shape):
    """A value of another shape, or null."""

    inner: Shape
    description: str = ""

    def check(self, value: Any, path: PathKey, report: Reporter) -> None:
        """Check `value` against the inner shape unless it is null."""
        if value is not None:
            self.inner.check(value, path, report)

    def json_schema(self) -> dict[str, Any]:
        """Describe the inner shape or null as JSON Schema."""
        return self._describe({"anyOf": [self.inner.json_schema(), {"type": "null"}]})


_DECISION = Text(choices=tuple(decision.value for decision in Decision))
_USD = Number(minimum=Decimal(0), places=6)
# The server rejects token counts above 10**9 with INVALID_ARGUMENT.
_TOKENS = Number(integer=True, minimum=Decimal(0), maximum=Decimal(10**9))

MESSAGE = Object(
    {
        "role": Key(Text(), required=True),
        "content": Key(Text(), required=True),
        "name": Key(Text()),
    }
)

REQUEST = Object(
    {
        "department": Key(Text(), required=True),
        "team": Key(Text()),
        "user": Key(Text()),
        "application": Key(Text()),
        "model": Key(Text(), required=True),
        "prompt": Key(Text()),
        "messages": Key(ListOf(MESSAGE)),
        "input_tokens": Key(_TOKENS),
        "max_output_tokens": Key(_TOKENS),
    },
    description="A Check request with one of prompt, messages and input_tokens.",
)

EXPECT = Object(
    {
        "decision": Key(_DECISION, required=True),
        "model": Key(Text()),
        "reason_code": Key(Text(choices=tuple(reason.value for reason in Reason))),
        "rule": Key(Text()),
        "max_output_tokens": Key(_TOKENS),
        "estimated_cost_usd": Key(_USD),
        "shadow_decision": Key(
            Nullable(_DECISION, description="null expects no shadow decision.")
        ),
    }
)

CASE = Object(
    {
        "name": Key(Text(), required=True),
        "request": Key(REQUEST, required=True),
        "expect": Key(EXPECT, required=True),
    }
)

SPEND = Object(
    {
        "department": Key(NAME, required=True),
        "team": Key(NAME),
        "budget": Key(NAME, required=True),
        "user": Key(Text()),
        "spent_usd": Key(_USD),
        "reserved_usd": Key(_USD),
    },
    description="Usage of one budget row in the window that contains `now`.",
)

POLICY_TEST = Object(
    {
        "apiVersion": Key(Text(), required=True),
        "kind": Key(Text(), required=True),
        "name": Key(Text(), required=True),
        "now": Key(
            Text(
                description="ISO 8601 time with a UTC offset: the clock of each case."
            ),
            required=True,
        ),
        "spend": Key(ListOf(SPEND)),
        "cases": Key(ListOf(CASE), required=True),
    }
)


@dataclass(frozen=True, slots=True)
class Case:
    """One request of a policy test and the fields of the outcome it expects."""

    name: str
    location: str
    request: Request
    # Expected value of each field the case names, in the form `observe` returns.
    expected: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class PolicyTest:
    """A PolicyTest document: a clock, the ledger usage and the cases."""

    name: str
    file: str
    location: str
    now: datetime
    # Usage by BudgetLine.key, as `evaluator.decide` reads it.
    usage: Mapping[str, Usage]
    cases: tuple[Case, ...]


@dataclass(slots=True)
class LoadedTests:
    """Policy tests read from a directory, with every problem found in them."""

    tests: list[PolicyTest]
    errors: list[Problem]
    warnings: list[Problem]


@dataclass(frozen=True, slots=True)
class Evaluation:
    """One request evaluated offline: the plan, the usage it saw and the outcome."""

    request: Request
    now: datetime
    plan: Plan
    usage: Mapping[str, Usage]
    outcome: Outcome


@dataclass(frozen=True, slots=True)
class CaseResult:
    """A case after it ran: the outcome's fields and those that differ."""

    test: PolicyTest
    case: Case
    evaluation: Evaluation
    actual: Mapping[str, str]
    mismatched: tuple[str, ...]

    @property
    def passed(self) -> bool:
        """True when every expected field matches."""
        return not self.mismatched


@dataclass(frozen=True, slots=True)
class RunResult:
    """Every case result and the policy rules that no decision named."""

    results: tuple[CaseResult, ...]
    uncovered_rules: tuple[str, ...]

    @property
    def passed(self) -> int:
        """Number of cases that passed."""
        return sum(1 for result in self.results if result.passed)

    @property
    def failed(self) -> int:
        """Number of cases that failed."""
        return len(self.results) - self.passed


UsageReader = Callable[[tuple[BudgetLine, ...]], Mapping[str, Usage]]


def find_test_documents(directory: Path) -> tuple[list[Document], list[Problem]]:
    """Read every PolicyTest document under `directory`, with YAML problems."""
    found: list[Document] = []
    problems: list[Problem] = []
    for path in policy_files(directory):
        display_name = path.relative_to(directory).as_posix()
        documents, read_problems = read_documents(path, display_name)
        problems += read_problems
        for document in documents:
            data = document.data
            if isinstance(data, dict) and data.get("kind") == KIND:
                found.append(document)
    return found, problems


def read_tests(directory: Path, policy: Policy) -> LoadedTests:
    """Read, check and compile every PolicyTest document under `directory`."""
    documents, errors = find_test_documents(directory)
    load = LoadedTests(tests=[], errors=errors, warnings=[])
    for document in documents:
        problems = check_test_document(document)
        if problems:
            load.errors += problems
            continue
        compiler = _TestCompiler(policy, document)
        test = compiler.compile()
        load.errors += compiler.errors
        load.warnings += compiler.warnings
        if test is not None and not compiler.errors:
            load.tests.append(test)
    return load


def check_test_document(document: Document) -> list[Problem]:
    """Check one PolicyTest document's keys, types and values, and return problems."""
    report = Reporter(document)
    data = document.data
    version = data.get("apiVersion")
    if version is not None and version != API_VERSION:
        report.error(
            ("apiVersion",),
            f'unsupported apiVersion "{version}"; expected "{API_VERSION}"',
        )
    POLICY_TEST.check(data, (), report)
    cases = data.get("cases")
    if isinstance(cases, list) and not cases:
        report.error(("cases",), "must contain at least one case")
    return report.problems


class _TestCompiler:
    """Turn one schema-valid PolicyTest document into a PolicyTest.

    Names in `spend` and models in `expect` are checked against the policy here.
    """

    def __init__(self, policy: Policy, document: Document) -> None:
        self.policy = policy
        self.document = document
        self.errors: list[Problem] = []
        self.warnings: list[Problem] = []
        self.rules = policy.rules()

    def compile(self) -> PolicyTest | None:
        data = self.document.data
        now = self._now(data["now"])
        usage: dict[str, Usage] = {}
        owners: dict[str, int] = {}
        for index, entry in enumerate(data.get("spend", [])):
            line = self._spend_line(("spend", index), entry, now)
            if line is None:
                continue
            if line.key in owners:
                self._error(
                    ("spend", index),
                    f"sets the same budget row as spend[{owners[line.key]}] "
                    f"({line.key}); merge the two entries",
                )
                continue
            owners[line.key] = index
            usage[line.key] = Usage(
                spent_micros=usd_to_micros(Decimal(entry.get("spent_usd", 0))),
                reserved_micros=usd_to_micros(Decimal(entry.get("reserved_usd", 0))),
            )

        cases = [
            self._case(("cases", index), entry)
            for index, entry in enumerate(data["cases"])
        ]
        if now is None or self.errors:
            return None
        return PolicyTest(
            name=data["name"],
            file=self.document.file,
            location=self._location(()),
            now=now,
            usage=usage,
            cases=tuple(case for case in cases if case is not None),
        )

    def _now(self, text: str) -> datetime | None:
        example = "such as 2026-03-31T23:30:00-04:00"
        try:
            now = datetime.fromisoformat(text)
        except ValueError:
            self._error(("now",), f'"{text}" is not an ISO 8601 time, {example}')
            return None
        if now.tzinfo is None:
            self._error(("now",), f'"{text}" must carry a UTC offset, {example}')
            return None
        return now

    def _spend_line(
        self, path: PathKey, entry: Mapping[str, Any], now: datetime | None
    ) -> BudgetLine | None:
        """Resolve a spend entry to the budget line a request in its window uses."""
        department = self._department((*path, "department"), entry["department"])
        if department is None:
            return None
        budget = self._spend_budget(path, department, entry)
        if budget is None or not self._spend_subject(path, budget, entry):
            return None

        if budget.per is Scope.USER:
            subject = normalize_name(str(entry["user"]))
        elif budget.per is Scope.TEAM:
            subject = normalize_name(str(entry["team"]))
        else:
            subject = department.name
        if now is None:
            return None
        window = window_key(budget.period, now, self.policy.organization.timezone)
        return BudgetLine(budget, budget.per, subject, window)

    def _department(self, path: PathKey, name: str) -> Department | None:
        department = self.policy.departments.get(name)
        if department is None:
            hint = suggest(name, tuple(self.policy.departments))
            self._error(path, f"unknown department {name!r}{hint}")
        return department

    def _spend_budget(
        self, path: PathKey, department: Department, entry: Mapping[str, Any]
    ) -> Budget | None:
        """Find the team's budget of that name, else the department's."""
        name = entry["budget"]
        own = {budget.name: budget for budget in department.budgets}
        team_name = entry.get("team")
        if team_name is None:
            if name not in own:
                hint = suggest(name, tuple(own)) or "; add `team` for a team's budget"
                self._error(
                    (*path, "budget"),
                    f"unknown budget {name!r} of department {department.name!r}{hint}",
                )
            return own.get(name)

        team = department.teams.get(team_name)
        shared = own.get(name)
        if team is None:
            # A department budget per team counts any team name, listed or not.
            if shared is not None and shared.per is Scope.TEAM:
                return shared
            hint = suggest(team_name, tuple(department.teams))
            self._error(
                (*path, "team"),
                f"unknown team {team_name!r} of department {department.name!r}{hint}",
            )
            return None
        found = next((budget for budget in team.budgets if budget.name == name), None)
        if found is not None:
            return found
        if shared is not None and shared.per is Scope.TEAM:
            return shared
        if shared is not None:
            self._error(
                (*path, "team"),
                f"team {team_name!r} has no budget {name!r}, and the department's "
                f"budget {name!r} is shared per {shared.per.value}; remove `team`",
            )
            return None
        hint = suggest(name, (*(budget.name for budget in team.budgets), *own))
        self._error(
            (*path, "budget"),
            f"unknown budget {name!r} of team {team_name!r} or of department "
            f"{department.name!r}{hint}",
        )
        return None

    def _spend_subject(
        self, path: PathKey, budget: Budget, entry: Mapping[str, Any]
    ) -> bool:
        """Check that `user` is given exactly for budgets shared per user."""
        if budget.per is Scope.USER and "user" not in entry:
            self._error(
                path,
                f"budget {budget.rule} is per user, so the entry needs `user` "
                '(user: "" for requests that send no user)',
            )
            return False
        if budget.per is not Scope.USER and "user" in entry:
            self._error(
                (*path, "user"),
                f"budget {budget.rule} is shared per {budget.per.value}, "
                "so `user` does not apply; remove it",
            )
            return False
        return True

    def _case(self, path: PathKey, entry: Mapping[str, Any]) -> Case | None:
        request = self._request((*path, "request"), entry["request"])
        expected = self._expected((*path, "expect"), entry["expect"])
        if request is None or expected is None:
            return None
        return Case(
            name=entry["name"],
            location=self._location(path),
            request=request,
            expected=expected,
        )

    def _request(self, path: PathKey, data: Mapping[str, Any]) -> Request | None:
        valid = True
        for key in ("department", "model"):
            if not data[key].strip():
                self._error((*path, key), "must not be empty")
                valid = False
        inputs = [key for key in INPUT_KEYS if key in data]
        if not inputs:
            self._error(path, "needs one of prompt, messages or input_tokens")
            valid = False
        elif len(inputs) > 1:
            self._error(
                (*path, inputs[1]),
                f"give only one of prompt, messages or input_tokens, not "
                f"both {inputs[0]} and {inputs[1]}",
            )
            valid = False
        if "messages" in data and not data["messages"]:
            self._error((*path, "messages"), "must contain at least one message")
            valid = False
        if not valid:
            return None

        messages = None
        if "messages" in data:
            messages = [
                tokens.ChatMessage(
                    role=item["role"],
                    content=item["content"],
                    name=item.get("name", ""),
                )
                for item in data["messages"]
            ]
        return Request(
            department=data["department"].strip(),
            model=data["model"].strip(),
            team=data.get("team", "").strip(),
            user=data.get("user", "").strip(),
            application=data.get("application", "").strip(),
            prompt=data.get("prompt"),
            messages=messages,
            input_tokens=data.get("input_tokens"),
            max_output_tokens=data.get("max_output_tokens"),
        )

    def _expected(
        self, path: PathKey, data: Mapping[str, Any]
    ) -> dict[str, str] | None:
        """Normalise the expected fields to the text form `observe` returns."""
        expected: dict[str, str] = {}
        for field in EXPECT_FIELDS:
            if field not in data:
                continue
            value = data[field]
            if field == "model" and value:
                model = self.policy.resolve_model(value)
                if model is None:
                    hint = suggest(value, tuple(self.policy.models))
                    self._error(
                        (*path, field),
                        f"unknown model {value!r}; it is not in the catalog{hint}",
                    )
                    return None
                value = model.name
            elif field == "rule" and value not in self.rules:
                hint = suggest(value, self.rules)
                self.warnings.append(
                    self.document.problem(
                        (*path, field),
                        f"{value!r} is not a rule id of this policy{hint}",
                        severity="warning",
                    )
                )
            elif field == "estimated_cost_usd":
                value = format_usd(usd_to_micros(Decimal(value)))
            elif field == "shadow_decision" and value is None:
                value = NO_SHADOW_DECISION
            expected[field] = str(value)
        return expected

    def _location(self, path: PathKey) -> str:
        problem = self.document.problem(path, "")
        return f"{problem.file}:{problem.line}:{problem.column}"

    def _error(self, path: PathKey, message: str) -> None:
        self.errors.append(self.document.problem(path, message))


def evaluate(
    policy: Policy, request: Request, now: datetime, read_usage: UsageReader
) -> Evaluation:
    """Plan `request`, read the usage of its budget lines, and decide."""
    plan = evaluator.plan(policy, request, now)
    usage = read_usage(plan.budgets)
    outcome = evaluator.decide(plan, usage)
    return Evaluation(request, now, plan, usage, outcome)


def observe(outcome: Outcome) -> dict[str, str]:
    """Return the outcome's fields as a CheckResponse and the audit log report them."""
    candidate = outcome.candidate
    estimate = candidate.estimate_micros if outcome.reserves and candidate else 0
    shadow = outcome.shadow_decision
    return {
        "decision": outcome.decision.value,
        "model": outcome.model,
        "reason_code": outcome.reason.value,
        "rule": outcome.rule,
        "max_output_tokens": str(candidate.max_output_tokens if candidate else 0),
        "estimated_cost_usd": format_usd(estimate),
        "shadow_decision": shadow.value if shadow else NO_SHADOW_DECISION,
    }


def run_tests(policy: Policy, tests: Sequence[PolicyTest]) -> RunResult:
    """Run every case from its test's usage, and list the rules no decision named."""
    results = []
    for test in tests:
        for case in test.cases:
            evaluation = evaluate(
                policy, case.request, test.now, _fixed_usage(test.usage)
            )
            actual = observe(evaluation.outcome)
            mismatched = tuple(
                field
                for field, value in case.expected.items()
                if actual[field] != value
            )
            results.append(CaseResult(test, case, evaluation, actual, mismatched))
    named = {result.evaluation.outcome.rule for result in results}
    uncovered = tuple(rule for rule in policy.rules() if rule not in named)
    return RunResult(tuple(results), uncovered)


def _fixed_usage(usage: Mapping[str, Usage]) -> UsageReader:
    def read(_lines: tuple[BudgetLine, ...]) -> Mapping[str, Usage]:
        return usage

    return read
