"""Time spendgate's own work on a Check and a Commit, in this process.

The servicer's handlers are called directly on one thread, with no gRPC
around them: request validation, policy evaluation with token counting,
the SQL transaction on a migrated SQLite file, the response and the JSON
log line. That is the least a Check+Commit pair can cost the server beyond
what the echo costs, whatever the server model.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import grpc

from _workload import TOKENIZER, CheckCommit, Scenario
from spendgate import ledger, logs, tokens
from spendgate.policy import load_policy
from spendgate.server import PolicyHolder, SpendGateServicer
from spendgate.v1 import spendgate_pb2 as pb

WARMUP_PAIRS = 100
IDLE_SECONDS = 0.001


@dataclass(frozen=True)
class OwnWork:
    """Median milliseconds of each part, over `pairs` Check+Commit pairs."""

    pairs: int
    check_ms: float
    commit_ms: float
    # tiktoken's encode_ordinary alone on the same prompts.
    tokenize_ms: float
    # Time inside sqlite3's C methods (execute, commit and the like) during
    # a Check and during a Commit, timed by a profile hook over another
    # `pairs` pairs.
    check_sqlite_ms: float
    commit_sqlite_ms: float
    # The same Check with IDLE_SECONDS of sleep before each pair, as a server
    # waits between the calls of one client: caches and the CPU cool down.
    check_after_idle_ms: float

    @property
    def pair_ms(self) -> float:
        """Own work of a Check and its Commit."""
        return self.check_ms + self.commit_ms


class _Context:
    """A minimal grpc.ServicerContext: the handlers use it only to abort."""

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        raise RuntimeError(f"{code.name}: {details}")


def _timed(times: list[float], call: Callable[..., Any], *args: Any) -> Any:
    started = time.perf_counter()
    result = call(*args)
    times.append(time.perf_counter() - started)
    return result


def measure(
    scenario: Scenario, policy_dir: Path, database: str, log_path: Path, pairs: int
) -> OwnWork:
    """Call Check, then Commit, `pairs` times after a warm-up, on `database`.

    Log lines go to `log_path` as JSON, as `spendgate serve --log-json`
    writes them.
    """
    # The file stays open for the rest of the process: loggers cache their
    # configuration on first use, so a closed file would break later lines.
    log = log_path.open("w", encoding="utf-8")
    logs.configure("info", json=True, stream=log)
    tokens.preload()
    engine = ledger.create_engine(database, pool_size=1)
    try:
        ledger.check_schema(engine)
        servicer = SpendGateServicer(
            PolicyHolder(load_policy(policy_dir)), ledger.Ledger(engine)
        )
        return _run(servicer, CheckCommit(scenario), pairs)
    finally:
        engine.dispose()


def _run(servicer: SpendGateServicer, workload: CheckCommit, pairs: int) -> OwnWork:
    context: Any = _Context()
    checks: list[float] = []
    commits: list[float] = []
    for seq in range(WARMUP_PAIRS + pairs):
        if seq == WARMUP_PAIRS:
            checks.clear()
            commits.clear()
        request = workload.first_request(0, seq)
        response: pb.CheckResponse = _timed(checks, servicer.Check, request, context)
        commit = workload.second_request(response)
        _timed(commits, servicer.Commit, commit, context)

    idle_checks: list[float] = []
    for seq in range(pairs):
        request = workload.first_request(0, seq)
        time.sleep(IDLE_SECONDS)
        response = _timed(idle_checks, servicer.Check, request, context)
        servicer.Commit(workload.second_request(response), context)

    clock = _SqliteClock()
    check_sqlite: list[float] = []
    commit_sqlite: list[float] = []
    for seq in range(pairs):
        request = workload.first_request(0, seq)
        response = clock.run(check_sqlite, servicer.Check, request, context)
        commit = workload.second_request(response)
        clock.run(commit_sqlite, servicer.Commit, commit, context)

    # spendgate's own tiktoken.Encoding, loaded from its packaged BPE file.
    encoding = tokens._get_encoding(TOKENIZER)
    encodes: list[float] = []
    for seq in range(pairs):
        texts = _texts(workload.first_request(0, seq))
        started = time.perf_counter()
        for text in texts:
            encoding.encode_ordinary(text)
        encodes.append(time.perf_counter() - started)
    return OwnWork(
        pairs=pairs,
        check_ms=statistics.median(checks) * 1000,
        commit_ms=statistics.median(commits) * 1000,
        tokenize_ms=statistics.median(encodes) * 1000,
        check_sqlite_ms=statistics.median(check_sqlite) * 1000,
        commit_sqlite_ms=statistics.median(commit_sqlite) * 1000,
        check_after_idle_ms=statistics.median(idle_checks) * 1000,
    )


class _SqliteClock:
    """A profile hook that adds up the time spent in sqlite3's C methods."""

    def __init__(self) -> None:
        self._seconds = 0.0
        self._started = 0.0

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if event == "c_call":
            if _is_sqlite(arg):
                self._started = time.perf_counter()
        elif event in ("c_return", "c_exception") and _is_sqlite(arg):
            self._seconds += time.perf_counter() - self._started

    def run(self, seconds: list[float], call: Callable[..., Any], *args: Any) -> Any:
        """Return call(*args), appending the time it spent in sqlite3 to `seconds`."""
        self._seconds = 0.0
        sys.setprofile(self)
        try:
            return call(*args)
        finally:
            sys.setprofile(None)
            seconds.append(self._seconds)


def _is_sqlite(function: Any) -> bool:
    owner = getattr(function, "__self__", None)
    return type(owner).__module__ == "sqlite3"


def _texts(request: pb.CheckRequest) -> list[str]:
    if request.HasField("messages"):
        return [message.content for message in request.messages.messages]
    return [request.prompt] if request.prompt else []
