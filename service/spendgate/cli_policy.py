"""The policy-author commands: `spendgate test` and `spendgate explain`.

`test` runs the policy tests of a directory and `explain` shows how one
request is decided. Both evaluate offline with the server's own evaluator, so
what they print is what the server would decide from the same policy, clock
and usage.
"""

# Commands import the evaluator, tokenizers and ledger lazily, as cli.py does,
# so `spendgate --help` starts fast. cli.py imports this module at its end, so
# its exit codes are imported inside the commands too.
# ruff: noqa: PLC0415

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

import click

from spendgate.errors import count_errors
from spendgate.money import format_usd, usd_to_micros
from spendgate.policy._schema import MAX_USD

if TYPE_CHECKING:
    from spendgate.errors import Problem
    from spendgate.evaluator import BudgetLine, Usage
    from spendgate.policy import Department, Policy, Team
    from spendgate.policytest import CaseResult, Evaluation, RunResult, UsageReader

# Exit codes after EXIT_INVALID_POLICY (3) of cli.py.
EXIT_TESTS_FAILED = 4
EXIT_NO_TESTS = 5
# Any other failure, such as an unreachable ledger, exits 1 as in cli.py.
EXIT_ERROR = 1


@dataclass(frozen=True, slots=True)
class BudgetCheck:
    """One budget line checked against one candidate, as `decide` checks it."""

    model: str
    line: BudgetLine
    used_micros: int
    estimate_micros: int

    @property
    def fits(self) -> bool:
        """True when usage plus the estimate stays within the limit."""
        total = self.used_micros + self.estimate_micros
        return total <= self.line.budget.limit_micros


@dataclass(frozen=True, slots=True)
class ThresholdCheck:
    """A budget's downgrade threshold compared with its usage before the request."""

    line: BudgetLine
    used_micros: int

    @property
    def percent(self) -> str:
        """downgrade_at_percent of the budget, such as "80" or "92.5"."""
        return _percent(self.line.budget.threshold_basis_points or 0)

    @property
    def reached(self) -> bool:
        """True when usage is at or above the threshold, as `decide` computes it."""
        basis_points = self.line.budget.threshold_basis_points or 0
        limit = self.line.budget.limit_micros
        return self.used_micros * 10_000 >= limit * basis_points


class SpendError(ValueError):
    """A --spend value that names no budget of the request."""


@click.command("test")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["text", "junit"]),
    default="text",
    show_default=True,
    help="Report format; junit writes JUnit XML for CI systems.",
)
@click.option(
    "--output",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Write the report to this file instead of stdout; the summary line "
    "is still printed.",
)
def test_command(directory: Path, output_format: str, output: Path | None) -> None:
    """Run the PolicyTest documents under DIRECTORY against its policy.

    Exits 0 when every case passes, 4 when one fails, 5 when no PolicyTest
    is found, 3 when the policy or a test file is invalid and 2 on usage
    errors.
    """
    from spendgate.cli import EXIT_OK
    from spendgate.policytest import read_tests, run_tests

    policy = _load_policy(directory)
    loaded = read_tests(directory, policy)
    for problem in loaded.warnings:
        click.echo(f"warning: {problem}", err=True)
    if loaded.errors:
        _exit_invalid(directory, "invalid policy tests", loaded.errors)
    if not loaded.tests:
        click.echo(
            f"error: no test ran: found no document of kind PolicyTest under "
            f"{directory}. Add test files such as {directory}/tests/*.yaml.",
            err=True,
        )
        sys.exit(EXIT_NO_TESTS)

    run = run_tests(policy, loaded.tests)
    report = junit_xml(run) if output_format == "junit" else "\n".join(text_report(run))
    if output is None:
        click.echo(report)
    else:
        try:
            output.write_text(report if report.endswith("\n") else f"{report}\n")
        except OSError as error:
            click.echo(f"error: cannot write the report to {output}: {error}", err=True)
            sys.exit(EXIT_ERROR)
        click.echo(summary_line(run))
    sys.exit(EXIT_OK if run.failed == 0 else EXIT_TESTS_FAILED)


