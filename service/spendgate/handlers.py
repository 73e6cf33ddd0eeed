"""Registration of the SpendGate RPCs on a grpcio thread pool or on grpc.aio.

The servicer's handlers are synchronous. On a thread pool, grpcio runs them
on its worker threads. On grpc.aio, each RPC runs its handler either
inline on the event loop or on an executor thread, as `off_loop` decides.
Inline saves two thread hand-offs and the GIL contention of a thread pool,
so it suits calls that finish within a millisecond, such as a Check on
SQLite. Calls that encode a long prompt go to a thread and leave the loop
free. An inline call never waits for SQLite's write lock. When another
process holds it, or another unit of this process is writing or queued,
the ledger raises WouldBlock before writing anything, and the call runs
again on a thread. A handler aborts a call through CallContext.abort,
which raises, and the wrapper then ends the call with that status.

With the generated registration, a request body that protobuf cannot parse
(a corrupt encoding, or a string field holding bytes that are not UTF-8)
fails inside grpcio's deserializer: the client gets INTERNAL, and no
spendgate code runs or logs the call. Here the deserializer returns a marker
instead, and the handler answers INVALID_ARGUMENT and logs the RPC.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

import grpc
import structlog
from google.protobuf.message import DecodeError, Message

from spendgate import ledger
from spendgate.v1 import spendgate_pb2 as pb

# The same logger as the per-RPC lines of spendgate.server, so one filter
# finds every RPC's line.
log = structlog.get_logger("spendgate.server")

SERVICE = pb.DESCRIPTOR.services_by_name["SpendGate"]


class Aborted(Exception):
    """A handler ended its call with a status other than OK."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class Abortable(Protocol):
    """The part of a call a synchronous handler uses: a way to abort it."""

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        """End the call with `code` and `details`; raises."""


class CallContext:
    """The context passed to a synchronous handler on grpc.aio, whose abort is async."""

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        """End the call with `code` and `details`; raises Aborted."""
        raise Aborted(code, details)


Behavior = Callable[[Any, Abortable], Message]
AsyncBehavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Message]]
# Given the RPC's method name and its request, True runs the handler on
# the executor instead of inline on the event loop.
OffLoop = Callable[[str, Any], bool]


@dataclass(frozen=True, slots=True)
class UndecodableRequest:
    """A request body that does not parse as its RPC's request message."""

    message_type: str
    reason: str
    size_bytes: int

    @property
    def message(self) -> str:
        """The INVALID_ARGUMENT details sent to the client."""
        return f"request is not a valid {self.message_type}: {self.reason}"


def add_servicer(servicer: object, server: grpc.Server) -> None:
    """Register every SpendGate RPC that `servicer` implements on a thread pool.

    Takes the place of the generated add_SpendGateServicer_to_server and
    registers the same handlers, with the deserializers swapped.
    """
    _register(server, servicer, lambda behavior, method: behavior)


def add_servicer_on_loop(
    servicer: object, server: grpc.aio.Server, off_loop: OffLoop, executor: Executor
) -> None:
    """Register every SpendGate RPC that `servicer` implements on grpc.aio.

    As add_servicer, with each synchronous handler run inline on the event
    loop or on `executor`, as `off_loop` decides.
    """
    _register(
        server,
        servicer,
        lambda behavior, method: _on_event_loop(behavior, method, off_loop, executor),
    )


def _register(
    server: grpc.Server | grpc.aio.Server,
    servicer: object,
    wrap: Callable[[Behavior, str], Any],
) -> None:
    handlers = {
        method.name: grpc.unary_unary_rpc_method_handler(
            wrap(
                _rejecting_undecodable(
                    getattr(servicer, method.name), _log_event(method.name)
                ),
                method.name,
            ),
            request_deserializer=_parser(getattr(pb, method.input_type.name)),
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
        for method in SERVICE.methods
    }
    generic = grpc.method_handlers_generic_handler(SERVICE.full_name, handlers)
    server.add_generic_rpc_handlers((generic,))
    # A registered method skips the generic lookup, as in generated code;
    # grpc-stubs 1.53 does not declare the method.
    server.add_registered_method_handlers(SERVICE.full_name, handlers)  # type: ignore[union-attr]


def _on_event_loop(
    behavior: Behavior, method: str, off_loop: OffLoop, executor: Executor
) -> AsyncBehavior:
    """Run a synchronous handler inline or on `executor`, and apply its abort."""
    call_context = CallContext()

    async def handle(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Message:
        try:
            if not off_loop(method, request):
                token = ledger.no_wait.set(True)
                try:
                    return behavior(request, call_context)
                except ledger.WouldBlock:
                    # SQLite's write lock is taken or queued for: wait for it
                    # on a thread instead of stopping the loop.
                    pass
                finally:
                    ledger.no_wait.reset(token)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(executor, behavior, request, call_context)
        except Aborted as aborted:
            await context.abort(aborted.code, aborted.details)
            raise AssertionError("context.abort returned") from aborted

    return handle


def _log_event(method: str) -> str:
    """Return the log event of an RPC: GetBudget becomes get_budget."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", method).lower()


def _parser(message_class: type[Message]) -> Callable[[bytes], Any]:
    """Return a deserializer that returns an UndecodableRequest instead of raising."""
    from_string = message_class.FromString
    message_type = message_class.DESCRIPTOR.full_name

    def parse(data: bytes) -> Message | UndecodableRequest:
        try:
            return from_string(data)
        except (DecodeError, UnicodeDecodeError) as error:
            return UndecodableRequest(message_type, _reason(error), len(data))

    return parse


def _reason(error: DecodeError | UnicodeDecodeError) -> str:
    # The pure-Python protobuf backend raises UnicodeDecodeError for bad
    # UTF-8. upb, the default backend, raises DecodeError and names the
    # cause only in its message text ("String field had bad UTF-8").
    if isinstance(error, UnicodeDecodeError) or "UTF-8" in str(error):
        return "string fields must be UTF-8"
    return "the body is not a valid protobuf encoding"


def _rejecting_undecodable(behavior: Behavior, event: str) -> Behavior:
    """Wrap a servicer method so an UndecodableRequest gets INVALID_ARGUMENT."""

    def handle(request: Any, context: Abortable) -> Message:
        if isinstance(request, UndecodableRequest):
            # The size only: the body may hold a prompt, which is never logged.
            log.warning(
                event,
                status="INVALID_ARGUMENT",
                error=request.message,
                request_bytes=request.size_bytes,
            )
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return behavior(request, context)

    return handle
