"""The gRPC server: SpendGate beside the standard health and reflection services.

The server model depends on the ledger, as `make bench` measured it
(docs/benchmarks.md). On SQLite the server runs on grpc.aio, with its
event loop on a thread of its own, and calls the handlers inline on the
loop: that served 1.1 to 1.5 times the Check+Commit pairs of a 16-thread
pool under 32 clients, for less CPU a pair, because it skips the thread
hand-offs and GIL contention around each call. A Check whose input is
longer than INLINE_MAX_CHARS, and a call that finds SQLite's write lock
taken, run on a thread pool instead. In some runs a call in sequence took
up to 0.3 ms more, in gRPC's asyncio layer, so SQLite can use the grpcio
thread pool too. On PostgreSQL every call waits on network round trips,
and there grpc.aio handing each call to a thread served 11 to 37% fewer
pairs than the grpcio thread pool. Either way create_server and
Running.stop are ordinary blocking calls.
"""

from __future__ import annotations

import asyncio
import re
import signal
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import replace
from types import FrameType
from typing import Any, NoReturn, Protocol, TypeVar

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1.health import (  # type: ignore[attr-defined]
    aio as health_aio,  # grpc-stubs does not declare the grpc.aio servicer.
)
from grpc_reflection.v1alpha import reflection
from sqlalchemy.exc import (
    InterfaceError,
    OperationalError,
)
from sqlalchemy.exc import (
    TimeoutError as PoolTimeoutError,
)

from spendgate import evaluator, handlers, tokens
from spendgate.background import DatabaseMonitor, ExpirySweeper, HealthStatus
from spendgate.errors import (
    ConflictError,
    LedgerUnavailableError,
    NotFoundError,
    RequestError,
    SpendgateError,
)
from spendgate.evaluator import BudgetLine, Decision, Usage
from spendgate.ledger import CheckRecord, Ledger, Principal
from spendgate.ledger._ledger import unverified_check
from spendgate.ledger._spool import AuditSpool
from spendgate.policy import FailMode
from spendgate.reload import PolicyReloader
from spendgate.runtime import Clock, PolicyHolder, utc_now

__all__ = [
    "PolicyHolder",
    "Running",
    "SpendGateServicer",
    "create_server",
    "serve_forever",
]
from spendgate.v1 import spendgate_pb2 as pb
from spendgate.v1 import spendgate_pb2_grpc as pb_grpc

log = structlog.get_logger("spendgate.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SpendGate"].full_name
MAX_MESSAGE_BYTES = 32 * 1024 * 1024
MAX_ID_LENGTH = 200
MAX_NAME_LENGTH = 100
MAX_LABELS = 32
MAX_LABEL_LENGTH = 256
MAX_TOKENS = 10**9

_DECISIONS = {
    Decision.ALLOW: pb.DECISION_ALLOW,
    Decision.DENY: pb.DECISION_DENY,
    Decision.DOWNGRADE: pb.DECISION_DOWNGRADE,
}

_STATUS = {
    RequestError: grpc.StatusCode.INVALID_ARGUMENT,
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    ConflictError: grpc.StatusCode.FAILED_PRECONDITION,
    LedgerUnavailableError: grpc.StatusCode.UNAVAILABLE,
}


