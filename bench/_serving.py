"""Serve a benchmark server on a grpcio thread pool until SIGTERM or SIGINT."""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from types import FrameType

import grpc

from spendgate.server import MAX_MESSAGE_BYTES


def serve_thread_pool(
    register: Callable[[grpc.Server], None],
    address: str,
    workers: int,
    thread_name_prefix: str,
    interceptors: Sequence[grpc.ServerInterceptor] = (),  # type: ignore[type-arg]
) -> None:
    """Serve what `register` adds on a thread pool, stopping on SIGTERM or SIGINT.

    The server has `spendgate serve`'s message size options. Once it listens,
    it prints the bound port as a JSON line with event "server_started", which
    the benchmark runner reads.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix=thread_name_prefix
        ),
        interceptors=list(interceptors),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    register(server)
    port = server.add_insecure_port(address)
    if port == 0:
        sys.exit(f"error: cannot listen on {address}")
    server.start()
    print(json.dumps({"event": "server_started", "port": port}), flush=True)

    stopping = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stopping.wait()
    server.stop(1).wait()
