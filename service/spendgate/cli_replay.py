"""The `spendgate replay` command, for reviewing a policy change on past traffic.

It re-decides the Checks of the audit log under a candidate policy directory
with spendgate.replay, and prints per department the decisions that would
change and the spend that moves with them.
"""

# The command imports the evaluator and the ledger lazily, as cli.py does, so
# `spendgate --help` starts fast. cli.py imports this module at its end, so
# its exit codes are imported inside the command too.
# ruff: noqa: PLC0415

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import click

if TYPE_CHECKING:
    from spendgate.replay import DepartmentSummary, Example, ReplayResult, Verdict

# After cli_policy's 4 (tests failed) and 5 (no tests).
EXIT_CHANGED = 6
# An unreadable ledger exits 1, as in the audit and budgets commands.
EXIT_ERROR = 1
# Progress is printed at least this often, and at every step of this share.
PROGRESS_INTERVAL_SECONDS = 2.0
PROGRESS_STEP_PERCENT = 5


class ProgressPrinter:
    """Print "events processed / total" every 5% or every 2 s, and at the end.

    On a terminal the line is rewritten in place. Elsewhere, such as in a
    CI log, each update is a line of its own.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._in_place = stream.isatty()
        self._printed_at = time.monotonic()
        self._next = 0

    def __call__(self, done: int, total: int) -> None:
        """Print the count when a step or the interval has passed, and at the end."""
        now = time.monotonic()
        due = done >= self._next or now - self._printed_at >= PROGRESS_INTERVAL_SECONDS
        if done < total and not due:
            return
        self._printed_at = now
        # Ceiling division, so a log of fewer than 20 events is not printed per event.
        self._next = done + max(1, -(-total * PROGRESS_STEP_PERCENT // 100))
        percent = min(100, done * 100 // total) if total else 100
        text = f"replay: {done:,} / {total:,} events ({percent}%)"
        if self._in_place:
            end = "\n" if done >= total else ""
            print(f"\r{text}", end=end, file=self.stream, flush=True)
        else:
            print(text, file=self.stream, flush=True)


def _parse_time_option(
    _ctx: click.Context, param: click.Parameter, value: str | None
) -> datetime | None:
    """Parse --since or --until with the audit command's time forms."""
    from spendgate import reports

    if value is None:
        return None
    try:
        return reports.parse_time(
            value, now=datetime.now(UTC), end_of_day=param.name == "until"
        )
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


@click.command("replay")
@click.option(
    "--database",
    required=True,
    envvar="SPENDGATE_DATABASE",
    metavar="URL",
    help="SQLAlchemy URL of the ledger whose audit log is replayed, read only.",
)
@click.option(
    "--policies",
    "policy_dir",
    required=True,
    metavar="NEW_DIR",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    help="Candidate policy directory to decide the recorded Checks with.",
)
@click.option(
    "--since",
    callback=_parse_time_option,
    metavar="TIME",
    help="Replay Checks at or after TIME: an ISO 8601 date or datetime (UTC "
    "without an offset) or a time back from now such as 30m, 24h or 7d. "
    "Earlier events of the budget windows in progress still count as usage.",
)
@click.option(
    "--until",
    callback=_parse_time_option,
    metavar="TIME",
    help="Replay events before TIME, in the same forms. A date alone includes "
    "that whole day.",
)
@click.option(
    "--department",
    default=None,
    help="Only events recorded for this department, matched ignoring case.",
)
@click.option(
    "--examples",
    default=5,
    show_default=True,
    type=click.IntRange(0),
    help="Example Checks to show per department and kind of change.",
)
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="text for reading, json for one object with money in integer micro-USD.",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Print progress to stderr; by default only when stderr is a terminal.",
)
@click.option(
    "--fail-on-change",
    is_flag=True,
    help="Exit 6 when any decision, model or reason code changes, for CI gates.",
)
def replay_command(
    database: str,
    policy_dir: Path,
    since: datetime | None,
    until: datetime | None,
    department: str | None,
    examples: int,
    output_format: str,
    progress: bool | None,
    fail_on_change: bool,
) -> None:
    """Re-decide the Checks in the audit log under a candidate policy.

    Each recorded Check is decided again at its recorded time with its
    recorded token counts, against a simulated ledger of the candidate's own
    decisions, and the report counts the decisions that would change. Exit 0
    on success, 1 when the ledger cannot be read, 2 on usage errors, 3 when
    the candidate policy is invalid, and 6 with --fail-on-change when a
    decision, model or reason code changes.
    """
    from sqlalchemy.exc import SQLAlchemyError

    from spendgate import reports
    from spendgate.cli import EXIT_INVALID_POLICY, EXIT_OK
    from spendgate.errors import PolicyError, SpendgateError
    from spendgate.policy import load_policy
    from spendgate.replay import replay, result_record

    if since is not None and until is not None and since >= until:
        raise click.BadParameter(
            f"--since ({since.isoformat()}) must be before --until "
            f"({until.isoformat()})",
            param_hint="--since",
        )
    try:
        policy = load_policy(policy_dir)
    except PolicyError as error:
        click.echo(str(error), err=True)
        sys.exit(EXIT_INVALID_POLICY)
    try:
        engine = reports.open_ledger(database)
    except SpendgateError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(EXIT_ERROR)

    show_progress = sys.stderr.isatty() if progress is None else progress
    try:
        result = replay(
            engine,
            policy,
            since=since,
            until=until,
            department=department,
            examples=examples,
            progress=ProgressPrinter(sys.stderr) if show_progress else None,
        )
    except SQLAlchemyError as error:
        reason = str(error).splitlines()[0]
        click.echo(f"error: reading the audit log failed: {reason}", err=True)
        sys.exit(EXIT_ERROR)
    finally:
        engine.dispose()

    if output_format == "json":
        click.echo(json.dumps(result_record(result), indent=2, ensure_ascii=False))
    else:
        click.echo("\n".join(text_report(result, policy_dir)))
    changed = result.total().changed
    sys.exit(EXIT_CHANGED if fail_on_change and changed else EXIT_OK)


