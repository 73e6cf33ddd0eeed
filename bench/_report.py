"""Render a run as text tables for the terminal and as a Markdown section."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from _own_work import IDLE_SECONDS
from _profile import CATEGORIES
from _results import RunResult, ScenarioResult

TOP_FUNCTIONS = 3
TARGET_P50_RATIO = 1.5
TARGET_THROUGHPUT_SHARE = 0.70
HEADLINE_SCENARIO = "typical"


@dataclass(frozen=True)
class Table:
    """A titled table with optional notes under it."""

    title: str
    headers: tuple[str, ...]
    rows: Sequence[tuple[str, ...]]
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Target:
    """A goal the run is compared with. `passed` is None when it was not measured."""

    goal: str
    measured: str
    passed: bool | None


def _ms(value: float) -> str:
    if math.isnan(value):
        return "-"
    if value < 1:
        return f"{value:.3f}"
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def _ratio(numerator: float, denominator: float) -> str:
    if denominator <= 0 or math.isnan(numerator) or math.isnan(denominator):
        return "-"
    return f"{numerator / denominator:.2f}x"


def _mb(value: int) -> str:
    return f"{value / 2**20:.1f}"


def _rate(value: float) -> str:
    return f"{value:,.0f}"


def _latency_table(run: RunResult) -> Table:
    rows = []
    for result in run.scenarios:
        check, echo = result.check, result.echo
        rows.append(
            (
                result.scenario,
                result.ledger,
                f"{result.input_tokens:,}",
                str(check.sequential_first.count),
                _ms(check.sequential_first.p50_ms),
                _ms(check.sequential_first.p99_ms),
                _ms(check.sequential_second.p50_ms),
                _ms(check.sequential_second.p99_ms),
                _ms(echo.sequential_first.p50_ms),
                _ms(echo.sequential_first.p99_ms),
                _ratio(check.sequential_first.p50_ms, echo.sequential_first.p50_ms),
                _ratio(check.sequential_first.p99_ms, echo.sequential_first.p99_ms),
            )
        )
    return Table(
        "Latency, one client calling in sequence (ms)",
        (
            "scenario",
            "ledger",
            "input tokens",
            "calls",
            "Check p50",
            "Check p99",
            "Commit p50",
            "Commit p99",
            "echo p50",
            "echo p99",
            "p50 vs echo",
            "p99 vs echo",
        ),
        rows,
        (
            "echo: the echo service with the Check's request and response sizes, "
            "measured in the same run.",
        ),
    )


def _throughput_table(run: RunResult) -> Table:
    rows = []
    for result in run.scenarios:
        check, echo = result.check, result.echo
        errors = sum(check.errors.values())
        rows.append(
            (
                result.scenario,
                result.ledger,
                _rate(check.pairs_per_second),
                _rate(echo.pairs_per_second),
                _ratio(check.pairs_per_second, echo.pairs_per_second),
                _ms(check.loaded_first.p50_ms),
                _ms(check.loaded_first.p99_ms),
                _ms(check.loaded_second.p50_ms),
                _ms(check.server_cpu_ms),
                _ms(echo.server_cpu_ms),
                _outcomes(result) + (f", {errors} errors" if errors else ""),
            )
        )
    return Table(
        f"Throughput, {run.clients} concurrent clients ({run.driver})",
        (
            "scenario",
            "ledger",
            "Check+Commit/s",
            "echo pairs/s",
            "vs echo",
            "Check p50 ms",
            "Check p99 ms",
            "Commit p50 ms",
            "server CPU ms/pair",
            "echo CPU ms/pair",
            "decisions",
        ),
        rows,
        (
            "Each client calls Check, then Commit with the reservation, as an "
            "application does; the echo clients send two echoes of the same sizes.",
            "CPU ms/pair: CPU time of the server process over the run, from "
            "/proc, per completed pair.",
        ),
    )


def _outcomes(result: ScenarioResult) -> str:
    counts = result.check.outcomes
    return ", ".join(
        f"{name.removeprefix('DECISION_')} {count}"
        for name, count in sorted(counts.items())
    )


def _driver_table(run: RunResult) -> Table | None:
    if not run.drivers:
        return None
    rows = [
        (name, _rate(check), _rate(echo))
        for name, (check, echo) in sorted(run.drivers.items())
    ]
    return Table(
        f"Client drivers, {run.clients} clients, {HEADLINE_SCENARIO} on SQLite",
        ("driver", "Check+Commit/s", "echo pairs/s"),
        rows,
        (f"The run uses {run.driver}, the driver that loads the servers more.",),
    )


def _server_model_table(run: RunResult) -> Table | None:
    if not run.server_models:
        return None
    rows = [
        (
            name,
            _ms(pair.sequential_first.p50_ms),
            _ms(pair.sequential_first.p99_ms),
            _rate(pair.pairs_per_second),
            _ms(pair.server_cpu_ms),
        )
        for name, pair in run.server_models.items()
    ]
    return Table(
        f"gRPC server model, {HEADLINE_SCENARIO} scenario on SQLite",
        (
            "server",
            "first call p50 ms",
            "p99 ms",
            f"pairs/s, {run.clients} clients",
            "server CPU ms/pair",
        ),
        rows,
        (
            "The echo and spendgate's Check+Commit, each on grpc.aio and on a "
            "grpcio thread pool with the same worker count, in one process "
            "each. On SQLite, spendgate serve uses grpc.aio and calls the "
            "handlers inline on the event loop; bench/thread_pool_server.py "
            "serves them from the thread pool. The first call is the echo or "
            "the Check.",
        ),
    )


def _peer_table(run: RunResult) -> Table | None:
    peer = run.peer
    if peer is None:
        return None
    rows = [
        (
            f"Cerbos {peer.version} CheckResources",
            _ms(peer.result.sequential_first.p50_ms),
            _ms(peer.result.sequential_first.p99_ms),
            _rate(peer.result.pairs_per_second),
            _ms(peer.result.loaded_first.p50_ms),
            _ms(peer.result.loaded_first.p99_ms),
        )
    ]
    for ledger in ("sqlite", "postgresql"):
        result = run.find(HEADLINE_SCENARIO, ledger)
        if result is not None:
            rows.append(
                (
                    f"spendgate Check, {HEADLINE_SCENARIO}, {ledger}",
                    _ms(result.check.sequential_first.p50_ms),
                    _ms(result.check.sequential_first.p99_ms),
                    _rate(result.check.pairs_per_second),
                    _ms(result.check.loaded_first.p50_ms),
                    _ms(result.check.loaded_first.p99_ms),
                )
            )
    agreement = (
        "Cerbos and spendgate agreed on every department and model."
        if not peer.disagreements
        else "Cerbos and spendgate disagreed on: " + ", ".join(peer.disagreements)
    )
    return Table(
        "Peer: a stateless policy decision point",
        (
            "call",
            "sequential p50 ms",
            "p99 ms",
            f"calls/s, {run.clients} clients",
            "loaded p50 ms",
            "loaded p99 ms",
        ),
        rows,
        (
            "Cerbos decides only whether the department may use the model; it "
            "counts no tokens and writes no ledger. The spendgate calls/s "
            "counts Check+Commit pairs.",
            agreement,
        ),
    )


def _profile_tables(run: RunResult) -> list[Table]:
    found = [_profile_table(run), _stage_table(run), _cache_table(run)]
    return [table for table in found if table is not None]


def _profile_table(run: RunResult) -> Table | None:
    if run.profile is None:
        return None
    breakdown = run.profile.breakdown
    rows = []
    for category in CATEGORIES:
        seconds = breakdown.by_category[category]
        if seconds <= 0:
            continue
        top = "; ".join(
            f"{entry.label} {breakdown.per_check_ms(entry.seconds):.3f}"
            for entry in breakdown.top(category, TOP_FUNCTIONS)
        )
        share = seconds / breakdown.total_seconds if breakdown.total_seconds else 0
        per_check = f"{breakdown.per_check_ms(seconds):.3f}"
        rows.append((category, per_check, f"{share:.0%}", top))

    total_ms = breakdown.per_check_ms(breakdown.total_seconds)
    return Table(
        f"Where a Check ({HEADLINE_SCENARIO}, SQLite) spends its time, "
        f"cProfile over {breakdown.checks} Checks",
        ("part", "ms per Check", "share", "largest functions (ms per Check)"),
        rows,
        (
            f"Own time of each function, {total_ms:.2f} ms per Check in all, "
            "from request parsing to response serialization in the server "
            "process. C functions count towards the part that called them. "
            "cProfile slows each Python call, so Python-heavy parts look "
            "larger than they are.",
        ),
    )


def _cache_table(run: RunResult) -> Table | None:
    if run.profile is None:
        return None
    profile = run.profile
    lookups = profile.cache_hits + profile.cache_misses
    hit_rate = f"{profile.cache_hits / lookups:.1%}" if lookups else "-"
    row = (
        str(profile.rag_checks),
        str(profile.cache_hits),
        str(profile.cache_misses),
        hit_rate,
    )
    return Table(
        "Count cache while the same RAG document is sent repeatedly",
        ("Checks", "hits", "misses", "hit rate"),
        [row],
        ("From tokens.cache_info() in the server process.",),
    )


def _stage_table(run: RunResult) -> Table | None:
    profile = run.profile
    if profile is None or not profile.stages_ms:
        return None
    stages = profile.stages_ms
    empty = {"mean": math.nan, "median": math.nan}

    def stage(name: str) -> dict[str, float]:
        return stages.get(name, empty)

    handler = stage("Check handler")
    rest = handler["mean"] - stage("evaluator.plan")["mean"]
    rest -= stage("Ledger.check")["mean"]
    rows = [
        ("deserialize the request", "deserialize"),
        ("evaluator.plan: policy lookup, token counting", "evaluator.plan"),
        ("Ledger.check: the SQL transaction", "Ledger.check"),
    ]
    found = [
        (label, _ms(stage(name)["mean"]), _ms(stage(name)["median"]))
        for label, name in rows
    ]
    found.append(("rest of the handler: validation, response, log", _ms(rest), "-"))
    found.append(("serialize the response", *_stage_cells(stage("serialize"))))
    found.append(("whole Check handler", *_stage_cells(handler)))
    notes = [
        f"Wall time of {profile.timed_checks} {HEADLINE_SCENARIO} Checks on "
        "SQLite in sequence, without the profiler. The rest of the handler is "
        "the handler's mean less the two timed stages.",
    ]
    result = run.find(HEADLINE_SCENARIO, "sqlite")
    if result is not None:
        notes.append(
            "The client saw a Check p50 of "
            f"{_ms(result.check.sequential_first.p50_ms)} ms in the sequential "
            "run; the difference is gRPC transport and the Python client."
        )
    return Table(
        f"Stages of a Check ({HEADLINE_SCENARIO}, SQLite), without the profiler",
        ("stage", "mean ms", "median ms"),
        found,
        tuple(notes),
    )


def _stage_cells(values: dict[str, float]) -> tuple[str, str]:
    return _ms(values["mean"]), _ms(values["median"])


def _counting_table(run: RunResult) -> Table | None:
    counting = run.counting
    if counting is None:
        return None

    def row(name: str, ms: float) -> tuple[str, ...]:
        rate = counting.tokens / (ms / 1000) if ms > 0 else 0.0
        return (name, _ms(ms), f"{rate / 1e6:.1f}", _ratio(ms, counting.tiktoken_ms))

    return Table(
        f"Token counting, {counting.tokens:,} tokens ({counting.characters:,} "
        "characters), median",
        ("method", "ms", "M tokens/s", "vs tiktoken"),
        [
            row("tiktoken encode_ordinary", counting.tiktoken_ms),
            row("tokens.count_text, new text", counting.miss_ms),
            row("tokens.count_text, same text again", counting.hit_ms),
        ],
        (
            "A new text is hashed (BLAKE2b), encoded and stored in the count "
            "cache; a text seen before is hashed and looked up.",
        ),
    )


def _memory_table(run: RunResult) -> Table | None:
    if not run.memory:
        return None
    rows = [
        (
            sample.process,
            _mb(sample.before_bytes),
            _mb(sample.after_bytes),
            f"{(sample.after_bytes - sample.before_bytes) / 2**20:+.1f}",
        )
        for sample in run.memory
    ]
    return Table(
        "Server memory (RSS, MiB)",
        ("process", "before load", "after load", "change"),
        rows,
    )


def _soak_table(run: RunResult) -> Table | None:
    if not run.soak:
        return None
    rows = [
        (
            f"{sample.elapsed_seconds:.0f}",
            _mb(sample.rss_bytes),
            _rate(sample.pairs_per_second),
            str(sample.errors),
        )
        for sample in run.soak
    ]
    # The first sample is the idle server, so growth is counted from the
    # first sample taken under load.
    loaded = run.soak[1:] or run.soak
    growth = (loaded[-1].rss_bytes - loaded[0].rss_bytes) / 2**20
    return Table(
        f"Soak: spendgate serve on SQLite, {run.clients} clients, mixed scenarios",
        ("seconds", "RSS MiB", "Check+Commit/s", "errors"),
        rows,
        (
            "Row 0 is the idle server. RSS change from the first to the last "
            f"sample under load: {growth:+.1f} MiB.",
        ),
    )


def targets(run: RunResult) -> list[Target]:
    """Compare the run with the goals set for the 1,000-token Check on SQLite."""
    result = run.find(HEADLINE_SCENARIO, "sqlite")
    if result is None:
        return []
    check = result.check.sequential_first.p50_ms
    echo = result.echo.sequential_first.p50_ms
    found = [
        Target(
            f"Check p50 <= {TARGET_P50_RATIO}x echo p50",
            f"{check:.2f} ms = {check / echo:.2f}x echo {echo:.2f} ms",
            check <= TARGET_P50_RATIO * echo,
        )
    ]
    if run.peer is not None:
        cerbos = run.peer.result.sequential_first.p50_ms
        found.append(
            Target(
                "Check p50 < Cerbos p50",
                f"{check:.2f} ms vs Cerbos {cerbos:.2f} ms",
                check < cerbos,
            )
        )
    else:
        found.append(Target("Check p50 < Cerbos p50", "Cerbos skipped", None))
    share = result.check.pairs_per_second / result.echo.pairs_per_second
    found.append(
        Target(
            f"{run.clients}-client throughput >= {TARGET_THROUGHPUT_SHARE:.0%} of echo",
            f"{result.check.pairs_per_second:,.0f}/s = {share:.0%} of echo "
            f"{result.echo.pairs_per_second:,.0f}/s",
            share >= TARGET_THROUGHPUT_SHARE,
        )
    )
    return found


def _room_table(run: RunResult) -> Table | None:
    """Set what each target leaves for spendgate's own work against that work."""
    result = run.find(HEADLINE_SCENARIO, "sqlite")
    own = run.own_work
    if result is None or own is None:
        return None

    echo_ms = result.echo.sequential_first.p50_ms
    floor_ms = own.tokenize_ms + own.check_sqlite_ms
    work = (
        f"{own.check_ms:.2f} ms a Check: tiktoken {own.tokenize_ms:.2f}, "
        f"SQLite {own.check_sqlite_ms:.2f}, the rest Python"
    )
    bound = (
        f"Check p50 >= {echo_ms + own.check_ms:.2f} ms = "
        f"{(echo_ms + own.check_ms) / echo_ms:.2f}x echo; with no Python at all "
        f"{(echo_ms + floor_ms) / echo_ms:.2f}x"
    )
    rows = [
        (
            f"Check p50 <= {TARGET_P50_RATIO}x echo p50",
            f"{(TARGET_P50_RATIO - 1) * echo_ms:.2f} ms a Check",
            work,
            bound,
        )
    ]

    if run.peer is not None:
        cerbos_ms = run.peer.result.sequential_first.p50_ms
        rows.append(
            (
                "Check p50 < Cerbos p50",
                f"{cerbos_ms - echo_ms:.2f} ms a Check",
                work,
                f"Check p50 >= {echo_ms + own.check_ms:.2f} ms, with no Python "
                f"{echo_ms + floor_ms:.2f} ms; Cerbos {cerbos_ms:.2f} ms",
            )
        )

    cores = int(run.machine.get("cores", "0") or 0)
    echo, check = result.echo, result.check
    fixed_ms = echo.server_cpu_ms + check.client_cpu_ms
    if cores and not math.isnan(fixed_ms):
        target_rate = TARGET_THROUGHPUT_SHARE * echo.pairs_per_second
        room_ms = cores * 1000 / target_rate - fixed_ms
        max_rate = cores * 1000 / (fixed_ms + own.pair_ms)
        pair_floor_ms = own.tokenize_ms + own.check_sqlite_ms + own.commit_sqlite_ms
        max_rate_without_python = cores * 1000 / (fixed_ms + pair_floor_ms)
        rows.append(
            (
                f"{run.clients}-client throughput >= "
                f"{TARGET_THROUGHPUT_SHARE:.0%} of echo",
                f"{room_ms:.2f} ms of CPU a pair",
                f"{own.pair_ms:.2f} ms a Check+Commit pair: tiktoken "
                f"{own.tokenize_ms:.2f}, SQLite "
                f"{own.check_sqlite_ms + own.commit_sqlite_ms:.2f}, the rest Python",
                f"at most {max_rate / echo.pairs_per_second:.0%} of echo; with no "
                f"Python at all {max_rate_without_python / echo.pairs_per_second:.0%}",
            )
        )

    return Table(
        "What each target leaves for spendgate's own work",
        (
            "target",
            "room for own work",
            "own work, in-process",
            "least cost it implies",
        ),
        rows,
        (
            f"Own work: median of {own.pairs} {HEADLINE_SCENARIO} Check and "
            "Commit handlers called directly on one thread on SQLite, with no "
            "gRPC (bench/_own_work.py): what a Check adds to the echo's work on "
            "any server model. tiktoken: encode_ordinary alone on the same "
            "prompts. SQLite: time inside sqlite3's C methods, from a profile hook. "
            "'With no Python at all' counts only those two.",
            "Latency room: the target's p50 less the echo's p50 in this run. "
            "The same Check took "
            f"{own.check_after_idle_ms:.2f} ms after "
            f"{IDLE_SECONDS * 1000:g} ms idle before each pair, "
            "as a server idles between the calls of one client, against "
            f"{own.check_ms:.2f} ms back to back.",
            f"Throughput room: at {TARGET_THROUGHPUT_SHARE:.0%} of the echo's "
            f"pairs/s, the {cores} cores' CPU time a pair, less the echo server's "
            f"CPU a pair ({echo.server_cpu_ms:.2f} ms) and the client's CPU a "
            f"spendgate pair ({check.client_cpu_ms:.2f} ms), from /proc over the "
            f"{run.clients}-client runs. The bound assumes every core busy and "
            "no cost for threads or the GIL. spendgate's server used "
            f"{check.server_cpu_ms:.2f} ms of CPU a pair.",
        ),
    )