@click.command("explain")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--department", required=True, help="Department of the request.")
@click.option("--team", default="", help="Team of the request.")
@click.option("--user", default="", help="User of the request, for per-user budgets.")
@click.option("--model", required=True, help="Model name or alias.")
@click.option("--prompt", default=None, help="Prompt text.")
@click.option(
    "--prompt-file",
    type=click.File("r", encoding="utf-8"),
    default=None,
    help="File with the prompt text, or - for stdin.",
)
@click.option(
    "--input-tokens",
    type=click.IntRange(0, 10**9),
    default=None,
    help="Input token count, instead of a prompt.",
)
@click.option(
    "--max-output-tokens",
    type=click.IntRange(0, 10**9),
    default=None,
    help="Maximum output tokens the application will request.",
)
@click.option(
    "--at",
    "at_text",
    default=None,
    metavar="TIME",
    help="Time of the request in ISO 8601 with a UTC offset. Default: now.",
)
@click.option(
    "--database",
    default=None,
    help="SQLAlchemy URL of a ledger to read budget usage from, read only.",
)
@click.option(
    "--spend",
    "spend_values",
    multiple=True,
    metavar="BUDGET[:SUBJECT]=USD",
    help="Spent USD of one budget of the request, instead of --database. "
    "BUDGET is a department budget's name, TEAM/NAME or a rule id, and SUBJECT, "
    "when given, must be the user or team the request is counted under. "
    "Repeatable.",
)
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Output format; json prints one object with money in integer micro-USD.",
)
def explain_command(
    directory: Path,
    department: str,
    team: str,
    user: str,
    model: str,
    prompt: str | None,
    prompt_file: TextIO | None,
    input_tokens: int | None,
    max_output_tokens: int | None,
    at_text: str | None,
    database: str | None,
    spend_values: tuple[str, ...],
    output_format: str,
) -> None:
    """Evaluate one request offline and print every step of its decision."""
    from spendgate.evaluator import Request
    from spendgate.policytest import evaluate

    prompt = read_prompt(prompt, prompt_file, input_tokens)
    if database is not None and spend_values:
        raise click.UsageError("give either --database or --spend, not both")
    for name, value in (("--department", department), ("--model", model)):
        if not value.strip():
            raise click.UsageError(f"{name} must not be empty")
    now = _parse_time(at_text)
    spent = [_parse_spend(value) for value in spend_values]

    policy = _load_policy(directory)
    request = Request(
        department=department.strip(),
        model=model.strip(),
        team=team.strip(),
        user=user.strip(),
        application="spendgate-explain",
        prompt=prompt,
        input_tokens=input_tokens,
        max_output_tokens=max_output_tokens,
    )
    try:
        with _usage_reader(database, spent) as reader:
            evaluation = evaluate(policy, request, now, reader)
    except SpendError as error:
        raise click.UsageError(str(error)) from error
    if output_format == "json":
        click.echo(json.dumps(explanation_json(policy, evaluation), indent=2))
    else:
        lines = explanation_text(
            policy, evaluation, database, spend_given=bool(spend_values)
        )
        click.echo("\n".join(lines))


def _load_policy(directory: Path) -> Policy:
    """Load DIRECTORY's policy, or exit 2 or 3 after printing why."""
    from spendgate.cli import EXIT_USAGE
    from spendgate.policy import read_policy

    if not directory.is_dir():
        click.echo(f"error: {directory} is not a directory", err=True)
        sys.exit(EXIT_USAGE)
    result = read_policy(directory)
    for problem in result.warnings:
        click.echo(f"warning: {problem}", err=True)
    if result.policy is None:
        _exit_invalid(directory, "invalid policy", result.errors)
    return result.policy


