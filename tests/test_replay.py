"""Tests for spendgate.replay and the replay command, on audit logs written for real."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from click.testing import CliRunner, Result

from conftest import START, PolicyWriter
from spendgate import evaluator, reports
from spendgate.cli import main
from spendgate.ledger import Ledger, Principal, create_engine
from spendgate.ledger._ledger import unverified_check
from spendgate.ledger._spool import AuditSpool
from spendgate.policy import ExpiryAction, Policy, load_policy
from spendgate.replay import TRANSITIONS, ReplayResult, replay

# "big" costs 1 micro-USD per input token and nothing per output token, so a
# Check of 100 input tokens reserves 100 micro-USD and a Commit of 80 input
# tokens spends 80.
POLICY = {
    "organization.yaml": """\
apiVersion: spendgate/v1
kind: Organization
name: replay-org
timezone: UTC
reservation_ttl: 10m
on_reservation_expiry: charge
""",
    "catalog.yaml": """\
apiVersion: spendgate/v1
kind: ModelCatalog
models:
  - name: big
    tokenizer: approximate
    price_per_million_tokens: {input: 1.00, output: 0}
    context_window: 100000
    max_output_tokens: 1000
  - name: small
    tokenizer: approximate
    price_per_million_tokens: {input: 0.10, output: 0}
    context_window: 100000
    max_output_tokens: 1000
  - name: old
    tokenizer: approximate
    price_per_million_tokens: {input: 1.00, output: 0}
    context_window: 100000
    max_output_tokens: 1000
""",
    "research.yaml": """\
apiVersion: spendgate/v1
kind: Department
name: research
budgets:
  - {name: daily, period: day, limit_usd: 0.001}
""",
    "labs.yaml": """\
apiVersion: spendgate/v1
kind: Department
name: labs
downgrades:
  big: small
budgets:
  - {name: monthly, period: month, limit_usd: 1}
