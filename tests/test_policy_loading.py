"""Tests for spendgate.policy loading: the compiled policy and every located error."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from spendgate.errors import PolicyError, Problem
from spendgate.policy import (
    Budget,
    ExpiryAction,
    Limits,
    Scope,
    load_policy,
    read_policy,
)
from spendgate.windows import Period

SHIPPED = Path(__file__).resolve().parent.parent / "policies"

ORGANIZATION = """\
apiVersion: spendgate/v1
kind: Organization
name: acme
timezone: Europe/Berlin
"""

CATALOG = """\
apiVersion: spendgate/v1
kind: ModelCatalog
models:
  - name: big
    aliases: [big-2025]
    tokenizer: o200k_base
    price_per_million_tokens: {input: 2.50, output: 10.00}
    context_window: 128000
    max_output_tokens: 16384
  - name: small
    tokenizer: approximate
    chars_per_token: 3.5
    price_per_million_tokens: {input: 0.10, cached_input: 0.025, output: 0.40}
    context_window: 128000
    max_output_tokens: 8192
  - name: legacy
    tokenizer: cl100k_base
    price_per_million_tokens: {input: 10.00, output: 30.00}
    context_window: 16385
    max_output_tokens: 4096
"""

DEPARTMENT = """\
apiVersion: spendgate/v1
kind: Department
name: eng
models:
  allow: [big, small]
downgrades:
  big: small
limits:
  max_output_tokens: 4096
budgets:
  - name: monthly
    period: month
    limit_usd: 100
teams:
  - name: web
"""

BASE = {
    "organization.yaml": ORGANIZATION,
    "catalog.yaml": CATALOG,
    "departments/eng.yaml": DEPARTMENT,
}

# A fourth catalog entry, appended at line 21 of catalog.yaml.
EXTRA_MODEL = """\
  - name: {name}
    aliases: [{alias}]
    tokenizer: o200k_base
    price_per_million_tokens: {{input: 1.00, output: 2.00}}
    context_window: 1000
    max_output_tokens: 100
"""


def edit(text: str, old: str, new: str) -> str:
    """Replace the one occurrence of `old`, so a stale case fails loudly."""
    assert text.count(old) == 1, f"{old!r} must occur once"
    return text.replace(old, new)


def write_policy(root: Path, overrides: Mapping[str, str | None] | None = None) -> Path:
    """Write BASE, changed by `overrides`, to root/policies. None omits a file."""
    directory = root / "policies"
    for name, text in {**BASE, **(overrides or {})}.items():
        if text is None:
            continue
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return directory


@dataclass(frozen=True)
class Expected:
    """Location a problem must be reported at, and words its message must contain."""

    file: str
    line: int
    column: int
    path: str
    fragments: tuple[str, ...]


def locate(problem: Problem | Expected) -> tuple[str, int, int, str]:
    """Return the file, line, column and key path of a problem."""
    return problem.file, problem.line, problem.column, problem.path


ENG = "departments/eng.yaml"
OPS = "departments/ops.yaml"


def test_read_policy_minimal(tmp_path: Path) -> None:
    directory = write_policy(tmp_path)

    result = read_policy(directory)

    assert result.errors == []
    assert result.warnings == []
    assert result.files == ["catalog.yaml", ENG, "organization.yaml"]
    policy = result.policy
    assert policy is not None
    assert policy.organization.name == "acme"
    assert policy.organization.timezone == ZoneInfo("Europe/Berlin")
    assert policy.organization.reservation_ttl == timedelta(minutes=15)
    assert policy.organization.on_reservation_expiry is ExpiryAction.CHARGE
    assert policy.organization.unknown_department is None
    assert set(policy.models) == {"big", "small", "legacy"}
    assert policy.model_names["big-2025"] == "big"


def test_read_policy_minimal_models(tmp_path: Path) -> None:
    policy = load_policy(write_policy(tmp_path))

    big = policy.models["big"]
    small = policy.models["small"]

    assert big.input_price_micros == 2_500_000
    assert big.cached_input_price_micros == 2_500_000  # defaults to input
    assert big.output_price_micros == 10_000_000
    assert big.aliases == ("big-2025",)
    assert big.chars_per_token is None
    assert big.context_window == 128_000
    assert big.max_output_tokens == 16_384
    assert small.cached_input_price_micros == 25_000
    assert small.chars_per_token == Decimal("3.5")
    assert policy.resolve_model(" BIG-2025 ") is big


def test_read_policy_minimal_department(tmp_path: Path) -> None:
    policy = load_policy(write_policy(tmp_path))

    eng = policy.departments["eng"]

    assert eng.shadow is False
    assert eng.allowed_models == frozenset({"big", "small"})
    assert eng.models_rule == "departments/eng/models"
    assert dict(eng.chains) == {"big": ("small",)}
    assert eng.limits == Limits(max_output_tokens=4096)
    assert eng.budgets == (
        Budget(
            rule="departments/eng/budgets/monthly",
            name="monthly",
            period=Period.MONTH,
            limit_micros=100_000_000,
            per=Scope.DEPARTMENT,
            threshold_basis_points=None,
            shadow=False,
        ),
    )
    web = eng.teams["web"]
    assert web.allowed_models == eng.allowed_models
    assert web.models_rule == "departments/eng/teams/web/models"
    assert web.limits == eng.limits
    assert web.budgets == ()


TEAM_BUDGET = """\
    budgets:
      - {name: daily, period: day, limit_usd: 5}
