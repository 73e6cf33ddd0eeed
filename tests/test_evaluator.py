"""Tests for spendgate.evaluator: every decision rule, in order, without a ledger."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from spendgate.evaluator import (
    Decision,
    Outcome,
    Reason,
    Request,
    Usage,
    budget_lines,
    decide,
    plan,
)
from spendgate.policy import Policy, Scope, load_policy
from spendgate.tokens import ChatMessage

# Friday 2026-12-04 22:00 in New York, already Saturday in UTC.
NOW = datetime(2026, 12, 5, 3, 0, tzinfo=UTC)
DAY, WEEK, MONTH = "2026-12-04", "2026-W49", "2026-12"

ORGANIZATION = """\
apiVersion: spendgate/v1
kind: Organization
name: acme
timezone: America/New_York
"""

# The prices make estimates easy to check by hand. Per input and output
# token, big costs 10 and 30 micro-USD, mid 1 and 3, small 0.1 and 0.4.
CATALOG = """\
apiVersion: spendgate/v1
kind: ModelCatalog
models:
  - name: big
    aliases: [big-latest]
    tokenizer: o200k_base
    price_per_million_tokens: {input: 10.00, output: 30.00}
    context_window: 8000
    max_output_tokens: 4000
  - name: mid
    tokenizer: o200k_base
    price_per_million_tokens: {input: 1.00, output: 3.00}
    context_window: 5000
    max_output_tokens: 2000
  - name: small
    tokenizer: approximate
    chars_per_token: 2
    price_per_million_tokens: {input: 0.10, output: 0.40}
    context_window: 8000
    max_output_tokens: 1000
  - name: legacy
    aliases: [legacy-v1]
    tokenizer: cl100k_base
    price_per_million_tokens: {input: 5.00, output: 15.00}
    context_window: 4000
    max_output_tokens: 1000
  - name: claude-1
    tokenizer: approximate
    price_per_million_tokens: {input: 3.00, output: 15.00}
    context_window: 8000
    max_output_tokens: 1000
  - name: claudex-1
    tokenizer: approximate
    price_per_million_tokens: {input: 3.00, output: 15.00}
    context_window: 8000
    max_output_tokens: 1000
  - name: odd
    tokenizer: o200k_base
    price_per_million_tokens: {input: 2.50, output: 0.50}
    context_window: 8000
    max_output_tokens: {odd_max_output}
"""

# Model rules and per-request limits, without budgets.
ENG = """\
apiVersion: spendgate/v1
kind: Department
name: eng
models:
  allow: [big, mid, small, legacy, odd, "claude-*"]
  deny: [legacy-v1]
downgrades:
  big: mid
  mid: small
  legacy: mid
limits:
  max_input_tokens: 6000
  max_output_tokens: 1500
teams:
  - name: narrow
    models:
      allow: [mid, small, legacy]
    limits:
      max_input_tokens: 7000
      max_output_tokens: 300
  - name: tiny
    models:
      allow: [small]
  - name: closed
    models:
      allow: [odd]
"""

CAPPED = """\
apiVersion: spendgate/v1
kind: Department
name: capped
downgrades:
  big: mid
limits:
  max_request_usd: 0.02
"""

BUDGETED = """\
apiVersion: spendgate/v1
kind: Department
name: budgeted
downgrades:
  big: mid
  mid: small
budgets:
  - name: monthly
    period: month
    limit_usd: 1.00
    downgrade_at_percent: 80
  - name: per-user-daily
    period: day
    limit_usd: 0.10
    per: user
  - name: per-team-weekly
    period: week
    limit_usd: 0.50
    per: team
teams:
  - name: red
    budgets:
      - {name: monthly, period: month, limit_usd: 0.20}
      - {name: user-daily, period: day, limit_usd: 0.05, per: user}
"""

PACED = """\
apiVersion: spendgate/v1
kind: Department
name: paced
downgrades:
  big: mid
budgets:
  - name: monthly
    period: month
    limit_usd: 1.00
  - name: pace
    period: day
    limit_usd: 0.01
    shadow: true
"""

SHADOWY = """\
apiVersion: spendgate/v1
kind: Department
name: shadowy
mode: shadow
models:
  allow: [small]
downgrades:
  mid: small
limits:
  max_input_tokens: 2000
budgets:
  - name: monthly
    period: month
    limit_usd: 0.01
"""

# Rules in shadow: the department's model list, its per-request cap and the
# model list of team strict. Its input limit stays enforced.
TRIAL = """\
apiVersion: spendgate/v1
kind: Department
name: trial
shadow_rules: [models, limits/max_request_usd, teams/strict/models]
models:
  allow: [small, mid]
downgrades:
  big: mid
limits:
  max_input_tokens: 3000
  max_request_usd: 0.005
teams:
  - name: strict
    models:
      allow: [small]
"""

SANDBOX = """\
apiVersion: spendgate/v1
kind: Department
name: sandbox
models:
  allow: [small]
budgets:
  - name: monthly
    period: month
    limit_usd: 1.00
