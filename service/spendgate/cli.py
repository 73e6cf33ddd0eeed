"""The spendgate command line: serve, migrate, validate, check, audit, budgets."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path
from typing import Any

import click
import structlog

from spendgate import logs
from spendgate.errors import count_errors

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_DATABASE = "sqlite:///var/spendgate.db"
DEFAULT_POLICIES = "policies"

# Exit codes that scripts and CI can tell apart.
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_INVALID_POLICY = 3

database_option = click.option(
    "--database",
    default=DEFAULT_DATABASE,
    show_default=True,
    envvar="SPENDGATE_DATABASE",
    help="SQLAlchemy URL of the ledger, such as postgresql+psycopg://user@host/db.",
)


def _shown_url(database: str) -> str:
    """Render a database URL for a message, with any password hidden."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return repr(make_url(database).render_as_string(hide_password=True))
    except ArgumentError:
        return "(an unparsable URL)"


def message_to_json(message: Any) -> dict[str, Any]:
    """Convert a response to the JSON the other commands print.

    Field names stay snake_case, int64 counts and micro-USD amounts stay
    integers (protobuf's JSON mapping writes them as strings), and
    decisions read ALLOW, DENY or DOWNGRADE, or null when unset.
    """
    from google.protobuf import json_format

    data = json_format.MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )
    return _plain(message, data)


def _plain(message: Any, data: dict[str, Any]) -> dict[str, Any]:
    for field in message.DESCRIPTOR.fields:
        name = field.name
        if name not in data:
            continue
        value = data[name]
        if field.message_type is not None and isinstance(value, list):
            data[name] = [
                _plain(item, entry)
                for item, entry in zip(getattr(message, name), value, strict=True)
            ]
        elif field.message_type is not None and isinstance(value, dict):
            if field.message_type.GetOptions().map_entry:
                continue
            data[name] = _plain(getattr(message, name), value)
        elif field.cpp_type in (field.CPPTYPE_INT64, field.CPPTYPE_UINT64):
            data[name] = int(value)
        elif field.enum_type is not None and isinstance(value, str):
            # An unset decision, such as shadow_decision outside shadow mode,
            # prints as null, as it does in the audit log.
            unset = value.endswith("_UNSPECIFIED")
            data[name] = None if unset else value.removeprefix("DECISION_")
    return data


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    help="debug, info, warning or error.",
)
@click.option(
    "--log-json/--log-console",
    default=None,
    help="Log format; default JSON unless stderr is a terminal.",
)
def main(log_level: str, log_json: bool | None) -> None:
    """Policy-as-code budget enforcement for AI inference."""
    logs.configure(log_level, json=log_json)


