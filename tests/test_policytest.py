"""Tests for `spendgate test` and `spendgate explain`, run through click's CliRunner."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from pathlib import Path
from xml.etree import ElementTree

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine, func, select

from conftest import PolicyWriter
from spendgate import evaluator
from spendgate.cli import main
from spendgate.ledger import Ledger, Principal, create_engine
from spendgate.ledger._tables import budget_usage
from spendgate.policy import load_policy
from spendgate.policytest import read_tests

SHIPPED = Path(__file__).resolve().parent.parent / "policies"

ORGANIZATION = """\
apiVersion: spendgate/v1
kind: Organization
name: acme
timezone: America/New_York
"""

# At 10,000 input tokens and the 1,000 output tokens both models are clamped
# to, big costs 10,000 x 10.00 + 1,000 x 30.00 = 130,000 micro-USD and small
# 10,000 x 1.00 + 1,000 x 2.00 = 12,000.
CATALOG = """\
apiVersion: spendgate/v1
kind: ModelCatalog
models:
  - name: big
    tokenizer: o200k_base
    price_per_million_tokens: {input: 10.00, output: 30.00}
    context_window: 200000
    max_output_tokens: 1000
  - name: small
    tokenizer: o200k_base
    price_per_million_tokens: {input: 1.00, output: 2.00}
    context_window: 200000
    max_output_tokens: 1000
"""

DEPARTMENT = """\
apiVersion: spendgate/v1
kind: Department
name: eng
downgrades:
  big: small
limits:
  max_input_tokens: 150000
budgets:
  - name: monthly
    period: month
    limit_usd: 100
    downgrade_at_percent: 80
  - name: per-user-daily
    period: day
    limit_usd: 5
    per: user
teams:
  - name: web
    budgets:
      - {name: monthly, period: month, limit_usd: 20}
    models:
      allow: [small]
"""

# departments/eng/models is not among them: eng allows the whole catalog.
RULE_COUNT = 10

PASSING = """\
apiVersion: spendgate/v1
kind: PolicyTest
name: eng past its threshold
now: 2026-03-18T10:00:00-04:00
spend:
  - {department: eng, budget: monthly, spent_usd: 85}
cases:
  - name: big moves to small past 80 percent
    request: {department: eng, user: u1, model: big, input_tokens: 10000}
    expect:
      decision: DOWNGRADE
      model: small
      reason_code: BUDGET_THRESHOLD
      rule: departments/eng/budgets/monthly
      estimated_cost_usd: 0.012
  - name: unknown department denied
    request: {department: sales, model: big, input_tokens: 10}
    expect: {decision: DENY, reason_code: UNKNOWN_DEPARTMENT}
---
apiVersion: spendgate/v1
kind: PolicyTest
name: cases start from the same usage
now: 2026-03-18T10:00:00-04:00
spend:
  - {department: eng, budget: per-user-daily, user: u1, spent_usd: 4.8}
cases:
  # Each fits the 0.20 USD left, but two together would not.
  - name: first big call
    request: {department: eng, user: u1, model: big, input_tokens: 10000}
    expect: {decision: ALLOW, model: big, rule: departments/eng}
  - name: second big call
    request: {department: eng, user: u1, model: big, input_tokens: 10000}
    expect: {decision: ALLOW, model: big, rule: departments/eng}
"""

# The failing case starts on line 9, column 5.
FAILING = """\
apiVersion: spendgate/v1
kind: PolicyTest
name: eng expectations
now: 2026-03-18T10:00:00-04:00
cases:
  - name: right
    request: {department: eng, model: big, input_tokens: 10000}
    expect: {decision: ALLOW, model: big}
  - name: wrong
    request: {department: eng, team: web, model: big, input_tokens: 10000}
    expect: {decision: ALLOW, model: big, reason_code: ALLOWED}