"""


def write_policy(directory: Path, *, organization: str, odd_max_output: str) -> Path:
    """Write the test policy set to `directory` and return it."""
    files = {
        "organization.yaml": organization,
        "catalog.yaml": CATALOG.replace("{odd_max_output}", odd_max_output),
        "departments/eng.yaml": ENG,
        "departments/capped.yaml": CAPPED,
        "departments/budgeted.yaml": BUDGETED,
        "departments/paced.yaml": PACED,
        "departments/shadowy.yaml": SHADOWY,
        "departments/sandbox.yaml": SANDBOX,
        "departments/trial.yaml": TRIAL,
    }
    for name, text in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return directory


@pytest.fixture
def policy(tmp_path: Path) -> Policy:
    """Load the test policy set, where unknown departments are denied."""
    directory = tmp_path / "deny"
    return load_policy(
        write_policy(directory, organization=ORGANIZATION, odd_max_output="1000")
    )


@pytest.fixture
def fallback_policy(tmp_path: Path) -> Policy:
    """Load the test policy set with `unknown_department: sandbox`."""
    organization = ORGANIZATION + "unknown_department: sandbox\n"
    directory = tmp_path / "fallback"
    return load_policy(
        write_policy(directory, organization=organization, odd_max_output="1000")
    )


def evaluate(
    policy: Policy, usage: Mapping[str, Usage] | None = None, **fields: Any
) -> Outcome:
    """Run both phases for one request at NOW."""
    request = Request(**fields)
    return decide(plan(policy, request, NOW), usage or {})


def format_key(rule: str, subject: str, window: str) -> str:
    """Build a BudgetLine.key from its rule, subject and window."""
    return f"{rule}|{subject}|{window}"


BUDGETS = "departments/budgeted/budgets"
RED = "departments/budgeted/teams/red/budgets"
MONTHLY = format_key(f"{BUDGETS}/monthly", "budgeted", MONTH)
ALICE_DAILY = format_key(f"{BUDGETS}/per-user-daily", "alice", DAY)
RED_WEEKLY = format_key(f"{BUDGETS}/per-team-weekly", "red", WEEK)
RED_MONTHLY = format_key(f"{RED}/monthly", "red", MONTH)
RED_ALICE_DAILY = format_key(f"{RED}/user-daily", "alice", DAY)
ALICE_NEXT_DAY = format_key(f"{BUDGETS}/per-user-daily", "alice", "2026-12-05")
SHADOWY_MONTHLY = format_key("departments/shadowy/budgets/monthly", "shadowy", MONTH)

# mid with 1,000 input and 1,000 output tokens: 1,000 x 1 + 1,000 x 3.
MID_1K = {"model": "mid", "input_tokens": 1000, "max_output_tokens": 1000}
MID_ESTIMATE = 4_000
# small with the same tokens: 1,000 x 0.1 + 1,000 x 0.4.
SMALL_ESTIMATE = 500
ALICE = {"department": "budgeted", "user": "alice", **MID_1K}
RED_ALICE = {**ALICE, "team": "red"}


def split_usage(micros: int) -> Usage:
    """Split usage into spent and reserved, since both count against a limit."""
    return Usage(spent_micros=micros - micros // 3, reserved_micros=micros // 3)


@pytest.mark.parametrize(
    ("fields", "usage", "decision", "reason", "rule", "model"),
    [
        pytest.param(
            {"department": "nope", "model": "big", "input_tokens": 10},
            {},
            Decision.DENY,
            Reason.UNKNOWN_DEPARTMENT,
            "organization/unknown_department",
            "",
            id="unknown-department",
        ),
        pytest.param(
            {"department": " ENG ", "model": "mid", "input_tokens": 10},
            {},
            Decision.ALLOW,
            Reason.ALLOWED,
            "departments/eng",
            "mid",
            id="department-case",
        ),
        pytest.param(
            {"department": "budgeted", "model": "gpt-9", "input_tokens": 10},
            {MONTHLY: split_usage(1_000_000)},
            Decision.DENY,
            Reason.UNKNOWN_MODEL,
            "catalog",
            "",
            id="unknown-model-spent-budget",
        ),
        pytest.param(
            {"department": "budgeted", "model": "gpt-9", "input_tokens": 10},
            {},
            Decision.DENY,
            Reason.UNKNOWN_MODEL,
            "catalog",
            "",
            id="unknown-model-empty-budget",
        ),
        pytest.param(
            {"department": "shadowy", "model": "gpt-9", "input_tokens": 10},
            {},
            Decision.DENY,
            Reason.UNKNOWN_MODEL,
            "catalog",
            "",
            id="unknown-model-shadow",
        ),
        pytest.param(
            {"department": "eng", "model": "BIG-latest", "input_tokens": 10},
            {},
            Decision.ALLOW,
            Reason.ALLOWED,
            "departments/eng",
            "big",
            id="alias",
        ),
        pytest.param(
            {"department": "eng", "model": "claude-1", "input_tokens": 10},
            {},
            Decision.ALLOW,
            Reason.ALLOWED,
            "departments/eng",
            "claude-1",
            id="glob-admits",
        ),
        pytest.param(
            {"department": "eng", "model": "claudex-1", "input_tokens": 10},
            {},
            Decision.DENY,
            Reason.MODEL_NOT_ALLOWED,
            "departments/eng/models",
            "",
            id="glob-rejects-claudex",
        ),
        pytest.param(
            {"department": "eng", "model": "legacy", "input_tokens": 10},
            {},
            Decision.DOWNGRADE,
            Reason.MODEL_NOT_ALLOWED,
            "departments/eng/models",
            "mid",
            id="denied-downgrade",
        ),
        pytest.param(
            {"department": "eng", "model": "legacy-v1", "input_tokens": 10},
            {},
            Decision.DOWNGRADE,
            Reason.MODEL_NOT_ALLOWED,
            "departments/eng/models",
            "mid",
            id="denied-by-alias",
        ),
        pytest.param(
            {"department": "eng", "team": "narrow", "model": "big", "input_tokens": 10},
            {},
            Decision.DOWNGRADE,
            Reason.MODEL_NOT_ALLOWED,
            "departments/eng/teams/narrow/models",
            "mid",
            id="team-narrows",
        ),
        pytest.param(
            {"department": "eng", "team": "tiny", "model": "big", "input_tokens": 10},
            {},
            Decision.DOWNGRADE,
            Reason.MODEL_NOT_ALLOWED,
            "departments/eng/teams/tiny/models",
            "small",
            id="team-skips-link",
        ),
        pytest.param(
            {"department": "eng", "team": "closed", "model": "big", "input_tokens": 10},
            {},
            Decision.DENY,
            Reason.MODEL_NOT_ALLOWED,
            "departments/eng/teams/closed/models",
            "",
            id="team-denies",
        ),
        pytest.param(
            {"department": "eng", "team": "narrow", "model": "odd", "input_tokens": 10},
            {},
            Decision.DENY,
            Reason.MODEL_NOT_ALLOWED,
            "departments/eng/teams/narrow/models",
            "",
            id="team-denies-no-chain",
        ),
        pytest.param(
            {
                "department": "eng",
                "team": "narrow",
                "model": "legacy",
                "input_tokens": 10,
            },
            {},
            Decision.DOWNGRADE,
            Reason.MODEL_NOT_ALLOWED,
            "departments/eng/models",
            "mid",
            id="team-department-rule",
        ),
        pytest.param(
            {"department": "eng", "team": "ghost", "model": "big", "input_tokens": 10},
            {},
            Decision.ALLOW,
            Reason.ALLOWED,
            "departments/eng",
            "big",
            id="unknown-team",
        ),
        pytest.param(
            {"department": "eng", "model": "big", "input_tokens": 6000},
            {},
            Decision.ALLOW,
            Reason.ALLOWED,
            "departments/eng",
            "big",
            id="max-input-equal",
        ),
        pytest.param(
            {"department": "eng", "model": "big", "input_tokens": 6001},
            {},
            Decision.DENY,
            Reason.REQUEST_TOO_LARGE,
            "departments/eng/limits/max_input_tokens",
            "",
            id="max-input-over",
        ),
        pytest.param(
            {
                "department": "eng",
                "team": "narrow",
                "model": "small",
                "input_tokens": 6001,
            },
            {},
            Decision.DENY,
            Reason.REQUEST_TOO_LARGE,
            "departments/eng/limits/max_input_tokens",
            "",
            id="max-input-smaller-wins",
        ),
        pytest.param(
            {"department": "eng", "model": "mid", "input_tokens": 5001},
            {},
            Decision.DENY,
            Reason.REQUEST_TOO_LARGE,
            "models/mid/context_window",
            "",
            id="context-window",
        ),
        pytest.param(
            {"department": "eng", "model": "legacy", "input_tokens": 5001},
            {},
            Decision.DOWNGRADE,
            Reason.MODEL_NOT_ALLOWED,
            "departments/eng/models",
            "small",
            id="large-target-skipped",
        ),
        pytest.param(
            {**MID_1K, "department": "capped", "model": "big"},
            {},
            Decision.DOWNGRADE,
            Reason.REQUEST_TOO_EXPENSIVE,
            "departments/capped/limits/max_request_usd",
            "mid",
            id="too-expensive-downgrade",
        ),
        pytest.param(
            {
                "department": "capped",
                "model": "legacy",
                "input_tokens": 1000,
                "max_output_tokens": 1000,
            },
            {},
            Decision.ALLOW,
            Reason.ALLOWED,
            "departments/capped",
            "legacy",
            id="request-cap-equal",
        ),
        pytest.param(
            {
                "department": "capped",
                "model": "legacy",
                "input_tokens": 1001,
                "max_output_tokens": 1000,
            },
            {},
            Decision.DENY,
            Reason.REQUEST_TOO_EXPENSIVE,
            "departments/capped/limits/max_request_usd",
            "",
            id="too-expensive-deny",
        ),
        pytest.param(
            ALICE,
            {ALICE_DAILY: Usage(spent_micros=90_000, reserved_micros=6_000)},
            Decision.ALLOW,
            Reason.ALLOWED,
            "departments/budgeted",
            "mid",
            id="budget-exact-fit",
        ),
        pytest.param(
            ALICE,
            {ALICE_DAILY: Usage(spent_micros=90_000, reserved_micros=6_001)},
            Decision.DOWNGRADE,
            Reason.BUDGET_EXCEEDED,
            f"{BUDGETS}/per-user-daily",
            "small",
            id="budget-one-micro-over",
        ),
        pytest.param(
            ALICE,
            {ALICE_DAILY: split_usage(100_000 - SMALL_ESTIMATE)},
            Decision.DOWNGRADE,
            Reason.BUDGET_EXCEEDED,
            f"{BUDGETS}/per-user-daily",
            "small",
            id="budget-target-exact-fit",
        ),
        pytest.param(
            ALICE,
            {ALICE_DAILY: split_usage(100_000 - SMALL_ESTIMATE + 1)},
            Decision.DENY,
            Reason.BUDGET_EXCEEDED,
            f"{BUDGETS}/per-user-daily",
            "",
            id="budget-deny",
        ),
        pytest.param(
            {**ALICE, "model": "small"},
            {ALICE_DAILY: split_usage(100_000 - SMALL_ESTIMATE + 1)},
            Decision.DENY,
            Reason.BUDGET_EXCEEDED,
            f"{BUDGETS}/per-user-daily",
            "",
            id="budget-deny-no-chain",
        ),
        pytest.param(
            {**ALICE, "user": "bob"},
            {ALICE_DAILY: split_usage(100_000)},
            Decision.ALLOW,
            Reason.ALLOWED,
            "departments/budgeted",
            "mid",
            id="budget-other-user",
        ),
        pytest.param(
            ALICE,
            {ALICE_NEXT_DAY: split_usage(100_000)},
            Decision.ALLOW,
            Reason.ALLOWED,
            "departments/budgeted",
            "mid",
            id="budget-other-window",
        ),
        pytest.param(
            ALICE,
            {MONTHLY: split_usage(799_999)},
            Decision.ALLOW,
            Reason.ALLOWED,
            "departments/budgeted",
            "mid",
            id="threshold-below",
        ),
        pytest.param(
            ALICE,
            {MONTHLY: split_usage(800_000)},
            Decision.DOWNGRADE,
            Reason.BUDGET_THRESHOLD,
            f"{BUDGETS}/monthly",
            "small",
            id="threshold-at",
        ),
        pytest.param(
            {**ALICE, "model": "small"},
            {MONTHLY: split_usage(800_000)},
            Decision.ALLOW,
            Reason.ALLOWED,
            "departments/budgeted",
            "small",
            id="threshold-no-target",
        ),
        pytest.param(
            ALICE,
            {
                MONTHLY: split_usage(800_000),
                ALICE_DAILY: split_usage(100_000 - SMALL_ESTIMATE + 1),
            },
            Decision.DENY,
            Reason.BUDGET_EXCEEDED,
            f"{BUDGETS}/per-user-daily",
            "",
            id="threshold-target-over",
        ),
        pytest.param(
            RED_ALICE,
            {RED_MONTHLY: split_usage(200_000 - MID_ESTIMATE)},
            Decision.ALLOW,
            Reason.ALLOWED,
            "departments/budgeted",
            "mid",
            id="team-budget-fits",
        ),
        pytest.param(
            RED_ALICE,
            {RED_MONTHLY: split_usage(200_000 - MID_ESTIMATE + 1)},
            Decision.DOWNGRADE,
            Reason.BUDGET_EXCEEDED,
            f"{RED}/monthly",
            "small",
            id="team-budget-over",
        ),
        pytest.param(
            RED_ALICE,
            {RED_ALICE_DAILY: split_usage(50_000 - MID_ESTIMATE + 1)},
            Decision.DOWNGRADE,
            Reason.BUDGET_EXCEEDED,
            f"{RED}/user-daily",
            "small",
            id="team-user-budget-over",
        ),
        pytest.param(
            RED_ALICE,
            {RED_WEEKLY: split_usage(500_000 - MID_ESTIMATE + 1)},
            Decision.DOWNGRADE,
            Reason.BUDGET_EXCEEDED,
            f"{BUDGETS}/per-team-weekly",
            "small",
            id="per-team-budget-over",
        ),
        pytest.param(
            ALICE,
            {RED_WEEKLY: split_usage(500_000)},
            Decision.ALLOW,
            Reason.ALLOWED,
            "departments/budgeted",
            "mid",
            id="per-team-other-team",
        ),
    ],
)
def test_decide_table(
    policy: Policy,
    fields: dict[str, Any],
    usage: dict[str, Usage],
    decision: Decision,
    reason: Reason,
    rule: str,
    model: str,
) -> None:
    outcome = evaluate(policy, usage, **fields)

    assert outcome.decision is decision
    assert outcome.reason is reason
    assert outcome.rule == rule
    assert outcome.model == model
    assert outcome.shadow_decision is None
    assert outcome.message


def test_plan_unknown_model_final(policy: Policy) -> None:
    request = Request(department="budgeted", model="gpt-9", input_tokens=10)

    planned = plan(policy, request, NOW)

    assert planned.final is not None
    assert planned.final.decision is Decision.DENY
    assert planned.final.budgets == ()
    assert "gpt-9" in planned.final.message


def test_decide_requested_model_canonical(policy: Policy) -> None:
    outcome = evaluate(policy, department="eng", model="legacy-v1", input_tokens=10)

    assert outcome.requested_model == "legacy"
    assert outcome.model == "mid"
    assert "legacy" in outcome.message
    assert "mid" in outcome.message


def test_decide_unknown_department_fallback(fallback_policy: Policy) -> None:
    request = Request(department="nope", model="small", user="alice", input_tokens=10)

    planned = plan(fallback_policy, request, NOW)
    outcome = decide(planned, {})

    assert outcome.decision is Decision.ALLOW
    assert outcome.rule == "departments/sandbox"
    assert [line.key for line in outcome.budgets] == [
        format_key("departments/sandbox/budgets/monthly", "sandbox", MONTH)
    ]
    assert any("sandbox" in step for step in planned.trace)


def test_decide_fallback_applies_rules(fallback_policy: Policy) -> None:
    monthly = format_key("departments/sandbox/budgets/monthly", "sandbox", MONTH)

    not_allowed = evaluate(
        fallback_policy, department="nope", model="big", input_tokens=10
    )
    over_budget = evaluate(
        fallback_policy,
        {monthly: split_usage(1_000_000)},
        department="nope",
        model="small",
        input_tokens=10,
    )

    assert not_allowed.decision is Decision.DENY
    assert not_allowed.reason is Reason.MODEL_NOT_ALLOWED
    assert not_allowed.rule == "departments/sandbox/models"
    assert over_budget.decision is Decision.DENY
    assert over_budget.reason is Reason.BUDGET_EXCEEDED
    assert over_budget.rule == "departments/sandbox/budgets/monthly"


def test_decide_fallback_unknown_model(fallback_policy: Policy) -> None:
    outcome = evaluate(fallback_policy, department="nope", model="gpt-9")

    assert outcome.decision is Decision.DENY
    assert outcome.reason is Reason.UNKNOWN_MODEL


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        pytest.param({"model": "big"}, 1500, id="absent-department-limit"),
        pytest.param({"model": "big", "max_output_tokens": 3000}, 1500, id="dept"),
        pytest.param({"model": "big", "max_output_tokens": 800}, 800, id="under"),
        pytest.param({"model": "small"}, 1000, id="absent-model-limit"),
        pytest.param({"model": "small", "max_output_tokens": 1200}, 1000, id="model"),
        pytest.param({"model": "mid", "team": "narrow"}, 300, id="absent-team-limit"),
        pytest.param(
            {"model": "mid", "team": "narrow", "max_output_tokens": 1000},
            300,
            id="team",
        ),
        pytest.param({"model": "big", "max_output_tokens": 0}, 0, id="explicit-zero"),
    ],
)
def test_plan_clamps_output(
    policy: Policy, fields: dict[str, Any], expected: int
) -> None:
    outcome = evaluate(policy, department="eng", input_tokens=10, **fields)

    assert outcome.candidate is not None
    assert outcome.candidate.max_output_tokens == expected


def test_plan_output_zero_differs_from_absent(policy: Policy) -> None:
    absent = Request(department="eng", model="big", input_tokens=1000)
    zero = dataclasses.replace(absent, max_output_tokens=0)

    zero_plan = plan(policy, zero, NOW)
    absent_plan = plan(policy, absent, NOW)

    assert zero_plan.requested is not None
    assert absent_plan.requested is not None
    assert zero_plan.requested.max_output_tokens == 0
    assert absent_plan.requested.max_output_tokens == 1500
    # 1,000 x 10 input only, against 1,000 x 10 + 1,500 x 30.
    assert zero_plan.requested.estimate_micros == 10_000
    assert absent_plan.requested.estimate_micros == 55_000


def test_plan_downgrade_clamps_target(policy: Policy) -> None:
    outcome = evaluate(policy, department="eng", model="legacy", input_tokens=10)

    # legacy's own maximum is 1,000, mid's is 2,000, the department's 1,500.
    assert outcome.candidate is not None
    assert outcome.candidate.model.name == "mid"
    assert outcome.candidate.max_output_tokens == 1500


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        pytest.param(
            {"model": "odd", "input_tokens": 3, "max_output_tokens": 1},
            8,
            id="one-rounding",
        ),
        pytest.param(
            {"model": "odd", "input_tokens": 1, "max_output_tokens": 0},
            3,
            id="rounds-up",
        ),
        pytest.param(
            {"model": "odd", "input_tokens": 1, "max_output_tokens": 1}, 3, id="exact"
        ),
        pytest.param(
            {"model": "odd", "input_tokens": 1000, "max_output_tokens": 1000},
            3000,
            id="odd-1k",
        ),
        pytest.param({**MID_1K, "model": "big"}, 40_000, id="big-1k"),
        pytest.param({"model": "big", "input_tokens": 1000}, 55_000, id="clamped"),
        # 6 approximate tokens x 0.1 + 10 x 0.4 = 4.6 micro-USD.
        pytest.param(
            {"model": "small", "prompt": "hello world", "max_output_tokens": 10},
            5,
            id="prompt",
        ),
    ],
)
def test_plan_estimate(policy: Policy, fields: dict[str, Any], expected: int) -> None:
    planned = plan(policy, Request(department="eng", **fields), NOW)

    assert planned.requested is not None
    assert planned.requested.estimate_micros == expected
    assert type(planned.requested.estimate_micros) is int


@pytest.mark.parametrize(
    ("fields", "tokens", "estimated"),
    [
        pytest.param({"model": "mid", "prompt": "hello world"}, 2, False, id="prompt"),
        pytest.param(
            {"model": "legacy", "prompt": "hello world"}, 2, False, id="prompt-cl100k"
        ),
        # Reply primer 3, message 3, "user" 1, "hello world" 2.
        pytest.param(
            {"model": "mid", "messages": [ChatMessage("user", "hello world")]},
            9,
            False,
            id="messages",
        ),
        # 11 characters at 2 characters a token.
        pytest.param(
            {"model": "small", "prompt": "hello world"}, 6, True, id="approximate"
        ),
        # Reply primer 3, message 3, "user" 2, "hello world" 6.
        pytest.param(
            {"model": "small", "messages": [ChatMessage("user", "hello world")]},
            14,
            True,
            id="approximate-messages",
        ),
        pytest.param({"model": "small", "prompt": ""}, 0, True, id="empty-prompt"),
        pytest.param(
            {"model": "small", "input_tokens": 7, "prompt": "hello world"},
            7,
            False,
            id="input-tokens-win",
        ),
    ],
)
def test_plan_counts_input(
    policy: Policy, fields: dict[str, Any], tokens: int, estimated: bool
) -> None:
    planned = plan(policy, Request(department="eng", **fields), NOW)

    assert planned.requested is not None
    assert planned.requested.input_tokens == tokens
    assert planned.requested.input_tokens_estimated is estimated


def test_plan_target_counts_own_tokenizer(policy: Policy) -> None:
    request = Request(department="eng", team="tiny", model="big", prompt="hello world")

    planned = plan(policy, request, NOW)
    outcome = decide(planned, {})

    assert planned.requested is not None
    assert planned.requested.input_tokens == 2
    assert outcome.candidate is not None
    assert outcome.candidate.model.name == "small"
    assert outcome.candidate.input_tokens == 6
    assert outcome.candidate.input_tokens_estimated is True


def test_plan_budget_lines(policy: Policy) -> None:
    request = Request(
        department="budgeted", team="red", user="alice", model="mid", input_tokens=1
    )

    lines = plan(policy, request, NOW).budgets

    assert [line.key for line in lines] == [
        MONTHLY,
        ALICE_DAILY,
        RED_WEEKLY,
        RED_MONTHLY,
        RED_ALICE_DAILY,
    ]
    assert [line.scope for line in lines] == [
        Scope.DEPARTMENT,
        Scope.USER,
        Scope.TEAM,
        Scope.TEAM,
        Scope.USER,
    ]
    assert [line.label for line in lines] == [
        "department:budgeted",
        "user:alice",
        "team:red",
        "team:red",
        "user:alice",
    ]
    assert [line.window for line in lines] == [MONTH, DAY, WEEK, MONTH, DAY]


def test_budget_lines_principal(policy: Policy, fallback_policy: Policy) -> None:
    found = budget_lines(policy, "budgeted", "red", "alice", NOW)
    unknown = budget_lines(policy, "nope", "", "alice", NOW)
    fallback = budget_lines(fallback_policy, "nope", "", "alice", NOW)

    assert found is not None
    assert [line.key for line in found] == [
        MONTHLY,
        ALICE_DAILY,
        RED_WEEKLY,
        RED_MONTHLY,
        RED_ALICE_DAILY,
    ]
    assert unknown is None
    assert fallback is not None
    assert [line.budget.rule for line in fallback] == [
        "departments/sandbox/budgets/monthly"
    ]


@pytest.mark.parametrize(
    ("department", "team", "user"),
    [
        pytest.param("Budgeted", "RED", "Alice", id="upper-case"),
        pytest.param(" budgeted ", " Red ", " ALICE ", id="padded"),
    ],
)
def test_budget_lines_ignore_case(
    policy: Policy, department: str, team: str, user: str
) -> None:
    request = Request(
        department=department, team=team, user=user, model="mid", input_tokens=1
    )

    planned = plan(policy, request, NOW).budgets
    listed = budget_lines(policy, department, team, user, NOW)

    assert [line.key for line in planned] == [
        MONTHLY,
        ALICE_DAILY,
        RED_WEEKLY,
        RED_MONTHLY,
        RED_ALICE_DAILY,
    ]
    assert listed is not None
    assert [line.key for line in listed] == [line.key for line in planned]


def test_decide_user_case_shares_budget(policy: Policy) -> None:
    # The usage was reserved under "alice"; "Alice" reads the same row.
    usage = {ALICE_DAILY: split_usage(100_000)}

    outcome = evaluate(policy, usage, **{**ALICE, "user": "Alice"})

    assert outcome.decision is Decision.DENY
    assert outcome.reason is Reason.BUDGET_EXCEEDED
    assert outcome.rule == f"{BUDGETS}/per-user-daily"


def test_plan_budget_lines_anonymous(policy: Policy) -> None:
    request = Request(department="budgeted", model="mid", input_tokens=1)

    lines = plan(policy, request, NOW).budgets

    # Without a user or team, the per-user and per-team budgets share one
    # row each under the empty subject.
    assert [line.key for line in lines] == [
        MONTHLY,
        format_key(f"{BUDGETS}/per-user-daily", "", DAY),
        format_key(f"{BUDGETS}/per-team-weekly", "", WEEK),
    ]


def test_plan_budget_lines_on_deny(policy: Policy) -> None:
    outcome = evaluate(policy, {ALICE_DAILY: split_usage(100_000)}, **ALICE)

    assert outcome.decision is Decision.DENY
    assert not outcome.reserves
    assert [line.key for line in outcome.budgets] == [
        MONTHLY,
        ALICE_DAILY,
        format_key(f"{BUDGETS}/per-team-weekly", "", WEEK),
    ]


def test_decide_downgrade_reserves_target(policy: Policy) -> None:
    outcome = evaluate(policy, {MONTHLY: split_usage(800_000)}, **ALICE)

    assert outcome.decision is Decision.DOWNGRADE
    assert outcome.reserves
    assert outcome.candidate is not None
    assert outcome.candidate.estimate_micros == SMALL_ESTIMATE


@pytest.mark.parametrize(
    ("fields", "usage", "reason", "rule", "model", "shadow_decision"),
    [
        pytest.param(
            {"model": "big", "input_tokens": 10},
            {},
            Reason.MODEL_NOT_ALLOWED,
            "departments/shadowy/models",
            "big",
            Decision.DENY,
            id="not-allowed",
        ),
        pytest.param(
            {"model": "mid", "input_tokens": 10},
            {},
            Reason.MODEL_NOT_ALLOWED,
            "departments/shadowy/models",
            "mid",
            Decision.DOWNGRADE,
            id="would-downgrade",
        ),
        pytest.param(
            {"model": "small", "input_tokens": 2001},
            {},
            Reason.REQUEST_TOO_LARGE,
            "departments/shadowy/limits/max_input_tokens",
            "small",
            Decision.DENY,
            id="too-large",
        ),
        pytest.param(
            {"model": "small", "input_tokens": 1000, "max_output_tokens": 1000},
            {SHADOWY_MONTHLY: split_usage(10_000 - SMALL_ESTIMATE + 1)},
            Reason.BUDGET_EXCEEDED,
            "departments/shadowy/budgets/monthly",
            "small",
            Decision.DENY,
            id="over-budget",
        ),
        pytest.param(
            {"model": "small", "input_tokens": 1000, "max_output_tokens": 1000},
            {},
            Reason.ALLOWED,
            "departments/shadowy",
            "small",
            Decision.ALLOW,
            id="fits",
        ),
    ],
)
def test_decide_shadow_department(
    policy: Policy,
    fields: dict[str, Any],
    usage: dict[str, Usage],
    reason: Reason,
    rule: str,
    model: str,
    shadow_decision: Decision,
) -> None:
    outcome = evaluate(policy, usage, department="shadowy", **fields)

    assert outcome.decision is Decision.ALLOW
    assert outcome.shadow_decision is shadow_decision
    assert outcome.shadow is True
    assert outcome.reason is reason
    assert outcome.rule == rule
    assert outcome.model == model
    assert outcome.message.startswith("Shadow mode:")
    assert shadow_decision.value in outcome.message


PACE = format_key("departments/paced/budgets/pace", "paced", DAY)
PACED_MONTHLY = format_key("departments/paced/budgets/monthly", "paced", MONTH)


@pytest.mark.parametrize(
    ("fields", "usage", "decision", "model", "shadow_decision"),
    [
        pytest.param(
            MID_1K,
            {PACE: split_usage(10_000 - MID_ESTIMATE)},
            Decision.ALLOW,
            "mid",
            None,
            id="fits",
        ),
        pytest.param(
            MID_1K,
            {PACE: split_usage(10_000 - MID_ESTIMATE + 1)},
            Decision.ALLOW,
            "mid",
            Decision.DENY,
            id="would-deny",
        ),
        # big costs 100 x 10 + 100 x 30 = 4,000 and mid 100 x 1 + 100 x 3 = 400.
        pytest.param(
            {"model": "big", "input_tokens": 100, "max_output_tokens": 100},
            {PACE: split_usage(10_000 - 4_000 + 1)},
            Decision.ALLOW,
            "big",
            Decision.DOWNGRADE,
            id="would-downgrade",
        ),
        pytest.param(
            MID_1K,
            {PACE: split_usage(10_000), PACED_MONTHLY: split_usage(1_000_000)},
            Decision.DENY,
            "",
            None,
            id="enforced-denies-too",
        ),
    ],
)
def test_decide_shadow_budget(
    policy: Policy,
    fields: dict[str, Any],
    usage: dict[str, Usage],
    decision: Decision,
    model: str,
    shadow_decision: Decision | None,
) -> None:
    outcome = evaluate(policy, usage, department="paced", **fields)

    assert outcome.decision is decision
    assert outcome.model == model
    assert outcome.shadow_decision is shadow_decision
    assert [line.key for line in outcome.budgets] == [PACED_MONTHLY, PACE]


def test_plan_estimate_fraction_written(tmp_path: Path) -> None:
    directory = write_policy(
        tmp_path, organization=ORGANIZATION, odd_max_output="1000.0"
    )
    policy = load_policy(directory)

    planned = plan(policy, Request(department="eng", model="odd", input_tokens=1), NOW)

    # 1 x 2.5 + 1,000 x 0.5 = 502.5 micro-USD, rounded up.
    assert planned.requested is not None
    assert planned.requested.estimate_micros == 503


@pytest.mark.parametrize(
    ("fields", "decision", "model", "shadow_decision", "shadowed"),
    [
        pytest.param(
            # Enforced, big fails the model list and mid the cap: DENY.
            {"model": "big", "input_tokens": 1000},
            Decision.ALLOW,
            "big",
            Decision.DENY,
            "departments/trial/models",
            id="model-list",
        ),
        pytest.param(
            # mid's estimate of 7,000 micro-USD is over the 5,000 cap.
            {"model": "mid", "input_tokens": 1000},
            Decision.ALLOW,
            "mid",
            Decision.DENY,
            "departments/trial/limits/max_request_usd",
            id="request-cap",
        ),
        pytest.param(
            {"model": "mid", "input_tokens": 1000, "max_output_tokens": 100},
            Decision.ALLOW,
            "mid",
            None,
            "",
            id="passes-all",
        ),
        pytest.param(
            {
                "team": "strict",
                "model": "mid",
                "input_tokens": 1000,
                "max_output_tokens": 100,
            },
            Decision.ALLOW,
            "mid",
            Decision.DENY,
            "departments/trial/teams/strict/models",
            id="team-model-list",
        ),
    ],
)
def test_decide_shadow_rule(
    policy: Policy,
    fields: dict[str, Any],
    decision: Decision,
    model: str,
    shadow_decision: Decision | None,
    shadowed: str,
) -> None:
    outcome = evaluate(policy, department="trial", **fields)

    assert outcome.decision is decision
    assert outcome.model == model
    assert outcome.shadow_decision is shadow_decision
    assert outcome.reason is Reason.ALLOWED
    if shadowed:
        assert f"Shadow rule {shadowed} would have answered" in outcome.message
    else:
        assert "Shadow rule" not in outcome.message


def test_decide_enforced_rule_beats_shadow(policy: Policy) -> None:
    # big fails the shadow model list and the enforced input limit.
    outcome = evaluate(policy, department="trial", model="big", input_tokens=4000)

    assert outcome.decision is Decision.DENY
    assert outcome.reason is Reason.REQUEST_TOO_LARGE
    assert outcome.rule == "departments/trial/limits/max_input_tokens"
    assert outcome.shadow_decision is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        pytest.param(
            {"department": "eng", "model": "mid", "input_tokens": 6500},
            "The input is larger than the limit for mid "
            "(6,500 input tokens, limit 6,000).",
            id="input-limit",
        ),
        pytest.param(
            {
                "department": "eng",
                "team": "narrow",
                "model": "mid",
                "input_tokens": 5500,
            },
            "The input is larger than the limit for mid "
            "(5,500 input tokens, context window 5,000).",
            id="context-window",
        ),
        pytest.param(
            # big: 1,000 x 10.00 + 4,000 x 30.00 = 130,000 micro-USD.
            {"department": "capped", "model": "big", "input_tokens": 1000},
            "The estimated cost of big is over the per-request cap "
            "(estimate $0.130000, cap $0.020000), so mid is used instead.",
            id="request-cap",
        ),
    ],
)
def test_limit_message_gives_figures(
    policy: Policy, fields: dict[str, Any], message: str
) -> None:
    assert evaluate(policy, **fields).message == message
