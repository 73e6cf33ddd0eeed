"""A spendgate server process that profiles its Check calls and times their stages.

It builds the objects `spendgate serve` builds (policy, tokenizers, engine,
ledger, servicer) and serves them from a grpcio thread pool, because there
a server interceptor can wrap each handler on the thread that runs it.
serve runs on grpc.aio on SQLite, so the gRPC share of this profile is the
thread pool's. Health and reflection services are left out, because no
Check touches them.
After `--skip` warm-up Checks, the interceptor handles Checks in two phases
of `--checks` calls each:

1. cProfile: a per-thread profiler is on while the request is deserialized,
   and again from the start of the Check handler to the end of response
   serialization, so the profile holds the Check and none of the idle
   waiting in the pool.
2. Stage times, without the profiler: wall time of deserialization, of
   evaluator.plan (policy lookup and token counting), of Ledger.check (the
   SQL transaction), of the whole handler and of serialization.

Later Checks pass through untouched.
"""

from __future__ import annotations

import argparse
import cProfile
import enum
import json
import pstats
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeAlias

import grpc

from _serving import serve_thread_pool
from spendgate import evaluator, handlers, ledger, logs, tokens
from spendgate.policy import load_policy
from spendgate.server import PolicyHolder, SpendGateServicer

CHECK_METHOD = "/spendgate.v1.SpendGate/Check"
# grpc-stubs makes RpcMethodHandler generic but grpcio's class is not, so the
# alias stays a string.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class Phase(enum.Enum):
    """Treatment of one Check by the interceptor."""

    PASS = "pass"
    PROFILE = "profile"
    TIME = "time"


class StageTimes:
    """Wall times in seconds of each stage of the timed Checks."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = defaultdict(list)
        self._lock = threading.Lock()
        self._local = threading.local()

    def timing(self) -> bool:
        """Return True while the current thread runs a timed Check."""
        return bool(getattr(self._local, "on", False))

    def set_timing(self, on: bool) -> None:
        """Mark the current thread as running a timed Check, or not."""
        self._local.on = on

    def add(self, stage: str, seconds: float) -> None:
        """Record one stage time."""
        with self._lock:
            self.seconds[stage].append(seconds)

    def summary_ms(self) -> dict[str, dict[str, float]]:
        """Return the mean and the median of each stage in milliseconds."""
        return {
            stage: {
                "mean": statistics.fmean(values) * 1000,
                "median": statistics.median(values) * 1000,
            }
            for stage, values in self.seconds.items()
        }


class TimedLedger(ledger.Ledger):
    """A Ledger whose check() records its wall time during timed Checks."""

    def __init__(self, engine: Any, times: StageTimes) -> None:
        super().__init__(engine)
        self.times = times

    def check(self, **kwargs: Any) -> ledger.CheckRecord:
        """Run Ledger.check and record how long it took."""
        started = time.perf_counter()
        try:
            return super().check(**kwargs)
        finally:
            if self.times.timing():
                self.times.add("Ledger.check", time.perf_counter() - started)


def _time_plan(times: StageTimes) -> None:
    """Make evaluator.plan record its wall time during timed Checks."""
    plan = evaluator.plan

    def timed_plan(*args: Any, **kwargs: Any) -> evaluator.Plan:
        started = time.perf_counter()
        try:
            return plan(*args, **kwargs)
        finally:
            if times.timing():
                times.add("evaluator.plan", time.perf_counter() - started)

    # The servicer calls evaluator.plan through the module, so replacing the
    # module attribute reaches it. Only this bench process is changed.
    evaluator.plan = timed_plan


class CheckProfiler(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Profile, then time, `limit` Check calls each, after the first `skip`."""

    def __init__(self, limit: int, skip: int, times: StageTimes) -> None:
        self.limit = limit
        self.skip = skip
        self.times = times
        self.profilers: list[cProfile.Profile] = []
        self.seen = 0
        self.profiled = 0
        self.timed = 0
        # tokens.cache_info() when the last timed Check finished.
        self.cache_after: tokens.CacheInfo | None = None
        self._local = threading.local()
        self._lock = threading.Lock()

    def _profiler(self) -> cProfile.Profile:
        profiler: cProfile.Profile | None = getattr(self._local, "profiler", None)
        if profiler is None:
            profiler = cProfile.Profile()
            self._local.profiler = profiler
            with self._lock:
                self.profilers.append(profiler)
        return profiler

    def _phase(self) -> Phase:
        with self._lock:
            self.seen += 1
            index = self.seen - self.skip
        if index <= 0 or index > 2 * self.limit:
            return Phase.PASS
        return Phase.PROFILE if index <= self.limit else Phase.TIME

    def _finish(self, phase: Phase) -> None:
        if phase is Phase.PROFILE:
            self._profiler().disable()
        else:
            self.times.set_timing(False)
        with self._lock:
            if phase is Phase.PROFILE:
                self.profiled += 1
            else:
                self.timed += 1
                if self.timed == self.limit:
                    self.cache_after = tokens.cache_info()

    def _start(self, phase: Phase) -> None:
        if phase is Phase.PROFILE:
            self._profiler().enable()
        else:
            self.times.set_timing(True)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Handler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        """Wrap the Check handler and pass every other handler through."""
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method != CHECK_METHOD:
            return handler
        phase = self._phase()
        if phase is Phase.PASS:
            return handler
        deserializer = handler.request_deserializer
        behavior = handler.unary_unary
        serializer = handler.response_serializer
        assert deserializer is not None
        assert behavior is not None
        assert serializer is not None
        times = self.times
        handler_started = [0.0]

        # grpcio deserializes on its polling thread and runs the handler and
        # the serializer on a pool thread, so each part turns on the
        # profiler of the thread it runs on.
        def deserialize(data: bytes) -> Any:
            started = time.perf_counter()
            profiler = self._profiler() if phase is Phase.PROFILE else None
            if profiler is not None:
                profiler.enable()
            try:
                return deserializer(data)
            finally:
                if profiler is not None:
                    profiler.disable()
                else:
                    times.add("deserialize", time.perf_counter() - started)

        def check(request: Any, context: grpc.ServicerContext) -> Any:
            self._start(phase)
            handler_started[0] = time.perf_counter()
            try:
                response = behavior(request, context)
            except BaseException:
                self._finish(phase)
                raise
            if phase is Phase.TIME:
                times.add("Check handler", time.perf_counter() - handler_started[0])
            return response

        def serialize(response: Any) -> bytes:
            started = time.perf_counter()
            try:
                data: bytes = serializer(response)
                return data
            finally:
                if phase is Phase.TIME:
                    times.add("serialize", time.perf_counter() - started)
                self._finish(phase)

        return grpc.unary_unary_rpc_method_handler(
            check, request_deserializer=deserialize, response_serializer=serialize
        )


