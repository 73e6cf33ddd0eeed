"""The benchmark floor: an echo service on the server stack `spendgate serve` uses.

It runs as its own process, like `spendgate serve`. With --aio it serves
from grpc.aio with the same message size options, as `spendgate serve`
does, so the difference between the two is what spendgate does with a
request. Without it, it serves from a grpcio thread pool, so the run can
compare the two server models on the same work.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from typing import Any

import grpc

import _stubs
from _serving import serve_thread_pool
from spendgate.server import MAX_MESSAGE_BYTES

echo_pb2, echo_pb2_grpc = _stubs.load()


class EchoServicer(echo_pb2_grpc.EchoServicer):  # type: ignore[misc,name-defined]
    """Return reply_size bytes taken from the start of the payload."""

    def Echo(self, request: Any, context: grpc.ServicerContext) -> Any:
        size = request.reply_size
        data = request.payload[:size]
        if len(data) < size:
            data += bytes(size - len(data))
        return echo_pb2.EchoReply(payload=data)


class AsyncEchoServicer(echo_pb2_grpc.EchoServicer):  # type: ignore[misc,name-defined]
    """The same Echo on grpc.aio."""

    async def Echo(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        return EchoServicer.Echo(self, request, context)  # type: ignore[arg-type]


async def serve_aio(address: str) -> None:
    """Serve Echo on grpc.aio until SIGTERM or SIGINT."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    echo_pb2_grpc.add_EchoServicer_to_server(AsyncEchoServicer(), server)
    port = server.add_insecure_port(address)
    if port == 0:
        sys.exit(f"error: cannot listen on {address}")
    await server.start()
    print(json.dumps({"event": "server_started", "port": port}), flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    await server.stop(1)


def main() -> None:
    """Serve Echo until SIGTERM or SIGINT, after printing the bound port as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--address", default="127.0.0.1:0", help="HOST:PORT.")
    parser.add_argument("--workers", type=int, default=16, help="Worker threads.")
    parser.add_argument(
        "--aio", action="store_true", help="Serve on grpc.aio, not a thread pool."
    )
    args = parser.parse_args()
    if args.aio:
        asyncio.run(serve_aio(args.address))
        return

    serve_thread_pool(
        lambda server: echo_pb2_grpc.add_EchoServicer_to_server(EchoServicer(), server),
        args.address,
        args.workers,
        "echo-rpc",
    )


if __name__ == "__main__":
    main()
