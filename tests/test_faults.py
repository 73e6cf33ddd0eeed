"""Database outages: fail modes, health transitions and a consistent ledger after."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import text
from sqlalchemy.engine import make_url

from spendgate.ledger import Ledger, create_engine
from spendgate.ledger._spool import AuditSpool
from spendgate.policy import load_policy
from spendgate.server import PolicyHolder, Running, create_server
from spendgate.v1 import spendgate_pb2 as pb
from spendgate.v1 import spendgate_pb2_grpc as pb_grpc
from support import wait_for
from tcp_proxy import TcpProxy

pytestmark = pytest.mark.postgres

CATALOG = """\
apiVersion: spendgate/v1
kind: ModelCatalog
models:
  - name: unit
    tokenizer: approximate
    price_per_million_tokens: {input: 1.00, output: 1.00}
    context_window: 1000000
    max_output_tokens: 1000
"""

DEPARTMENT = """\
apiVersion: spendgate/v1
kind: Department
name: eng
budgets:
  - {name: daily, period: day, limit_usd: 100}
"""


def organization(fail_mode: str) -> str:
    """Return an Organization document with the given fail mode."""
    return f"""\
apiVersion: spendgate/v1
kind: Organization
name: faults-corp
timezone: UTC
fail_mode: {fail_mode}
"""


def through_proxy(url: str, proxy: TcpProxy) -> str:
    """Point a database URL at the proxy instead of the server."""
    return (
        make_url(url)
        .set(host="127.0.0.1", port=proxy.port)
        .render_as_string(hide_password=False)
    )


class Outage:
    """A server whose PostgreSQL connection runs through a proxy the test cuts."""

    def __init__(self, running: Running, proxy: TcpProxy, ledger: Ledger) -> None:
        self.running = running
        self.proxy = proxy
        self.ledger = ledger
        self.channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
        self.stub = pb_grpc.SpendGateStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def status(self) -> int:
        """Return the overall health status."""
        request = health_pb2.HealthCheckRequest(service="")
        return int(self.health.Check(request, timeout=5).status)

    def check(self, request_id: str) -> pb.CheckResponse:
        """Send a Check of 1,000 input tokens and 0 output tokens (1,000 micro-USD)."""
        return self.stub.Check(
            pb.CheckRequest(
                request_id=request_id,
                principal=pb.Principal(department="eng", user="u1"),
                model="unit",
                input_tokens=1000,
                max_output_tokens=0,
            ),
            timeout=15,
        )


@pytest.fixture
def outage(
    tmp_path: Path, postgres_url: str, write_policy: Callable[..., Path]
) -> Iterator[Callable[[str], Outage]]:
    """Return a function starting a proxied server with a fail mode."""
    started: list[Outage] = []
    target = make_url(postgres_url)

    def start(fail_mode: str) -> Outage:
        directory = write_policy(
            {
                "organization.yaml": organization(fail_mode),
                "catalog.yaml": CATALOG,
                "eng.yaml": DEPARTMENT,
            }
        )
        proxy = TcpProxy(target.host or "127.0.0.1", target.port or 5432)
        proxy.start()
        engine = create_engine(through_proxy(postgres_url, proxy), pool_size=4)
        ledger = Ledger(engine)
        running = create_server(
            "127.0.0.1:0",
            PolicyHolder(load_policy(directory)),
            ledger,
            max_workers=8,
            health_interval=0.1,
            sweep_interval=3600,
            spool=AuditSpool(tmp_path / f"spool-{fail_mode}.jsonl"),
        )
        started.append(Outage(running, proxy, ledger))
        return started[-1]

    yield start
    for item in started:
        item.channel.close()
        item.running.stop(grace=1)
        item.proxy.close()
        item.ledger.engine.dispose()


def audit_count(postgres_url: str, where: str = "TRUE") -> int:
    """Count audit rows matching a SQL condition, through a direct connection."""
    engine = create_engine(postgres_url, pool_size=1)
    with engine.connect() as connection:
        found = connection.execute(
            text(f"SELECT count(*) FROM audit_events WHERE {where}")
        ).scalar()
        connection.rollback()
    engine.dispose()
    return int(found or 0)


def test_fail_closed_unavailable_then_recovers(
    outage: Callable[[str], Outage], postgres_url: str
) -> None:
    gate = outage("closed")
    assert gate.check("before").decision == pb.DECISION_ALLOW
    assert gate.status() == health_pb2.HealthCheckResponse.SERVING

    gate.proxy.cut()
    with pytest.raises(grpc.RpcError) as raised:
        gate.check("during")
    wait_for(
        lambda: gate.status() == health_pb2.HealthCheckResponse.NOT_SERVING,
        "NOT_SERVING",
    )
    gate.proxy.restore()
    wait_for(lambda: gate.status() == health_pb2.HealthCheckResponse.SERVING, "SERVING")
    after = gate.check("after")

    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert after.decision == pb.DECISION_ALLOW
    assert audit_count(postgres_url, "request_id = 'during'") == 0
    assert audit_count(postgres_url, "request_id IN ('before', 'after')") == 2


def test_fail_open_allows_unverified_and_audits_later(
    outage: Callable[[str], Outage], postgres_url: str
) -> None:
    gate = outage("open")
    gate.check("warm-up")

    gate.proxy.cut()
    during = [gate.check(f"open-{index}") for index in range(3)]
    gate.proxy.restore()
    wait_for(lambda: gate.status() == health_pb2.HealthCheckResponse.SERVING, "SERVING")
    wait_for(
        lambda: audit_count(postgres_url, "unverified") == 3, "the spooled audit rows"
    )

    for response in during:
        assert response.decision == pb.DECISION_ALLOW
        assert response.unverified
        assert response.reservation_id == ""
    assert audit_count(postgres_url, "unverified AND reservation_id IS NULL") == 3
    assert gate.check("verified-again").unverified is False


def retry(call: Callable[[], object], failures: list[grpc.StatusCode]) -> object:
    """Call until it succeeds, as an application retrying with the same ids would."""
    for _attempt in range(400):
        try:
            return call()
        except grpc.RpcError as error:
            failures.append(error.code())
            time.sleep(0.02)
    pytest.fail("a call kept failing after the outage ended")


def test_outage_during_load_loses_nothing(
    outage: Callable[[str], Outage], postgres_url: str
) -> None:
    gate = outage("closed")
    committed: dict[str, int] = {}
    failures: list[grpc.StatusCode] = []
    stop = threading.Event()
    lock = threading.Lock()

    def client(worker: int) -> None:
        for index in range(400):
            if stop.is_set():
                return
            request_id = f"load-{worker}-{index}"
            response = retry(partial(gate.check, request_id), failures)
            assert isinstance(response, pb.CheckResponse)
            reservation = response.reservation_id
            commit = retry(
                partial(
                    gate.stub.Commit,
                    pb.CommitRequest(reservation_id=reservation, input_tokens=500),
                    timeout=15,
                ),
                failures,
            )
            assert isinstance(commit, pb.CommitResponse)
            with lock:
                committed[reservation] = commit.cost_micros

    workers = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for worker in workers:
        worker.start()
    time.sleep(0.5)
    gate.proxy.cut()
    time.sleep(1.0)
    gate.proxy.restore()
    time.sleep(1.0)
    stop.set()
    for worker in workers:
        worker.join(timeout=60)

    engine = create_engine(postgres_url, pool_size=1)
    with engine.connect() as connection:
        usage = connection.execute(
            text("SELECT spent_micros, reserved_micros FROM budget_usage")
        ).one()
        audited = connection.execute(
            text(
                "SELECT coalesce(sum(actual_micros), 0) FROM audit_events"
                " WHERE event = 'commit'"
            )
        ).scalar()
        connection.rollback()
    engine.dispose()

    assert failures, "the outage failed no call"
    assert set(failures) == {grpc.StatusCode.UNAVAILABLE}, failures
    assert len(committed) > 10
    assert usage.spent_micros == sum(committed.values())
    assert usage.spent_micros == audited
    assert usage.reserved_micros == 0