""",
}
INPUT_TOKENS = 100
COMMIT_INPUT_TOKENS = 80
COMMIT_MICROS = 80
# Research Checks in recorded order: 12 committed and 1 released are allowed,
# then the $0.001 daily budget (960 spent + 100) denies the last 2.
RESEARCH = ["commit"] * 3 + ["release"] + ["commit"] * 9 + ["deny", "deny"]
# Minutes after START: research takes 0-14, labs 15-19, the unverified Check 20.
LABS_START = 15
UNVERIFIED_AT = 20
EXPIRE_AT = 29

EXIT_USAGE = 2
EXIT_INVALID_POLICY = 3
EXIT_CHANGED = 6


@dataclass(frozen=True, slots=True)
class AuditLog:
    """A ledger whose audit log the fixture wrote, and its policy directory."""

    url: str
    policy_dir: Path


def minute(count: float) -> datetime:
    return START + timedelta(minutes=count)


def policy_with(**files: str) -> dict[str, str]:
    """Return the test policy with some files replaced, keyed by file stem."""
    return {**POLICY, **{f"{stem}.yaml": text for stem, text in files.items()}}


def research_budget(limit_usd: str) -> str:
    return POLICY["research.yaml"].replace(
        "limit_usd: 0.001", f"limit_usd: {limit_usd}"
    )


def check(
    ledger: Ledger,
    policy: Policy,
    at: datetime,
    *,
    department: str,
    user: str,
    model: str = "big",
) -> str:
    """Check a call of 100 input and 50 output tokens; return the reservation id."""
    request = evaluator.Request(
        department=department,
        model=model,
        user=user,
        application="tests",
        input_tokens=INPUT_TOKENS,
        max_output_tokens=50,
    )
    record = ledger.check(
        request_id=f"{department}-{uuid.uuid4().hex[:8]}",
        principal=Principal(department, "", user, "tests"),
        plan=evaluator.plan(policy, request, at),
        policy_version=policy.version,
        reservation_ttl=policy.organization.reservation_ttl,
        labels={},
        now=at,
    )
    return record.reservation_id


def commit(ledger: Ledger, reservation_id: str, at: datetime) -> None:
    ledger.commit(
        reservation_id,
        input_tokens=COMMIT_INPUT_TOKENS,
        cached_input_tokens=0,
        output_tokens=10,
        now=at + timedelta(seconds=30),
    )


@pytest.fixture(autouse=True)
def restore_structlog() -> Iterator[None]:
    """Undo the structlog set-up that every command runs, as in test_cli."""
    saved = structlog.get_config()
    yield
    structlog.reset_defaults()
    structlog.configure(**saved)


@pytest.fixture
def audit_log(
    ledger_url: str, write_policy: PolicyWriter, tmp_path: Path
) -> Iterator[AuditLog]:
    """Record 21 Checks with real ledger calls, on SQLite and on PostgreSQL.

    Research records the Checks listed beside RESEARCH. Labs records 4
    Checks of big (3 committed, 1 expired and charged) and 1 committed Check
    of old. One more research Check is unverified: written through the spool
    as during a ledger outage.
    """
    policy_dir = write_policy(POLICY)
    policy = load_policy(policy_dir)
    engine = create_engine(ledger_url)
    ledger = Ledger(engine)

    for index, settle in enumerate(RESEARCH):
        at = minute(index)
        reservation = check(ledger, policy, at, department="research", user="alice")
        assert bool(reservation) == (settle != "deny")
        if settle == "commit":
            commit(ledger, reservation, at)
        elif settle == "release":
            ledger.release(reservation, now=at + timedelta(seconds=30))

    for index, model in enumerate(["big", "big", "big", "big", "old"]):
        at = minute(LABS_START + index)
        reservation = check(
            ledger, policy, at, department="labs", user="bob", model=model
        )
        if index != 3:
            commit(ledger, reservation, at)
    assert ledger.expire(ExpiryAction.CHARGE, now=minute(EXPIRE_AT)) == 1

    request = evaluator.Request(
        department="research", model="big", user="alice", input_tokens=INPUT_TOKENS
    )
    _, row = unverified_check(
        request_id="unverified-1",
        principal=Principal("research", "", "alice", "tests"),
        outcome=evaluator.decide(evaluator.plan(policy, request, START), {}),
        policy_version=policy.version,
        labels={},
        now=minute(UNVERIFIED_AT),
    )
    spool = AuditSpool(tmp_path / "spool.jsonl")
    spool.append(row)
    assert spool.flush(engine) == 1

    yield AuditLog(ledger_url, policy_dir)
    engine.dispose()


def run_replay(audit_log: AuditLog, policy_dir: Path, **options: Any) -> ReplayResult:
    engine = reports.open_ledger(audit_log.url)
    try:
        return replay(engine, load_policy(policy_dir), **options)
    finally:
        engine.dispose()


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, ["replay", *args])


def nonzero(transitions: Mapping[str, int]) -> dict[str, int]:
    return {name: count for name, count in transitions.items() if count}


def test_replay_identical_policy(audit_log: AuditLog) -> None:
    result = run_replay(audit_log, audit_log.policy_dir)

    research = result.departments["research"]
    labs = result.departments["labs"]
    assert research.replayed == len(RESEARCH)
    assert research.unverified == 1
    assert labs.replayed == 5
    assert result.total().changed == 0
    assert result.total().prevented_micros == 0
    assert result.total().allowed_micros == 0


def test_replay_lower_budget(audit_log: AuditLog, write_policy: PolicyWriter) -> None:
    candidate = write_policy(policy_with(research=research_budget("0.0005")))

    result = run_replay(audit_log, candidate)

    # 80 spent per Commit: the 7th to 12th committed Checks no longer fit $0.0005.
    research = result.departments["research"]
    assert nonzero(research.transitions) == {"ALLOW->DENY": 6}
    assert research.prevented_micros == 6 * COMMIT_MICROS
    assert research.allowed_micros == 0
    assert result.departments["labs"].changed == 0


def test_replay_removed_model(audit_log: AuditLog, write_policy: PolicyWriter) -> None:
    labs = POLICY["labs.yaml"] + "models:\n  allow: [small, old]\n"
    candidate = write_policy(policy_with(labs=labs))

    result = run_replay(audit_log, candidate)

    summary = result.departments["labs"]
    assert nonzero(summary.transitions) == {"ALLOW->DOWNGRADE": 4}
    examples = summary.examples["ALLOW->DOWNGRADE"]
    assert [example.candidate.model for example in examples] == ["small"] * 4
    assert {example.candidate.reason_code for example in examples} == {
        "MODEL_NOT_ALLOWED"
    }
    assert {example.candidate.rule for example in examples} == {
        "departments/labs/models"
    }
    assert {example.recorded.model for example in examples} == {"big"}
    assert result.departments["research"].changed == 0


def test_replay_raised_budget(audit_log: AuditLog, write_policy: PolicyWriter) -> None:
    candidate = write_policy(policy_with(research=research_budget("0.002")))

    result = run_replay(audit_log, candidate)

    research = result.departments["research"]
    assert nonzero(research.transitions) == {"DENY->ALLOW": 2}
    assert research.allowed_micros == 2 * INPUT_TOKENS
    assert research.prevented_micros == 0


def test_replay_model_missing_from_catalog(
    audit_log: AuditLog, write_policy: PolicyWriter
) -> None:
    catalog = POLICY["catalog.yaml"].split("  - name: old")[0]
    candidate = write_policy(policy_with(catalog=catalog))

    result = run_replay(audit_log, candidate)

    labs = result.departments["labs"]
    assert labs.model_not_in_catalog == 1
    assert labs.replayed == 4
    assert labs.changed == 0


@pytest.mark.parametrize(
    ("limit_usd", "transitions"),
    [
        pytest.param("0.001", {}, id="identical"),
        pytest.param("0.0005", {"ALLOW->DENY": 6}, id="lowered"),
    ],
)
def test_replay_since_rebuilds_usage(
    audit_log: AuditLog,
    write_policy: PolicyWriter,
    limit_usd: str,
    transitions: dict[str, int],
) -> None:
    candidate = write_policy(policy_with(research=research_budget(limit_usd)))
    since = minute(3.5)

    result = run_replay(audit_log, candidate, since=since, department="research")

    # Only the Checks after the release are replayed, but the usage of the
    # 3 commits before `since` still counts against the budget.
    research = result.departments["research"]
    assert list(result.departments) == ["research"]
    assert research.replayed == len(RESEARCH) - 4
    assert nonzero(research.transitions) == transitions
    # The labs budget is monthly, so the rebuild starts on the 1st.
    assert result.usage_from == datetime(2040, 6, 1, tzinfo=UTC)


def test_replay_until_excludes_later(audit_log: AuditLog) -> None:
    result = run_replay(audit_log, audit_log.policy_dir, until=minute(LABS_START))

    assert list(result.departments) == ["research"]
    assert result.departments["research"].replayed == len(RESEARCH)


def test_replay_examples_limit(audit_log: AuditLog, write_policy: PolicyWriter) -> None:
    candidate = write_policy(policy_with(research=research_budget("0.0005")))

    result = run_replay(audit_log, candidate, examples=2)

    examples = result.departments["research"].examples["ALLOW->DENY"]
    assert len(examples) == 2
    assert examples[0].occurred_at == minute(7)
    assert examples[0].candidate.decision == "DENY"
    assert examples[0].candidate.reason_code == "BUDGET_EXCEEDED"


def test_cli_text_report(audit_log: AuditLog, write_policy: PolicyWriter) -> None:
    candidate = write_policy(policy_with(research=research_budget("0.0005")))

    result = invoke("--database", audit_log.url, "--policies", str(candidate))

    assert result.exit_code == 0, result.stderr
    assert "research: 15 checks replayed, 6 changed, 1 not replayed" in result.stdout
    assert "  ALLOW->DENY              6" in result.stdout
    assert "spend prevented   $0.000480" in result.stdout
    assert "not replayed: 1 unverified" in result.stdout
    assert "recorded:  ALLOW big ALLOWED by departments/research" in result.stdout
    assert "clamped" in result.stdout
    assert result.stderr == ""


@pytest.mark.parametrize(
    ("limit_usd", "exit_code"),
    [
        pytest.param("0.001", 0, id="unchanged"),
        pytest.param("0.0005", EXIT_CHANGED, id="changed"),
    ],
)
def test_cli_fail_on_change(
    audit_log: AuditLog, write_policy: PolicyWriter, limit_usd: str, exit_code: int
) -> None:
    candidate = write_policy(policy_with(research=research_budget(limit_usd)))

    result = invoke(
        "--database", audit_log.url, "--policies", str(candidate), "--fail-on-change"
    )

    assert result.exit_code == exit_code, result.stderr


def test_cli_json_shape(audit_log: AuditLog, write_policy: PolicyWriter) -> None:
    candidate = write_policy(policy_with(research=research_budget("0.0005")))

    result = invoke(
        "--database",
        audit_log.url,
        "--policies",
        str(candidate),
        "--format",
        "json",
        "--since",
        "2040-06-12T12:03:30",
    )

    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report) == {
        "policy_version",
        "since",
        "until",
        "usage_from",
        "events_read",
        "total",
        "departments",
        "notes",
    }
    assert report["since"] == "2040-06-12T12:03:30+00:00"
    assert report["until"] is None
    assert report["usage_from"] == "2040-06-01T00:00:00+00:00"
    research = report["departments"]["research"]
    assert list(research["transitions"]) == list(TRANSITIONS)
    assert research["transitions"]["ALLOW->DENY"] == 6
    assert research["prevented_micros"] == 480
    assert research["prevented_usd"] == "0.000480"
    assert research["not_replayed"] == {
        "unverified": 1,
        "model_not_in_catalog": 0,
        "no_token_count": 0,
    }
    example = research["examples"]["ALLOW->DENY"][0]
    assert set(example) == {
        "request_id",
        "occurred_at",
        "department",
        "team",
        "user",
        "application",
        "requested_model",
        "recorded",
        "candidate",
    }
    assert set(example["candidate"]) == {"decision", "model", "reason_code", "rule"}
    assert report["total"]["changed"] == 6


def test_cli_invalid_candidate(audit_log: AuditLog, write_policy: PolicyWriter) -> None:
    broken = POLICY["research.yaml"].replace("period: day", "period: fortnight")
    candidate = write_policy(policy_with(research=broken))

    result = invoke("--database", audit_log.url, "--policies", str(candidate))

    assert result.exit_code == EXIT_INVALID_POLICY
    assert "research.yaml" in result.stderr


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(["--since", "2040-06-12", "--until", "2040-06-11"], id="range"),
        pytest.param(["--since", "yesterday"], id="since"),
        pytest.param(["--examples", "-1"], id="examples"),
    ],
)
def test_cli_usage_errors(audit_log: AuditLog, extra: list[str]) -> None:
    result = invoke(
        "--database", audit_log.url, "--policies", str(audit_log.policy_dir), *extra
    )

    assert result.exit_code == EXIT_USAGE


def test_cli_missing_policies(audit_log: AuditLog, tmp_path: Path) -> None:
    result = invoke("--database", audit_log.url, "--policies", str(tmp_path / "no"))

    assert result.exit_code == EXIT_USAGE
    assert "does not exist" in result.stderr


def test_cli_missing_database(tmp_path: Path, write_policy: PolicyWriter) -> None:
    url = f"sqlite:///{tmp_path / 'none.db'}"

    result = invoke("--database", url, "--policies", str(write_policy(POLICY)))

    assert result.exit_code == 1
    assert "not found" in result.stderr


def test_cli_progress(audit_log: AuditLog) -> None:
    args = ["--database", audit_log.url, "--policies", str(audit_log.policy_dir)]

    with_progress = invoke(*args, "--progress")
    quiet = invoke(*args)

    # 21 Checks, 16 Commits, 1 Release, 1 expiry and the unverified Check.
    assert with_progress.exit_code == 0, with_progress.stderr
    assert with_progress.stderr.splitlines()[-1] == "replay: 39 / 39 events (100%)"
    assert quiet.stderr == ""