"""

# Schema errors stop a document before its names are checked, so the
# second document carries the errors found against the policy.
INVALID = """\
apiVersion: spendgate/v1
kind: PolicyTest
name: schema errors
now: 2026-03-18T10:00:00-04:00
cases:
  - name: typo in expect
    request: {department: eng, model: big, input_tokens: many}
    expct: {decision: ALLOW}
---
apiVersion: spendgate/v1
kind: PolicyTest
name: reference errors
now: 2026-03-18T10:00:00
spend:
  - {department: engg, budget: monthly, spent_usd: 1}
  - {department: eng, budget: montly, spent_usd: 1}
  - {department: eng, team: webb, budget: monthly, spent_usd: 1}
  - {department: eng, budget: per-user-daily, spent_usd: 1}
cases:
  - name: unknown model in expect
    request: {department: eng, model: big, prompt: hello, input_tokens: 10}
    expect: {decision: ALLOW, model: bigg}
"""


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


@pytest.fixture
def policy_dir(write_policy: PolicyWriter) -> Path:
    """A valid policy directory without any test file."""
    return write_policy(
        {
            "organization.yaml": ORGANIZATION,
            "catalog.yaml": CATALOG,
            "departments/eng.yaml": DEPARTMENT,
        }
    )


def with_tests(directory: Path, text: str, name: str = "tests/eng.yaml") -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return directory


def test_shipped_policies_pass() -> None:
    result = run("test", str(SHIPPED))

    assert result.exit_code == 0, result.output
    assert " passed, 0 failed" in result.stdout


def test_passing_tests_exit_0(policy_dir: Path) -> None:
    result = run("test", str(with_tests(policy_dir, PASSING)))

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    uncovered = RULE_COUNT - 3
    assert lines[0] == f"4 passed, 0 failed, {uncovered} rules not exercised"
    assert "FAIL" not in result.stdout


def test_failing_case_expected_actual(policy_dir: Path) -> None:
    result = run("test", str(with_tests(policy_dir, FAILING)))

    assert result.exit_code == 4, result.output
    out = result.stdout
    assert "FAIL tests/eng.yaml:9:5: eng expectations: wrong" in out
    assert "expected: decision ALLOW, model big, reason_code ALLOWED" in out
    assert (
        "actual:   decision DOWNGRADE, model small, reason_code MODEL_NOT_ALLOWED"
        in out
    )
    assert "differs:  decision, model, reason_code" in out
    assert "decided by rule departments/eng/teams/web/models" in out
    assert "big: MODEL_NOT_ALLOWED by departments/eng/teams/web/models" in out
    assert "small on departments/eng/teams/web/budgets/monthly (team:web)" in out
    assert "1 passed, 1 failed" in out
    assert "FAIL tests/eng.yaml:6:5" not in out


def test_no_policy_test_exit_5(policy_dir: Path) -> None:
    result = run("test", str(policy_dir))

    assert result.exit_code == 5
    assert "no test ran" in result.stderr
    assert "PolicyTest" in result.stderr


def test_policy_test_anywhere_counts(policy_dir: Path) -> None:
    result = run("test", str(with_tests(policy_dir, PASSING, "checks.yml")))

    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("4 passed, 0 failed")


def test_invalid_policy_exit_3(policy_dir: Path) -> None:
    with_tests(policy_dir, PASSING)
    (policy_dir / "departments/eng.yaml").write_text(
        DEPARTMENT.replace("limit_usd: 100", "limit_usd: lots"), encoding="utf-8"
    )

    result = run("test", str(policy_dir))

    assert result.exit_code == 3
    assert "departments/eng.yaml:11:16: budgets[0].limit_usd:" in result.stderr
    assert "invalid policy, 1 error" in result.stderr


def test_missing_directory_exit_2(tmp_path: Path) -> None:
    result = run("test", str(tmp_path / "absent"))

    assert result.exit_code == 2
    assert "is not a directory" in result.stderr


@pytest.mark.parametrize(
    "expected",
    [
        pytest.param(
            "tests/bad.yaml:6:5: cases[0]: missing required key 'expect'",
            id="missing-key",
        ),
        pytest.param(
            "tests/bad.yaml:7:58: cases[0].request.input_tokens: must be an "
            'integer, got "many"',
            id="wrong-type",
        ),
        pytest.param(
            "tests/bad.yaml:8:5: cases[0].expct: unknown key 'expct'; "
            'did you mean "expect"?',
            id="unknown-key",
        ),
        pytest.param(
            'tests/bad.yaml:13:6: now: "2026-03-18T10:00:00" must carry a UTC offset',
            id="now-offset",
        ),
        pytest.param(
            "tests/bad.yaml:15:18: spend[0].department: unknown department "
            "'engg'; did you mean \"eng\"?",
            id="unknown-department",
        ),
        pytest.param(
            "tests/bad.yaml:16:31: spend[1].budget: unknown budget 'montly' of "
            "department 'eng'; did you mean \"monthly\"?",
            id="unknown-budget",
        ),
        pytest.param(
            "tests/bad.yaml:17:29: spend[2].team: unknown team 'webb' of "
            "department 'eng'; did you mean \"web\"?",
            id="unknown-team",
        ),
        pytest.param(
            "tests/bad.yaml:18:5: spend[3]: budget departments/eng/budgets/"
            "per-user-daily is per user, so the entry needs `user`",
            id="per-user-needs-user",
        ),
        pytest.param(
            "tests/bad.yaml:21:73: cases[0].request.input_tokens: give only one "
            "of prompt, messages or input_tokens",
            id="two-inputs",
        ),
        pytest.param(
            "tests/bad.yaml:22:38: cases[0].expect.model: unknown model 'bigg'; "
            'it is not in the catalog; did you mean "big"?',
            id="unknown-model",
        ),
    ],
)
def test_invalid_test_file_located(policy_dir: Path, expected: str) -> None:
    result = run("test", str(with_tests(policy_dir, INVALID, "tests/bad.yaml")))

    assert result.exit_code == 3
    assert expected in result.stderr
    assert "invalid policy tests, 10 errors" in result.stderr


def test_spend_resolves_budget_keys(policy_dir: Path) -> None:
    # 02:00 UTC on 1 April is still 31 March in New York.
    text = """\