@main.command()
@click.option(
    "--address",
    default=DEFAULT_ADDRESS,
    show_default=True,
    help="HOST:PORT to listen on.",
)
@click.option(
    "--policies",
    "policy_dir",
    default=DEFAULT_POLICIES,
    show_default=True,
    type=click.Path(path_type=Path),
    help="Policy directory.",
)
@database_option
@click.option(
    "--workers",
    default=16,
    show_default=True,
    type=click.IntRange(1, 512),
    help="gRPC worker threads on PostgreSQL and with --sqlite-server-model "
    "thread-pool. Otherwise, on SQLite, threads for the calls that leave the "
    "event loop: Checks with long prompts and calls that must wait for the "
    "write lock. Also sizes the database pool.",
)
@click.option(
    "--watch/--no-watch",
    default=True,
    show_default=True,
    help="Reload policies on file change events; SIGHUP always reloads.",
)
@click.option(
    "--poll-interval",
    default=2.0,
    show_default=True,
    type=click.FloatRange(0),
    help="Seconds between checks of the policy directory; 0 turns the poll off.",
)
@click.option(
    "--sweep-interval",
    default=15.0,
    show_default=True,
    type=click.FloatRange(0.05),
    help="Seconds between sweeps settling expired reservations.",
)
@click.option(
    "--health-interval",
    default=1.0,
    show_default=True,
    type=click.FloatRange(0.05),
    help="Seconds between database pings that drive the health status.",
)
@click.option(
    "--sqlite-server-model",
    type=click.Choice(["event-loop", "thread-pool"]),
    default="event-loop",
    show_default=True,
    help="gRPC server model on SQLite: event-loop runs short calls inline on "
    "grpc.aio, for more calls a second per core; thread-pool runs every call "
    "on a grpcio worker thread, for up to 0.3 ms less per call at low load. "
    "PostgreSQL always uses thread-pool.",
)
@click.option(
    "--sqlite-synchronous",
    type=click.Choice(["normal", "full"]),
    default="normal",
    show_default=True,
    help="SQLite durability: normal survives a process crash, full also a power "
    "loss at about 4 ms more per write.",
)
@click.option(
    "--sqlite-busy-timeout",
    default=5.0,
    show_default=True,
    type=click.FloatRange(0.1, 600),
    help="Seconds a request waits for another process's SQLite write lock before "
    "it fails with UNAVAILABLE. A request queued behind one that is already "
    "waiting may wait up to twice as long.",
)
@click.option(
    "--drain-delay",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0),
    help="Seconds to keep serving after SIGTERM turns health NOT_SERVING, before "
    "the listener closes; set it above the load balancer's health check interval.",
)
@click.option(
    "--spool",
    default="var/spool/unverified-audit.jsonl",
    show_default=True,
    type=click.Path(path_type=Path),
    help="File keeping audit rows of Checks decided while the database is down "
    "(fail_mode: open) until they are written to it.",
)
@click.option(
    "--grace",
    default=10.0,
    show_default=True,
    type=click.FloatRange(0),
    help="Seconds to drain in-flight calls on SIGTERM.",
)
def serve(
    address: str,
    policy_dir: Path,
    database: str,
    workers: int,
    watch: bool,
    poll_interval: float,
    sweep_interval: float,
    health_interval: float,
    sqlite_server_model: str,
    sqlite_synchronous: str,
    sqlite_busy_timeout: float,
    drain_delay: float,
    spool: Path,
    grace: float,
) -> None:
    """Serve the SpendGate gRPC API."""
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    from spendgate import ledger, server, tokens
    from spendgate.errors import PolicyError, SchemaOutdatedError
    from spendgate.ledger._spool import AuditSpool
    from spendgate.policy import load_policy
    from spendgate.reload import PolicyReloader, install_sighup

    log = structlog.get_logger("spendgate")
    try:
        policy = load_policy(policy_dir)
    except PolicyError as error:
        click.echo(str(error), err=True)
        sys.exit(EXIT_INVALID_POLICY)
    tokens.preload()
    try:
        missing = ledger.missing_sqlite_error(database)
        if missing is not None:
            click.echo(f"error: {missing}", err=True)
            sys.exit(1)
        engine = ledger.create_engine(
            database,
            pool_size=workers,
            sqlite_synchronous=sqlite_synchronous,
            sqlite_busy_timeout_ms=int(sqlite_busy_timeout * 1000),
        )
        revision = ledger.check_schema(engine)
    except SchemaOutdatedError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(1)
    except (ArgumentError, SQLAlchemyError, ValueError) as error:
        first_line = str(error).splitlines()[0]
        shown = _shown_url(database)
        click.echo(f"error: cannot open the ledger {shown}: {first_line}", err=True)
        sys.exit(1)

    holder = server.PolicyHolder(policy)
    reloader = PolicyReloader(
        policy_dir, holder, watch=watch, poll_seconds=poll_interval
    )
    try:
        running = server.create_server(
            address,
            holder,
            ledger.Ledger(engine),
            max_workers=workers,
            reloader=reloader,
            spool=AuditSpool(spool),
            sweep_interval=sweep_interval,
            health_interval=health_interval,
            thread_pool_on_sqlite=sqlite_server_model == "thread-pool",
        )
    except OSError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(1)
    reloader.start()
    install_sighup(reloader)
    log.info(
        "server_started",
        address=address,
        port=running.port,
        policy_version=policy.version,
        policy_dir=str(policy_dir),
        database=engine.url.render_as_string(hide_password=True),
        schema_revision=revision,
        server_model=running.model,
        workers=workers,
    )
    server.serve_forever(running, grace, drain_delay)
    reloader.stop()
    engine.dispose()


@main.command()
@database_option
def migrate(database: str) -> None:
    """Create or upgrade the ledger schema to the newest revision."""
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    from spendgate import ledger

    try:
        engine = ledger.create_engine(database, pool_size=1)
        ledger.migrate(engine)
        revision = ledger.check_schema(engine)
    except (ArgumentError, SQLAlchemyError, ValueError) as error:
        first_line = str(error).splitlines()[0]
        shown = _shown_url(database)
        click.echo(f"error: cannot migrate {shown}: {first_line}", err=True)
        sys.exit(1)
    click.echo(f"database at revision {revision}")
    engine.dispose()