def _target_table(run: RunResult) -> Table | None:
    found = targets(run)
    if not found:
        return None
    verdicts = {True: "met", False: "NOT met", None: "not measured"}
    return Table(
        f"Targets ({HEADLINE_SCENARIO} scenario, SQLite ledger)",
        ("target", "measured", "result"),
        [(target.goal, target.measured, verdicts[target.passed]) for target in found],
    )


def tables(run: RunResult) -> list[Table]:
    """Return the report's tables in reading order, leaving out empty ones."""
    found: list[Table | None] = []
    if run.scenarios:
        found += [
            _target_table(run),
            _room_table(run),
            _latency_table(run),
            _throughput_table(run),
        ]
    found += [
        _driver_table(run),
        _server_model_table(run),
        _peer_table(run),
        *_profile_tables(run),
    ]
    found += [_counting_table(run), _memory_table(run), _soak_table(run)]
    return [table for table in found if table is not None]


def _machine_lines(run: RunResult) -> list[str]:
    machine = ", ".join(f"{key} {value}" for key, value in run.machine.items())
    return [
        f"Date: {run.started}",
        f"Command: {run.command}",
        f"Machine: {machine}",
        f"Servers: {run.workers} worker threads each, on 127.0.0.1; "
        f"run took {run.elapsed_seconds:.0f} s",
        *(f"Skipped: {line}" for line in run.skipped),
    ]


