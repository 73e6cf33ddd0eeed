"""Several `spendgate serve` processes on one ledger: exact budgets, crashes, drains."""

from __future__ import annotations

import signal
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from conftest import PolicyWriter
from replica_support import (
    ProcessGroup,
    Replica,
    call_with_failover,
    fetch,
    reader,
    usage_mismatches,
)
from spendgate.ledger import create_engine, migrate
from spendgate.v1 import spendgate_pb2 as pb
from support import wait_for

ALLOW = pb.DECISION_ALLOW
DENY = pb.DECISION_DENY
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# unit costs one micro-USD per input token and nothing per output token, so a
# Check of N input tokens with max_output_tokens 0 reserves exactly N micro-USD.
CATALOG = """\
apiVersion: spendgate/v1
kind: ModelCatalog
models:
  - name: unit
    tokenizer: approximate
    price_per_million_tokens: {input: 1.00, output: 0}
    context_window: 100000
    max_output_tokens: 1000
"""

ESTIMATE_MICROS = 1_000
WORKERS = "8"
DEPARTMENT_KEY_PATTERN = "departments/eng/budgets/daily|%"


def organization(reservation_ttl: str = "15m") -> str:
    """Return an Organization document that charges expired reservations."""
    return f"""\
apiVersion: spendgate/v1
kind: Organization
name: replicas-corp
timezone: UTC
reservation_ttl: {reservation_ttl}
on_reservation_expiry: charge
"""


def department(daily_usd: str, per_user_usd: str) -> str:
    """Return department eng with a daily budget and a daily per-user budget."""
    return f"""\
apiVersion: spendgate/v1
kind: Department
name: eng
budgets:
  - {{name: daily, period: day, limit_usd: {daily_usd}}}
  - {{name: per-user, period: day, limit_usd: {per_user_usd}, per: user}}
"""


def policy(
    write_policy: PolicyWriter,
    *,
    daily_usd: str = "1000",
    per_user_usd: str = "1000",
    reservation_ttl: str = "15m",
) -> Path:
    """Write a complete policy directory and return it."""
    return write_policy(
        {
            "organization.yaml": organization(reservation_ttl),
            "catalog.yaml": CATALOG,
            "eng.yaml": department(daily_usd, per_user_usd),
        }
    )


def check_request(
    request_id: str, user: str, input_tokens: int = ESTIMATE_MICROS
) -> pb.CheckRequest:
    """Build a Check whose estimate is exactly `input_tokens` micro-USD."""
    return pb.CheckRequest(
        request_id=request_id,
        principal=pb.Principal(department="eng", user=user),
        model="unit",
        input_tokens=input_tokens,
        max_output_tokens=0,
    )


def send_check(message: pb.CheckRequest) -> Callable[[Replica], pb.CheckResponse]:
    """Return a function sending `message` as a Check to the replica it is given."""
    return lambda replica: replica.stub.Check(message, timeout=10)


def send_commit(
    message: pb.CommitRequest,
) -> Callable[[Replica], pb.CommitResponse]:
    """Return a function sending `message` as a Commit to the replica it is given."""
    return lambda replica: replica.stub.Commit(message, timeout=10)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[ProcessGroup]:
    """Return a group that starts serve processes and stops them after the test."""
    group = ProcessGroup(tmp_path)
    yield group
    group.stop_all()