class SpendGateServicer(pb_grpc.SpendGateServicer):
    """Implements the SpendGate RPCs on a policy holder and a ledger."""

    def __init__(
        self,
        policies: PolicyHolder,
        ledger: Ledger,
        clock: Clock = utc_now,
        reloader: PolicyReloader | None = None,
        spool: AuditSpool | None = None,
    ) -> None:
        self.policies = policies
        self.ledger = ledger
        self.clock = clock
        self.reloader = reloader
        self.spool = spool
        # Set by create_server once the health service exists.
        self.monitor: DatabaseMonitor | None = None

    def _database_failed(self, error: BaseException) -> None:
        if self.monitor is not None:
            self.monitor.mark_down(error)

    def Check(
        self, request: pb.CheckRequest, context: handlers.Abortable
    ) -> pb.CheckResponse:
        with _rpc(
            context, "check", self._database_failed, request_id=request.request_id
        ) as fields:
            domain = _parse_check(request)
            policy = self.policies.current
            now = self.clock()
            plan = evaluator.plan(policy, domain, now)
            principal = Principal(
                department=domain.department,
                team=domain.team,
                user=domain.user,
                application=domain.application,
            )
            unverified = False
            try:
                record = self.ledger.check(
                    request_id=request.request_id,
                    principal=principal,
                    plan=plan,
                    policy_version=policy.version,
                    reservation_ttl=policy.organization.reservation_ttl,
                    labels=dict(request.labels),
                    now=now,
                )
            except (OperationalError, InterfaceError, PoolTimeoutError) as error:
                if policy.organization.fail_mode is not FailMode.OPEN:
                    raise
                self._database_failed(error)
                log.warning("check_unverified", error=str(error).splitlines()[0])
                record, row = unverified_check(
                    request_id=request.request_id,
                    principal=principal,
                    outcome=evaluator.decide(plan, {}),
                    policy_version=policy.version,
                    labels=dict(request.labels),
                    now=now,
                )
                if self.spool is None:
                    raise
                self.spool.append(row)
                unverified = True
            fields.update(
                department=domain.department,
                team=domain.team,
                user=domain.user,
                application=domain.application,
                decision=record.decision.value,
                reason_code=record.reason.value,
                rule=record.rule,
                requested_model=record.requested_model,
                model=record.model,
                reservation_id=record.reservation_id,
                estimated_cost_micros=record.estimated_micros,
                input_tokens=record.input_tokens,
                policy_version=record.policy_version,
                replayed=record.replayed,
                unverified=unverified,
            )
            response = _check_response(record, plan.budgets)
            response.unverified = unverified
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    def Commit(
        self, request: pb.CommitRequest, context: handlers.Abortable
    ) -> pb.CommitResponse:
        with _rpc(
            context,
            "commit",
            self._database_failed,
            reservation_id=request.reservation_id,
        ) as fields:
            _require(request.reservation_id, "reservation_id")
            for name in ("input_tokens", "cached_input_tokens", "output_tokens"):
                _bounded(getattr(request, name), name)
            if request.cached_input_tokens > request.input_tokens:
                raise RequestError(
                    "cached_input_tokens",
                    f"must not exceed input_tokens ({request.cached_input_tokens} > "
                    f"{request.input_tokens})",
                )
            record = self.ledger.commit(
                request.reservation_id,
                input_tokens=request.input_tokens,
                cached_input_tokens=request.cached_input_tokens,
                output_tokens=request.output_tokens,
                now=self.clock(),
            )
            fields.update(
                cost_micros=record.cost_micros,
                overage_micros=record.overage_micros,
                already_committed=record.already_committed,
            )
            return pb.CommitResponse(
                cost_micros=record.cost_micros,
                reserved_micros=record.reserved_micros,
                overage_micros=record.overage_micros,
                already_committed=record.already_committed,
            )
        raise AssertionError("unreachable")  # pragma: no cover

    def Release(
        self, request: pb.ReleaseRequest, context: handlers.Abortable
    ) -> pb.ReleaseResponse:
        with _rpc(
            context,
            "release",
            self._database_failed,
            reservation_id=request.reservation_id,
        ) as fields:
            _require(request.reservation_id, "reservation_id")
            record = self.ledger.release(request.reservation_id, now=self.clock())
            fields.update(
                released_micros=record.released_micros,
                already_released=record.already_released,
            )
            return pb.ReleaseResponse(
                released_micros=record.released_micros,
                already_released=record.already_released,
            )
        raise AssertionError("unreachable")  # pragma: no cover

    def GetBudget(
        self, request: pb.GetBudgetRequest, context: handlers.Abortable
    ) -> pb.GetBudgetResponse:
        with _rpc(
            context,
            "get_budget",
            self._database_failed,
            department=request.principal.department,
        ):
            principal = request.principal
            _require(principal.department, "principal.department")
            _check_text(principal.team, "principal.team")
            _check_text(principal.user, "principal.user")
            policy = self.policies.current
            lines = evaluator.budget_lines(
                policy,
                principal.department,
                principal.team,
                principal.user,
                self.clock(),
            )
            if lines is None:
                raise NotFoundError(
                    f"department {principal.department!r} is not defined in the policy"
                )
            usage = self.ledger.read_usage(lines)
            return pb.GetBudgetResponse(
                budgets=_budget_statuses(lines, usage), policy_version=policy.version
            )
        raise AssertionError("unreachable")  # pragma: no cover

    def GetPolicyStatus(
        self, request: pb.GetPolicyStatusRequest, context: handlers.Abortable
    ) -> pb.PolicyStatus:
        with _rpc(context, "get_policy_status", self._database_failed):
            policy = self.policies.current
            status = pb.PolicyStatus(
                version=policy.version,
                content_hash=policy.content_hash,
                files=len(policy.files),
                warnings=[str(warning) for warning in policy.warnings],
            )
            status.loaded_at.FromDatetime(policy.loaded_at)
            if self.reloader is not None:
                reload_status = self.reloader.status
                status.directory = reload_status.directory
                status.reloads = reload_status.reloads
                status.rejections = reload_status.rejections
                if reload_status.last_checked_at is not None:
                    status.last_checked_at.FromDatetime(reload_status.last_checked_at)
                rejection = reload_status.last_rejection
                if rejection is not None:
                    status.last_rejected.content_hash = rejection.content_hash
                    status.last_rejected.rejected_at.FromDatetime(rejection.at)
                    status.last_rejected.errors.extend(str(e) for e in rejection.errors)
            return status
        raise AssertionError("unreachable")  # pragma: no cover


