"""Group a cProfile profile of Check calls into the parts a Check is made of."""

from __future__ import annotations

import pstats
import sysconfig
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

TOKENS = "token counting"
EVALUATION = "policy evaluation"
SQL = "SQL ledger"
PROTOBUF = "protobuf build/parse"
GRPC = "gRPC handler"
LOGGING = "logging"
SERVER = "server code"
PROFILER = "profiler hooks"
OTHER = "other"
CATEGORIES = (
    TOKENS,
    EVALUATION,
    SQL,
    PROTOBUF,
    GRPC,
    LOGGING,
    SERVER,
    PROFILER,
    OTHER,
)
LABEL_WIDTH = 60

# pstats names a function (file, line, name), and C functions have file "~".
Function = tuple[str, int, str]

_FILE_CATEGORIES = (
    ("/spendgate/tokens.py", TOKENS),
    ("/tiktoken/", TOKENS),
    ("/spendgate/evaluator.py", EVALUATION),
    ("/spendgate/policy/", EVALUATION),
    ("/spendgate/windows.py", EVALUATION),
    ("/spendgate/money.py", EVALUATION),
    ("/zoneinfo/", EVALUATION),
    ("/spendgate/ledger/", SQL),
    ("/sqlalchemy/", SQL),
    ("<sqlalchemy generated", SQL),
    ("/psycopg/", SQL),
    ("/psycopg_binary/", SQL),
    ("/sqlite3/", SQL),
    ("/google/protobuf/", PROTOBUF),
    ("/grpc/", GRPC),
    ("/structlog/", LOGGING),
    ("/json/", LOGGING),
    ("/spendgate/logs.py", LOGGING),
    ("/bench/profiled_server.py", PROFILER),
)
# Functions of spendgate/server.py that only build or read protobuf messages.
_SERVER_PROTOBUF = {"_check_response", "_budget_statuses"}
_C_PROTOBUF = ("SerializeToString", "FromString", "ParseFromString")
_MAX_CALLER_DEPTH = 8
_STDLIB = Path(sysconfig.get_paths()["stdlib"]).as_posix() + "/"


@dataclass(frozen=True)
class Entry:
    """One function's own time, in seconds over the whole profile."""

    category: str
    label: str
    seconds: float


@dataclass(frozen=True)
class Breakdown:
    """Own time per category and the functions that make it up."""

    checks: int
    total_seconds: float
    by_category: dict[str, float]
    entries: list[Entry]

    def per_check_ms(self, seconds: float) -> float:
        """Convert a profile total in seconds to milliseconds per Check."""
        return seconds * 1000 / self.checks if self.checks else 0.0

    def top(self, category: str, count: int) -> list[Entry]:
        """Return the `count` largest entries of `category`."""
        chosen = [entry for entry in self.entries if entry.category == category]
        return sorted(chosen, key=lambda entry: entry.seconds, reverse=True)[:count]


def _file_category(function: Function) -> str | None:
    filename, _, name = function
    if filename == "~":
        if any(marker in name for marker in _C_PROTOBUF):
            return PROTOBUF
        return None
    path = filename.replace("\\", "/")
    if path.endswith("/spendgate/server.py"):
        if name.startswith("<"):
            # A comprehension counts towards the function it is written in.
            return None
        return PROTOBUF if name in _SERVER_PROTOBUF else SERVER
    for marker, category in _FILE_CATEGORIES:
        if marker in path:
            return category
    if path.startswith(_STDLIB) and "/site-packages/" not in path:
        # Like C functions, standard library helpers (enum, dataclasses,
        # threading) count towards the part that called them.
        return None
    return OTHER


def _label(function: Function) -> str:
    filename, line, name = function
    if filename == "~":
        label = name
    else:
        parts = Path(filename).parts
        short = "/".join(parts[-2:]) if len(parts) > 1 else filename
        label = f"{name} ({short}:{line})"
    if len(label) > LABEL_WIDTH:
        label = label[: LABEL_WIDTH - 3] + "..."
    return label


def _shares(
    function: Function,
    raw: dict[Function, tuple[int, int, float, float, dict[Function, tuple]]],  # type: ignore[type-arg]
    depth: int = 0,
) -> dict[str, float]:
    """Return category weights for `function`, summing to 1.

    A C function (len, sqlite3's execute, tiktoken's encoder) or a standard
    library helper takes the categories of its callers, weighted by the
    time it spent under each.
    """
    category = _file_category(function)
    if category is not None:
        return {category: 1.0}
    callers = raw[function][4] if function in raw else {}
    if depth >= _MAX_CALLER_DEPTH or not callers:
        return {OTHER: 1.0}
    weights: dict[str, float] = defaultdict(float)
    total = sum(edge[2] for edge in callers.values()) or float(len(callers))
    for caller, edge in callers.items():
        share = (edge[2] if total else 1.0) / total
        for name, weight in _shares(caller, raw, depth + 1).items():
            weights[name] += share * weight
    return dict(weights)


def breakdown(profile_path: Path, checks: int) -> Breakdown:
    """Read a pstats dump and split its own time by category."""
    raw = pstats.Stats(str(profile_path)).stats  # type: ignore[attr-defined]
    by_category: dict[str, float] = dict.fromkeys(CATEGORIES, 0.0)
    entries: list[Entry] = []
    for function, (_cc, _nc, own, _cumulative, _callers) in raw.items():
        for category, weight in _shares(function, raw).items():
            seconds = own * weight
            by_category[category] += seconds
            entries.append(Entry(category, _label(function), seconds))
    total = sum(by_category.values())
    return Breakdown(checks, total, by_category, entries)