def render_text(run: RunResult) -> str:
    """Render the run as aligned text tables for the terminal."""
    lines = ["spendgate benchmark", *_machine_lines(run)]
    for table in tables(run):
        widths = [
            max(len(cell) for cell in column)
            for column in zip(table.headers, *table.rows, strict=True)
        ]
        lines += ["", table.title]
        for cells in (table.headers, *table.rows):
            lines.append(
                "  ".join(
                    cell.ljust(width) for cell, width in zip(cells, widths, strict=True)
                )
            )
        lines += [f"  {note}" for note in table.notes]
    return "\n".join(lines)


def _escape(cell: str) -> str:
    return cell.replace("|", "\\|")


def render_markdown(run: RunResult, name: str) -> str:
    """Render the run as a Markdown section headed `name`."""
    lines = [f"## {name}", ""]
    lines += [f"- {line}" for line in _machine_lines(run)]
    for table in tables(run):
        lines += ["", f"### {table.title}", ""]
        lines.append("| " + " | ".join(table.headers) + " |")
        lines.append("|" + "---|" * len(table.headers))
        for row in table.rows:
            lines.append("| " + " | ".join(_escape(cell) for cell in row) + " |")
        if table.notes:
            lines.append("")
            lines += list(table.notes)
    return "\n".join(lines) + "\n"


def write_section(path: Path, name: str, body: str) -> None:
    """Replace the section `name` of the Markdown file at `path`, or append it.

    A section runs from its begin marker to its end marker, so text outside
    the markers, such as the page's introduction, is kept as it is.
    """
    begin = f"<!-- bench-run: {name} -->"
    end = f"<!-- /bench-run: {name} -->"
    block = f"{begin}\n{body}{end}\n"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _match: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text, encoding="utf-8")
