"""Client drivers: one sequential client, or many concurrent ones on threads or asyncio.

Every driver stops at its call limit or its time limit, whichever comes
first, and times each RPC on its own with time.perf_counter.
"""

from __future__ import annotations

import asyncio
import collections
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import grpc.aio

from _workload import Method

CALL_TIMEOUT_SECONDS = 30.0
# A separate subchannel pool per channel gives each client its own TCP
# connection, as separate application processes would have.
CHANNEL_OPTIONS = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.max_receive_message_length", 32 * 1024 * 1024),
    ("grpc.max_send_message_length", 32 * 1024 * 1024),
]


class Workload(Protocol):
    """A pair of RPCs as an application calls them. The second is optional."""

    first: Method
    second: Method | None

    def first_request(self, client: int, seq: int) -> Any:
        """Build the first request of call `seq` of client `client`."""

    def second_request(self, first_response: Any) -> Any:
        """Build the second request from the first response."""

    def outcome(self, first_response: Any) -> str:
        """Name the result of the first call, such as a decision."""


@dataclass
class Samples:
    """Latencies in seconds and counts gathered by one driver run."""

    first: list[float] = field(default_factory=list)
    second: list[float] = field(default_factory=list)
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    pairs: int = 0
    elapsed: float = 0.0
    last_first_response: Any = None
    last_second_response: Any = None
    # CPU seconds the server process and this client process spent during
    # the run, when the caller measured them.
    server_cpu_seconds: float = math.nan
    client_cpu_seconds: float = math.nan

    def merge(self, other: Samples) -> None:
        """Add the samples and counts of `other` to these."""
        self.first.extend(other.first)
        self.second.extend(other.second)
        self.outcomes.update(other.outcomes)
        self.errors.update(other.errors)
        self.pairs += other.pairs
        if other.last_first_response is not None:
            self.last_first_response = other.last_first_response
            self.last_second_response = other.last_second_response

    @property
    def pairs_per_second(self) -> float:
        """Completed pairs per second of wall time."""
        return self.pairs / self.elapsed if self.elapsed > 0 else 0.0


def _callables(channel: grpc.Channel, workload: Workload) -> tuple[Any, Any | None]:
    def bind(method: Method) -> Any:
        return channel.unary_unary(
            method.path,
            request_serializer=method.serializer,
            response_deserializer=method.deserializer,
        )

    second = bind(workload.second) if workload.second is not None else None
    return bind(workload.first), second


@dataclass
class _Deadline:
    """A deadline that the starting thread may move after the clients connect."""

    at: float


def _sync_client(
    address: str,
    workload: Workload,
    client: int,
    max_pairs: int,
    deadline: _Deadline,
    start: threading.Barrier | None,
) -> Samples:
    samples = Samples()
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        first, second = _callables(channel, workload)
        grpc.channel_ready_future(channel).result(timeout=CALL_TIMEOUT_SECONDS)
        if start is not None:
            start.wait(timeout=CALL_TIMEOUT_SECONDS)
        for seq in range(max_pairs):
            if time.perf_counter() >= deadline.at:
                break
            try:
                _sync_pair(workload, first, second, client, seq, samples)
            except grpc.RpcError as error:
                samples.errors[error.code().name] += 1
    return samples


def _sync_pair(
    workload: Workload,
    first: Any,
    second: Any | None,
    client: int,
    seq: int,
    samples: Samples,
) -> None:
    request = workload.first_request(client, seq)
    started = time.perf_counter()
    response = first(request, timeout=CALL_TIMEOUT_SECONDS)
    samples.first.append(time.perf_counter() - started)
    samples.outcomes[workload.outcome(response)] += 1
    samples.last_first_response = response
    if second is not None:
        follow_up = workload.second_request(response)
        started = time.perf_counter()
        samples.last_second_response = second(follow_up, timeout=CALL_TIMEOUT_SECONDS)
        samples.second.append(time.perf_counter() - started)
    samples.pairs += 1