@main.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
)
def validate(directory: Path, output_format: str) -> None:
    """Validate a policy directory; exit 0 when valid, 3 when not, 2 on usage errors."""
    from spendgate.policy import read_policy

    if not directory.is_dir():
        click.echo(f"error: {directory} is not a directory", err=True)
        sys.exit(EXIT_USAGE)
    result = read_policy(directory)
    if result.policy is not None:
        # Policy tests beside the policies are checked too, so a broken test
        # file fails review here and not only when the tests run.
        from spendgate.policytest import read_tests

        tests = read_tests(directory, result.policy)
        result.errors += tests.errors
        result.warnings += tests.warnings
        if tests.errors:
            result.policy = None
    problems = [*result.errors, *result.warnings]
    if output_format == "json":
        payload = {
            "valid": result.policy is not None,
            "version": result.policy.version if result.policy else None,
            "files": result.files,
            "problems": [
                {
                    "file": p.file,
                    "line": p.line,
                    "column": p.column,
                    "path": p.path,
                    "severity": p.severity,
                    "message": p.message,
                }
                for p in problems
            ],
        }
        click.echo(json.dumps(payload, indent=2))
    else:
        for problem in result.errors:
            click.echo(f"{problem}", err=True)
        for problem in result.warnings:
            click.echo(f"warning: {problem}", err=True)
        if result.policy is not None:
            summary = f"{directory}: valid, {len(result.files)} files"
            summary += f", version {result.policy.version}"
            if result.warnings:
                summary += f", {len(result.warnings)} warnings"
            click.echo(summary)
        else:
            count = count_errors(len(result.errors))
            click.echo(f"{directory}: invalid, {count}", err=True)
    sys.exit(EXIT_OK if result.policy is not None else EXIT_INVALID_POLICY)


@main.command()
def schema() -> None:
    """Print the JSON Schema of policy and PolicyTest documents, for editors and CI."""
    from spendgate.policy import json_schema
    from spendgate.policytest import POLICY_TEST

    click.echo(json.dumps(json_schema({"PolicyTest": POLICY_TEST}), indent=2))


@main.command()
@click.option(
    "--address", default=DEFAULT_ADDRESS, show_default=True, help="Server HOST:PORT."
)
@click.option("--timeout", default=10.0, show_default=True, type=click.FloatRange(0.1))
def status(address: str, timeout: float) -> None:
    """Print a running server's policy version and last rejected reload as JSON."""
    from spendgate.v1 import spendgate_pb2 as pb

    _call(address, "GetPolicyStatus", pb.GetPolicyStatusRequest(), timeout)


@main.command()
@click.option(
    "--address", default=DEFAULT_ADDRESS, show_default=True, help="Server HOST:PORT."
)
@click.option("--department", required=True)
@click.option("--team", default="")
@click.option("--user", default="")
@click.option("--application", default="spendgate-cli")
@click.option("--model", required=True)
@click.option("--prompt", default=None, help="Prompt text.")
@click.option(
    "--prompt-file",
    type=click.File("r", encoding="utf-8"),
    default=None,
    help="File holding the prompt text; - reads stdin.",
)
@click.option(
    "--input-tokens",
    type=click.IntRange(0, 10**9),
    default=None,
    help="Input token count, instead of a prompt.",
)
@click.option("--max-output-tokens", type=click.IntRange(0, 2**32 - 1), default=None)
@click.option("--request-id", default=None, help="Request id; default a new UUID.")
@click.option("--label", "labels", multiple=True, help="KEY=VALUE, repeatable.")
@click.option(
    "--timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(0.1),
    help="Seconds.",
)
def check(
    address: str,
    department: str,
    team: str,
    user: str,
    application: str,
    model: str,
    prompt: str | None,
    prompt_file: Any,
    input_tokens: int | None,
    max_output_tokens: int | None,
    request_id: str | None,
    labels: tuple[str, ...],
    timeout: float,
) -> None:
    """Ask a running server about one model call and print the response as JSON."""
    from spendgate.cli_policy import read_prompt
    from spendgate.v1 import spendgate_pb2 as pb

    prompt = read_prompt(prompt, prompt_file, input_tokens)
    label_map = {}
    for label in labels:
        key, sep, value = label.partition("=")
        if not sep:
            raise click.UsageError(f"--label must be KEY=VALUE, got {label!r}")
        label_map[key] = value

    request = pb.CheckRequest(
        request_id=request_id or str(uuid.uuid4()),
        principal=pb.Principal(
            department=department, team=team, user=user, application=application
        ),
        model=model,
        labels=label_map,
    )
    if prompt is not None:
        request.prompt = prompt
    else:
        request.input_tokens = input_tokens or 0
    if max_output_tokens is not None:
        request.max_output_tokens = max_output_tokens
    _call(address, "Check", request, timeout)


