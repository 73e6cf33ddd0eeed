"""End-to-end tests of the SpendGate gRPC API on a real server and a real ledger."""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import grpc
import pytest
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from sqlalchemy import text
from sqlalchemy.engine import make_url

from conftest import Gate, PolicyWriter, ServeFactory
from spendgate import tokens
from spendgate.ledger import Ledger, create_engine
from spendgate.ledger._spool import AuditSpool
from spendgate.policy import load_policy
from spendgate.server import (
    INLINE_MAX_CHARS,
    INLINE_MAX_MESSAGES,
    PolicyHolder,
    _off_loop,
    create_server,
)
from spendgate.v1 import spendgate_pb2 as pb
from spendgate.v1 import spendgate_pb2_grpc as pb_grpc
from support import wait_for

ALLOW = pb.DECISION_ALLOW
DENY = pb.DECISION_DENY
TOKYO = ZoneInfo("Asia/Tokyo")

# flat-1 costs one micro-USD per input token and nothing per output token,
# so a request of N input tokens with max_output_tokens 0 reserves N micro-USD.
CATALOG = """\
apiVersion: spendgate/v1
kind: ModelCatalog
models:
  - name: flat-1
    tokenizer: approximate
    price_per_million_tokens: {input: 1.00, output: 0}
    context_window: 2000000
    max_output_tokens: 1000
  - name: cached-1
    tokenizer: o200k_base
    price_per_million_tokens: {input: 2.50, cached_input: 1.25, output: 10.00}
    context_window: 128000
    max_output_tokens: 16384
  - name: chat-1
    tokenizer: cl100k_base
    price_per_million_tokens: {input: 10.00, output: 30.00}
    context_window: 128000
    max_output_tokens: 4096
  - name: claude-sonnet
    tokenizer: approximate
    chars_per_token: 3.5
    price_per_million_tokens: {input: 3.00, output: 15.00}
    context_window: 200000
    max_output_tokens: 8192
  - name: claude-opus
    aliases: [opus-latest]
    tokenizer: approximate
    chars_per_token: 3.5
    price_per_million_tokens: {input: 15.00, output: 75.00}
    context_window: 200000
    max_output_tokens: 8192
  - name: claudex-1
    tokenizer: approximate
    price_per_million_tokens: {input: 1.00, output: 1.00}
    context_window: 200000
    max_output_tokens: 8192
"""

DEPARTMENTS = {
    "departments/research.yaml": """\
apiVersion: spendgate/v1
kind: Department
name: research
budgets:
  - {name: daily, period: day, limit_usd: 1.00}
""",
    "departments/capped.yaml": """\
apiVersion: spendgate/v1
kind: Department
name: capped
budgets:
  - {name: daily, period: day, limit_usd: 0.30}
""",
    "departments/labs.yaml": """\
apiVersion: spendgate/v1
kind: Department
name: labs
models:
  allow: ["claude-*"]
  deny: [claude-opus]
""",
    "departments/platform.yaml": """\
apiVersion: spendgate/v1
kind: Department
name: platform
budgets:
  - {name: monthly, period: month, limit_usd: 100}
  - {name: per-user-daily, period: day, limit_usd: 5, per: user}
teams:
  - name: ml
    budgets:
      - {name: weekly, period: week, limit_usd: 20}
""",
}


def policy_files(
    *, timezone: str = "UTC", on_reservation_expiry: str = "charge"
) -> dict[str, str]:
    """Return the YAML files of the test policy, by relative file name."""
    organization = f"""\
apiVersion: spendgate/v1
kind: Organization
name: test-org
timezone: {timezone}
reservation_ttl: 10m
on_reservation_expiry: {on_reservation_expiry}
"""
    return {
        "organization.yaml": organization,
        "catalog.yaml": CATALOG,
        **DEPARTMENTS,
    }


@pytest.fixture
def policy_dir(write_policy: PolicyWriter) -> Path:
    """Write the test policy with UTC windows."""
    return write_policy(policy_files())


@pytest.fixture
def gate(serve: ServeFactory, policy_dir: Path, sqlite_url: str) -> Gate:
    """Start a server on a SQLite ledger."""
    return serve(policy_dir, sqlite_url)


@pytest.fixture
def ledger_gate(serve: ServeFactory, policy_dir: Path, ledger_url: str) -> Gate:
    """Start a server on a SQLite ledger and again on a PostgreSQL one."""
    return serve(policy_dir, ledger_url)


def check_request(
    request_id: str,
    input_tokens: int,
    *,
    department: str = "research",
    model: str = "flat-1",
    team: str = "",
    user: str = "",
    max_output_tokens: int = 0,
) -> pb.CheckRequest:
    """Build a Check with a token count, so flat-1 costs are exact."""
    return pb.CheckRequest(
        request_id=request_id,
        principal=pb.Principal(department=department, team=team, user=user),
        model=model,
        input_tokens=input_tokens,
        max_output_tokens=max_output_tokens,
    )


def spend(
    gate: Gate,
    request_id: str,
    micros: int,
    *,
    department: str = "research",
    team: str = "",
    user: str = "",
) -> None:
    """Check and commit `micros` of flat-1 input, so that much is spent."""
    request = check_request(
        request_id, micros, department=department, team=team, user=user
    )
    decided = gate.stub.Check(request)
    assert decided.decision == ALLOW, decided.message
    committed = gate.stub.Commit(
        pb.CommitRequest(reservation_id=decided.reservation_id, input_tokens=micros)
    )
    assert committed.cost_micros == micros