@pytest.mark.parametrize(
    ("backend", "replica_count"),
    [
        pytest.param("postgres", 3, id="postgres-3", marks=pytest.mark.postgres),
        pytest.param("sqlite", 1, id="sqlite-1"),
    ],
)
def test_hard_budget_exact_under_race(
    request: pytest.FixtureRequest,
    processes: ProcessGroup,
    write_policy: PolicyWriter,
    backend: str,
    replica_count: int,
) -> None:
    database_url: str = request.getfixturevalue(f"{backend}_url")
    admitted = 40
    limit_micros = admitted * ESTIMATE_MICROS
    clients, per_client = 32, 6
    directory = policy(write_policy, daily_usd=f"{limit_micros / 1_000_000:.6f}")
    replicas = processes.start(
        replica_count, directory, database_url, "--workers", WORKERS
    )
    start = threading.Barrier(clients)
    stop_sampling = threading.Event()
    samples: list[int] = []

    def client(worker: int) -> list[tuple[str, pb.CheckResponse]]:
        near = replicas[worker % len(replicas)]
        far = replicas[(worker + 1) % len(replicas)]
        answers = []
        start.wait(timeout=30)
        for index in range(per_client):
            request_id = f"race-{worker}-{index}"
            response = near.stub.Check(
                check_request(request_id, f"user-{worker}"), timeout=30
            )
            answers.append((request_id, response))
            if response.decision == ALLOW:
                # Committing the estimate exactly keeps the budget full, so the
                # number of ALLOWs stays the number the limit admits.
                far.stub.Commit(
                    pb.CommitRequest(
                        reservation_id=response.reservation_id,
                        input_tokens=ESTIMATE_MICROS,
                    ),
                    timeout=30,
                )
        return answers

    with reader(database_url) as engine:

        def sample() -> None:
            while not stop_sampling.is_set():
                rows = fetch(
                    engine,
                    "SELECT spent_micros + reserved_micros AS used FROM budget_usage"
                    " WHERE budget_key LIKE :key",
                    key=DEPARTMENT_KEY_PATTERN,
                )
                samples.extend(int(row.used) for row in rows)
                time.sleep(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        with ThreadPoolExecutor(max_workers=clients) as pool:
            results = [pool.submit(client, worker) for worker in range(clients)]
            answers = [answer for future in results for answer in future.result()]
        stop_sampling.set()
        sampler.join(timeout=10)

        usage = fetch(
            engine,
            "SELECT spent_micros, reserved_micros FROM budget_usage"
            " WHERE budget_key LIKE :key",
            key=DEPARTMENT_KEY_PATTERN,
        )
        allow_audits = Counter(
            row.request_id
            for row in fetch(
                engine,
                "SELECT request_id FROM audit_events"
                " WHERE event = 'check' AND decision = 'ALLOW'",
            )
        )
        check_audits = fetch(
            engine, "SELECT count(*) AS n FROM audit_events WHERE event = 'check'"
        )
        mismatches = usage_mismatches(engine)

    allowed = sorted(rid for rid, answer in answers if answer.decision == ALLOW)
    denied = [answer for _rid, answer in answers if answer.decision != ALLOW]
    assert len(answers) == clients * per_client
    assert len(allowed) == admitted
    assert {answer.decision for answer in denied} == {DENY}
    assert {answer.reason_code for answer in denied} == {"BUDGET_EXCEEDED"}
    assert len(usage) == 1
    assert usage[0].spent_micros == limit_micros
    assert usage[0].reserved_micros == 0
    assert samples, "the sampler read no budget row during the run"
    assert max(samples) <= limit_micros
    assert allow_audits == Counter(allowed)
    assert check_audits[0].n == clients * per_client
    assert mismatches == []


@pytest.mark.postgres
def test_new_user_over_budget_denied(
    processes: ProcessGroup, postgres_url: str, write_policy: PolicyWriter
) -> None:
    # Each first request of a user is estimated at 1,500 micro-USD, above the
    # 1,000 micro-USD per-user budget, so none of them fits.
    directory = policy(write_policy, per_user_usd="0.001")
    replicas = processes.start(3, directory, postgres_url, "--workers", WORKERS)
    users, per_user = 4, 8
    requests = [
        (
            replicas[index % 3],
            check_request(f"first-{user}-{index}", f"new-{user}", 1500),
        )
        for user in range(users)
        for index in range(per_user)
    ]

    # Sending through futures puts every Check in flight before the first response.
    futures = [
        replica.stub.Check.future(message, timeout=30) for replica, message in requests
    ]
    answers = [future.result() for future in futures]

    with reader(postgres_url) as engine:
        usage = fetch(engine, "SELECT budget_key, reserved_micros FROM budget_usage")
        reservations = fetch(engine, "SELECT count(*) AS n FROM reservations")
        audits = fetch(
            engine,
            "SELECT decision, count(*) AS n FROM audit_events"
            " WHERE event = 'check' GROUP BY decision",
        )
    assert [answer.decision for answer in answers] == [DENY] * (users * per_user)
    assert {answer.rule for answer in answers} == {"departments/eng/budgets/per-user"}
    assert {answer.reservation_id for answer in answers} == {""}
    assert [row for row in usage if row.reserved_micros > 0] == []
    assert reservations[0].n == 0
    assert {row.decision: row.n for row in audits} == {"DENY": users * per_user}


@pytest.mark.postgres
def test_sigkill_mid_load_ledger_consistent(
    processes: ProcessGroup, postgres_url: str, write_policy: PolicyWriter
) -> None:
    ttl_seconds = 2
    directory = policy(write_policy, reservation_ttl=f"{ttl_seconds}s")
    replicas = processes.start(
        3,
        directory,
        postgres_url,
        "--workers",
        WORKERS,
        "--sweep-interval",
        "0.25",
    )
    victim = replicas[0]
    clients = 12
    stop = threading.Event()
    failures: list[grpc.StatusCode] = []
    committed: dict[str, int] = {}
    abandoned: set[str] = set()
    lock = threading.Lock()

    def client(worker: int) -> None:
        preferred = worker
        index = 0
        while not stop.is_set():
            request_id = f"kill-{worker}-{index}"
            message = check_request(request_id, f"user-{worker % 3}")
            answer, preferred = call_with_failover(
                replicas,
                preferred,
                send_check(message),
                failures,
            )
            assert answer.decision == ALLOW, answer
            reservation = answer.reservation_id
            if index % 5 == 4:
                # The application died with its call, so nobody commits this one.
                with lock:
                    abandoned.add(reservation)
                index += 1
                continue
            tokens = 500 + (worker * 37 + index * 101) % 1000
            commit, preferred = call_with_failover(
                replicas,
                preferred,
                send_commit(
                    pb.CommitRequest(reservation_id=reservation, input_tokens=tokens)
                ),
                failures,
            )
            assert commit.cost_micros == tokens
            with lock:
                committed[reservation] = commit.cost_micros
            index += 1

    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = [pool.submit(client, worker) for worker in range(clients)]
        time.sleep(1.0)
        victim.kill()
        time.sleep(1.5)
        stop.set()
        for future in results:
            future.result(timeout=60)

    with reader(postgres_url) as engine:
        after_load = usage_mismatches(engine)
        wait_for(
            lambda: (
                fetch(
                    engine,
                    "SELECT count(*) AS n FROM reservations WHERE state = 'open'",
                )[0].n
                == 0
            ),
            "the sweepers to settle every open reservation",
        )
        after_expiry = usage_mismatches(engine)
        states = {
            row.id: row
            for row in fetch(
                engine,
                "SELECT id, state, actual_micros, charged_micros,"
                " expires_at, settled_at FROM reservations",
            )
        }
        expire_rows = Counter(
            row.reservation_id
            for row in fetch(
                engine, "SELECT reservation_id FROM audit_events WHERE event = 'expire'"
            )
        )
        commit_audit = fetch(
            engine,
            "SELECT coalesce(sum(actual_micros), 0) AS total, count(*) AS n"
            " FROM audit_events WHERE event = 'commit'",
        )[0]
        department_spent = fetch(
            engine,
            "SELECT spent_micros FROM budget_usage WHERE budget_key LIKE :key",
            key=DEPARTMENT_KEY_PATTERN,
        )[0].spent_micros

    expired = {rid for rid, row in states.items() if row.state == "expired"}
    charged = {rid for rid, row in states.items() if row.charged_micros > 0}
    expiry_charges = sum(states[rid].charged_micros for rid in expired)
    slowest_expiry_seconds = max(
        (states[rid].settled_at - states[rid].expires_at).total_seconds()
        for rid in charged
    )
    assert victim.process.returncode == -signal.SIGKILL
    assert failures, "killing a replica failed no call"
    assert set(failures) <= {grpc.StatusCode.UNAVAILABLE}, failures
    assert abandoned, "no reservation was left to expire"
    assert after_load == []
    assert after_expiry == []
    assert {rid for rid, row in states.items() if row.state == "committed"} == set(
        committed
    )
    assert expired == abandoned
    assert set(expire_rows) == charged
    assert set(expire_rows.values()) == {1}
    assert slowest_expiry_seconds < 5
    assert commit_audit.n == len(committed)
    assert commit_audit.total == sum(committed.values())
    assert department_spent == commit_audit.total + expiry_charges


def test_sigkill_mid_load_sqlite_consistent(
    processes: ProcessGroup, sqlite_url: str, write_policy: PolicyWriter
) -> None:
    # One process owns a SQLite file, so its units of work share group
    # commits. A kill mid-group must lose the whole group and nothing else.
    directory = policy(write_policy, reservation_ttl="2s")
    (first,) = processes.start(
        1, directory, sqlite_url, "--workers", WORKERS, "--sweep-interval", "0.25"
    )
    stop = threading.Event()
    committed: dict[str, int] = {}
    failed: list[grpc.StatusCode] = []
    lock = threading.Lock()

    def client(worker: int) -> None:
        index = 0
        while not stop.is_set():
            message = check_request(f"sqlite-kill-{worker}-{index}", f"u{worker % 3}")
            index += 1
            try:
                answer = first.stub.Check(message, timeout=5)
                tokens = 500 + (worker * 37 + index * 101) % 1000
                commit = first.stub.Commit(
                    pb.CommitRequest(
                        reservation_id=answer.reservation_id, input_tokens=tokens
                    ),
                    timeout=5,
                )
            except grpc.RpcError as error:
                with lock:
                    failed.append(error.code())
                time.sleep(0.02)
                continue
            with lock:
                committed[answer.reservation_id] = commit.cost_micros

    with ThreadPoolExecutor(max_workers=12) as pool:
        results = [pool.submit(client, worker) for worker in range(12)]
        time.sleep(1.0)
        first.kill()
        time.sleep(0.3)
        stop.set()
        for future in results:
            future.result(timeout=60)

    with reader(sqlite_url) as engine:
        after_kill = usage_mismatches(engine)
    # A new process on the same file sweeps what the killed one left open.
    processes.start(1, directory, sqlite_url, "--sweep-interval", "0.25")
    with reader(sqlite_url) as engine:
        wait_for(
            lambda: (
                fetch(
                    engine,
                    "SELECT count(*) AS n FROM reservations WHERE state = 'open'",
                )[0].n
                == 0
            ),
            "the new process to settle every open reservation",
        )
        after_sweep = usage_mismatches(engine)
        stored = {
            row.id: row.actual_micros
            for row in fetch(
                engine,
                "SELECT id, actual_micros FROM reservations WHERE state = 'committed'",
            )
        }
        commit_audit = fetch(
            engine,
            "SELECT coalesce(sum(actual_micros), 0) AS total, count(*) AS n"
            " FROM audit_events WHERE event = 'commit'",
        )[0]

    assert first.process.returncode == -signal.SIGKILL
    assert failed, "killing the process failed no call"
    assert committed, "no Commit finished before the kill"
    assert after_kill == []
    assert after_sweep == []
    # A Commit can land just before the kill and lose only its response.
    assert set(committed) <= set(stored)
    assert all(stored[rid] == cost for rid, cost in committed.items())
    assert commit_audit.n == len(stored)
    assert commit_audit.total == sum(stored.values())


@pytest.mark.parametrize(
    ("model", "logged"),
    [("event-loop", "grpc.aio"), ("thread-pool", "grpcio thread pool")],
)
def test_sigterm_drains_in_flight_calls(
    processes: ProcessGroup,
    sqlite_url: str,
    tmp_path: Path,
    write_policy: PolicyWriter,
    model: str,
    logged: str,
) -> None:
    grace_seconds = 10.0
    (replica,) = processes.start(
        1,
        policy(write_policy),
        sqlite_url,
        "--sqlite-server-model",
        model,
        "--workers",
        WORKERS,
        "--grace",
        str(grace_seconds),
        # No database pings while the test holds the write lock, and Checks
        # wait for that lock longer than the test can take on a slow machine.
        "--health-interval",
        "60",
        "--sqlite-busy-timeout",
        "60",
    )
    statuses: list[tuple[float, int]] = []
    serving = threading.Event()
    not_serving = threading.Event()
    watch = replica.health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)

    def follow_health() -> None:
        try:
            for response in watch:
                statuses.append((time.monotonic(), int(response.status)))
                if response.status == SERVING:
                    serving.set()
                if response.status == NOT_SERVING:
                    not_serving.set()
                    # The drain waits for every open call, this stream included.
                    watch.cancel()
        except grpc.RpcError:
            # Cancelling ends the stream with an error. A missing NOT_SERVING
            # fails the assertions below.
            return

    follower = threading.Thread(target=follow_health, daemon=True)
    follower.start()
    assert serving.wait(timeout=10)

    # Holding SQLite's write lock keeps the Checks waiting inside the server
    # (for up to the 60 s busy timeout set above) until the test lets them finish.
    blocker = sqlite3.connect(tmp_path / "ledger.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    finished: list[float] = []
    calls = [
        replica.stub.Check.future(
            check_request(f"drain-{index}", "drainer"), timeout=30
        )
        for index in range(3)
    ]
    for call in calls:
        call.add_done_callback(lambda _call: finished.append(time.monotonic()))
    time.sleep(0.5)
    signalled = time.monotonic()
    replica.process.send_signal(signal.SIGTERM)
    saw_not_serving = not_serving.wait(timeout=3)
    # Health turns NOT_SERVING before the listener closes, so a call sent in
    # between is still taken. Once the server logs `draining` it takes none;
    # which code the client sees depends on whether its connection was closed.
    wait_for(lambda: "draining" in replica.launched.event_names(), "draining")
    with pytest.raises(grpc.RpcError) as refused:
        replica.stub.Check(check_request("after-sigterm", "drainer"), timeout=5)
    time.sleep(0.3)
    still_running = sum(not call.done() for call in calls)
    blocker.execute("ROLLBACK")
    blocker.close()
    code = replica.process.wait(timeout=grace_seconds + 10)
    exited = time.monotonic()
    answers = [call.result(timeout=10) for call in calls]
    follower.join(timeout=10)

    events = replica.launched.event_names()
    assert saw_not_serving
    assert refused.value.code() in {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
    }
    assert still_running == len(calls)
    assert [answer.decision for answer in answers] == [ALLOW] * len(calls)
    assert code == 0
    assert exited - signalled < grace_seconds
    not_serving_at = next(at for at, status in statuses if status == NOT_SERVING)
    assert signalled < not_serving_at < min(finished)
    assert "shutdown_started" in events
    assert "shutdown_finished" in events
    started_at = events.index("shutdown_started")
    finished_at = events.index("shutdown_finished")
    assert events[started_at:finished_at].count("check") == len(calls)
    started = next(
        event
        for event in replica.launched.events()
        if event["event"] == "server_started"
    )
    assert started["server_model"] == logged


def test_serve_rejects_outdated_schema(
    processes: ProcessGroup, tmp_path: Path, write_policy: PolicyWriter
) -> None:
    database_url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = create_engine(database_url, pool_size=1)
    migrate(engine, "0001")
    engine.dispose()

    launched = processes.launch(policy(write_policy), database_url)
    code = launched.process.wait(timeout=30)

    log = launched.log_text()
    assert code != 0
    assert f"run `spendgate migrate --database {database_url}` first" in log
    assert "revision 0001" in log
    assert "server_started" not in launched.event_names()


def test_serve_rejects_missing_sqlite_error(
    processes: ProcessGroup, tmp_path: Path, write_policy: PolicyWriter
) -> None:
    missing = tmp_path / "never-migrated.db"
    database_url = f"sqlite:///{missing}"

    launched = processes.launch(policy(write_policy), database_url)
    code = launched.process.wait(timeout=30)

    log = launched.log_text()
    assert code == 1
    assert f"database file {missing} not found" in log
    assert f"`spendgate migrate --database {database_url}`" in log
    # Opening the file would have created an empty database.
    assert not missing.exists()


@pytest.mark.postgres
def test_check_idempotent_across_replicas(
    processes: ProcessGroup, postgres_url: str, write_policy: PolicyWriter
) -> None:
    first, second = processes.start(
        2, policy(write_policy), postgres_url, "--workers", WORKERS
    )
    request_ids = [f"twice-{index}" for index in range(10)]

    # Both replicas get every request_id at the same time, as after a client
    # timeout that was retried elsewhere while the first call still ran.
    pending = [
        replica.stub.Check.future(check_request(rid, "alice"), timeout=30)
        for rid in request_ids
        for replica in (first, second)
    ]
    answers = [future.result() for future in pending]
    pairs = [answers[index : index + 2] for index in range(0, len(answers), 2)]
    reservation_ids = [pair[0].reservation_id for pair in pairs]
    commits = [
        first.stub.Commit(
            pb.CommitRequest(reservation_id=reservation, input_tokens=700),
            timeout=30,
        )
        for reservation in reservation_ids
    ]
    retries = [
        second.stub.Commit(
            pb.CommitRequest(reservation_id=reservation, input_tokens=700),
            timeout=30,
        )
        for reservation in reservation_ids
    ]

    with reader(postgres_url) as engine:
        reservations = Counter(
            row.request_id
            for row in fetch(engine, "SELECT request_id FROM reservations")
        )
        check_rows = Counter(
            row.request_id
            for row in fetch(
                engine, "SELECT request_id FROM audit_events WHERE event = 'check'"
            )
        )
        commit_rows = Counter(
            row.reservation_id
            for row in fetch(
                engine,
                "SELECT reservation_id FROM audit_events WHERE event = 'commit'",
            )
        )
        usage = fetch(
            engine,
            "SELECT spent_micros, reserved_micros FROM budget_usage"
            " WHERE budget_key LIKE :key",
            key=DEPARTMENT_KEY_PATTERN,
        )
        mismatches = usage_mismatches(engine)

    for one, other in pairs:
        assert one.decision == ALLOW
        assert one.reservation_id != ""
        assert other.reservation_id == one.reservation_id
        assert sorted([one.replayed, other.replayed]) == [False, True]
    assert reservations == Counter(request_ids)
    assert check_rows == Counter(request_ids)
    assert [commit.already_committed for commit in commits] == [False] * 10
    assert [retry.already_committed for retry in retries] == [True] * 10
    assert [retry.cost_micros for retry in retries] == [700] * 10
    assert commit_rows == Counter(reservation_ids)
    assert usage[0].spent_micros == 7_000
    assert usage[0].reserved_micros == 0
    assert mismatches == []