def sequential(
    address: str, workload: Workload, calls: int, seconds: float, warmup: int
) -> Samples:
    """Run one client for `calls` pairs or `seconds`, after `warmup` pairs."""
    warmup_deadline = _Deadline(time.perf_counter() + seconds)
    _sync_client(address, workload, 0, warmup, warmup_deadline, None)
    started = time.perf_counter()
    deadline = _Deadline(started + seconds)
    samples = _sync_client(address, workload, 0, calls, deadline, None)
    samples.elapsed = time.perf_counter() - started
    return samples


def concurrent_threads(
    address: str, workload: Workload, clients: int, seconds: float, max_pairs: int
) -> Samples:
    """Run `clients` threads, each with its own channel, for `seconds`."""
    start = threading.Barrier(clients + 1)
    # Connecting must not count against the run, so the deadline stays far
    # away until every client is connected and the barrier opens.
    deadline = _Deadline(time.perf_counter() + CALL_TIMEOUT_SECONDS + seconds)
    results: list[Samples] = []
    lock = threading.Lock()

    def run(client: int) -> None:
        samples = _sync_client(address, workload, client, max_pairs, deadline, start)
        with lock:
            results.append(samples)

    threads = [
        threading.Thread(target=run, args=(c,), daemon=True) for c in range(clients)
    ]
    for thread in threads:
        thread.start()
    start.wait(timeout=CALL_TIMEOUT_SECONDS)
    started = time.perf_counter()
    deadline.at = started + seconds
    for thread in threads:
        thread.join(timeout=seconds + 2 * CALL_TIMEOUT_SECONDS)
    merged = Samples()
    merged.elapsed = time.perf_counter() - started
    for samples in results:
        merged.merge(samples)
    return merged


async def _async_client(
    channel: grpc.aio.Channel,
    workload: Workload,
    client: int,
    max_pairs: int,
    deadline: float,
) -> Samples:
    samples = Samples()
    first, second = _callables(channel, workload)  # type: ignore[arg-type]
    for seq in range(max_pairs):
        if time.perf_counter() >= deadline:
            break
        request = workload.first_request(client, seq)
        try:
            started = time.perf_counter()
            response = await first(request, timeout=CALL_TIMEOUT_SECONDS)
            samples.first.append(time.perf_counter() - started)
            samples.outcomes[workload.outcome(response)] += 1
            samples.last_first_response = response
            if second is not None:
                follow_up = workload.second_request(response)
                started = time.perf_counter()
                samples.last_second_response = await second(
                    follow_up, timeout=CALL_TIMEOUT_SECONDS
                )
                samples.second.append(time.perf_counter() - started)
            samples.pairs += 1
        except grpc.aio.AioRpcError as error:
            samples.errors[error.code().name] += 1
    return samples


async def _concurrent_aio(
    address: str, workload: Workload, clients: int, seconds: float, max_pairs: int
) -> Samples:
    channels = [
        grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        for _ in range(clients)
    ]
    try:
        await asyncio.wait_for(
            asyncio.gather(*(channel.channel_ready() for channel in channels)),
            CALL_TIMEOUT_SECONDS,
        )
        started = time.perf_counter()
        parts = await asyncio.gather(
            *(
                _async_client(channel, workload, client, max_pairs, started + seconds)
                for client, channel in enumerate(channels)
            )
        )
        merged = Samples()
        merged.elapsed = time.perf_counter() - started
    finally:
        await asyncio.gather(*(channel.close(None) for channel in channels))
    for samples in parts:
        merged.merge(samples)
    return merged


def concurrent_aio(
    address: str, workload: Workload, clients: int, seconds: float, max_pairs: int
) -> Samples:
    """Run `clients` coroutines on one event loop, each with its own channel."""
    return asyncio.run(_concurrent_aio(address, workload, clients, seconds, max_pairs))


DRIVERS = {"threads": concurrent_threads, "aio": concurrent_aio}