apiVersion: spendgate/v1
kind: PolicyTest
name: keys
now: 2026-04-01T02:00:00Z
spend:
  - {department: eng, budget: monthly, spent_usd: 1}
  - {department: eng, budget: per-user-daily, user: " u1 ", reserved_usd: 0.5}
  - {department: eng, team: web, budget: monthly, spent_usd: 2.000001}
cases:
  - name: any
    request: {department: eng, model: big, input_tokens: 10}
    expect: {decision: ALLOW}
"""
    with_tests(policy_dir, text)

    loaded = read_tests(policy_dir, load_policy(policy_dir))

    assert loaded.errors == []
    usage = loaded.tests[0].usage
    assert set(usage) == {
        "departments/eng/budgets/monthly|eng|2026-03",
        "departments/eng/budgets/per-user-daily|u1|2026-03-31",
        "departments/eng/teams/web/budgets/monthly|web|2026-03",
    }
    assert usage["departments/eng/budgets/monthly|eng|2026-03"].spent_micros == (
        1_000_000
    )
    daily = usage["departments/eng/budgets/per-user-daily|u1|2026-03-31"]
    assert daily.reserved_micros == 500_000
    assert daily.spent_micros == 0
    web = usage["departments/eng/teams/web/budgets/monthly|web|2026-03"]
    assert web.spent_micros == 2_000_001


def test_spend_user_ignores_case(policy_dir: Path) -> None:
    # small would cost 0.012 USD, so 4.99 USD spent leaves no room for either
    # model, whichever letter case the user name has.
    text = """\
