"""Measure what spendgate adds to every model call, against an echo floor and Cerbos.

Run it with `make bench`. Every server runs in its own process on
127.0.0.1, and the results go to stdout and to a section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import sqlalchemy

import _cerbos
import _counting
import _drivers
import _own_work
import _postgres
import _procs
import _profile
import _report
import _stubs
from _results import (
    MemorySample,
    Pair,
    PeerResult,
    ProfileResult,
    RunResult,
    ScenarioResult,
    SoakSample,
)
from _workload import SCENARIOS, CheckCommit, EchoPair, Scenario, rag_document
from spendgate.policy import load_policy

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
WORK_DIR = _stubs.CACHE_DIR / "run"
POLICY_DIR = BENCH_DIR / "policies"
DOCS_PATH = REPO_DIR / "docs" / "benchmarks.md"
VENV_BIN = REPO_DIR / ".venv" / "bin"
POSTGRES_ENV = "SPENDGATE_BENCH_POSTGRES_URL"
# Each concurrent client stops after this many pairs even if time is left.
MAX_PAIRS_PER_CLIENT = 100_000
PROFILE_CHECKS = 300
PROFILE_RAG_CHECKS = 50
SOAK_INTERVAL_SECONDS = 5.0


@dataclass(frozen=True)
class Settings:
    """Sizes and durations of one run."""

    calls: int
    heavy_calls: int
    warmup: int
    sequential_seconds: float
    seconds: float
    clients: int
    workers: int
    driver: str
    compare_drivers: bool


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--calls", type=int, default=400, help="Sequential calls per scenario."
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=5.0,
        help="Seconds of each concurrent run (default 5).",
    )
    parser.add_argument("--clients", type=int, default=32, help="Concurrent clients.")
    parser.add_argument(
        "--workers", type=int, default=16, help="gRPC worker threads per server."
    )
    parser.add_argument(
        "--driver",
        choices=sorted(_drivers.DRIVERS),
        default="aio",
        help="Concurrent client driver (default aio, which loaded both servers "
        "more than threads on 2 cores).",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="Few calls and 1-second runs, to check that everything starts.",
    )
    parser.add_argument(
        "--soak",
        type=float,
        metavar="SECONDS",
        help="Run only a soak: mixed load on SQLite for SECONDS, sampling RSS "
        f"every {SOAK_INTERVAL_SECONDS:.0f} s.",
    )
    parser.add_argument(
        "--record",
        default=None,
        metavar="NAME",
        help="Section of docs/benchmarks.md to write (default: latest, or "
        "soak with --soak).",
    )
    parser.add_argument(
        "--no-record", action="store_true", help="Do not write docs/benchmarks.md."
    )
    return parser.parse_args()


def _settings(args: argparse.Namespace) -> Settings:
    if args.quick:
        return Settings(
            30, 10, 5, 3.0, 1.0, args.clients, args.workers, args.driver, False
        )
    return Settings(
        calls=args.calls,
        heavy_calls=max(1, args.calls // 4),
        warmup=20,
        sequential_seconds=10.0,
        seconds=args.seconds,
        clients=args.clients,
        workers=args.workers,
        driver=args.driver,
        compare_drivers=True,
    )


def _machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "CPU": cpu,
        "cores": str(os.cpu_count()),
        "OS": f"{platform.system()} {platform.release()}",
        "Python": platform.python_version(),
        "grpcio": grpc.__version__,
        "SQLAlchemy": sqlalchemy.__version__,
    }


def _spendgate() -> str:
    path = VENV_BIN / "spendgate"
    if not path.exists():
        sys.exit(f"error: {path} is missing; run `make install` first")
    return str(path)


def _migrate(database: str) -> None:
    result = subprocess.run(
        [_spendgate(), "migrate"],
        env={**os.environ, "SPENDGATE_DATABASE": database},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"spendgate migrate failed: {result.stderr.strip()}")


def _fresh_sqlite(name: str) -> str:
    directory = WORK_DIR / name
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    database = f"sqlite:///{directory / 'spendgate.db'}"
    _migrate(database)
    return database


def _serve(database: str, name: str, settings: Settings) -> _procs.ServerProcess:
    argv = [
        _spendgate(),
        "--log-json",
        "serve",
        "--address",
        f"{_procs.HOST}:0",
        "--policies",
        str(POLICY_DIR),
        "--workers",
        str(settings.workers),
    ]
    # The URL goes in the environment, so a password never shows in `ps`.
    return _procs.start(
        f"spendgate serve ({name})",
        argv,
        WORK_DIR / f"spendgate-{name}.log",
        env={"SPENDGATE_DATABASE": database},
    )


def _client_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _say(message: str) -> None:
    print(message, flush=True)


def _check_samples(label: str, samples: _drivers.Samples) -> None:
    unexpected = {
        name: count
        for name, count in samples.outcomes.items()
        if name not in ("DECISION_ALLOW", "OK", _cerbos.EFFECT_ALLOW)
    }
    if unexpected or samples.errors:
        _say(
            f"  warning: {label}: decisions {unexpected}, errors {dict(samples.errors)}"
        )


class Bench:
    """One run: starts the servers, measures them and collects the results."""

    def __init__(self, settings: Settings, run: RunResult) -> None:
        self.settings = settings
        self.run = run
        self.echo_pb2, _ = _stubs.load()
        # Echo results by scenario, measured during the SQLite pass and
        # reused for PostgreSQL, whose requests and responses have the same sizes.
        self.echo: dict[str, Pair] = {}
        self.echo_server: _procs.ServerProcess | None = None

    def measure_pair(
        self,
        server: _procs.ServerProcess,
        workload: _drivers.Workload,
        calls: int,
        label: str,
    ) -> tuple[_drivers.Samples, _drivers.Samples]:
        """Run `workload` with one client in sequence, then with many at once.

        The concurrent run also records the CPU time of the server process
        and of this process, whose client spends its share of the cores.
        """
        settings = self.settings
        sequential = _drivers.sequential(
            server.address,
            workload,
            calls,
            settings.sequential_seconds,
            settings.warmup,
        )
        _check_samples(f"{label}, sequential", sequential)
        server_before = _procs.read_cpu_seconds(server.process.pid)
        client_before = _client_cpu_seconds()
        concurrent = _drivers.DRIVERS[settings.driver](
            server.address,
            workload,
            settings.clients,
            settings.seconds,
            MAX_PAIRS_PER_CLIENT,
        )
        concurrent.server_cpu_seconds = (
            _procs.read_cpu_seconds(server.process.pid) - server_before
        )
        concurrent.client_cpu_seconds = _client_cpu_seconds() - client_before
        _check_samples(f"{label}, concurrent", concurrent)
        return sequential, concurrent

    def scenario(
        self, server: _procs.ServerProcess, scenario: Scenario, ledger: str
    ) -> None:
        """Measure one scenario on spendgate and, once per scenario, on the echo."""
        calls = self.settings.heavy_calls if scenario.heavy else self.settings.calls
        workload = CheckCommit(scenario)
        label = f"{scenario.name} on {ledger}"
        sequential, concurrent = self.measure_pair(server, workload, calls, label)
        check = Pair.of(sequential, concurrent)
        last_check = sequential.last_first_response
        last_commit = sequential.last_second_response
        if last_check is None or last_commit is None:
            raise RuntimeError(
                f"{label}: no Check and Commit pair succeeded; see {server.log_path}"
            )

        if scenario.name not in self.echo:
            request_sizes = (
                workload.first_request(0, 0).ByteSize(),
                workload.second_request(last_check).ByteSize(),
            )
            reply_sizes = (last_check.ByteSize(), last_commit.ByteSize())
            echo_workload = EchoPair(self.echo_pb2, request_sizes, reply_sizes)
            assert self.echo_server is not None
            self.echo[scenario.name] = Pair.of(
                *self.measure_pair(
                    self.echo_server, echo_workload, calls, f"echo {label}"
                )
            )
            if (
                scenario.name == _report.HEADLINE_SCENARIO
                and self.settings.compare_drivers
            ):
                self.compare_drivers(server, workload, echo_workload, check)
                self.compare_server_models(workload, check, echo_workload, calls)
        echo = self.echo[scenario.name]
        self.run.scenarios.append(
            ScenarioResult(
                scenario.name,
                scenario.description,
                ledger,
                int(last_check.input_tokens),
                check,
                echo,
            )
        )
        _say(
            f"  {scenario.name:8} {ledger:10} Check p50 "
            f"{check.sequential_first.p50_ms:6.2f} ms (echo "
            f"{echo.sequential_first.p50_ms:.2f}), {check.pairs_per_second:6.0f} "
            f"pairs/s (echo {echo.pairs_per_second:.0f})"
        )

    def compare_drivers(
        self,
        server: _procs.ServerProcess,
        workload: CheckCommit,
        echo_workload: EchoPair,
        check: Pair,
    ) -> None:
        """Run the other concurrent drivers on the headline scenario."""
        settings = self.settings
        chosen = (
            check.pairs_per_second,
            self.echo[_report.HEADLINE_SCENARIO].pairs_per_second,
        )
        self.run.drivers[settings.driver] = chosen
        for name, driver in _drivers.DRIVERS.items():
            if name == settings.driver:
                continue
            figures = tuple(
                driver(
                    address,
                    target,
                    settings.clients,
                    settings.seconds,
                    MAX_PAIRS_PER_CLIENT,
                ).pairs_per_second
                for address, target in (
                    (server.address, workload),
                    (
                        self.echo_server.address if self.echo_server else "",
                        echo_workload,
                    ),
                )
            )
            self.run.drivers[name] = (figures[0], figures[1])

    def compare_server_models(
        self, workload: CheckCommit, check: Pair, echo_workload: EchoPair, calls: int
    ) -> None:
        """Measure the headline echo and Check+Commit on a thread pool too."""
        models = self.run.server_models
        models["echo, grpc.aio (the floor)"] = self.echo[_report.HEADLINE_SCENARIO]
        models["echo, grpcio thread pool"] = self._measure_server(
            "thread-pool echo server",
            [
                str(BENCH_DIR / "echo_server.py"),
                "--address",
                f"{_procs.HOST}:0",
                "--workers",
                str(self.settings.workers),
            ],
            echo_workload,
            calls,
        )
        models["spendgate serve, grpc.aio"] = check
        models["spendgate handlers, grpcio thread pool"] = self._measure_server(
            "thread-pool spendgate server",
            [
                str(BENCH_DIR / "thread_pool_server.py"),
                "--policies",
                str(POLICY_DIR),
                "--database",
                _fresh_sqlite("thread-pool"),
                "--workers",
                str(self.settings.workers),
            ],
            workload,
            calls,
        )

    def _measure_server(
        self, name: str, argv: list[str], workload: _drivers.Workload, calls: int
    ) -> Pair:
        log_name = name.replace(" ", "-") + ".log"
        server = _procs.start(name, [sys.executable, *argv], WORK_DIR / log_name)
        try:
            return Pair.of(*self.measure_pair(server, workload, calls, name))
        finally:
            server.stop()

    def ledger(self, database: str, name: str) -> None:
        """Start `spendgate serve` on `database` and measure every scenario."""
        server = _serve(database, name, self.settings)
        try:
            before = server.rss_bytes()
            for scenario in SCENARIOS:
                self.scenario(server, scenario, name)
            self.run.memory.append(
                MemorySample(f"spendgate serve ({name})", before, server.rss_bytes())
            )
        finally:
            server.stop()


def _postgres_pass(bench: Bench) -> None:
    admin_url = os.environ.get(POSTGRES_ENV, _postgres.DEFAULT_URL)
    shown = sqlalchemy.engine.make_url(admin_url).render_as_string(hide_password=True)
    try:
        database, version = _postgres.create_database(admin_url)
    except _postgres.PostgresUnavailableError as error:
        line = f"PostgreSQL: skipped, no bench database at {shown}: {error}"
        _say(line)
        bench.run.skipped.append(line)
        return
    bench.run.machine["PostgreSQL"] = version
    url = database.render_as_string(hide_password=False)
    _say(f"PostgreSQL {version}: database {database.database}")
    try:
        _migrate(url)
        bench.ledger(url, "postgresql")
    finally:
        _postgres.drop_database(admin_url, database)


def _peer_pass(bench: Bench) -> None:
    policy = load_policy(POLICY_DIR)
    try:
        binary = _cerbos.install(_stubs.CACHE_DIR)
        server = _cerbos.start(binary, policy, WORK_DIR / "cerbos")
    except (_cerbos.CerbosUnavailableError, _procs.ServerStartError, OSError) as error:
        line = f"Cerbos: skipped, {error}"
        _say(line)
        bench.run.skipped.append(line)
        return
    try:
        before = server.rss_bytes()
        workload = _cerbos.CheckResources(server.address)
        disagreements = _cerbos.verify_equivalence(workload, server.address, policy)
        sequential, concurrent = bench.measure_pair(
            server, workload, bench.settings.calls, "Cerbos"
        )
        bench.run.peer = PeerResult(
            _cerbos.VERSION, Pair.of(sequential, concurrent), disagreements
        )
        bench.run.memory.append(
            MemorySample(f"Cerbos {_cerbos.VERSION}", before, server.rss_bytes())
        )
        _say(
            f"  Cerbos CheckResources p50 "
            f"{bench.run.peer.result.sequential_first.p50_ms:.2f} ms, "
            f"{bench.run.peer.result.pairs_per_second:.0f} calls/s"
        )
    finally:
        server.stop()


def _profile_pass(bench: Bench) -> None:
    database = _fresh_sqlite("profile")
    profile_out = WORK_DIR / "check.pstats"
    stats_out = WORK_DIR / "profile-stats.json"
    warmup = bench.settings.warmup
    checks = min(PROFILE_CHECKS, bench.settings.calls)
    argv = [
        sys.executable,
        str(BENCH_DIR / "profiled_server.py"),
        "--policies",
        str(POLICY_DIR),
        "--database",
        database,
        "--workers",
        str(bench.settings.workers),
        "--checks",
        str(checks),
        "--skip",
        str(warmup),
        "--profile-out",
        str(profile_out),
        "--stats-out",
        str(stats_out),
    ]
    server = _procs.start("profiled server", argv, WORK_DIR / "profiled.log")
    try:
        typical = next(s for s in SCENARIOS if s.name == _report.HEADLINE_SCENARIO)
        rag = next(s for s in SCENARIOS if s.name == "rag")
        _drivers.sequential(
            server.address, CheckCommit(typical), 2 * checks, 120, warmup
        )
        _drivers.sequential(
            server.address, CheckCommit(rag), PROFILE_RAG_CHECKS, 120, 0
        )
    finally:
        server.stop()
    stats = json.loads(stats_out.read_text(encoding="utf-8"))
    after, final = stats["cache_after_timed"], stats["cache_at_exit"]
    bench.run.profile = ProfileResult(
        _profile.breakdown(profile_out, stats["checks_profiled"]),
        stages_ms=stats["stages_ms"],
        timed_checks=stats["checks_timed"],
        cache_hits=final["hits"] - after["hits"],
        cache_misses=final["misses"] - after["misses"],
        rag_checks=PROFILE_RAG_CHECKS,
    )


def _full_run(settings: Settings, run: RunResult) -> None:
    _say("Token counting in this process")
    run.counting = _counting.measure()
    _say("Own work of a Check and a Commit in this process")
    typical = next(s for s in SCENARIOS if s.name == _report.HEADLINE_SCENARIO)
    run.own_work = _own_work.measure(
        typical,
        POLICY_DIR,
        _fresh_sqlite("own-work"),
        WORK_DIR / "own-work.log",
        settings.calls,
    )
    bench = Bench(settings, run)
    bench.echo_server = _procs.start(
        "echo server",
        [
            sys.executable,
            str(BENCH_DIR / "echo_server.py"),
            "--address",
            f"{_procs.HOST}:0",
            "--aio",
        ],
        WORK_DIR / "echo.log",
    )
    try:
        echo_before = bench.echo_server.rss_bytes()
        _say("SQLite ledger")
        bench.ledger(_fresh_sqlite("sqlite"), "sqlite")
        _postgres_pass(bench)
        run.memory.append(
            MemorySample("echo server", echo_before, bench.echo_server.rss_bytes())
        )
    finally:
        bench.echo_server.stop()
    _say("Cerbos")
    _peer_pass(bench)
    _say("Profile of Check")
    _profile_pass(bench)


def _soak(settings: Settings, run: RunResult, seconds: float) -> None:
    server = _serve(_fresh_sqlite("soak"), "soak", settings)
    driver = _drivers.DRIVERS[settings.driver]
    try:
        started = time.monotonic()
        run.soak.append(SoakSample(0.0, server.rss_bytes(), 0.0, 0))
        # A last interval under a second would give a noisy rate, so it is skipped.
        while (left := seconds - (time.monotonic() - started)) >= 1:
            # A new workload each interval gives every request a new id.
            samples = driver(
                server.address,
                CheckCommit(*SCENARIOS),
                settings.clients,
                min(SOAK_INTERVAL_SECONDS, left),
                MAX_PAIRS_PER_CLIENT,
            )
            sample = SoakSample(
                time.monotonic() - started,
                server.rss_bytes(),
                samples.pairs_per_second,
                sum(samples.errors.values()),
            )
            run.soak.append(sample)
            rss_mib = sample.rss_bytes / 2**20
            _say(
                f"  {sample.elapsed_seconds:5.0f} s  RSS {rss_mib:7.1f} MiB  "
                f"{sample.pairs_per_second:6.0f} pairs/s"
            )
    finally:
        server.stop()


def _command() -> str:
    if os.environ.get("MAKELEVEL"):
        return "make bench"
    script = Path(sys.argv[0]).resolve()
    try:
        shown = str(script.relative_to(REPO_DIR))
    except ValueError:
        shown = str(script)
    return shlex.join([".venv/bin/python", shown, *sys.argv[1:]])


def main() -> None:
    """Run the benchmark, print the tables and write the docs section."""
    args = _parse_args()
    settings = _settings(args)
    started = time.monotonic()
    shutil.rmtree(WORK_DIR, ignore_errors=True)
    WORK_DIR.mkdir(parents=True)
    run = RunResult(
        machine=_machine(),
        command=_command(),
        started=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        clients=settings.clients,
        driver=settings.driver,
        workers=settings.workers,
    )
    _say("Preparing prompts")
    rag_document()
    if args.soak is not None:
        _soak(settings, run, args.soak)
    else:
        _full_run(settings, run)
    run.elapsed_seconds = time.monotonic() - started

    print()
    print(_report.render_text(run))
    if not args.no_record:
        name = args.record or ("soak" if args.soak is not None else "latest")
        _report.write_section(DOCS_PATH, name, _report.render_markdown(run, name))
        print(f"\nWrote section {name!r} of {DOCS_PATH.relative_to(REPO_DIR)}")


if __name__ == "__main__":
    main()