def read_prompt(
    prompt: str | None, prompt_file: TextIO | None, input_tokens: int | None
) -> str | None:
    """Check that exactly one input option is given; return the prompt text, if any.

    Shared by `check` and `explain`, which take the same three input options.
    """
    given = [
        name
        for name, value in (
            ("--prompt", prompt),
            ("--prompt-file", prompt_file),
            ("--input-tokens", input_tokens),
        )
        if value is not None
    ]
    if len(given) != 1:
        raise click.UsageError(
            "give exactly one of --prompt, --prompt-file or --input-tokens"
        )
    if prompt_file is None:
        return prompt
    try:
        return prompt_file.read()
    except UnicodeDecodeError as error:
        raise click.BadParameter(
            f"the file is not UTF-8 text ({error.reason} at byte {error.start})",
            param_hint="--prompt-file",
        ) from None


def _exit_invalid(directory: Path, summary: str, problems: list[Problem]) -> NoReturn:
    """Print every problem and a summary line, then exit with EXIT_INVALID_POLICY."""
    from spendgate.cli import EXIT_INVALID_POLICY

    for problem in problems:
        click.echo(str(problem), err=True)
    click.echo(f"{directory}: {summary}, {count_errors(len(problems))}", err=True)
    sys.exit(EXIT_INVALID_POLICY)


def _parse_time(text: str | None) -> datetime:
    if text is None:
        return datetime.now(UTC)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as error:
        raise click.BadParameter(
            f"{text!r} is not an ISO 8601 time, such as 2026-03-31T23:30:00-04:00",
            param_hint="--at",
        ) from error
    if moment.tzinfo is None:
        raise click.BadParameter(
            f"{text!r} has no UTC offset. Add one, such as -04:00 or Z.",
            param_hint="--at",
        )
    try:
        # Budget windows are named in the organisation's timezone, which must
        # be able to represent this instant.
        (moment - timedelta(days=2)).astimezone(UTC)
        (moment + timedelta(days=2)).astimezone(UTC)
    except OverflowError:
        raise click.BadParameter(
            f"{text!r} is too close to the limits of the calendar",
            param_hint="--at",
        ) from None
    return moment


def _parse_spend(value: str) -> tuple[str, str, int]:
    """Split BUDGET[:SUBJECT]=USD into the budget, the subject and micro-USD."""
    target, separator, amount = value.rpartition("=")
    budget, _, subject = target.partition(":")
    if not separator or not budget:
        raise click.BadParameter(
            f"{value!r} is not BUDGET[:SUBJECT]=USD, such as monthly=20400",
            param_hint="--spend",
        )
    try:
        usd = Decimal(amount)
        finite = usd.is_finite() and 0 <= usd <= MAX_USD
        micros = usd_to_micros(usd) if finite else -1
    except (ArithmeticError, ValueError):
        # InvalidOperation, Overflow and digit-limit errors all mean "not USD".
        micros = -1
    if micros < 0:
        raise click.BadParameter(
            f"{amount!r} in {value!r} is not a USD amount of 0 or more with at "
            "most 6 decimal places",
            param_hint="--spend",
        )
    return budget, subject, micros


def spend_usage(
    values: list[tuple[str, str, int]], lines: tuple[BudgetLine, ...]
) -> dict[str, Usage]:
    """Turn parsed --spend values into usage of the request's budget lines.

    A budget is named by its rule id, by its name for a department budget,
    or by TEAM/NAME for a budget of the request's team. A subject, when
    given, must be the one the request is counted under, compared the way
    the evaluator compares names (trimmed and lowercased). Raises SpendError
    for a budget that does not apply to the request.
    """
    from spendgate.evaluator import Usage, normalize_name
    from spendgate.policy._schema import suggest

    names: dict[str, BudgetLine] = {}
    for line in lines:
        names[line.budget.rule] = line
        # departments/D/budgets/B or departments/D/teams/T/budgets/B
        parts = line.budget.rule.split("/")
        short = parts[-1] if len(parts) == 4 else f"{parts[3]}/{parts[-1]}"
        names[short] = line

    usage: dict[str, Usage] = {}
    for budget, subject, micros in values:
        found = names.get(budget)
        if found is None:
            options = sorted(name for name in names if "/budgets/" not in name)
            listed = ", ".join(options) or "none"
            raise SpendError(
                f"--spend {budget!r} is not a budget of this request. Its budgets "
                f"are: {listed}{suggest(budget, options)}"
            )
        if subject and normalize_name(subject) != found.subject:
            raise SpendError(
                f"--spend {budget}:{subject} names {found.scope.value} {subject!r}, "
                f"but the request is counted as {found.label}; drop :{subject}"
            )
        if found.key in usage:
            raise SpendError(f"--spend {budget!r} is given twice")
        usage[found.key] = Usage(spent_micros=micros)
    return usage