"""


def test_read_policy_optional_settings(tmp_path: Path) -> None:
    organization = ORGANIZATION + (
        "reservation_ttl: 2h\non_reservation_expiry: release\nunknown_department: eng\n"
    )
    department = edit(
        DEPARTMENT,
        "    limit_usd: 100\n",
        "    limit_usd: 100\n"
        "    downgrade_at_percent: 92.5\n"
        "    shadow: true\n"
        "    per: user\n",
    )
    department = edit(department, "  - name: web\n", "  - name: web\n" + TEAM_BUDGET)
    directory = write_policy(
        tmp_path, {"organization.yaml": organization, ENG: department}
    )

    policy = load_policy(directory)

    assert policy.organization.reservation_ttl == timedelta(hours=2)
    assert policy.organization.on_reservation_expiry is ExpiryAction.RELEASE
    assert policy.organization.unknown_department == "eng"
    budget = policy.departments["eng"].budgets[0]
    assert budget.threshold_basis_points == 9250
    assert budget.shadow is True
    assert budget.per is Scope.USER
    team_budget = policy.departments["eng"].teams["web"].budgets[0]
    assert team_budget.rule == "departments/eng/teams/web/budgets/daily"
    assert team_budget.per is Scope.TEAM  # the default inside a team
    assert team_budget.limit_micros == 5_000_000


def test_load_policy_shipped() -> None:
    result = read_policy(SHIPPED)

    assert [str(problem) for problem in result.errors] == []
    assert [str(problem) for problem in result.warnings] == []
    assert result.policy is not None
    assert result.policy.departments
    assert result.policy.models


def test_load_policy_missing_directory(tmp_path: Path) -> None:
    result = read_policy(tmp_path / "absent")

    assert result.policy is None
    assert len(result.errors) == 1
    assert "not found" in result.errors[0].message


CYCLE = "  big: small\n  small: big\n"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        pytest.param(
            {ENG: edit(DEPARTMENT, "max_output_tokens:", "max_output_token:")},
            [
                Expected(
                    ENG,
                    9,
                    3,
                    "limits.max_output_token",
                    (
                        "unknown key 'max_output_token'",
                        'did you mean "max_output_tokens"',
                    ),
                )
            ],
            id="unknown-key",
        ),
        pytest.param(
            {ENG: edit(DEPARTMENT, "limits:", "limit:")},
            [
                Expected(
                    ENG,
                    8,
                    1,
                    "limit",
                    ("unknown key 'limit'", 'did you mean "limits"'),
                )
            ],
            id="unknown-top-key",
        ),
        pytest.param(
            {ENG: edit(DEPARTMENT, "limit_usd: 100", 'limit_usd: "ten"')},
            [
                Expected(
                    ENG, 13, 16, "budgets[0].limit_usd", ("must be a number", '"ten"')
                )
            ],
            id="wrong-type",
        ),
        pytest.param(
            {ENG: edit(DEPARTMENT, "limit_usd: 100", "limit_usd: -5")},
            [
                Expected(
                    ENG, 13, 16, "budgets[0].limit_usd", ("greater than 0", "got -5")
                )
            ],
            id="negative-limit",
        ),
        pytest.param(
            {ENG: edit(DEPARTMENT, "limit_usd: 100", "limit_usd: 0")},
            [
                Expected(
                    ENG, 13, 16, "budgets[0].limit_usd", ("greater than 0", "got 0")
                )
            ],
            id="zero-limit",
        ),
        pytest.param(
            {ENG: edit(DEPARTMENT, "limit_usd: 100", "limit_usd: 0.0000001")},
            [
                Expected(
                    ENG,
                    13,
                    16,
                    "budgets[0].limit_usd",
                    ("at most 6 decimal places",),
                )
            ],
            id="limit-decimals",
        ),
        pytest.param(
            {ENG: edit(DEPARTMENT, "tokens: 4096", "tokens: 0")},
            [Expected(ENG, 9, 22, "limits.max_output_tokens", ("at least 1", "got 0"))],
            id="zero-token-limit",
        ),
        pytest.param(
            {"catalog.yaml": edit(CATALOG, "input: 2.50", "input: 2.5000001")},
            [
                Expected(
                    "catalog.yaml",
                    7,
                    39,
                    "models[0].price_per_million_tokens.input",
                    ("at most 6 decimal places", "2.5000001"),
                )
            ],
            id="price-decimals",
        ),
        pytest.param(
            {ENG: edit(DEPARTMENT, "allow: [big, small]", "allow: [big, smal]")},
            [
                Expected(
                    ENG,
                    5,
                    16,
                    "models.allow[1]",
                    ("unknown model 'smal'", "catalog", 'did you mean "small"'),
                )
            ],
            id="allow-unknown-model",
        ),
        pytest.param(
            {ENG: edit(DEPARTMENT, "allow: [big, small]", "deny: [lgacy]")},
            [
                Expected(
                    ENG,
                    5,
                    10,
                    "models.deny[0]",
                    ("unknown model 'lgacy'", 'did you mean "legacy"'),
                )
            ],
            id="deny-unknown-model",
        ),
        pytest.param(
            {ENG: edit(DEPARTMENT, "  big: small\n", "  big: smol\n")},
            [
                Expected(
                    ENG,
                    7,
                    8,
                    "downgrades.big",
                    ("unknown model 'smol'", 'did you mean "small"'),
                )
            ],
            id="downgrade-unknown-target",
        ),
        pytest.param(
            {ENG: edit(DEPARTMENT, "  big: small\n", "  bgi: small\n")},
            [
                Expected(
                    ENG,
                    7,
                    3,
                    "downgrades.bgi",
                    ("unknown model 'bgi'", 'did you mean "big"'),
                )
            ],
            id="downgrade-unknown-source",
        ),
        pytest.param(
            {ENG: edit(DEPARTMENT, "  big: small\n", CYCLE)},
            [
                Expected(
                    ENG,
                    7,
                    3,
                    "downgrades.big",
                    ("downgrade cycle", "big -> small -> big"),
                ),
            ],
            id="downgrade-cycle",
        ),
        pytest.param(
            {OPS: DEPARTMENT},
            [Expected(OPS, 3, 7, "name", ("duplicate Department 'eng'",))],
            id="duplicate-department",
        ),
        pytest.param(
            {
                ENG: edit(
                    DEPARTMENT,
                    "    limit_usd: 100\n",
                    "    limit_usd: 100\n"
                    "  - name: monthly\n"
                    "    period: day\n"
                    "    limit_usd: 5\n",
                )
            },
            [Expected(ENG, 14, 11, "budgets[1].name", ("duplicate budget 'monthly'",))],
            id="duplicate-budget",
        ),
        pytest.param(
            {ENG: DEPARTMENT + "  - name: web\n"},
            [Expected(ENG, 16, 11, "teams[1].name", ("duplicate team 'web'",))],
            id="duplicate-team",
        ),
        pytest.param(
            {"catalog.yaml": CATALOG + EXTRA_MODEL.format(name="big", alias="huge")},
            [
                Expected(
                    "catalog.yaml",
                    21,
                    11,
                    "models[3].name",
                    ("duplicate model name or alias 'big'",),
                )
            ],
            id="duplicate-model-name",
        ),
        pytest.param(
            {"catalog.yaml": CATALOG + EXTRA_MODEL.format(name="x", alias="big-2025")},
            [
                Expected(
                    "catalog.yaml",
                    22,
                    15,
                    "models[3].aliases[0]",
                    ("duplicate model name or alias 'big-2025'",),
                )
            ],
            id="duplicate-alias",
        ),
        pytest.param(
            {"catalog.yaml": CATALOG + EXTRA_MODEL.format(name="big-2025", alias="x")},
            [
                Expected(
                    "catalog.yaml",
                    21,
                    11,
                    "models[3].name",
                    ("duplicate model name or alias 'big-2025'",),
                )
            ],
            id="name-equals-alias",
        ),
        pytest.param(
            {
                "catalog.yaml": edit(
                    CATALOG,
                    "    tokenizer: o200k_base\n",
                    "    tokenizer: o200k_base\n    chars_per_token: 4\n",
                )
            },
            [
                Expected(
                    "catalog.yaml",
                    7,
                    22,
                    "models[0].chars_per_token",
                    ("tokenizer: approximate", "o200k_base"),
                )
            ],
            id="chars-per-token-exact",
        ),
        pytest.param(
            {"organization.yaml": edit(ORGANIZATION, "Europe/Berlin", "Europe/Berln")},
            [
                Expected(
                    "organization.yaml",
                    4,
                    11,
                    "timezone",
                    ("unknown timezone 'Europe/Berln'", "IANA", '"UTC"'),
                )
            ],
            id="bad-timezone",
        ),
        pytest.param(
            {"organization.yaml": ORGANIZATION + "unknown_department: egn\n"},
            [
                Expected(
                    "organization.yaml",
                    5,
                    21,
                    "unknown_department",
                    ('"deny"', '"egn"', 'did you mean "eng"'),
                )
            ],
            id="bad-unknown-department",
        ),
        pytest.param(
            {ENG: edit(DEPARTMENT, "spendgate/v1", "spendgate/v2")},
            [
                Expected(
                    ENG,
                    1,
                    13,
                    "apiVersion",
                    (
                        '"spendgate/v2" is newer than this spendgate',
                        "upgrade spendgate",
                    ),
                )
            ],
            id="newer-api-version",
        ),
        pytest.param(
            {ENG: edit(DEPARTMENT, "spendgate/v1", "example.com/v1")},
            [
                Expected(
                    ENG,
                    1,
                    13,
                    "apiVersion",
                    ('unsupported apiVersion "example.com/v1"', '"spendgate/v1"'),
                )
            ],
            id="unsupported-api-version",
        ),
        pytest.param(
            {"extra.yaml": "apiVersion: spendgate/v1\nkind: Departmnet\nname: ops\n"},
            [
                Expected(
                    "extra.yaml",
                    2,
                    7,
                    "kind",
                    ('unknown kind "Departmnet"', 'did you mean "Department"'),
                )
            ],
            id="unknown-kind",
        ),
        pytest.param(
            {"extra.yaml": "- apiVersion: spendgate/v1\n"},
            [Expected("extra.yaml", 1, 1, "", ("must be a mapping", "a list"))],
            id="document-not-mapping",
        ),
        pytest.param(
            {
                OPS: (
                    "apiVersion: spendgate/v1\n"
                    "kind: Department\n"
                    "name: ops\n"
                    "models: {allow: [big}\n"
                )
            },
            [Expected(OPS, 4, 21, "", ("invalid YAML",))],
            id="yaml-syntax",
        ),
        pytest.param(
            {
                ENG: edit(
                    DEPARTMENT,
                    "    period: month\n",
                    "    period: month\n    period: day\n",
                )
            },
            [Expected(ENG, 13, 5, "budgets[0].period", ("duplicate key 'period'",))],
            id="duplicate-yaml-key",
        ),
        pytest.param(
            {ENG: edit(DEPARTMENT, "    period: month\n", "")},
            [Expected(ENG, 11, 5, "budgets[0]", ("missing required key 'period'",))],
            id="missing-required-key",
        ),
        pytest.param(
            {ENG: edit(DEPARTMENT, "period: month", "period: monthly")},
            [
                Expected(
                    ENG,
                    12,
                    13,
                    "budgets[0].period",
                    ("day, week, month", '"monthly"', 'did you mean "month"'),
                )
            ],
            id="bad-choice",
        ),
        pytest.param(
            {ENG: edit(DEPARTMENT, "name: web", "name: Web")},
            [Expected(ENG, 15, 11, "teams[0].name", ('"Web" is invalid', "a-z"))],
            id="bad-name",
        ),
        pytest.param(
            {"organization.yaml": None},
            [Expected("policies", 1, 1, "", ("no Organization document found",))],
            id="missing-organization",
        ),
        pytest.param(
            {"other/organization.yaml": ORGANIZATION},
            [
                Expected(
                    "other/organization.yaml",
                    2,
                    7,
                    "kind",
                    ("only one Organization",),
                )
            ],
            id="two-organizations",
        ),
    ],
)
def test_read_policy_problem(
    tmp_path: Path, overrides: Mapping[str, str | None], expected: list[Expected]
) -> None:
    directory = write_policy(tmp_path, overrides)

    result = read_policy(directory)

    assert result.policy is None
    assert [locate(problem) for problem in result.errors] == [
        locate(item) for item in expected
    ]
    for problem, item in zip(result.errors, expected, strict=True):
        assert problem.severity == "error"
        for fragment in item.fragments:
            assert fragment in problem.message


def test_read_policy_all_files_at_once(tmp_path: Path) -> None:
    eng = edit(DEPARTMENT, "max_output_tokens:", "max_output_token:")
    eng = edit(eng, "limit_usd: 100", 'limit_usd: "ten"')
    ops = edit(DEPARTMENT, "name: eng", "name: ops")
    ops = edit(ops, "allow: [big, small]", "allow: [big, smal]")
    ops = edit(ops, "  big: small\n", CYCLE)
    ops = edit(ops, "limits:\n", "mode: enforce\nmode: shadow\nlimits:\n")
    catalog = edit(
        CATALOG,
        "    tokenizer: o200k_base\n",
        "    tokenizer: o200k_base\n    chars_per_token: 4\n",
    )
    directory = write_policy(
        tmp_path,
        {
            "organization.yaml": edit(ORGANIZATION, "Europe/Berlin", "Europe/Berln"),
            "catalog.yaml": catalog,
            ENG: eng,
            OPS: ops,
            "broken.yaml": "apiVersion: spendgate/v1\nkind: [Department\n",
        },
    )

    result = read_policy(directory)

    assert sorted(locate(problem) for problem in result.errors) == [
        ("broken.yaml", 3, 1, ""),
        ("catalog.yaml", 7, 22, "models[0].chars_per_token"),
        (ENG, 9, 3, "limits.max_output_token"),
        (ENG, 13, 16, "budgets[0].limit_usd"),
        (OPS, 5, 16, "models.allow[1]"),
        (OPS, 7, 3, "downgrades.big"),
        (OPS, 10, 1, "mode"),
        ("organization.yaml", 4, 11, "timezone"),
    ]
    assert result.policy is None


def test_load_policy_error_lists_all(tmp_path: Path) -> None:
    department = edit(DEPARTMENT, "limit_usd: 100", "limit_usd: -1")
    organization = edit(ORGANIZATION, "Europe/Berlin", "Nowhere/City")
    directory = write_policy(
        tmp_path, {ENG: department, "organization.yaml": organization}
    )

    with pytest.raises(PolicyError) as raised:
        load_policy(directory)

    problems = raised.value.problems
    assert [locate(problem) for problem in problems] == [
        (ENG, 13, 16, "budgets[0].limit_usd"),
        ("organization.yaml", 4, 11, "timezone"),
    ]
    text = str(raised.value)
    assert "(2 errors)" in text
    assert f"{ENG}:13:16: budgets[0].limit_usd: must be greater than 0" in text
    assert "organization.yaml:4:11: timezone: unknown timezone" in text


def test_read_policy_alias_in_allow(tmp_path: Path) -> None:
    department = edit(DEPARTMENT, "allow: [big, small]", "allow: [BIG-2025, small]")
    directory = write_policy(tmp_path, {ENG: department})

    policy = load_policy(directory)

    assert policy.departments["eng"].allowed_models == frozenset({"big", "small"})


def test_read_policy_alias_in_deny(tmp_path: Path) -> None:
    department = edit(
        DEPARTMENT, "allow: [big, small]", 'allow: ["*"]\n  deny: [big-2025]'
    )
    directory = write_policy(tmp_path, {ENG: department})

    policy = load_policy(directory)

    assert policy.departments["eng"].allowed_models == frozenset({"small", "legacy"})


def test_read_policy_glob_no_match_warns(tmp_path: Path) -> None:
    department = edit(
        DEPARTMENT, "allow: [big, small]", 'allow: [big, small, "gemini-*"]'
    )
    directory = write_policy(tmp_path, {ENG: department})

    result = read_policy(directory)

    assert result.errors == []
    assert result.policy is not None
    assert [locate(problem) for problem in result.warnings] == [
        (ENG, 5, 23, "models.allow[2]")
    ]
    warning = result.warnings[0]
    assert warning.severity == "warning"
    assert "'gemini-*' matches no model" in warning.message
    assert result.policy.warnings == tuple(result.warnings)


def test_read_policy_glob_expands(tmp_path: Path) -> None:
    department = edit(DEPARTMENT, "allow: [big, small]", 'allow: ["B*", "?mall"]')
    directory = write_policy(tmp_path, {ENG: department})

    policy = load_policy(directory)

    assert policy.departments["eng"].allowed_models == frozenset({"big", "small"})


def test_read_policy_skips_dot_folders(tmp_path: Path) -> None:
    directory = write_policy(
        tmp_path,
        {
            ".drafts/eng.yaml": "kind: [unclosed\n",
            "departments/.old/eng.yaml": DEPARTMENT,
            ".hidden.yaml": "not: [valid\n",
        },
    )

    result = read_policy(directory)

    assert result.errors == []
    assert result.policy is not None
    assert result.files == ["catalog.yaml", ENG, "organization.yaml"]


def test_read_policy_skips_policy_test(tmp_path: Path) -> None:
    policy_test = (
        "apiVersion: spendgate/v1\n"
        "kind: PolicyTest\n"
        "name: engineers-get-big\n"
        "cases:\n"
        "  - request: {department: eng, model: big}\n"
        "    expect: {decision: ALLOW}\n"
    )
    directory = write_policy(tmp_path, {"tests/eng.yaml": policy_test})

    result = read_policy(directory)

    assert result.errors == []
    assert result.policy is not None
    assert "tests/eng.yaml" in result.files
    assert set(result.policy.departments) == {"eng"}


def test_read_policy_policy_test_in_stream(tmp_path: Path) -> None:
    stream = DEPARTMENT + "---\napiVersion: spendgate/v1\nkind: PolicyTest\nx: 1\n"
    directory = write_policy(tmp_path, {ENG: stream})

    result = read_policy(directory)

    assert result.errors == []
    assert result.policy is not None


def test_read_policy_version_follows_content(tmp_path: Path) -> None:
    directory = write_policy(tmp_path)
    first = load_policy(directory)
    again = load_policy(directory)

    (directory / ENG).write_text(DEPARTMENT + "# a comment\n", encoding="utf-8")
    edited = load_policy(directory)

    assert again.version == first.version
    assert again.content_hash == first.content_hash
    assert edited.version != first.version
    assert edited.content_hash != first.content_hash
    assert "sha256:" in first.version


def test_read_policy_version_follows_names(tmp_path: Path) -> None:
    directory = write_policy(tmp_path)
    first = load_policy(directory)

    (directory / ENG).rename(directory / "departments" / "engineering.yaml")
    renamed = load_policy(directory)

    assert renamed.content_hash != first.content_hash


def test_read_policy_team_models_intersect(tmp_path: Path) -> None:
    department = edit(
        DEPARTMENT,
        "  - name: web\n",
        "  - name: web\n"
        "    models:\n"
        '      allow: ["*"]\n'
        "  - name: data\n"
        "    models:\n"
        "      allow: [small, legacy]\n"
        "  - name: lean\n"
        "    models:\n"
        "      deny: [big]\n",
    )
    directory = write_policy(tmp_path, {ENG: department})

    teams = load_policy(directory).departments["eng"].teams

    assert teams["web"].allowed_models == frozenset({"big", "small"})
    assert teams["data"].allowed_models == frozenset({"small"})
    assert teams["lean"].allowed_models == frozenset({"small"})


def test_read_policy_team_limits_smaller(tmp_path: Path) -> None:
    department = edit(
        DEPARTMENT,
        "  max_output_tokens: 4096\n",
        "  max_output_tokens: 4096\n"
        "  max_input_tokens: 1000\n"
        "  max_request_usd: 1.00\n",
    )
    department = edit(
        department,
        "  - name: web\n",
        "  - name: web\n"
        "    limits:\n"
        "      max_input_tokens: 2000\n"
        "      max_output_tokens: 1024\n"
        "  - name: cheap\n"
        "    limits:\n"
        "      max_request_usd: 0.25\n",
    )
    directory = write_policy(tmp_path, {ENG: department})

    eng = load_policy(directory).departments["eng"]

    assert eng.limits == Limits(1000, 4096, 1_000_000)
    assert eng.teams["web"].limits == Limits(1000, 1024, 1_000_000)
    assert eng.teams["cheap"].limits == Limits(1000, 4096, 250_000)


def test_read_policy_team_limit_alone(tmp_path: Path) -> None:
    department = edit(DEPARTMENT, "limits:\n  max_output_tokens: 4096\n", "")
    department = edit(
        department,
        "  - name: web\n",
        "  - name: web\n    limits:\n      max_input_tokens: 2000\n",
    )
    directory = write_policy(tmp_path, {ENG: department})

    eng = load_policy(directory).departments["eng"]

    assert eng.limits == Limits()
    assert eng.teams["web"].limits == Limits(max_input_tokens=2000)


def test_read_policy_chains_follow(tmp_path: Path) -> None:
    department = edit(
        DEPARTMENT, "  big: small\n", "  legacy: big-2025\n  big: small\n"
    )
    directory = write_policy(tmp_path, {ENG: department})

    chains = load_policy(directory).departments["eng"].chains

    assert dict(chains) == {"legacy": ("big", "small"), "big": ("small",)}


def test_read_policy_no_follow_on_error(tmp_path: Path) -> None:
    directory = write_policy(
        tmp_path,
        {
            "organization.yaml": ORGANIZATION + "unknown_department: eng\n",
            ENG: edit(DEPARTMENT, "limit_usd: 100", "limit_usd: -1"),
        },
    )

    result = read_policy(directory)

    assert [locate(problem) for problem in result.errors] == [
        (ENG, 13, 16, "budgets[0].limit_usd")
    ]


def test_read_policy_cycle_alias_key(tmp_path: Path) -> None:
    department = edit(DEPARTMENT, "  big: small\n", "  big-2025: small\n  small: big\n")
    directory = write_policy(tmp_path, {ENG: department})

    result = read_policy(directory)

    assert [locate(problem) for problem in result.errors] == [
        (ENG, 7, 3, "downgrades.big-2025")
    ]


def test_read_policy_token_count_int(tmp_path: Path) -> None:
    catalog = edit(CATALOG, "tokens: 16384", "tokens: 16384.0")
    department = edit(DEPARTMENT, "tokens: 4096", "tokens: 4096.0")
    directory = write_policy(tmp_path, {"catalog.yaml": catalog, ENG: department})

    policy = load_policy(directory)

    assert type(policy.models["big"].max_output_tokens) is int
    assert type(policy.departments["eng"].limits.max_output_tokens) is int


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n"
            + "".join(
                f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]\n"
                for i in range(1, 7)
            ),
            "expands to more than",
            id="alias-bomb",
        ),
        pytest.param(
            "models: &a [*a]\n", "refers to a node that contains it", id="alias-loop"
        ),
        pytest.param("x: " + "[" * 3000 + "]" * 3000 + "\n", "nests deeper", id="deep"),
        pytest.param("name: !!int abc\n", "invalid value 'abc'", id="bad-tag"),
        pytest.param("x: " + "9" * 5000 + "\n", "invalid value", id="huge-integer"),
    ],
)
def test_hostile_yaml_reported(tmp_path: Path, text: str, message: str) -> None:
    directory = write_policy(tmp_path, {"hostile.yaml": text})

    result = read_policy(directory)

    assert result.policy is None
    assert any(
        problem.file == "hostile.yaml" and message in problem.message
        for problem in result.errors
    ), [str(problem) for problem in result.errors]


@pytest.mark.parametrize(
    ("name", "old", "new", "path"),
    [
        pytest.param(
            ENG, "limit_usd: 100", "limit_usd: 10000000000000", "limit_usd", id="usd"
        ),
        pytest.param(
            "catalog.yaml",
            "context_window: 16385",
            "context_window: 10000000000",
            "context_window",
            id="tokens",
        ),
    ],
)
def test_values_beyond_ledger_rejected(
    tmp_path: Path, name: str, old: str, new: str, path: str
) -> None:
    base = DEPARTMENT if name == ENG else CATALOG
    directory = write_policy(tmp_path, {name: edit(base, old, new)})

    result = read_policy(directory)

    assert result.policy is None
    assert any(
        problem.path.endswith(path) and "must be at most" in problem.message
        for problem in result.errors
    ), [str(problem) for problem in result.errors]


def test_too_many_budgets_rejected(tmp_path: Path) -> None:
    budgets = "".join(
        f"  - {{name: b{index}, period: day, limit_usd: 1}}\n" for index in range(101)
    )
    department = (
        "apiVersion: spendgate/v1\nkind: Department\nname: big\nbudgets:\n" + budgets
    )
    directory = write_policy(tmp_path, {"big.yaml": department})

    result = read_policy(directory)

    assert result.policy is None
    assert [
        problem.message for problem in result.errors if problem.path == "budgets"
    ] == ["must have at most 100 items, got 101"]


def test_unknown_shadow_rules_rejected(tmp_path: Path) -> None:
    department = (
        "apiVersion: spendgate/v1\nkind: Department\nname: trial\n"
        "shadow_rules: [modles, limits/max_output_tokens, teams/red/models]\n"
    )
    directory = write_policy(tmp_path, {"trial.yaml": department})

    result = read_policy(directory)

    messages = [
        problem.message
        for problem in result.errors
        if problem.path.startswith("shadow_rules")
    ]
    assert result.policy is None
    assert len(messages) == 3
    assert messages[0].startswith("unknown rule 'modles'; expected one of models,")
    assert messages[0].endswith('did you mean "models"?')
    assert "'limits/max_output_tokens'" in messages[1]
    assert "'teams/red/models'" in messages[2]


def test_unclosed_quote_located_at_quote(tmp_path: Path) -> None:
    # The parser notices the missing quote only at the end of the file.
    text = DEPARTMENT.replace("name: eng\n", 'name: "eng\n', 1)
    directory = write_policy(tmp_path, {ENG: text})

    result = read_policy(directory)

    problems = [problem for problem in result.errors if problem.file == ENG]
    line = 1 + DEPARTMENT.splitlines().index("name: eng")
    assert len(problems) == 1
    assert (problems[0].line, problems[0].column) == (line, 7)
    assert problems[0].message == (
        "invalid YAML: found unexpected end of stream while scanning a quoted "
        "scalar that starts here"
    )


def test_timezone_and_ttl_errors_together(tmp_path: Path) -> None:
    organization = ORGANIZATION.replace("Europe/Berlin", "America/NewYork") + (
        "reservation_ttl: 15 minutes\n"
    )
    directory = write_policy(tmp_path, {"organization.yaml": organization})

    result = read_policy(directory)

    paths = sorted(problem.path for problem in result.errors)
    assert paths == ["reservation_ttl", "timezone"]
