"""Registration of the SpendGate RPCs, rejecting undecodable requests as invalid.

With the generated registration, a request body that protobuf cannot parse
(a corrupt encoding, or a string field holding bytes that are not UTF-8)
fails inside grpcio's deserializer: the client gets INTERNAL, and no
spendgate code runs or logs the call. Here the deserializer returns a marker
instead, and the handler answers INVALID_ARGUMENT and logs the RPC.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from google.protobuf.message import DecodeError, Message

from spendgate.v1 import spendgate_pb2 as pb

# The same logger as the per-RPC lines of spendgate.server, so one filter
# finds every RPC's line.
log = structlog.get_logger("spendgate.server")

SERVICE = pb.DESCRIPTOR.services_by_name["SpendGate"]

Behavior = Callable[[Any, grpc.ServicerContext], Message]


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
    """Register every SpendGate RPC that `servicer` implements on `server`.

    Takes the place of the generated add_SpendGateServicer_to_server and
    registers the same handlers, with the deserializers swapped.
    """
    handlers = {
        method.name: grpc.unary_unary_rpc_method_handler(
            _rejecting_undecodable(
                getattr(servicer, method.name), _log_event(method.name)
            ),
            request_deserializer=_parser(getattr(pb, method.input_type.name)),
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
        for method in SERVICE.methods
    }
    generic = grpc.method_handlers_generic_handler(SERVICE.full_name, handlers)
    server.add_generic_rpc_handlers((generic,))
    # grpc-stubs 1.53 does not declare this method, which grpcio has and the
    # generated code calls: a registered method skips the generic lookup.
    server.add_registered_method_handlers(SERVICE.full_name, handlers)  # type: ignore[attr-defined]


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

    def handle(request: Any, context: grpc.ServicerContext) -> Message:
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
