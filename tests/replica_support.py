"""Real `spendgate serve` processes and ledger checks for the multi-replica tests."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import sqlalchemy
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import Engine, Row, text
from sqlalchemy.pool import NullPool

from spendgate.v1 import spendgate_pb2_grpc as pb_grpc

STARTUP_SECONDS = 30.0
STOP_SECONDS = 10.0
RPC_SECONDS = 10.0

# Codes a real client retries on another replica with the same ids.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

Result = TypeVar("Result")


@dataclass(frozen=True, slots=True)
class Launched:
    """A started serve process and the file its stdout and stderr go to."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_text(self) -> str:
        """Return the whole log written so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def events(self) -> list[dict[str, Any]]:
        """Parse the JSON log lines, skipping lines that are not JSON."""
        parsed = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    parsed.append(entry)
        return parsed

    def event_names(self) -> list[str]:
        """Return the `event` field of every JSON log line, in order."""
        return [str(entry.get("event")) for entry in self.events()]


@dataclass(frozen=True, slots=True)
class Replica:
    """A ready serve process with a client channel and stubs."""

    launched: Launched
    port: int
    channel: grpc.Channel
    stub: pb_grpc.SpendGateStub
    health: health_pb2_grpc.HealthStub

    @property
    def process(self) -> subprocess.Popen[bytes]:
        """The serve process."""
        return self.launched.process

    def kill(self) -> None:
        """Send SIGKILL, as a crash or the OOM killer would, and reap the process."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=STOP_SECONDS)

    def health_status(self) -> int:
        """Return the overall health status from grpc.health.v1."""
        request = health_pb2.HealthCheckRequest(service="")
        return int(self.health.Check(request, timeout=RPC_SECONDS).status)


class ProcessGroup:
    """Start serve processes for one test and stop every one of them afterwards."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.launched: list[Launched] = []
        self.channels: list[grpc.Channel] = []

    def launch(
        self,
        policy_dir: Path,
        database_url: str,
        *options: str,
    ) -> Launched:
        """Start `spendgate serve` on a free loopback port without waiting for it."""
        name = f"replica-{len(self.launched)}"
        log_path = self.directory / f"{name}.log"
        command = [
            sys.executable,
            "-m",
            "spendgate",
            "--log-json",
            "serve",
            "--address",
            "127.0.0.1:0",
            "--policies",
            str(policy_dir),
            "--database",
            database_url,
            "--spool",
            str(self.directory / f"{name}-spool.jsonl"),
            "--no-watch",
            "--poll-interval",
            "0",
            *options,
        ]
        with log_path.open("wb") as log:
            # The child writes to a file it keeps open, not to a pipe that
            # could fill up and block the server.
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=self.directory
            )
        launched = Launched(name, process, log_path)
        self.launched.append(launched)
        return launched

    def start(
        self, count: int, policy_dir: Path, database_url: str, *options: str
    ) -> list[Replica]:
        """Start `count` replicas at once and return them when all are serving."""
        launched = [
            self.launch(policy_dir, database_url, *options) for _ in range(count)
        ]
        return [self.connect(item) for item in launched]

    def connect(self, launched: Launched) -> Replica:
        """Wait for the server_started log line, then connect to the logged port."""
        deadline = time.monotonic() + STARTUP_SECONDS
        port = 0
        while not port:
            started = [e for e in launched.events() if e["event"] == "server_started"]
            if started:
                port = int(started[0]["port"])
                break
            if launched.process.poll() is not None:
                pytest.fail(
                    f"{launched.name} exited with {launched.process.returncode} "
                    f"before serving; log:\n{launched.log_text()}"
                )
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{launched.name} did not log server_started within "
                    f"{STARTUP_SECONDS} s; log:\n{launched.log_text()}"
                )
            time.sleep(0.05)

        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.channels.append(channel)
        replica = Replica(
            launched=launched,
            port=port,
            channel=channel,
            # The generated SpendGate stub carries no type annotations.
            stub=pb_grpc.SpendGateStub(channel),  # type: ignore[no-untyped-call]
            health=health_pb2_grpc.HealthStub(channel),
        )
        status = replica.health_status()
        if status != health_pb2.HealthCheckResponse.SERVING:
            pytest.fail(f"{launched.name} started with health status {status}")
        return replica

    def stop_all(self) -> None:
        """Terminate every process still running, killing those that hang."""
        for channel in self.channels:
            channel.close()
        for launched in self.launched:
            if launched.process.poll() is None:
                launched.process.terminate()
        for launched in self.launched:
            try:
                launched.process.wait(timeout=STOP_SECONDS)
            except subprocess.TimeoutExpired:
                launched.process.kill()
                launched.process.wait(timeout=STOP_SECONDS)


def call_with_failover(
    replicas: Sequence[Replica],
    first: int,
    call: Callable[[Replica], Result],
    failures: list[grpc.StatusCode],
    *,
    seconds: float = 30.0,
) -> tuple[Result, int]:
    """Run `call` on replicas[first], moving to the next replica on a retryable error.

    A real client retries a failed Check or Commit with the same ids on
    another replica. Returns the result and the index of the replica that
    returned it, so the caller can keep using that replica.
    """
    deadline = time.monotonic() + seconds
    index = first
    while True:
        try:
            return call(replicas[index % len(replicas)]), index % len(replicas)
        except grpc.RpcError as error:
            code = error.code()
            if code not in RETRYABLE or time.monotonic() > deadline:
                raise
            failures.append(code)
            index += 1
            time.sleep(0.02)


@contextlib.contextmanager
def reader(database_url: str) -> Iterator[Engine]:
    """Yield an engine for the test's own reads, opening a connection per use."""
    engine = sqlalchemy.create_engine(database_url, poolclass=NullPool)
    try:
        yield engine
    finally:
        engine.dispose()


def fetch(engine: Engine, sql: str, **params: Any) -> list[Row[Any]]:
    """Run one query in its own short transaction and return every row."""
    with engine.connect() as connection:
        rows = list(connection.execute(text(sql), params))
        connection.rollback()
    return rows


# What each budget row should show, recomputed from the reservations linked
# to it: committed costs plus what expiry charged, and the open estimates.
_EXPECTED_USAGE = """
SELECT u.budget_key, u.spent_micros, u.reserved_micros,
       coalesce(sum(CASE WHEN r.state = 'committed' THEN r.actual_micros
                         WHEN r.state = 'expired' THEN r.charged_micros
                         ELSE 0 END), 0) AS expected_spent,
       coalesce(sum(CASE WHEN r.state = 'open' THEN r.estimated_micros
                         ELSE 0 END), 0) AS expected_reserved
FROM budget_usage u
LEFT JOIN reservation_budgets rb ON rb.usage_id = u.id
LEFT JOIN reservations r ON r.id = rb.reservation_id
GROUP BY u.id, u.budget_key, u.spent_micros, u.reserved_micros
ORDER BY u.budget_key
"""


def usage_mismatches(engine: Engine) -> list[str]:
    """List every budget row whose spent or reserved disagrees with its reservations."""
    problems = []
    for row in fetch(engine, _EXPECTED_USAGE):
        if row.spent_micros != row.expected_spent:
            problems.append(
                f"{row.budget_key}: spent_micros {row.spent_micros}, "
                f"reservations say {row.expected_spent}"
            )
        if row.reserved_micros != row.expected_reserved:
            problems.append(
                f"{row.budget_key}: reserved_micros {row.reserved_micros}, "
                f"open reservations say {row.expected_reserved}"
            )
    return problems