def _parse_time_option(
    _ctx: click.Context, param: click.Parameter, value: str | None
) -> Any:
    """Parse --since or --until to an aware UTC datetime."""
    from datetime import UTC, datetime

    from spendgate import reports

    if value is None:
        return None
    try:
        return reports.parse_time(
            value, now=datetime.now(UTC), end_of_day=param.name == "until"
        )
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


def _stub(address: str) -> Any:
    import grpc

    from spendgate.v1 import spendgate_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(address)
    return channel, pb_grpc.SpendGateStub(channel)  # type: ignore[no-untyped-call]


def _call(address: str, method: str, request: Any, timeout: float) -> None:
    """Send one request to a running server and print the response as JSON."""
    import grpc

    channel, stub = _stub(address)
    with channel:
        try:
            response = getattr(stub, method)(request, timeout=timeout)
        except grpc.RpcError as error:
            click.echo(f"error: {error.code().name}: {error.details()}", err=True)
            sys.exit(1)
    click.echo(json.dumps(message_to_json(response), indent=2))


@main.command()
@click.option(
    "--address", default=DEFAULT_ADDRESS, show_default=True, help="Server HOST:PORT."
)
@click.argument("reservation_id")
@click.option("--input-tokens", type=click.IntRange(0), required=True)
@click.option("--cached-input-tokens", type=click.IntRange(0), default=0)
@click.option("--output-tokens", type=click.IntRange(0), required=True)
@click.option("--timeout", default=10.0, show_default=True, type=click.FloatRange(0.1))
def commit(
    address: str,
    reservation_id: str,
    input_tokens: int,
    cached_input_tokens: int,
    output_tokens: int,
    timeout: float,
) -> None:
    """Report a model call's real usage for a reservation; prints the cost."""
    from spendgate.v1 import spendgate_pb2 as pb

    request = pb.CommitRequest(
        reservation_id=reservation_id,
        input_tokens=input_tokens,
        cached_input_tokens=cached_input_tokens,
        output_tokens=output_tokens,
    )
    _call(address, "Commit", request, timeout)


@main.command()
@click.option(
    "--address", default=DEFAULT_ADDRESS, show_default=True, help="Server HOST:PORT."
)
@click.argument("reservation_id")
@click.option("--timeout", default=10.0, show_default=True, type=click.FloatRange(0.1))
def release(address: str, reservation_id: str, timeout: float) -> None:
    """Free a reservation whose model call failed."""
    from spendgate.v1 import spendgate_pb2 as pb

    _call(address, "Release", pb.ReleaseRequest(reservation_id=reservation_id), timeout)