def main() -> None:
    """Serve until SIGTERM, then write the profile, stage times and cache figures."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--policies", type=Path, required=True)
    parser.add_argument("--database", required=True, help="SQLAlchemy URL.")
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument(
        "--checks", type=int, required=True, help="Checks to profile, then to time."
    )
    parser.add_argument(
        "--skip", type=int, default=0, help="Warm-up Checks to leave out first."
    )
    parser.add_argument("--profile-out", type=Path, required=True)
    parser.add_argument("--stats-out", type=Path, required=True)
    args = parser.parse_args()

    logs.configure("info", json=True)
    policy = load_policy(args.policies)
    tokens.preload()
    engine = ledger.create_engine(args.database, pool_size=args.workers)
    ledger.check_schema(engine)
    times = StageTimes()
    _time_plan(times)
    servicer = SpendGateServicer(PolicyHolder(policy), TimedLedger(engine, times))
    interceptor = CheckProfiler(args.checks, args.skip, times)
    serve_thread_pool(
        lambda server: handlers.add_servicer(servicer, server),
        "127.0.0.1:0",
        args.workers,
        "spendgate-rpc",
        [interceptor],
    )
    engine.dispose()
    _write(interceptor, args.profile_out, args.stats_out)


def _write(interceptor: CheckProfiler, profile_out: Path, stats_out: Path) -> None:
    if interceptor.profilers:
        stats = pstats.Stats(interceptor.profilers[0])
        for extra in interceptor.profilers[1:]:
            stats.add(extra)
        stats.dump_stats(profile_out)
    after = interceptor.cache_after
    stats_out.write_text(
        json.dumps(
            {
                "checks_profiled": interceptor.profiled,
                "checks_timed": interceptor.timed,
                "stages_ms": interceptor.times.summary_ms(),
                "cache_after_timed": after._asdict() if after else None,
                "cache_at_exit": tokens.cache_info()._asdict(),
            }
        ),
        encoding="utf-8",
    )


if __name__ == "__main__":
    main()