def text_report(result: ReplayResult, policy_dir: Path) -> list[str]:
    """Render a replay for reading: the range, each department, totals, notes."""
    from spendgate.replay import NOTES

    start = "the start of the log" if result.since is None else _time(result.since)
    end = "the end of the log" if result.until is None else _time(result.until)
    lines = [
        f"replay of {policy_dir} (policy version {result.policy_version})",
        f"checks from {start} to {end}, {result.events_read:,} events read",
    ]
    since, usage_from = result.since, result.usage_from
    if since is not None and usage_from is not None and usage_from != since:
        lines.append(
            f"usage before {_time(since)} rebuilt from the events "
            f"recorded since {_time(usage_from)}"
        )
    for name, summary in result.departments.items():
        lines.append("")
        lines += _department_lines(name, summary)
    total = result.total()
    lines += [
        "",
        f"total: {_counts(total)}, spend prevented "
        f"{_usd(total.prevented_micros)}, spend allowed {_usd(total.allowed_micros)}",
        "",
        "notes:",
    ]
    lines += [f"- {note}" for note in NOTES]
    return lines


def _department_lines(name: str, summary: DepartmentSummary) -> list[str]:
    from spendgate.replay import TRANSITIONS

    lines = [f"{name}: {_counts(summary)}"]
    lines += [
        f"  {transition:<18}{summary.transitions[transition]:>8,}"
        for transition in TRANSITIONS
        if summary.transitions.get(transition)
    ]
    lines += [
        f"  spend prevented   {_usd(summary.prevented_micros)} (recorded cost of "
        "calls the candidate denies)",
        f"  spend allowed     {_usd(summary.allowed_micros)} (estimates of calls "
        "the candidate allows)",
    ]
    skipped = [
        (summary.unverified, "unverified (decided while the ledger was down)"),
        (summary.model_not_in_catalog, "of a model missing from the catalog"),
        (summary.no_token_count, "without a recorded token count"),
    ]
    lines += [f"  not replayed: {count:,} {why}" for count, why in skipped if count]
    for transition in TRANSITIONS:
        found = summary.examples.get(transition, [])
        if found:
            lines.append(f"  examples of {transition}:")
            for example in found:
                lines += _example_lines(example)
    return lines


def _example_lines(example: Example) -> list[str]:
    principal = example.department + (f"/{example.team}" if example.team else "")
    return [
        f"    {_time(example.occurred_at)}  request {example.request_id}  "
        f"{principal}  user {example.user or '-'}  model {example.requested_model}",
        f"      recorded:  {_verdict(example.recorded)}",
        f"      candidate: {_verdict(example.candidate)}",
    ]


def _verdict(verdict: Verdict) -> str:
    model = f" {verdict.model}" if verdict.model else ""
    rule = verdict.rule or "-"
    return f"{verdict.decision}{model} {verdict.reason_code} by {rule}"


def _counts(summary: DepartmentSummary) -> str:
    text = f"{summary.replayed:,} checks replayed, {summary.changed:,} changed"
    if summary.not_replayed:
        text += f", {summary.not_replayed:,} not replayed"
    return text


def _time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _usd(micros: int) -> str:
    from spendgate.reports import format_usd_grouped

    return format_usd_grouped(micros)