@contextmanager
def _rpc(
    context: handlers.Abortable,
    method: str,
    on_database_error: Callable[[BaseException], None],
    **ids: Any,
) -> Iterator[dict[str, Any]]:
    """Log one line per RPC and turn errors into gRPC status codes, in one place."""
    started = time.perf_counter()
    fields: dict[str, Any] = dict(ids)
    try:
        yield fields
    except SpendgateError as error:
        code = next(
            (code for kind, code in _STATUS.items() if isinstance(error, kind)),
            grpc.StatusCode.INTERNAL,
        )
        log.info(
            method, status=code.name, error=str(error), **_elapsed(started), **fields
        )
        _abort(context, code, str(error))
    except (OperationalError, InterfaceError, PoolTimeoutError) as error:
        # The database is unreachable or too slow: a retry may succeed.
        on_database_error(error)
        log.error(
            method, status="UNAVAILABLE", exc_info=error, **_elapsed(started), **fields
        )
        _abort(
            context,
            grpc.StatusCode.UNAVAILABLE,
            "the ledger database is unavailable; retry later",
        )
    except Exception as error:
        # A bug, not a bad request: log it with its traceback, return INTERNAL.
        log.error(
            method, status="INTERNAL", exc_info=error, **_elapsed(started), **fields
        )
        _abort(context, grpc.StatusCode.INTERNAL, "internal error; see the server log")
    else:
        log.info(method, status="OK", **_elapsed(started), **fields)


def _abort(
    context: handlers.Abortable, code: grpc.StatusCode, message: str
) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("context.abort returned")  # pragma: no cover


def _elapsed(started: float) -> dict[str, float]:
    return {"duration_ms": round((time.perf_counter() - started) * 1000, 3)}


# Longest accepted value of each text field; each fits its ledger column.
FIELD_LIMITS = {
    "request_id": MAX_ID_LENGTH,
    "reservation_id": 64,
    "principal.department": MAX_NAME_LENGTH,
    "principal.team": MAX_NAME_LENGTH,
    "principal.user": MAX_ID_LENGTH,
    "principal.application": MAX_ID_LENGTH,
    "model": 128,
}
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


def _require(value: str, field: str) -> None:
    if not value.strip():
        raise RequestError(field, "is required")
    _check_text(value, field)


def _check_text(value: str, field: str) -> None:
    """Reject a value too long for its column or holding control characters."""
    limit = FIELD_LIMITS[field]
    if len(value) > limit:
        raise RequestError(
            field, f"must be at most {limit} characters, got {len(value)}"
        )
    if _CONTROL_CHARACTERS.search(value):
        raise RequestError(field, "must not contain control characters")


def _bounded(value: int, field: str) -> None:
    if value > MAX_TOKENS:
        raise RequestError(field, f"must be at most {MAX_TOKENS}, got {value}")