def budget_of(gate: Gate, department: str) -> pb.BudgetStatus:
    """Return the one budget of a department, read through GetBudget."""
    response: pb.GetBudgetResponse = gate.stub.GetBudget(
        pb.GetBudgetRequest(principal=pb.Principal(department=department))
    )
    assert len(response.budgets) == 1
    return response.budgets[0]


def rpc_error(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    """Run an RPC that must fail and return its status code and details."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error = caught.value
    return error.code(), error.details() or ""


def test_budget_denies_third_request(ledger_gate: Gate) -> None:
    spend(ledger_gate, "spent-90c", 900_000)

    responses = [
        ledger_gate.stub.Check(check_request(f"nickel-{n}", 50_000)) for n in range(3)
    ]

    assert [a.decision for a in responses] == [ALLOW, ALLOW, DENY]
    assert responses[2].reason_code == "BUDGET_EXCEEDED"
    assert responses[2].rule == "departments/research/budgets/daily"
    assert responses[2].reservation_id == ""
    assert responses[2].estimated_cost_micros == 0
    assert responses[2].budgets[0].spent_micros == 900_000
    assert responses[2].budgets[0].reserved_micros == 100_000


def test_budget_fills_cap_exactly(ledger_gate: Gate) -> None:
    for n in range(3):
        spend(ledger_gate, f"dime-{n}", 100_000, department="capped")

    fourth = ledger_gate.stub.Check(
        check_request("dime-3", 100_000, department="capped")
    )

    status = budget_of(ledger_gate, "capped")
    assert status.limit_micros == 300_000
    assert status.spent_micros == 300_000
    assert status.reserved_micros == 0
    assert fourth.decision == DENY
    assert fourth.reason_code == "BUDGET_EXCEEDED"


def test_commit_prices_cached_tokens(gate: Gate) -> None:
    decided = gate.stub.Check(
        check_request("cached", 10_000, model="cached-1", max_output_tokens=500)
    )

    committed = gate.stub.Commit(
        pb.CommitRequest(
            reservation_id=decided.reservation_id,
            input_tokens=10_000,
            cached_input_tokens=8_000,
            output_tokens=500,
        )
    )

    # Estimate: 10,000 x 2.50 + 500 x 10.00. Cost: 2,000 x 2.50 + 8,000 x 1.25
    # + 500 x 10.00, all in micro-USD per token.
    assert decided.estimated_cost_micros == 30_000
    assert committed.cost_micros == 20_000
    assert committed.reserved_micros == 30_000
    assert committed.overage_micros == 0


@pytest.mark.parametrize(
    ("model", "decision", "reason", "canonical"),
    [
        pytest.param("claudex-1", DENY, "MODEL_NOT_ALLOWED", "claudex-1", id="glob"),
        pytest.param(
            "opus-latest", DENY, "MODEL_NOT_ALLOWED", "claude-opus", id="alias-denied"
        ),
        pytest.param("CLAUDE-SONNET", ALLOW, "ALLOWED", "claude-sonnet", id="allowed"),
    ],
)
def test_model_rules(
    gate: Gate, model: str, decision: int, reason: str, canonical: str
) -> None:
    response = gate.stub.Check(check_request("r", 1000, department="labs", model=model))

    assert response.decision == decision
    assert response.reason_code == reason
    assert response.requested_model == canonical


def test_daily_window_tokyo_midnight(
    serve: ServeFactory, write_policy: PolicyWriter, sqlite_url: str
) -> None:
    gate = serve(write_policy(policy_files(timezone="Asia/Tokyo")), sqlite_url)
    gate.clock.set(datetime(2040, 6, 12, 23, 0, tzinfo=TOKYO))
    spend(gate, "evening", 1_000_000)
    evening = gate.stub.Check(check_request("after-spend", 50_000))
    gate.clock.set(datetime(2040, 6, 12, 23, 59, 59, tzinfo=TOKYO))
    last_second = gate.stub.Check(check_request("last-second", 50_000))

    gate.clock.set(datetime(2040, 6, 13, 0, 1, tzinfo=TOKYO))
    morning = gate.stub.Check(check_request("morning", 50_000))

    assert evening.decision == DENY
    assert last_second.decision == DENY
    assert last_second.budgets[0].window == "2040-06-12"
    # 00:01 in Tokyo is still June 12 in UTC, so only a Tokyo window resets here.
    assert morning.decision == ALLOW
    assert morning.budgets[0].window == "2040-06-13"
    assert morning.budgets[0].spent_micros == 0


@pytest.mark.parametrize(
    "spent_micros",
    [
        pytest.param(0, id="fresh-budget"),
        pytest.param(1_000_000, id="exhausted-budget"),
    ],
)
def test_unknown_model_denied(gate: Gate, spent_micros: int) -> None:
    if spent_micros:
        spend(gate, "exhaust", spent_micros)

    response = gate.stub.Check(check_request("r", 10, model="gpt-9"))

    assert response.decision == DENY
    assert response.reason_code == "UNKNOWN_MODEL"
    assert response.rule == "catalog"
    assert response.reservation_id == ""


def _no_input() -> pb.CheckRequest:
    return pb.CheckRequest(
        request_id="r", principal=pb.Principal(department="research"), model="flat-1"
    )


def _no_messages() -> pb.CheckRequest:
    request = _no_input()
    request.messages.SetInParent()
    return request


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        pytest.param(check_request("", 10), "request_id", id="missing-request-id"),
        pytest.param(check_request("  ", 10), "request_id", id="blank-request-id"),
        pytest.param(
            check_request("r", 10, department=""),
            "principal.department",
            id="missing-department",
        ),
        pytest.param(check_request("r", 10, model=""), "model", id="missing-model"),
        pytest.param(_no_input(), "input", id="missing-input"),
        pytest.param(_no_messages(), "messages", id="empty-messages"),
        pytest.param(
            check_request("r", 10**9 + 1), "input_tokens", id="too-many-tokens"
        ),
        pytest.param(
            check_request("r", 10, team="t" * 101),
            "principal.team",
            id="team-longer-than-column",
        ),
        pytest.param(
            check_request("r", 10, user="a\x00b"),
            "principal.user",
            id="nul-in-user",
        ),
        pytest.param(
            check_request("r", 10, model="m" * 129), "model", id="model-too-long"
        ),
        pytest.param(
            # U+0130 lowercases to two code points: 101 characters become 202.
            check_request("r", 10, user="\u0130" * 101),
            "principal.user",
            id="user-too-long-once-lowercased",
        ),
    ],
)
def test_check_invalid(gate: Gate, request_: pb.CheckRequest, field: str) -> None:
    error_code, details = rpc_error(lambda: gate.stub.Check(request_))

    assert error_code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(f"{field}: ")
    assert gate.count("audit_events") == 0


@pytest.mark.parametrize(
    ("build", "code", "named"),
    [
        pytest.param(
            lambda _id: pb.CommitRequest(input_tokens=10),
            grpc.StatusCode.INVALID_ARGUMENT,
            "reservation_id: ",
            id="missing-id",
        ),
        pytest.param(
            lambda id_: pb.CommitRequest(
                reservation_id=id_, input_tokens=10, cached_input_tokens=11
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "cached_input_tokens: ",
            id="cached-above-input",
        ),
        pytest.param(
            lambda _id: pb.CommitRequest(reservation_id="no-such-id", input_tokens=10),
            grpc.StatusCode.NOT_FOUND,
            "'no-such-id'",
            id="unknown-id",
        ),
    ],
)
def test_commit_invalid(
    gate: Gate,
    build: Callable[[str], pb.CommitRequest],
    code: grpc.StatusCode,
    named: str,
) -> None:
    reservation_id = gate.stub.Check(check_request("r", 10)).reservation_id

    error_code, details = rpc_error(lambda: gate.stub.Commit(build(reservation_id)))

    assert error_code == code
    assert named in details
    assert [row.event for row in gate.audit_rows("r")] == ["check"]


@pytest.mark.parametrize(
    ("reservation_id", "code", "named"),
    [
        pytest.param(
            "", grpc.StatusCode.INVALID_ARGUMENT, "reservation_id: ", id="missing-id"
        ),
        pytest.param(
            "no-such-id", grpc.StatusCode.NOT_FOUND, "'no-such-id'", id="unknown-id"
        ),
    ],
)
def test_release_invalid(
    gate: Gate, reservation_id: str, code: grpc.StatusCode, named: str
) -> None:
    error_code, details = rpc_error(
        lambda: gate.stub.Release(pb.ReleaseRequest(reservation_id=reservation_id))
    )

    assert error_code == code
    assert named in details


@pytest.mark.parametrize(
    ("department", "code", "named"),
    [
        pytest.param(
            "",
            grpc.StatusCode.INVALID_ARGUMENT,
            "principal.department: ",
            id="missing-department",
        ),
        pytest.param(
            "nowhere", grpc.StatusCode.NOT_FOUND, "'nowhere'", id="unknown-department"
        ),
    ],
)
def test_get_budget_invalid(
    gate: Gate, department: str, code: grpc.StatusCode, named: str
) -> None:
    request = pb.GetBudgetRequest(principal=pb.Principal(department=department))

    error_code, details = rpc_error(lambda: gate.stub.GetBudget(request))

    assert error_code == code
    assert named in details


def test_deny_is_ok_status(gate: Gate) -> None:
    response, call = gate.stub.Check.with_call(
        check_request("too-much", 2_000_000, department="capped")
    )

    assert call.code() == grpc.StatusCode.OK
    assert response.decision == DENY
    assert response.reason_code == "BUDGET_EXCEEDED"
    assert response.message != ""


def test_check_retry_replays(ledger_gate: Gate) -> None:
    request = check_request("retried", 40_000)

    first = ledger_gate.stub.Check(request)
    second = ledger_gate.stub.Check(request)

    assert first.decision == ALLOW
    assert first.replayed is False
    assert second.replayed is True
    assert second.decision == ALLOW
    assert second.reservation_id == first.reservation_id
    assert second.estimated_cost_micros == first.estimated_cost_micros
    assert second.reservation_expires_at == first.reservation_expires_at
    assert budget_of(ledger_gate, "research").reserved_micros == 40_000
    assert ledger_gate.count("reservations") == 1
    assert [row.event for row in ledger_gate.audit_rows("retried")] == ["check"]


def test_commit_retry_counts_once(ledger_gate: Gate) -> None:
    decided = ledger_gate.stub.Check(check_request("r", 40_000))
    commit = pb.CommitRequest(
        reservation_id=decided.reservation_id, input_tokens=30_000
    )

    first = ledger_gate.stub.Commit(commit)
    second = ledger_gate.stub.Commit(commit)

    assert first.already_committed is False
    assert second.already_committed is True
    assert second.cost_micros == first.cost_micros == 30_000
    status = budget_of(ledger_gate, "research")
    assert status.spent_micros == 30_000
    assert status.reserved_micros == 0
    assert [row.event for row in ledger_gate.audit_rows("r")] == ["check", "commit"]


def test_commit_retry_other_usage(gate: Gate) -> None:
    decided = gate.stub.Check(check_request("r", 40_000))
    gate.stub.Commit(
        pb.CommitRequest(reservation_id=decided.reservation_id, input_tokens=30_000)
    )
    changed = pb.CommitRequest(
        reservation_id=decided.reservation_id, input_tokens=35_000
    )

    error_code, details = rpc_error(lambda: gate.stub.Commit(changed))

    assert error_code == grpc.StatusCode.FAILED_PRECONDITION
    assert decided.reservation_id in details
    assert budget_of(gate, "research").spent_micros == 30_000


def test_commit_after_release(ledger_gate: Gate) -> None:
    decided = ledger_gate.stub.Check(check_request("r", 40_000))
    ledger_gate.stub.Release(pb.ReleaseRequest(reservation_id=decided.reservation_id))
    commit = pb.CommitRequest(reservation_id=decided.reservation_id, input_tokens=10)

    error_code, details = rpc_error(lambda: ledger_gate.stub.Commit(commit))

    assert error_code == grpc.StatusCode.FAILED_PRECONDITION
    assert decided.reservation_id in details
    status = budget_of(ledger_gate, "research")
    assert status.spent_micros == 0
    assert status.reserved_micros == 0


def test_release_after_commit(ledger_gate: Gate) -> None:
    decided = ledger_gate.stub.Check(check_request("r", 40_000))
    ledger_gate.stub.Commit(
        pb.CommitRequest(reservation_id=decided.reservation_id, input_tokens=40_000)
    )
    release = pb.ReleaseRequest(reservation_id=decided.reservation_id)

    error_code, details = rpc_error(lambda: ledger_gate.stub.Release(release))

    assert error_code == grpc.StatusCode.FAILED_PRECONDITION
    assert decided.reservation_id in details
    assert budget_of(ledger_gate, "research").spent_micros == 40_000


def test_release_retry(gate: Gate) -> None:
    decided = gate.stub.Check(check_request("r", 40_000))
    release = pb.ReleaseRequest(reservation_id=decided.reservation_id)

    first = gate.stub.Release(release)
    second = gate.stub.Release(release)

    assert first.released_micros == 40_000
    assert first.already_released is False
    assert second.already_released is True
    assert [row.event for row in gate.audit_rows("r")] == ["check", "release"]


def test_release_frees_budget(ledger_gate: Gate) -> None:
    full_cap = ledger_gate.stub.Check(
        check_request("all", 300_000, department="capped")
    )
    blocked = ledger_gate.stub.Check(
        check_request("blocked", 100_000, department="capped")
    )

    released = ledger_gate.stub.Release(
        pb.ReleaseRequest(reservation_id=full_cap.reservation_id)
    )
    after = ledger_gate.stub.Check(check_request("after", 100_000, department="capped"))

    assert full_cap.decision == ALLOW
    assert blocked.decision == DENY
    assert released.released_micros == 300_000
    assert after.decision == ALLOW
    assert budget_of(ledger_gate, "capped").reserved_micros == 100_000


def test_commit_overage(ledger_gate: Gate) -> None:
    decided = ledger_gate.stub.Check(check_request("r", 100_000))

    committed = ledger_gate.stub.Commit(
        pb.CommitRequest(reservation_id=decided.reservation_id, input_tokens=150_000)
    )

    assert committed.cost_micros == 150_000
    assert committed.reserved_micros == 100_000
    assert committed.overage_micros == 50_000
    status = budget_of(ledger_gate, "research")
    assert status.spent_micros == 150_000
    assert status.reserved_micros == 0
    commit_row = ledger_gate.audit_rows("r")[-1]
    assert commit_row.event == "commit"
    assert commit_row.actual_micros == 150_000
    assert commit_row.overage_micros == 50_000


def test_get_budget_windows(gate: Gate) -> None:
    spend(gate, "r", 250_000, department="platform", team="ml", user="alice")
    principal = pb.Principal(department="platform", team="ml", user="alice")

    response = gate.stub.GetBudget(pb.GetBudgetRequest(principal=principal))

    # The clock is at 2040-06-12 12:00 UTC, a Tuesday of ISO week 24.
    assert list(response.budgets) == [
        pb.BudgetStatus(
            scope="department:platform",
            budget="monthly",
            period="month",
            window="2040-06",
            limit_micros=100_000_000,
            spent_micros=250_000,
            rule="departments/platform/budgets/monthly",
        ),
        pb.BudgetStatus(
            scope="user:alice",
            budget="per-user-daily",
            period="day",
            window="2040-06-12",
            limit_micros=5_000_000,
            spent_micros=250_000,
            rule="departments/platform/budgets/per-user-daily",
        ),
        pb.BudgetStatus(
            scope="team:ml",
            budget="weekly",
            period="week",
            window="2040-W24",
            limit_micros=20_000_000,
            spent_micros=250_000,
            rule="departments/platform/teams/ml/budgets/weekly",
        ),
    ]
    assert response.policy_version == gate.policy.version


@pytest.mark.parametrize(
    "service",
    [
        pytest.param("", id="server"),
        pytest.param("spendgate.v1.SpendGate", id="spendgate"),
    ],
)
def test_health_serving(gate: Gate, service: str) -> None:
    stub = health_pb2_grpc.HealthStub(gate.channel)

    response = stub.Check(health_pb2.HealthCheckRequest(service=service))

    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_service(gate: Gate) -> None:
    database = ProtoReflectionDescriptorDatabase(gate.channel)

    services = database.get_services()

    assert "spendgate.v1.SpendGate" in services
    assert "grpc.health.v1.Health" in services


def test_messages_counted_like_openai(gate: Gate) -> None:
    # The worked example of the OpenAI cookbook "How to count tokens with
    # tiktoken", for which the API reported 129 prompt tokens on gpt-4-0613.
    texts = [
        ("system", "", "You are a helpful, pattern-following assistant that "
         "translates corporate jargon into plain English."),
        ("system", "example_user", "New synergies will help drive top-line growth."),
        ("system", "example_assistant",
         "Things working well together will increase revenue."),
        ("system", "example_user", "Let's circle back when we have more bandwidth "
         "to touch base on opportunities for increased leverage."),
        ("system", "example_assistant",
         "Let's talk later when we're less busy about how to do better."),
        ("user", "", "This late pivot means we don't have time to boil the ocean "
         "for the client deliverable."),
    ]  # fmt: skip
    request = pb.CheckRequest(
        request_id="chat",
        principal=pb.Principal(department="research"),
        model="chat-1",
        messages=pb.Messages(
            messages=[
                pb.ChatMessage(role=role, name=name, content=content)
                for role, name, content in texts
            ]
        ),
        max_output_tokens=0,
    )

    response = gate.stub.Check(request)

    assert response.decision == ALLOW
    assert response.input_tokens == 129
    assert response.input_tokens_estimated is False
    assert response.estimated_cost_micros == 1_290


EXPIRY = [
    pytest.param("charge", 200_000, id="charge"),
    pytest.param("release", 0, id="release"),
]


def _expiring_gate(
    serve: ServeFactory, write_policy: PolicyWriter, url: str, action: str
) -> tuple[Gate, pb.CheckResponse]:
    policy = write_policy(policy_files(on_reservation_expiry=action))
    gate = serve(policy, url)
    decided = gate.stub.Check(check_request("abandoned", 200_000))
    assert decided.decision == ALLOW
    # The test policy's reservation_ttl is 10 minutes.
    gate.clock.advance(timedelta(minutes=10, seconds=1))
    return gate, decided


def _assert_expired(gate: Gate, decided: pb.CheckResponse, charged: int) -> None:
    status = budget_of(gate, "research")
    assert status.spent_micros == charged
    assert status.reserved_micros == 0
    rows = gate.audit_rows("abandoned")
    assert [row.event for row in rows] == ["check", "expire"]
    assert rows[1].reservation_id == decided.reservation_id
    assert rows[1].actual_micros == charged


@pytest.mark.parametrize(("action", "charged"), EXPIRY)
def test_sweeper_settles_expired(
    serve: ServeFactory,
    write_policy: PolicyWriter,
    ledger_url: str,
    action: str,
    charged: int,
) -> None:
    gate, decided = _expiring_gate(serve, write_policy, ledger_url, action)

    settled = gate.running.sweeper.sweep()
    settled_again = gate.running.sweeper.sweep()

    assert settled == 1
    assert settled_again == 0
    _assert_expired(gate, decided, charged)


def test_sweeper_waits_for_ttl(
    serve: ServeFactory, write_policy: PolicyWriter, sqlite_url: str
) -> None:
    gate = serve(write_policy(policy_files()), sqlite_url)
    decided = gate.stub.Check(check_request("r", 200_000))
    gate.clock.advance(timedelta(minutes=9, seconds=59))

    settled = gate.running.sweeper.sweep()

    assert decided.reservation_expires_at == int(
        (gate.clock() + timedelta(seconds=1)).timestamp()
    )
    assert settled == 0
    assert budget_of(gate, "research").reserved_micros == 200_000


@pytest.mark.parametrize(
    ("action", "settle", "spent"),
    [
        pytest.param("charge", "commit", 50_000, id="charge-commit"),
        pytest.param("release", "commit", 50_000, id="release-commit"),
        pytest.param("charge", "release", 0, id="charge-release"),
    ],
)
def test_settle_after_expiry(
    serve: ServeFactory,
    write_policy: PolicyWriter,
    ledger_url: str,
    action: str,
    settle: str,
    spent: int,
) -> None:
    gate, decided = _expiring_gate(serve, write_policy, ledger_url, action)
    assert gate.running.sweeper.sweep() == 1

    if settle == "commit":
        gate.stub.Commit(
            pb.CommitRequest(reservation_id=decided.reservation_id, input_tokens=50_000)
        )
    else:
        gate.stub.Release(pb.ReleaseRequest(reservation_id=decided.reservation_id))

    status = budget_of(gate, "research")
    assert status.spent_micros == spent
    assert status.reserved_micros == 0
    events = [row.event for row in gate.audit_rows("abandoned")]
    assert events == ["check", "expire", settle]


@pytest.mark.parametrize(
    ("request_", "decision", "reason", "rule"),
    [
        pytest.param(
            check_request("r", 1000),
            "ALLOW",
            "ALLOWED",
            "departments/research",
            id="allow",
        ),
        pytest.param(
            check_request("r", 400_000, department="capped"),
            "DENY",
            "BUDGET_EXCEEDED",
            "departments/capped/budgets/daily",
            id="budget",
        ),
        pytest.param(
            check_request("r", 1000, model="gpt-9"),
            "DENY",
            "UNKNOWN_MODEL",
            "catalog",
            id="unknown-model",
        ),
        pytest.param(
            check_request("r", 1000, department="nowhere"),
            "DENY",
            "UNKNOWN_DEPARTMENT",
            "organization/unknown_department",
            id="unknown-department",
        ),
        pytest.param(
            check_request("r", 1000, department="labs", model="claudex-1"),
            "DENY",
            "MODEL_NOT_ALLOWED",
            "departments/labs/models",
            id="model-not-allowed",
        ),
        pytest.param(
            check_request("r", 2_000_001),
            "DENY",
            "REQUEST_TOO_LARGE",
            "models/flat-1/context_window",
            id="too-large",
        ),
    ],
)
def test_audit_row_per_decision(
    gate: Gate, request_: pb.CheckRequest, decision: str, reason: str, rule: str
) -> None:
    response = gate.stub.Check(request_)
    replay = gate.stub.Check(request_)

    rows = gate.audit_rows("r")
    assert replay.replayed is True
    assert len(rows) == 1
    assert rows[0].event == "check"
    assert rows[0].decision == decision
    assert rows[0].reason_code == reason
    assert rows[0].rule == rule == response.rule
    assert (rows[0].reservation_id or "") == response.reservation_id


def test_prompt_not_stored_or_logged(
    gate: Gate, capfd: pytest.CaptureFixture[str]
) -> None:
    marker = f"secret-prompt-{secrets.token_hex(8)}"
    request_id = f"request-{secrets.token_hex(8)}"
    prompt = pb.CheckRequest(
        request_id=request_id,
        principal=pb.Principal(department="research"),
        model="flat-1",
        prompt=f"Summarise {marker} in one line.",
        max_output_tokens=10,
    )
    chat = pb.CheckRequest(
        request_id=f"{request_id}-chat",
        principal=pb.Principal(department="research"),
        model="chat-1",
        messages=pb.Messages(
            messages=[pb.ChatMessage(role="user", content=f"Explain {marker}.")]
        ),
    )
    denied = pb.CheckRequest(
        request_id=f"{request_id}-denied",
        principal=pb.Principal(department="research"),
        model="gpt-9",
        prompt=marker,
    )

    with structlog.testing.capture_logs() as logs:
        allowed = gate.stub.Check(prompt)
        gate.stub.Commit(
            pb.CommitRequest(reservation_id=allowed.reservation_id, input_tokens=12)
        )
        gate.stub.Check(chat)
        gate.stub.Check(denied)
    gate.engine.dispose()

    database = Path(make_url(gate.database_url).database or "")
    stored = b"".join(
        path.read_bytes() for path in database.parent.glob(f"{database.name}*")
    )
    output = capfd.readouterr()
    # The request id is stored and logged, so finding it shows the search works.
    assert request_id.encode() in stored
    assert any(entry.get("request_id") == request_id for entry in logs)
    assert marker.encode() not in stored
    assert marker not in repr(logs)
    assert marker not in output.out + output.err


def test_check_user_case_shares_budget(ledger_gate: Gate) -> None:
    # platform gives each user 5 USD a day, and a Check of 2,000,000 flat-1
    # input tokens reserves 2 USD.
    spellings = ("Alice", "ALICE", " alice ")

    responses = [
        ledger_gate.stub.Check(
            check_request(f"case-{n}", 2_000_000, department="platform", user=name)
        )
        for n, name in enumerate(spellings)
    ]
    budgets = ledger_gate.stub.GetBudget(
        pb.GetBudgetRequest(principal=pb.Principal(department="platform", user="aLiCe"))
    ).budgets
    with ledger_gate.engine.connect() as connection:
        audit_rows = connection.execute(
            text('SELECT "user" FROM audit_events ORDER BY id')
        )
        audited_users = list(audit_rows.scalars())
        connection.rollback()

    per_user = [status for status in budgets if status.budget == "per-user-daily"]
    assert [response.decision for response in responses] == [ALLOW, ALLOW, DENY]
    assert responses[2].rule == "departments/platform/budgets/per-user-daily"
    assert [status.scope for status in per_user] == ["user:alice"]
    assert per_user[0].reserved_micros == 4_000_000
    # The audit log keeps the user name as sent, trimmed of whitespace.
    assert audited_users == ["Alice", "ALICE", "alice"]


def test_check_retry_other_principal(ledger_gate: Gate) -> None:
    first = ledger_gate.stub.Check(check_request("shared-id", 1_000, user="alice"))

    error_code, details = rpc_error(
        lambda: ledger_gate.stub.Check(check_request("shared-id", 1_000, user="bob"))
    )

    assert first.decision == ALLOW
    assert error_code == grpc.StatusCode.FAILED_PRECONDITION
    assert "shared-id" in details
    assert first.reservation_id not in details
    assert ledger_gate.count("reservations") == 1


def _text_field(number: int, value: bytes) -> bytes:
    """Encode a short length-delimited protobuf field by hand, UTF-8 or not."""
    assert len(value) < 128, "the length must fit in one varint byte"
    return bytes([number << 3 | 2, len(value)]) + value


# A prompt that fails UTF-8 decoding after the marker, so a body that is
# logged or stored would show the marker.
_BAD_PROMPT = b"secret-prompt-7f3a " + b"\xff\xfe"


@pytest.mark.parametrize(
    ("method", "body", "message_type", "reason", "event"),
    [
        pytest.param(
            "Check",
            _text_field(1, b"bad-user")
            + _text_field(2, _text_field(1, b"platform") + _text_field(3, b"al\xe9"))
            + _text_field(3, b"flat-1")
            + bytes([6 << 3, 10]),
            "spendgate.v1.CheckRequest",
            "string fields must be UTF-8",
            "check",
            id="check-latin-1-user",
        ),
        pytest.param(
            "Check",
            _text_field(1, b"bad-prompt")
            + _text_field(2, _text_field(1, b"research"))
            + _text_field(3, b"flat-1")
            + _text_field(4, _BAD_PROMPT),
            "spendgate.v1.CheckRequest",
            "string fields must be UTF-8",
            "check",
            id="check-bad-prompt",
        ),
        pytest.param(
            "Commit",
            _text_field(1, b"\xc3\x28"),
            "spendgate.v1.CommitRequest",
            "string fields must be UTF-8",
            "commit",
            id="commit-bad-reservation-id",
        ),
        pytest.param(
            "Release",
            _text_field(1, b"\x80"),
            "spendgate.v1.ReleaseRequest",
            "string fields must be UTF-8",
            "release",
            id="release-bad-reservation-id",
        ),
        pytest.param(
            "GetBudget",
            _text_field(1, _text_field(1, b"r\xe9search")),
            "spendgate.v1.GetBudgetRequest",
            "string fields must be UTF-8",
            "get_budget",
            id="get-budget-bad-department",
        ),
        pytest.param(
            "GetPolicyStatus",
            # Field 1 claims 5 bytes, but only 2 follow.
            bytes([1 << 3 | 2, 5]) + b"ab",
            "spendgate.v1.GetPolicyStatusRequest",
            "the body is not a valid protobuf encoding",
            "get_policy_status",
            id="get-policy-status-truncated",
        ),
    ],
)
def test_undecodable_request_invalid(
    gate: Gate, method: str, body: bytes, message_type: str, reason: str, event: str
) -> None:
    call = gate.channel.unary_unary(
        f"/spendgate.v1.SpendGate/{method}",
        request_serializer=None,
        response_deserializer=None,
    )

    with structlog.testing.capture_logs() as logs:
        error_code, details = rpc_error(lambda: call(body, timeout=10))
    after = gate.stub.Check(check_request("after-bad-body", 10))

    assert error_code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == f"request is not a valid {message_type}: {reason}"
    assert logs == [
        {
            "event": event,
            "log_level": "warning",
            "status": "INVALID_ARGUMENT",
            "error": details,
            "request_bytes": len(body),
        }
    ]
    assert b"secret-prompt" not in repr(logs).encode()
    assert gate.audit_rows("bad-user") == []
    assert gate.audit_rows("bad-prompt") == []
    assert after.decision == ALLOW


def test_shadow_rule_allows_and_audits(
    serve: ServeFactory, write_policy: PolicyWriter, sqlite_url: str
) -> None:
    trial = """\
apiVersion: spendgate/v1
kind: Department
name: trial
shadow_rules: [limits/max_request_usd]
limits:
  max_request_usd: 0.0005
budgets:
  - {name: daily, period: day, limit_usd: 1.00}
"""
    files = {**policy_files(), "departments/trial.yaml": trial}
    gate = serve(write_policy(files), sqlite_url)

    # 1,000 flat-1 tokens cost 1,000 micro-USD, over the 500 cap in shadow.
    response = gate.stub.Check(check_request("shadow-cap", 1000, department="trial"))
    with gate.engine.connect() as connection:
        audited = connection.execute(
            text(
                "SELECT decision, shadow_decision, message FROM audit_events"
                " WHERE request_id = 'shadow-cap'"
            )
        ).one()
        connection.rollback()

    assert response.decision == ALLOW
    assert response.shadow is True
    assert response.shadow_decision == DENY
    assert response.reservation_id != ""
    assert response.estimated_cost_micros == 1000
    assert audited.decision == "ALLOW"
    assert audited.shadow_decision == "DENY"
    assert "departments/trial/limits/max_request_usd" in audited.message


def test_busy_port_error_says_what_to_do(gate: Gate) -> None:
    address = f"127.0.0.1:{gate.running.port}"

    with pytest.raises(OSError, match="pass another --address HOST:PORT") as raised:
        create_server(address, PolicyHolder(gate.policy), gate.ledger)

    assert str(raised.value).startswith(f"cannot listen on {address}: ")


def test_locked_sqlite_keeps_loop_serving(gate: Gate) -> None:
    database = make_url(gate.database_url).database
    assert database is not None
    blocker = sqlite3.connect(database, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        waiting = gate.stub.Check.future(check_request("behind-lock", 100), timeout=30)
        time.sleep(0.3)
        # The ledger waits up to 5 s for the lock. A Check that waited on the
        # event loop would hold these calls past their 2 s deadlines.
        status = gate.stub.GetPolicyStatus(pb.GetPolicyStatusRequest(), timeout=2)
        health = health_pb2_grpc.HealthStub(gate.channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=2
        )
        still_waiting = not waiting.done()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()

    assert still_waiting
    assert waiting.result().decision == ALLOW
    assert status.version == gate.policy.version
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert [row.event for row in gate.audit_rows("behind-lock")] == ["check"]


@pytest.mark.parametrize(
    ("method", "request_", "expected"),
    [
        ("Check", check_request("short", 10), False),
        ("Check", pb.CheckRequest(prompt="x" * INLINE_MAX_CHARS), False),
        ("Check", pb.CheckRequest(prompt="x" * (INLINE_MAX_CHARS + 1)), True),
        (
            "Check",
            pb.CheckRequest(
                messages=pb.Messages(
                    messages=[
                        pb.ChatMessage(role="user", content="x" * INLINE_MAX_CHARS),
                        pb.ChatMessage(role="user", content="y"),
                    ]
                )
            ),
            True,
        ),
        (
            "Check",
            pb.CheckRequest(
                messages=pb.Messages(
                    messages=[pb.ChatMessage(role="user", name="x" * INLINE_MAX_CHARS)]
                )
            ),
            True,
        ),
        (
            "Check",
            pb.CheckRequest(
                messages=pb.Messages(
                    messages=[pb.ChatMessage(role="x" * (INLINE_MAX_CHARS + 1))]
                )
            ),
            True,
        ),
        (
            "Check",
            pb.CheckRequest(
                messages=pb.Messages(
                    messages=[pb.ChatMessage(role="u")] * (INLINE_MAX_MESSAGES + 1)
                )
            ),
            True,
        ),
        ("Commit", pb.CommitRequest(reservation_id="r"), False),
    ],
)
def test_sqlite_inline_dispatch(method: str, request_: object, expected: bool) -> None:
    assert _off_loop(method, request_) is expected


def test_server_model_by_ledger(ledger_gate: Gate) -> None:
    sqlite = ledger_gate.engine.dialect.name == "sqlite"

    expected = "grpc.aio" if sqlite else "grpcio thread pool"
    assert ledger_gate.running.model == expected


def test_sqlite_thread_pool_model(
    serve: ServeFactory, policy_dir: Path, sqlite_url: str
) -> None:
    gate = serve(policy_dir, sqlite_url, thread_pool_on_sqlite=True)

    spend(gate, "on-pool", 100)

    assert gate.running.model == "grpcio thread pool"
    assert budget_of(gate, "research").spent_micros == 100


def test_inline_check_skips_long_text_slots(gate: Gate) -> None:
    # Two long prompts counted on worker threads hold both slots that bound
    # the memory of long encodings. A shorter prompt counted inline must not
    # wait for one, or the whole loop waits with it.
    tokens._long_encodings.acquire()
    tokens._long_encodings.acquire()
    try:
        request = pb.CheckRequest(
            request_id="medium-prompt",
            principal=pb.Principal(department="research"),
            # An exact tokenizer; flat-1's approximate one encodes nothing.
            model="cached-1",
            # Inline, and long enough for the count cache's path.
            prompt="lorem ipsum " * 500,
        )
        response = gate.stub.Check(request, timeout=2)
        health = health_pb2_grpc.HealthStub(gate.channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=2
        )
    finally:
        tokens._long_encodings.release()
        tokens._long_encodings.release()

    assert response.decision == ALLOW
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_fail_open_inline_on_sqlite(
    write_policy: PolicyWriter, sqlite_url: str, tmp_path: Path
) -> None:
    organization = policy_files()["organization.yaml"] + "fail_mode: open\n"
    files = {**policy_files(), "organization.yaml": organization}
    engine = create_engine(sqlite_url)
    spool_path = tmp_path / "spool.jsonl"
    running = create_server(
        "127.0.0.1:0",
        PolicyHolder(load_policy(write_policy(files))),
        Ledger(engine),
        health_interval=0.1,
        sweep_interval=3600,
        spool=AuditSpool(spool_path),
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    stub = pb_grpc.SpendGateStub(channel)  # type: ignore[no-untyped-call]

    def audited() -> list[tuple[str, bool]]:
        with engine.connect() as connection:
            rows = connection.execute(
                text(
                    "SELECT decision, unverified FROM audit_events"
                    " WHERE request_id = 'open-inline'"
                )
            ).all()
            connection.rollback()
        return [(row.decision, bool(row.unverified)) for row in rows]

    try:
        # A missing table fails the inline Check's write with an
        # OperationalError, as a broken database file would.
        with engine.begin() as connection:
            connection.execute(text("ALTER TABLE reservations RENAME TO away"))
        response = stub.Check(check_request("open-inline", 100), timeout=5)
        with engine.begin() as connection:
            connection.execute(text("ALTER TABLE away RENAME TO reservations"))
        wait_for(lambda: audited() != [], "the spooled audit row")
        after = stub.Check(check_request("after-outage", 100), timeout=5)
    finally:
        channel.close()
        running.stop(grace=1)
        engine.dispose()

    assert running.model == "grpc.aio"
    assert response.decision == ALLOW
    assert response.unverified
    assert response.reservation_id == ""
    assert audited() == [("ALLOW", True)]
    assert after.unverified is False