@contextmanager
def _usage_reader(
    database: str | None, spent: list[tuple[str, str, int]]
) -> Iterator[UsageReader]:
    """Yield a reader of usage from the ledger at `database`, else from --spend."""
    if database is None:
        yield functools.partial(spend_usage, spent)
        return

    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    from spendgate import ledger
    from spendgate.cli import EXIT_USAGE
    from spendgate.errors import SchemaOutdatedError

    try:
        parsed = make_url(database)
    except ArgumentError as error:
        raise click.BadParameter(str(error), param_hint="--database") from error
    missing = ledger.missing_sqlite_error(parsed)
    if missing is not None:
        click.echo(f"error: {missing}", err=True)
        sys.exit(EXIT_USAGE)
    engine = ledger.create_engine(database, pool_size=1)
    try:
        ledger.check_schema(engine)
        yield ledger.Ledger(engine).read_usage
    except (SchemaOutdatedError, SQLAlchemyError) as error:
        click.echo(f"error: cannot read the ledger: {error}", err=True)
        sys.exit(EXIT_ERROR)
    finally:
        engine.dispose()


def summary_line(run: RunResult) -> str:
    """Write "N passed, M failed", with the count of rules no decision named."""
    line = f"{run.passed} passed, {run.failed} failed"
    if run.uncovered_rules:
        line += f", {len(run.uncovered_rules)} rules not exercised"
    return line


def text_report(run: RunResult) -> list[str]:
    """Render a run as text: each failure in full, the summary, uncovered rules."""
    lines: list[str] = []
    for result in run.results:
        if result.passed:
            continue
        lines.append(
            f"FAIL {result.case.location}: {result.test.name}: {result.case.name}"
        )
        lines += [f"  {line}" for line in failure_lines(result)]
        lines.append("")
    lines.append(summary_line(run))
    lines += [f"info: rule not exercised: {rule}" for rule in run.uncovered_rules]
    return lines


def failure_lines(result: CaseResult) -> list[str]:
    """Describe a failed case: expected and actual fields, the rule and the trace."""
    expected = result.case.expected
    outcome = result.evaluation.outcome
    lines = [
        "expected: "
        + ", ".join(f"{field} {_shown(value)}" for field, value in expected.items()),
        "actual:   "
        + ", ".join(f"{field} {_shown(result.actual[field])}" for field in expected),
        f"differs:  {', '.join(result.mismatched)}",
        f"decided by rule {_shown(outcome.rule)}: {outcome.message}",
        "trace:",
    ]
    lines += [f"  {step}" for step in trace_lines(result.evaluation)]
    return lines


def mismatch_summary(result: CaseResult) -> str:
    """Write the differing fields on one line, such as "decision: expected X, got Y"."""
    return "; ".join(
        f"{field}: expected {_shown(result.case.expected[field])}, "
        f"got {_shown(result.actual[field])}"
        for field in result.mismatched
    )