def _parse_check(request: pb.CheckRequest) -> evaluator.Request:
    """Validate a CheckRequest and convert it to the evaluator's Request."""
    _require(request.request_id, "request_id")
    principal = request.principal
    _require(principal.department, "principal.department")
    _require(request.model, "model")
    for field in ("team", "user", "application"):
        _check_text(getattr(principal, field), f"principal.{field}")
    # The lowercased user is the per-user budget subject, and lowercasing
    # can lengthen it: "\u0130" (I with dot above) becomes two code points.
    subject = evaluator.normalize_name(principal.user)
    if len(subject) > FIELD_LIMITS["principal.user"]:
        raise RequestError(
            "principal.user",
            f"must be at most {FIELD_LIMITS['principal.user']} characters "
            f"once lowercased, got {len(subject)}",
        )
    if len(request.labels) > MAX_LABELS:
        raise RequestError(
            "labels", f"at most {MAX_LABELS} labels, got {len(request.labels)}"
        )
    for key, value in request.labels.items():
        if len(key) > MAX_LABEL_LENGTH or len(value) > MAX_LABEL_LENGTH:
            raise RequestError(
                f"labels[{key[:40]!r}]",
                f"keys and values must be at most {MAX_LABEL_LENGTH} characters",
            )

    which = request.WhichOneof("input")
    if which is None:
        raise RequestError(
            "input", "one of prompt, messages or input_tokens is required"
        )
    max_output = (
        request.max_output_tokens if request.HasField("max_output_tokens") else None
    )
    base = evaluator.Request(
        department=principal.department.strip(),
        model=request.model.strip(),
        team=principal.team.strip(),
        user=principal.user.strip(),
        application=principal.application.strip(),
        max_output_tokens=max_output,
    )
    if which == "prompt":
        return replace(base, prompt=request.prompt)
    if which == "messages":
        if not request.messages.messages:
            raise RequestError("messages", "must hold at least one message")
        messages = [
            tokens.ChatMessage(role=m.role, content=m.content, name=m.name)
            for m in request.messages.messages
        ]
        return replace(base, messages=messages)
    _bounded(request.input_tokens, "input_tokens")
    return replace(base, input_tokens=request.input_tokens)


def _budget_statuses(
    lines: tuple[BudgetLine, ...], usage: dict[str, Usage] | Any
) -> list[pb.BudgetStatus]:
    empty = Usage()
    return [
        pb.BudgetStatus(
            scope=line.label,
            budget=line.budget.name,
            period=line.budget.period.value,
            window=line.window,
            limit_micros=line.budget.limit_micros,
            spent_micros=usage.get(line.key, empty).spent_micros,
            reserved_micros=usage.get(line.key, empty).reserved_micros,
            rule=line.budget.rule,
            shadow=line.budget.shadow,
        )
        for line in lines
    ]


def _check_response(
    record: CheckRecord, lines: tuple[BudgetLine, ...]
) -> pb.CheckResponse:
    response = pb.CheckResponse(
        decision=_DECISIONS[record.decision],
        model=record.model,
        requested_model=record.requested_model,
        reason_code=record.reason.value,
        message=record.message,
        rule=record.rule,
        policy_version=record.policy_version,
        reservation_id=record.reservation_id,
        estimated_cost_micros=record.estimated_micros,
        input_tokens=record.input_tokens,
        input_tokens_estimated=record.input_tokens_estimated,
        max_output_tokens=record.max_output_tokens,
        budgets=_budget_statuses(lines, record.usage),
        replayed=record.replayed,
    )
    if record.shadow_decision is not None:
        response.shadow_decision = _DECISIONS[record.shadow_decision]
        response.shadow = (
            record.decision is Decision.ALLOW
            and record.shadow_decision is not Decision.ALLOW
        )
    if record.expires_at is not None:
        response.reservation_expires_at = int(record.expires_at.timestamp())
    return response


_T = TypeVar("_T")

# A Check whose prompt or messages hold more characters than this runs on
# the thread pool. tiktoken took 0.12 to 0.2 ms for 6,000 characters on the
# benchmark machine, so an inline Check keeps the loop well under 1 ms.
INLINE_MAX_CHARS = 8_000
# A Check with more messages than this runs on the thread pool too, because
# each message costs a few microseconds of Python even when it is empty.
INLINE_MAX_MESSAGES = 100