@main.command()
@database_option
@click.option(
    "--department",
    default=None,
    help="Only events of this department, matched ignoring case.",
)
@click.option(
    "--decision",
    type=click.Choice(["allow", "deny", "downgrade"], case_sensitive=False),
    default=None,
    help="Only check events with this decision (shadow mode: the decision returned).",
)
@click.option(
    "--event",
    type=click.Choice(["check", "commit", "release", "expire"], case_sensitive=False),
    default=None,
    help="Only events of this kind.",
)
@click.option(
    "--since",
    callback=_parse_time_option,
    metavar="TIME",
    help="Only events at or after TIME: an ISO 8601 date or datetime (UTC "
    "without an offset) or a time back from now such as 30m, 24h or 7d.",
)
@click.option(
    "--until",
    callback=_parse_time_option,
    metavar="TIME",
    help="Only events before TIME, in the same forms. A date alone includes "
    "that whole day.",
)
@click.option(
    "--limit",
    default=1000,
    show_default=True,
    type=click.IntRange(0),
    help="Show the newest N matching events; 0 shows all.",
)
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["table", "json", "csv"]),
    default="table",
    show_default=True,
    help="table for a terminal, json for one object per line, csv with a header.",
)
def audit(
    database: str,
    department: str | None,
    decision: str | None,
    event: str | None,
    since: Any,
    until: Any,
    limit: int,
    output_format: str,
) -> None:
    """Print audit log events oldest first, so the newest come last.

    Times are UTC. Money is exact: the table shows USD to the micro-USD, json
    and csv give integer micro-USD beside a USD decimal string. In csv, a
    text cell that starts with =, +, - or @ gets a leading apostrophe, so
    spreadsheets do not run it as a formula. Exit 1 when the database cannot
    be read.
    """
    from sqlalchemy.exc import SQLAlchemyError

    from spendgate import reports
    from spendgate.errors import SpendgateError
    from spendgate.evaluator import Decision

    if since is not None and until is not None and since >= until:
        raise click.BadParameter(
            f"--since ({since.isoformat()}) must be before --until "
            f"({until.isoformat()})",
            param_hint="--since",
        )
    audit_filter = reports.AuditFilter(
        department=department,
        decision=None if decision is None else Decision(decision.upper()),
        event=None if event is None else event.lower(),
        since=since,
        until=until,
    )
    try:
        engine = reports.open_ledger(database)
    except SpendgateError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(1)
    printed = 0
    try:
        selection = reports.read_audit(engine, audit_filter, limit=limit or None)
        for line in reports.render_audit(selection.events, output_format):
            click.echo(line)
            printed += 1
    except SQLAlchemyError as error:
        reason = str(error).splitlines()[0]
        click.echo(f"error: reading the audit log failed: {reason}", err=True)
        sys.exit(1)
    finally:
        engine.dispose()
    # csv prints its header line even when no event matches.
    header_lines = 1 if output_format == "csv" else 0
    if printed == header_lines:
        click.echo("no audit events match", err=True)
    if selection.truncated:
        noun = "event" if limit == 1 else "events"
        click.echo(
            f"showing the newest {limit} matching {noun}; "
            "pass --limit 0 for all, or narrow with --since",
            err=True,
        )


@main.command()
@database_option
@click.option(
    "--policies",
    "policy_dir",
    default=DEFAULT_POLICIES,
    show_default=True,
    type=click.Path(path_type=Path),
    help="Policy directory.",
)
@click.option("--department", default=None, help="Only this department's budgets.")
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="table for a terminal, json for one object per line.",
)
def budgets(
    database: str, policy_dir: Path, department: str | None, output_format: str
) -> None:
    """Print every budget of the policy in its current window, with its usage.

    Per-user budgets, and department budgets per team, list the subjects the
    ledger has rows for in the window. Money is exact: the table shows USD to
    the micro-USD, json gives integer micro-USD beside a USD decimal string.
    Exit 1 when the database cannot be read, 3 when the policy is invalid.
    """
    from datetime import UTC, datetime

    from sqlalchemy.exc import SQLAlchemyError

    from spendgate import reports
    from spendgate.errors import PolicyError, SpendgateError
    from spendgate.policy import load_policy

    try:
        policy = load_policy(policy_dir)
    except PolicyError as error:
        click.echo(str(error), err=True)
        sys.exit(EXIT_INVALID_POLICY)
    if department is not None and department.strip().lower() not in (
        policy.departments
    ):
        known = ", ".join(sorted(policy.departments))
        raise click.BadParameter(
            f"department {department!r} is not defined in {policy_dir}. "
            f"Use one of: {known}",
            param_hint="--department",
        )
    try:
        engine = reports.open_ledger(database)
    except SpendgateError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(1)
    try:
        statuses = reports.read_budgets(
            engine, policy, datetime.now(UTC), department=department
        )
    except SQLAlchemyError as error:
        reason = str(error).splitlines()[0]
        click.echo(f"error: reading the budgets failed: {reason}", err=True)
        sys.exit(1)
    finally:
        engine.dispose()
    for line in reports.render_budgets(statuses, output_format):
        click.echo(line)
    if not statuses:
        click.echo("the policy defines no budgets", err=True)


from spendgate.cli_policy import explain_command, test_command  # noqa: E402

main.add_command(test_command)
main.add_command(explain_command)

from spendgate.cli_replay import replay_command  # noqa: E402

main.add_command(replay_command)


if __name__ == "__main__":  # pragma: no cover
    main()