def junit_xml(run: RunResult) -> str:
    """Render a run as JUnit XML: a testsuite per PolicyTest, a testcase per case."""
    from xml.etree import ElementTree

    root = ElementTree.Element(
        "testsuites",
        name="spendgate policy tests",
        tests=str(len(run.results)),
        failures=str(run.failed),
        errors="0",
    )
    suites: dict[int, ElementTree.Element] = {}
    for result in run.results:
        test = result.test
        suite = suites.get(id(test))
        if suite is None:
            suite = ElementTree.SubElement(root, "testsuite", name=test.name)
            suite.attrib.update(
                file=test.file, tests="0", failures="0", errors="0", skipped="0"
            )
            suites[id(test)] = suite
        suite.set("tests", str(int(suite.get("tests", "0")) + 1))
        case = ElementTree.SubElement(
            suite, "testcase", name=result.case.name, classname=test.name
        )
        case.set("file", test.file)
        if not result.passed:
            suite.set("failures", str(int(suite.get("failures", "0")) + 1))
            failure = ElementTree.SubElement(
                case, "failure", message=mismatch_summary(result)
            )
            failure.set("type", "PolicyTestFailure")
            failure.text = "\n".join([result.case.location, *failure_lines(result)])
    if run.uncovered_rules:
        output = ElementTree.SubElement(root, "system-out")
        output.text = "\n".join(
            f"rule not exercised: {rule}" for rule in run.uncovered_rules
        )
    ElementTree.indent(root)
    body = ElementTree.tostring(root, encoding="unicode")
    return f'<?xml version="1.0" encoding="UTF-8"?>\n{body}\n'


def budget_checks(evaluation: Evaluation) -> list[BudgetCheck]:
    """List the budget checks `decide` made, candidate by candidate.

    Checking stops at the first candidate that fits every counted budget, as
    `decide` does. Shadow budgets count only in a shadow department, whose
    decision is the one the policy would have made.
    """
    # NOTE: this repeats the comparisons of evaluator._pick for display only,
    # so a change there must be copied here. The decision shown always comes
    # from evaluator.decide.
    plan = evaluation.plan
    if plan.final is not None or plan.department is None:
        return []
    shadow_department = plan.department.shadow
    checks: list[BudgetCheck] = []
    for candidate in plan.candidates:
        candidate_checks = [
            BudgetCheck(
                candidate.model.name,
                line,
                _used(evaluation, line),
                candidate.estimate_micros,
            )
            for line in plan.budgets
        ]
        checks += candidate_checks
        counted = [
            check
            for check in candidate_checks
            if shadow_department or not check.line.budget.shadow
        ]
        if all(check.fits for check in counted):
            break
    return checks


def threshold_checks(evaluation: Evaluation) -> list[ThresholdCheck]:
    """List the budgets with a downgrade threshold and whether usage reached it."""
    plan = evaluation.plan
    if plan.final is not None:
        return []
    return [
        ThresholdCheck(line, _used(evaluation, line))
        for line in plan.budgets
        if line.budget.threshold_basis_points is not None
    ]


def trace_lines(evaluation: Evaluation) -> list[str]:
    """Summarise an evaluation: the evaluator's trace, then each budget check."""
    lines = list(evaluation.plan.trace)
    lines += [_describe_check(check) for check in budget_checks(evaluation)]
    lines += [_describe_threshold(check) for check in threshold_checks(evaluation)]
    if not lines:
        lines.append(f"decided before any budget: {evaluation.outcome.message}")
    return lines


def _usage_source(database: str | None, spend_given: bool) -> str:
    if database:
        return _hide_password(database)
    if spend_given:
        return "--spend values"
    return "none given, so every budget is taken as empty"


