"""Start the servers under test as separate processes and read their memory and CPU."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

HOST = "127.0.0.1"
START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 20.0


class ServerStartError(RuntimeError):
    """A server process exited or did not report its port in time."""


@dataclass
class ServerProcess:
    """A server running in a child process, listening on HOST:port."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def address(self) -> str:
        """HOST:PORT for a gRPC channel."""
        return f"{HOST}:{self.port}"

    def rss_bytes(self) -> int:
        """Return the resident set size of the process, from /proc."""
        return read_rss_bytes(self.process.pid)

    def stop(self) -> None:
        """Send SIGTERM, wait for the exit, and SIGKILL only after the timeout."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT_SECONDS)


def read_rss_bytes(pid: int) -> int:
    """Return VmRSS of process `pid` in bytes (Linux /proc)."""
    status = Path(f"/proc/{pid}/status").read_text(encoding="ascii")
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            kilobytes = int(line.split()[1])
            return kilobytes * 1024
    raise ValueError(f"/proc/{pid}/status has no VmRSS line")


def read_cpu_seconds(pid: int) -> float:
    """Return the user and system CPU time of process `pid` so far (Linux /proc)."""
    stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    # The command name in parentheses may hold spaces, so split after it.
    fields = stat.rsplit(")", 1)[1].split()
    user, system = int(fields[11]), int(fields[12])
    return (user + system) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """Return a TCP port on HOST that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def _logged_port(log_path: Path) -> int | None:
    """Return the port from a `server_started` JSON log line, if one is there."""
    for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == "server_started" and "port" in record:
            return int(record["port"])
    return None


def _tail(log_path: Path, lines: int = 15) -> str:
    text = log_path.read_text(encoding="utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def start(
    name: str,
    argv: Sequence[str],
    log_path: Path,
    *,
    port: int | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> ServerProcess:
    """Start `argv` with output to `log_path` and wait until it serves gRPC.

    Without `port`, the process must log a JSON line with event
    "server_started" and its port, as `spendgate serve` does.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=cwd,
        )
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    try:
        while port is None:
            port = _logged_port(log_path)
            if port is None:
                _check_alive(name, process, log_path, deadline)
                time.sleep(0.05)
        _wait_ready(name, process, log_path, port, deadline)
    except BaseException:
        process.kill()
        process.wait(STOP_TIMEOUT_SECONDS)
        raise
    return ServerProcess(name, process, port, log_path)


def _check_alive(
    name: str, process: subprocess.Popen[bytes], log_path: Path, deadline: float
) -> None:
    if process.poll() is not None:
        raise ServerStartError(
            f"{name} exited with status {process.returncode} before serving. "
            f"Last lines of {log_path}:\n{_tail(log_path)}"
        )
    if time.monotonic() > deadline:
        raise ServerStartError(
            f"{name} did not start within {START_TIMEOUT_SECONDS:.0f} s. "
            f"Last lines of {log_path}:\n{_tail(log_path)}"
        )


def _wait_ready(
    name: str,
    process: subprocess.Popen[bytes],
    log_path: Path,
    port: int,
    deadline: float,
) -> None:
    with grpc.insecure_channel(f"{HOST}:{port}") as channel:
        while True:
            try:
                grpc.channel_ready_future(channel).result(timeout=0.5)
                return
            except grpc.FutureTimeoutError:
                _check_alive(name, process, log_path, deadline)