apiVersion: spendgate/v1
kind: PolicyTest
name: user names ignore case
now: 2026-03-18T10:00:00-04:00
spend:
  - {department: eng, budget: per-user-daily, user: " Alice ", spent_usd: 4.99}
cases:
  - name: lower case
    request: {department: eng, user: alice, model: big, input_tokens: 10000}
    expect: {decision: DENY, rule: departments/eng/budgets/per-user-daily}
  - name: upper case
    request: {department: eng, user: ALICE, model: big, input_tokens: 10000}
    expect: {decision: DENY, rule: departments/eng/budgets/per-user-daily}
"""
    with_tests(policy_dir, text)

    loaded = read_tests(policy_dir, load_policy(policy_dir))
    result = run("test", str(policy_dir))

    assert loaded.errors == []
    assert set(loaded.tests[0].usage) == {
        "departments/eng/budgets/per-user-daily|alice|2026-03-18"
    }
    assert result.exit_code == 0, result.output


def test_junit_counts(policy_dir: Path, tmp_path: Path) -> None:
    with_tests(policy_dir, FAILING)
    with_tests(policy_dir, PASSING, "tests/more.yaml")
    report = tmp_path / "junit.xml"

    result = run("test", str(policy_dir), "--format", "junit", "--output", str(report))

    assert result.exit_code == 4, result.output
    assert result.stdout.startswith("5 passed, 1 failed")
    root = ElementTree.parse(report).getroot()
    assert root.tag == "testsuites"
    assert root.get("tests") == "6"
    assert root.get("failures") == "1"
    suites = root.findall("testsuite")
    assert [suite.get("name") for suite in suites] == [
        "eng expectations",
        "eng past its threshold",
        "cases start from the same usage",
    ]
    assert [suite.get("tests") for suite in suites] == ["2", "2", "2"]
    assert [suite.get("failures") for suite in suites] == ["1", "0", "0"]
    failures = root.findall(".//testcase/failure")
    assert len(failures) == 1
    assert "decision: expected ALLOW, got DOWNGRADE" in (
        failures[0].get("message") or ""
    )
    assert "tests/eng.yaml:9:5" in (failures[0].text or "")


def test_junit_to_stdout(policy_dir: Path) -> None:
    result = run("test", str(with_tests(policy_dir, PASSING)), "--format", "junit")

    assert result.exit_code == 0, result.output
    root = ElementTree.fromstring(result.stdout)
    assert root.get("tests") == "4"
    assert root.get("failures") == "0"
    assert len(root.findall(".//testcase")) == 4
    assert root.findall(".//failure") == []


def test_uncovered_rules_listed(policy_dir: Path) -> None:
    result = run("test", str(with_tests(policy_dir, PASSING)))

    listed = [
        line.removeprefix("info: rule not exercised: ")
        for line in result.stdout.splitlines()
        if line.startswith("info: ")
    ]
    assert listed == [
        "catalog",
        "departments/eng/limits/max_input_tokens",
        "departments/eng/budgets/per-user-daily",
        "departments/eng/teams/web/models",
        "departments/eng/teams/web/budgets/monthly",
        "models/big/context_window",
        "models/small/context_window",
    ]


def explain(policy_dir: Path, *extra: str) -> Result:
    return run(
        "explain",
        str(policy_dir),
        "--department",
        "eng",
        "--user",
        "u1",
        "--model",
        "big",
        "--input-tokens",
        "10000",
        "--max-output-tokens",
        "1000",
        "--at",
        "2026-03-18T10:00:00-04:00",
        *extra,
    )


def test_explain_budget_exceeded(policy_dir: Path) -> None:
    result = explain(policy_dir, "--spend", "per-user-daily:u1=4.99")

    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "department: eng (enforced)" in out
    assert (
        "departments/eng/budgets/per-user-daily (user:u1, day 2026-03-18): "
        "spent $4.990000, reserved $0.000000, limit $5.000000"
    ) in out
    assert "departments/eng/budgets/monthly (department:eng, month 2026-03)" in out
    assert "big: 10000 input tokens (exact), 1000 output tokens, $0.130000" in out
    assert (
        "big on departments/eng/budgets/per-user-daily (user:u1): used $4.990000 "
        "+ estimate $0.130000 = $5.120000 vs limit $5.000000: over the limit"
    ) in out
    assert (
        "small on departments/eng/budgets/per-user-daily (user:u1): used "
        "$4.990000 + estimate $0.012000 = $5.002000 vs limit $5.000000: "
        "over the limit"
    ) in out
    assert "threshold 80% of departments/eng/budgets/monthly" in out
    assert "decision: DENY\n" in out
    assert "reason_code: BUDGET_EXCEEDED\n" in out
    assert "rule: departments/eng/budgets/per-user-daily\n" in out


@pytest.mark.parametrize(
    "options",
    [
        pytest.param(["--spend", "per-user-daily:U1=4.99"], id="spend-upper-case"),
        pytest.param(
            ["--user", " U1 ", "--spend", "per-user-daily:u1=4.99"],
            id="user-upper-case",
        ),
    ],
)
def test_explain_user_ignores_case(policy_dir: Path, options: list[str]) -> None:
    result = explain(policy_dir, *options)

    assert result.exit_code == 0, result.output
    assert (
        "departments/eng/budgets/per-user-daily (user:u1, day 2026-03-18): "
        "spent $4.990000, reserved $0.000000, limit $5.000000"
    ) in result.stdout
    assert "decision: DENY\n" in result.stdout
    assert "rule: departments/eng/budgets/per-user-daily\n" in result.stdout


def test_explain_json(policy_dir: Path) -> None:
    result = explain(policy_dir, "--spend", "monthly=85", "--format", "json")

    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["decision"] == "DOWNGRADE"
    assert payload["effective_model"] == "small"
    assert payload["reason_code"] == "BUDGET_THRESHOLD"
    assert payload["rule"] == "departments/eng/budgets/monthly"
    assert payload["estimated_cost_micros"] == 12_000
    monthly = payload["budgets"][0]
    assert monthly["rule"] == "departments/eng/budgets/monthly"
    assert monthly["window"] == "2026-03"
    assert monthly["spent_micros"] == 85_000_000
    assert monthly["downgrade_at_percent"] == "80"
    assert payload["thresholds"][0]["reached"] is True


def test_explain_team_budget_spend(policy_dir: Path) -> None:
    result = explain(
        policy_dir,
        "--team",
        "web",
        "--model",
        "small",
        "--spend",
        "web/monthly=19.995",
        "--spend",
        "departments/eng/budgets/monthly=1",
    )

    assert result.exit_code == 0, result.output
    assert "spent $19.995000, reserved $0.000000, limit $20.000000" in result.stdout
    assert "spent $1.000000, reserved $0.000000, limit $100.000000" in result.stdout
    assert "rule: departments/eng/teams/web/budgets/monthly\n" in result.stdout


def test_explain_reads_sqlite_ledger(policy_dir: Path, sqlite_url: str) -> None:
    policy = load_policy(policy_dir)
    at = datetime.fromisoformat("2026-03-18T09:00:00-04:00")
    request = evaluator.Request(
        department="eng", model="big", user="u1", input_tokens=100000
    )
    engine = create_engine(sqlite_url, pool_size=1)
    try:
        # Reserves 100,000 x 10.00 + 1,000 x 30.00 = 1.03 USD on each budget.
        Ledger(engine).check(
            request_id=uuid.uuid4().hex,
            principal=Principal("eng", "", "u1", "tests"),
            plan=evaluator.plan(policy, request, at),
            policy_version=policy.version,
            reservation_ttl=policy.organization.reservation_ttl,
            labels={},
            now=at,
        )
        rows_before = _count_rows(engine)

        result = explain(policy_dir, "--database", sqlite_url, "--user", "u2")
        result_u1 = explain(policy_dir, "--database", sqlite_url)

        rows_after = _count_rows(engine)
    finally:
        engine.dispose()

    assert result.exit_code == 0, result.output
    assert (
        "departments/eng/budgets/monthly (department:eng, month 2026-03): "
        "spent $0.000000, reserved $1.030000"
    ) in result.stdout
    assert (
        "departments/eng/budgets/per-user-daily (user:u2, day 2026-03-18): "
        "spent $0.000000, reserved $0.000000"
    ) in result.stdout
    assert "per-user-daily (user:u1, day 2026-03-18): spent $0.000000, " in (
        result_u1.stdout
    )
    assert "reserved $1.030000, limit $5.000000" in result_u1.stdout
    assert "usage from: sqlite:///" in result.stdout
    assert rows_after == rows_before


def _count_rows(engine: Engine) -> int:
    with engine.connect() as connection:
        count = connection.execute(select(func.count()).select_from(budget_usage))
        value = int(count.scalar_one())
        connection.rollback()
    return value


def test_explain_missing_database_file(policy_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "absent.db"

    result = explain(policy_dir, "--database", f"sqlite:///{missing}")

    assert result.exit_code == 2
    assert "not found" in result.stderr
    assert not missing.exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param(
            ["--spend", "yearly=1"],
            "'yearly' is not a budget of this request",
            id="unknown-budget",
        ),
        pytest.param(
            ["--spend", "per-user-daily:u9=1"],
            "names user 'u9', but the request is counted as user:u1",
            id="other-subject",
        ),
        pytest.param(
            ["--spend", "monthly=-1"],
            "is not a USD amount",
            id="negative-usd",
        ),
        pytest.param(
            ["--spend", "monthly"],
            "is not BUDGET[:SUBJECT]=USD",
            id="no-amount",
        ),
        pytest.param(
            ["--spend", "monthly=1", "--database", "sqlite:///x.db"],
            "either --database or --spend",
            id="both-sources",
        ),
        pytest.param(
            ["--at", "2026-03-18T10:00:00"],
            "has no UTC offset",
            id="naive-time",
        ),
        pytest.param(
            ["--prompt", "hello"],
            "exactly one of --prompt, --prompt-file or --input-tokens",
            id="two-inputs",
        ),
    ],
)
def test_explain_usage_errors(
    policy_dir: Path, options: list[str], message: str
) -> None:
    result = explain(policy_dir, *options)

    assert result.exit_code == 2
    assert message in result.stderr


def test_explain_unknown_department(policy_dir: Path) -> None:
    result = run(
        "explain",
        str(policy_dir),
        "--department",
        "sales",
        "--model",
        "big",
        "--prompt",
        "hello",
    )

    assert result.exit_code == 0, result.output
    assert "'sales' is not defined, and unknown departments are denied" in (
        result.stdout
    )
    assert "budgets: none apply" in result.stdout
    assert "decision: DENY\n" in result.stdout
    assert "rule: organization/unknown_department\n" in result.stdout


def test_unknown_rule_warns(policy_dir: Path) -> None:
    text = FAILING.replace(
        "expect: {decision: ALLOW, model: big}",
        "expect: {decision: ALLOW, model: big, rule: departments/eng/budget/monthly}",
    )

    result = run("test", str(with_tests(policy_dir, text)))

    assert result.exit_code == 4
    assert (
        "warning: tests/eng.yaml:8:49: cases[0].expect.rule: "
        "'departments/eng/budget/monthly' is not a rule id of this policy; "
        'did you mean "departments/eng/budgets/monthly"?'
    ) in result.stderr
    assert "expected: decision ALLOW, model big, rule departments/eng/budget/" in (
        result.stdout
    )