def explanation_text(
    policy: Policy,
    evaluation: Evaluation,
    database: str | None,
    *,
    spend_given: bool = True,
) -> list[str]:
    """Render every step of one evaluation for `spendgate explain`."""
    request, plan, outcome = evaluation.request, evaluation.plan, evaluation.outcome
    timezone = policy.organization.timezone
    local = evaluation.now.astimezone(timezone)
    department = _department(policy, request.department)
    resolved = policy.resolve_model(request.model)

    lines = [
        f"policy: version {policy.version}",
        f"time: {evaluation.now.isoformat()} ({local.isoformat()} in {timezone.key})",
        f"department: {_department_text(request.department, department)}",
        f"team: {_team_text(request.team, department)}",
        f"user: {_shown(request.user)}",
        "model: "
        + (
            f"{resolved.name} (requested {request.model!r})"
            if resolved
            else f"{request.model!r} is not in the catalog"
        ),
        "usage from: " + _usage_source(database, spend_given),
        "budgets:" if plan.budgets else "budgets: none apply",
    ]
    lines += [f"  {_describe_line(evaluation, line)}" for line in plan.budgets]
    candidates = plan.candidates
    if plan.requested is not None and plan.requested not in candidates:
        candidates = (plan.requested, *candidates)
    lines.append("estimates:" if candidates else "estimates: none")
    for candidate in candidates:
        counting = "estimated" if candidate.input_tokens_estimated else "exact"
        lines.append(
            f"  {candidate.model.name}: {candidate.input_tokens} input tokens "
            f"({counting}), {candidate.max_output_tokens} output tokens, "
            f"{format_usd(candidate.estimate_micros)}"
        )
    lines.append("steps:")
    lines += [f"  {step}" for step in trace_lines(evaluation)]
    actual = _observed(evaluation)
    lines += [
        f"decision: {outcome.decision.value}",
        f"model: {_shown(outcome.model)}",
        f"reason_code: {outcome.reason.value}",
        f"rule: {_shown(outcome.rule)}",
        f"shadow_decision: {actual['shadow_decision']}",
        f"estimated_cost: {actual['estimated_cost_usd']}",
        f"max_output_tokens: {actual['max_output_tokens']}",
        f"message: {outcome.message}",
    ]
    return lines


def explanation_json(policy: Policy, evaluation: Evaluation) -> dict[str, Any]:
    """Return one evaluation as a JSON object, with money in integer micro-USD."""
    request, plan, outcome = evaluation.request, evaluation.plan, evaluation.outcome
    department = _department(policy, request.department)
    team = department.teams.get(request.team.lower()) if department else None
    resolved = policy.resolve_model(request.model)
    candidate = outcome.candidate
    return {
        "policy_version": policy.version,
        "at": evaluation.now.isoformat(),
        "timezone": policy.organization.timezone.key,
        "request": {
            "department": request.department,
            "team": request.team,
            "user": request.user,
            "model": request.model,
            "input_tokens": request.input_tokens,
            "max_output_tokens": request.max_output_tokens,
        },
        "department": department.name if department else None,
        "team": team.name if team else None,
        "model": resolved.name if resolved else None,
        "budgets": [_line_json(evaluation, line) for line in plan.budgets],
        "candidates": [
            {
                "model": option.model.name,
                "input_tokens": option.input_tokens,
                "input_tokens_estimated": option.input_tokens_estimated,
                "max_output_tokens": option.max_output_tokens,
                "estimate_micros": option.estimate_micros,
            }
            for option in plan.candidates
        ],
        "trace": list(plan.trace),
        "budget_checks": [
            {
                "model": check.model,
                "rule": check.line.budget.rule,
                "used_micros": check.used_micros,
                "estimate_micros": check.estimate_micros,
                "limit_micros": check.line.budget.limit_micros,
                "fits": check.fits,
                "shadow": check.line.budget.shadow,
            }
            for check in budget_checks(evaluation)
        ],
        "thresholds": [
            {
                "rule": check.line.budget.rule,
                "percent": str(check.percent),
                "used_micros": check.used_micros,
                "limit_micros": check.line.budget.limit_micros,
                "reached": check.reached,
            }
            for check in threshold_checks(evaluation)
        ],
        "decision": outcome.decision.value,
        "effective_model": outcome.model,
        "requested_model": outcome.requested_model,
        "reason_code": outcome.reason.value,
        "rule": outcome.rule,
        "message": outcome.message,
        "shadow_decision": outcome.shadow_decision.value
        if outcome.shadow_decision
        else None,
        "estimated_cost_micros": candidate.estimate_micros
        if outcome.reserves and candidate
        else 0,
        "max_output_tokens": candidate.max_output_tokens if candidate else 0,
    }


