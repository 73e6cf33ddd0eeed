"""Results of one bench run, summarised into latency and throughput figures."""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from _counting import CountTimes
from _drivers import Samples
from _own_work import OwnWork
from _profile import Breakdown


@dataclass(frozen=True)
class Latency:
    """Percentiles of one RPC's latency, in milliseconds."""

    count: int
    p50_ms: float
    p99_ms: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Latency:
        """Summarise latencies given in seconds."""
        ordered = sorted(seconds)
        return cls(
            len(ordered),
            percentile(ordered, 50) * 1000,
            percentile(ordered, 99) * 1000,
        )


def percentile(ordered: Sequence[float], percent: float) -> float:
    """Return the percentile of sorted values, interpolating linearly (NaN if none)."""
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * percent / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Pair:
    """Sequential and concurrent figures of one workload: a pair of RPCs."""

    sequential_first: Latency
    sequential_second: Latency
    pairs_per_second: float
    loaded_first: Latency
    loaded_second: Latency
    outcomes: collections.Counter[str]
    errors: collections.Counter[str]
    # CPU milliseconds the server and the client spent on each pair of the
    # concurrent run (NaN when not measured).
    server_cpu_ms: float = math.nan
    client_cpu_ms: float = math.nan

    @classmethod
    def of(cls, sequential: Samples, concurrent: Samples) -> Pair:
        """Summarise a sequential run and a concurrent run of one workload."""
        outcomes = sequential.outcomes + concurrent.outcomes
        errors = sequential.errors + concurrent.errors
        pairs = concurrent.pairs or math.nan
        return cls(
            Latency.of(sequential.first),
            Latency.of(sequential.second),
            concurrent.pairs_per_second,
            Latency.of(concurrent.first),
            Latency.of(concurrent.second),
            outcomes,
            errors,
            concurrent.server_cpu_seconds * 1000 / pairs,
            concurrent.client_cpu_seconds * 1000 / pairs,
        )


@dataclass(frozen=True)
class ScenarioResult:
    """spendgate and the echo floor on one scenario and ledger."""

    scenario: str
    description: str
    ledger: str
    input_tokens: int
    check: Pair
    echo: Pair


@dataclass(frozen=True)
class PeerResult:
    """Cerbos CheckResources, sequential and concurrent."""

    version: str
    result: Pair
    disagreements: list[str]


@dataclass(frozen=True)
class ProfileResult:
    """The Check profile and the count cache of the profiled server."""

    breakdown: Breakdown
    # Stage name to {"mean": ms, "median": ms}, over `timed_checks` Checks
    # run without the profiler.
    stages_ms: dict[str, dict[str, float]]
    timed_checks: int
    # Count-cache lookups while the same RAG document was sent rag_checks times.
    cache_hits: int
    cache_misses: int
    rag_checks: int


@dataclass(frozen=True)
class MemorySample:
    """Resident set size of a server process before and after its load."""

    process: str
    before_bytes: int
    after_bytes: int


@dataclass(frozen=True)
class SoakSample:
    """One RSS sample of the soak, with the load of the interval before it."""

    elapsed_seconds: float
    rss_bytes: int
    pairs_per_second: float
    errors: int


@dataclass
class RunResult:
    """Everything one run measured, in the order the report shows it."""

    machine: dict[str, str]
    command: str
    started: str
    clients: int
    driver: str
    workers: int
    scenarios: list[ScenarioResult] = field(default_factory=list)
    drivers: dict[str, tuple[float, float]] = field(default_factory=dict)
    # Echo of the headline scenario on each gRPC server model.
    server_models: dict[str, Pair] = field(default_factory=dict)
    peer: PeerResult | None = None
    profile: ProfileResult | None = None
    counting: CountTimes | None = None
    own_work: OwnWork | None = None
    memory: list[MemorySample] = field(default_factory=list)
    soak: list[SoakSample] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    elapsed_seconds: float = 0.0

    def find(self, scenario: str, ledger: str) -> ScenarioResult | None:
        """Return the result of `scenario` on `ledger`, if it ran."""
        for result in self.scenarios:
            if result.scenario == scenario and result.ledger == ledger:
                return result
        return None