class _LoopThread:
    """An asyncio event loop running forever on a daemon thread of its own."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="spendgate-grpc", daemon=True
        )
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        """Run `coroutine` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def close(self) -> None:
        """Stop the loop, wait for its thread and close it."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class _Health:
    """The grpc.aio health service, set from any thread.

    DatabaseMonitor sets statuses from its own thread and, through an RPC
    that hit a database error, from the event loop itself, so a status is
    queued on the loop, in order, rather than awaited.
    """

    def __init__(self, servicer: health_aio.HealthServicer, loop: _LoopThread) -> None:
        self._servicer = servicer
        self._loop = loop
        self._pending: set[asyncio.Task[None]] = set()

    def set(
        self, service: str, status: health_pb2.HealthCheckResponse.ServingStatus
    ) -> None:
        """Queue `status` for `service` on the event loop."""
        self._loop.loop.call_soon_threadsafe(self._start, service, status)

    def _start(
        self, service: str, status: health_pb2.HealthCheckResponse.ServingStatus
    ) -> None:
        task = self._loop.loop.create_task(self._servicer.set(service, status))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def enter_graceful_shutdown(self) -> None:
        """Set every service NOT_SERVING for good; call from outside the loop."""
        self._loop.run(self._servicer.enter_graceful_shutdown())


class _HealthService(HealthStatus, Protocol):
    """A health service that Running and DatabaseMonitor set from any thread."""

    def enter_graceful_shutdown(self) -> None:
        """Set every service NOT_SERVING for good."""


class _Listener(Protocol):
    """The gRPC server of one server model, as Running stops it."""

    model: str

    def drain(self, grace: float) -> None:
        """Refuse new calls, give in-flight ones `grace` seconds, then stop."""


class _ThreadPoolListener:
    """A grpcio server whose worker threads run every call."""

    model = "grpcio thread pool"

    def __init__(self, server: grpc.Server) -> None:
        self.server = server

    def drain(self, grace: float) -> None:
        stopped = self.server.stop(grace)
        # From here new calls are refused; in-flight ones have `grace` seconds.
        log.info("draining", grace_seconds=grace)
        stopped.wait()


class _EventLoopListener:
    """A grpc.aio server on its own loop thread, with threads for long calls."""

    model = "grpc.aio"

    def __init__(
        self,
        server: grpc.aio.Server,
        loop: _LoopThread,
        executor: futures.ThreadPoolExecutor,
    ) -> None:
        self.server = server
        self._loop = loop
        self._executor = executor

    def drain(self, grace: float) -> None:
        self._loop.run(self._drain(grace))
        # Calls cut off at the end of the grace period may still be running
        # a ledger transaction on a thread; it finishes before the exit.
        self._executor.shutdown(wait=True)
        self._loop.close()

    async def _drain(self, grace: float) -> None:
        stopping = asyncio.ensure_future(self.server.stop(grace))
        # Let stop() close the listener before saying so.
        await asyncio.sleep(0)
        log.info("draining", grace_seconds=grace)
        await stopping


class Running:
    """A started server with the pieces a caller stops or inspects."""

    def __init__(
        self,
        listener: _Listener,
        port: int,
        health_service: _HealthService,
        sweeper: ExpirySweeper,
        monitor: DatabaseMonitor,
    ) -> None:
        self.listener = listener
        self.port = port
        self.health = health_service
        self.sweeper = sweeper
        self.monitor = monitor
        self._stopped = False

    @property
    def model(self) -> str:
        """The gRPC server model: "grpc.aio" or "grpcio thread pool"."""
        return self.listener.model

    def stop(self, grace: float = 5.0, drain_delay: float = 0.0) -> None:
        """Report NOT_SERVING, drain in-flight calls for `grace` seconds, then stop.

        `drain_delay` keeps accepting calls that long after health turns
        NOT_SERVING, so a load balancer polling health moves traffic away
        before the listener closes. A second call does nothing.
        """
        if self._stopped:
            return
        self._stopped = True
        self.monitor.stop()
        self.health.enter_graceful_shutdown()
        if drain_delay > 0:
            time.sleep(drain_delay)
        self.sweeper.stop()
        self.listener.drain(grace)


def create_server(
    address: str,
    policies: PolicyHolder,
    ledger: Ledger,
    *,
    max_workers: int = 16,
    sweep_interval: float = 15.0,
    health_interval: float = 1.0,
    clock: Clock = utc_now,
    reloader: PolicyReloader | None = None,
    spool: AuditSpool | None = None,
    thread_pool_on_sqlite: bool = False,
) -> Running:
    """Build and start a server on `address`; port 0 picks a free port.

    On SQLite the server runs on grpc.aio and `max_workers` threads run the
    calls that leave the event loop, unless `thread_pool_on_sqlite` is set.
    On PostgreSQL, and with that flag, it runs on a grpcio pool of
    `max_workers` threads (see the module's docstring). `spool` is the file
    for audit rows of Checks decided while the database is down under
    fail_mode: open; without one, such Checks get UNAVAILABLE.
    """
    servicer = SpendGateServicer(policies, ledger, clock, reloader, spool)
    on_event_loop = ledger.engine.dialect.name == "sqlite" and not thread_pool_on_sqlite
    start = _start_on_event_loop if on_event_loop else _start_on_thread_pool
    listener, port, health_service = start(address, servicer, max_workers)
    monitor = DatabaseMonitor(
        ledger,
        health_service,
        ("", SERVICE_NAME),
        interval=health_interval,
        spool=spool,
    )
    servicer.monitor = monitor
    monitor.check()
    monitor.start()
    sweeper = ExpirySweeper(policies, ledger, sweep_interval, clock)
    sweeper.start()
    return Running(listener, port, health_service, sweeper, monitor)


_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # gRPC turns SO_REUSEPORT on by default, which let a second server start
    # on a busy port and split requests between two ledgers.
    ("grpc.so_reuseport", 0),
]
_SERVICES = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)


def _start_on_thread_pool(
    address: str, servicer: SpendGateServicer, max_workers: int
) -> tuple[_Listener, int, _HealthService]:
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="spendgate-rpc"
        ),
        options=_OPTIONS,
    )
    handlers.add_servicer(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(_SERVICES, server)
    port = _listen(server, address)
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return _ThreadPoolListener(server), port, health_servicer


def _start_on_event_loop(
    address: str, servicer: SpendGateServicer, max_workers: int
) -> tuple[_Listener, int, _HealthService]:
    executor = futures.ThreadPoolExecutor(
        max_workers=max_workers, thread_name_prefix="spendgate-rpc"
    )
    loop = _LoopThread()
    try:
        server, port, health_servicer = loop.run(
            _start_aio(address, servicer, _off_loop, executor)
        )
    except BaseException:
        loop.close()
        executor.shutdown(wait=False)
        raise
    listener = _EventLoopListener(server, loop, executor)
    return listener, port, _Health(health_servicer, loop)


async def _start_aio(
    address: str,
    servicer: SpendGateServicer,
    off_loop: handlers.OffLoop,
    executor: futures.Executor,
) -> tuple[grpc.aio.Server, int, health_aio.HealthServicer]:
    server = grpc.aio.server(options=_OPTIONS)
    handlers.add_servicer_on_loop(servicer, server, off_loop, executor)
    health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(_SERVICES, server)
    port = _listen(server, address)
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port, health_servicer


def _listen(server: grpc.Server | grpc.aio.Server, address: str) -> int:
    cannot_listen = (
        f"cannot listen on {address}: another server may be using the port, or "
        "the host is not an address of this machine; stop that server or pass "
        "another --address HOST:PORT"
    )
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as error:
        # grpcio's own message only suggests setting GRPC_VERBOSITY for details.
        raise OSError(cannot_listen) from error
    if port == 0:
        raise OSError(cannot_listen)
    return port


def _off_loop(method: str, request: Any) -> bool:
    """Return True for a call on SQLite that leaves the event loop for a thread."""
    if method != "Check" or not isinstance(request, pb.CheckRequest):
        return False
    if len(request.messages.messages) > INLINE_MAX_MESSAGES:
        return True
    return _input_chars(request) > INLINE_MAX_CHARS


def _input_chars(request: pb.CheckRequest) -> int:
    # Token counting encodes each message's role and name as well.
    return len(request.prompt) + sum(
        len(message.role) + len(message.content) + len(message.name)
        for message in request.messages.messages
    )


def serve_forever(running: Running, grace: float, drain_delay: float = 0.0) -> None:
    """Block until SIGTERM or SIGINT, then shut down gracefully."""
    stopping = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info(
            "shutdown_started", signal=signal.Signals(signum).name, grace_seconds=grace
        )
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stopping.wait()
    running.stop(grace, drain_delay)
    log.info("shutdown_finished")