def _line_json(evaluation: Evaluation, line: BudgetLine) -> dict[str, Any]:
    usage = evaluation.usage.get(line.key)
    basis_points = line.budget.threshold_basis_points
    return {
        "rule": line.budget.rule,
        "budget": line.budget.name,
        "scope": line.label,
        "period": line.budget.period.value,
        "window": line.window,
        "limit_micros": line.budget.limit_micros,
        "spent_micros": usage.spent_micros if usage else 0,
        "reserved_micros": usage.reserved_micros if usage else 0,
        "downgrade_at_percent": None
        if basis_points is None
        else _percent(basis_points),
        "shadow": line.budget.shadow,
    }


def _describe_line(evaluation: Evaluation, line: BudgetLine) -> str:
    usage = evaluation.usage.get(line.key)
    spent = usage.spent_micros if usage else 0
    reserved = usage.reserved_micros if usage else 0
    text = (
        f"{line.budget.rule} ({line.label}, {line.budget.period.value} "
        f"{line.window}): spent {format_usd(spent)}, reserved "
        f"{format_usd(reserved)}, limit {format_usd(line.budget.limit_micros)}"
    )
    if line.budget.threshold_basis_points is not None:
        percent = _percent(line.budget.threshold_basis_points)
        text += f", downgrade at {percent}%"
    if line.budget.shadow:
        text += ", shadow budget"
    return text


def _describe_check(check: BudgetCheck) -> str:
    limit = check.line.budget.limit_micros
    total = check.used_micros + check.estimate_micros
    verdict = "fits" if check.fits else "over the limit"
    shadow = ", shadow budget" if check.line.budget.shadow else ""
    return (
        f"{check.model} on {check.line.budget.rule} ({check.line.label}{shadow}): "
        f"used {format_usd(check.used_micros)} + estimate "
        f"{format_usd(check.estimate_micros)} = {format_usd(total)} vs limit "
        f"{format_usd(limit)}: {verdict}"
    )


def _describe_threshold(check: ThresholdCheck) -> str:
    limit = check.line.budget.limit_micros
    state = "reached" if check.reached else "not reached"
    return (
        f"threshold {check.percent}% of {check.line.budget.rule}: used "
        f"{format_usd(check.used_micros)} of {format_usd(limit)}, {state}"
    )


def _department(policy: Policy, name: str) -> Department | None:
    """Find the department whose rules decide, as the evaluator does."""
    found = policy.departments.get(name.lower())
    fallback = policy.organization.unknown_department
    if found is None and fallback is not None:
        found = policy.departments[fallback]
    return found


def _department_text(name: str, found: Department | None) -> str:
    if found is None:
        return f"{name!r} is not defined, and unknown departments are denied"
    mode = "shadow mode" if found.shadow else "enforced"
    if found.name != name.lower():
        return f"{found.name} ({mode}), the organisation's default for {name!r}"
    return f"{found.name} ({mode})"


def _team_text(name: str, department: Department | None) -> str:
    if not name:
        return "none, so only the department's rules apply"
    team: Team | None = department.teams.get(name.lower()) if department else None
    if team is None:
        return f"{name!r} is not a team of the department, so its rules apply alone"
    return team.name


def _used(evaluation: Evaluation, line: BudgetLine) -> int:
    usage = evaluation.usage.get(line.key)
    return usage.used_micros if usage else 0


def _observed(evaluation: Evaluation) -> dict[str, str]:
    from spendgate.policytest import observe

    return observe(evaluation.outcome)


def _hide_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _percent(basis_points: int) -> str:
    return format(Decimal(basis_points).scaleb(-2).normalize(), "f")


def _shown(value: str) -> str:
    return value if value else '""'
