"""Policy reloads: file edits, symlink swaps, SIGHUP, rejected versions, git."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from sqlalchemy import text

from spendgate.ledger import Ledger, create_engine
from spendgate.policy import load_policy
from spendgate.reload import PolicyReloader
from spendgate.server import PolicyHolder, create_server
from spendgate.v1 import spendgate_pb2 as pb
from spendgate.v1 import spendgate_pb2_grpc as pb_grpc
from support import wait_for

ORGANIZATION = """\
apiVersion: spendgate/v1
kind: Organization
name: reload-corp
timezone: UTC
"""

CATALOG = """\
apiVersion: spendgate/v1
kind: ModelCatalog
models:
  - name: small
    tokenizer: approximate
    price_per_million_tokens: {input: 1.00, output: 0}
    context_window: 100000
    max_output_tokens: 1000
"""


def department(limit_usd: str) -> str:
    """Return a Department document with one daily budget of `limit_usd`."""
    return f"""\
apiVersion: spendgate/v1
kind: Department
name: eng
budgets:
  - {{name: daily, period: day, limit_usd: {limit_usd}}}
"""


def write_tree(directory: Path, limit_usd: str) -> Path:
    """Write a complete policy directory whose only budget is `limit_usd`."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "organization.yaml").write_text(ORGANIZATION)
    (directory / "catalog.yaml").write_text(CATALOG)
    (directory / "eng.yaml").write_text(department(limit_usd))
    return directory


def budget_limit(holder: PolicyHolder) -> int:
    """Return the daily budget limit of department eng in micro-USD."""
    return holder.current.departments["eng"].budgets[0].limit_micros


@pytest.fixture
def reloading(
    tmp_path: Path,
) -> Iterator[Callable[..., tuple[PolicyHolder, PolicyReloader]]]:
    """Return a function starting a reloader on a directory; all stop afterwards."""
    started: list[PolicyReloader] = []

    def start(
        directory: Path, *, watch: bool = True, poll_seconds: float = 0.2
    ) -> tuple[PolicyHolder, PolicyReloader]:
        holder = PolicyHolder(load_policy(directory))
        reloader = PolicyReloader(
            directory, holder, watch=watch, poll_seconds=poll_seconds
        )
        reloader.start()
        started.append(reloader)
        return holder, reloader

    yield start
    for reloader in started:
        reloader.stop()


def test_reload_on_file_edit(tmp_path: Path, reloading: Callable[..., tuple]) -> None:
    directory = write_tree(tmp_path / "policies", "10")
    holder, reloader = reloading(directory, watch=True, poll_seconds=0)
    first = holder.current.version

    (directory / "eng.yaml").write_text(department("20"))

    wait_for(lambda: budget_limit(holder) == 20_000_000, "the edited budget")
    assert holder.current.version != first
    assert reloader.status.reloads == 1


def test_reload_on_configmap_symlink_swap(
    tmp_path: Path, reloading: Callable[..., tuple]
) -> None:
    # The layout Kubernetes gives a mounted ConfigMap: files are symlinks
    # through ..data, and an update swaps ..data to a new folder atomically.
    root = tmp_path / "configmap"
    write_tree(root / "..2026_12_04_a", "10")
    (root / "..data").symlink_to("..2026_12_04_a")
    for name in ("organization.yaml", "catalog.yaml", "eng.yaml"):
        (root / name).symlink_to(f"..data/{name}")
    holder, _reloader = reloading(root, watch=True, poll_seconds=0.2)
    assert budget_limit(holder) == 10_000_000

    write_tree(root / "..2026_12_04_b", "30")
    (root / "..data_tmp").symlink_to("..2026_12_04_b")
    os.replace(root / "..data_tmp", root / "..data")

    wait_for(lambda: budget_limit(holder) == 30_000_000, "the swapped ConfigMap")


def test_reload_on_directory_symlink_swap(
    tmp_path: Path, reloading: Callable[..., tuple]
) -> None:
    write_tree(tmp_path / "release-1", "10")
    write_tree(tmp_path / "release-2", "40")
    link = tmp_path / "current"
    link.symlink_to("release-1")
    holder, _reloader = reloading(link, watch=False, poll_seconds=0.1)

    (tmp_path / "next").symlink_to("release-2")
    os.replace(tmp_path / "next", link)

    wait_for(lambda: budget_limit(holder) == 40_000_000, "the new release")


def test_invalid_version_rejected_keeps_old(
    tmp_path: Path, reloading: Callable[..., tuple]
) -> None:
    directory = write_tree(tmp_path / "policies", "10")
    holder, reloader = reloading(directory, watch=False, poll_seconds=0.1)
    good = holder.current.version

    (directory / "eng.yaml").write_text(department('"ten"'))

    wait_for(lambda: reloader.status.rejections >= 1, "the rejection")
    assert holder.current.version == good
    rejection = reloader.status.last_rejection
    assert rejection is not None
    assert "eng.yaml:5:" in str(rejection.errors[0])
    assert "limit_usd" in str(rejection.errors[0])


def test_unchanged_content_does_not_reload(
    tmp_path: Path, reloading: Callable[..., tuple]
) -> None:
    directory = write_tree(tmp_path / "policies", "10")
    holder, reloader = reloading(directory, watch=False, poll_seconds=0)
    before = holder.current

    (directory / "eng.yaml").write_text(department("10"))
    changed = reloader.reload("test")

    assert changed is False
    assert holder.current is before


def check(stub: pb_grpc.SpendGateStub, request_id: str) -> pb.CheckResponse:
    """Send a one-token Check for department eng."""
    return stub.Check(
        pb.CheckRequest(
            request_id=request_id,
            principal=pb.Principal(department="eng"),
            model="small",
            input_tokens=1,
            max_output_tokens=0,
        ),
        timeout=10,
    )


def test_decisions_name_version_across_reload(
    tmp_path: Path, sqlite_url: str, reloading: Callable[..., tuple]
) -> None:
    directory = write_tree(tmp_path / "policies", "10")
    holder, reloader = reloading(directory, watch=False, poll_seconds=0)
    engine = create_engine(sqlite_url)
    running = create_server(
        "127.0.0.1:0", holder, Ledger(engine), reloader=reloader, sweep_interval=3600
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    stub = pb_grpc.SpendGateStub(channel)
    try:
        old_version = holder.current.version
        before = check(stub, "before-reload")
        (directory / "eng.yaml").write_text(department("20"))
        assert reloader.reload("test")
        after = check(stub, "after-reload")
        (directory / "eng.yaml").write_text("kind: [")
        assert not reloader.reload("test")
        during_rejection = check(stub, "after-rejection")
        status = stub.GetPolicyStatus(pb.GetPolicyStatusRequest(), timeout=10)
    finally:
        channel.close()
        running.stop(grace=1)

    assert before.policy_version == old_version
    assert after.policy_version == holder.current.version
    assert after.policy_version != old_version
    assert during_rejection.decision == pb.DECISION_ALLOW
    assert during_rejection.policy_version == after.policy_version
    assert status.version == after.policy_version
    assert status.reloads == 1
    assert status.rejections == 1
    assert status.last_rejected.errors
    with engine.connect() as connection:
        audited = dict(
            connection.execute(
                text("SELECT request_id, policy_version FROM audit_events")
            ).all()
        )
    engine.dispose()
    assert audited["before-reload"] == old_version
    assert audited["after-reload"] == after.policy_version


def free_port() -> int:
    """Return a loopback port that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_sighup_reloads_serving_process(tmp_path: Path, sqlite_url: str) -> None:
    directory = write_tree(tmp_path / "policies", "10")
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "spendgate",
        "--log-json",
        "serve",
        "--address",
        f"127.0.0.1:{port}",
        "--policies",
        str(directory),
        "--database",
        sqlite_url,
        "--no-watch",
        "--poll-interval",
        "0",
    ]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=20)
        stub = pb_grpc.SpendGateStub(channel)
        first = stub.GetPolicyStatus(pb.GetPolicyStatusRequest(), timeout=5).version
        (directory / "eng.yaml").write_text(department("20"))
        time.sleep(0.5)
        unchanged = stub.GetPolicyStatus(pb.GetPolicyStatusRequest(), timeout=5).version

        process.send_signal(signal.SIGHUP)

        def reloaded() -> bool:
            status = stub.GetPolicyStatus(pb.GetPolicyStatusRequest(), timeout=5)
            return status.version != first

        wait_for(reloaded, "the reload after SIGHUP")
    finally:
        channel.close()
        process.terminate()
        _, log = process.communicate(timeout=30)

    assert unchanged == first
    assert process.returncode == 0
    assert '"event": "policy_loaded"' in log
    assert '"trigger": "watch_or_sighup"' in log


def git(directory: Path, *arguments: str) -> None:
    """Run git in `directory` with a fixed identity."""
    subprocess.run(
        [
            "git",
            "-c",
            "user.email=test@example.com",
            "-c",
            "user.name=test",
            *arguments,
        ],
        cwd=directory,
        check=True,
        capture_output=True,
    )


def test_version_names_git_commit_and_dirty(tmp_path: Path) -> None:
    directory = write_tree(tmp_path / "repo" / "policies", "10")
    git(tmp_path / "repo", "init", "-q")
    git(tmp_path / "repo", "add", ".")
    git(tmp_path / "repo", "commit", "-q", "-m", "policies")
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"],
        cwd=tmp_path / "repo",
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()

    clean = load_policy(directory).version
    (directory / "eng.yaml").write_text(department("20"))
    dirty = load_policy(directory).version
    (directory / "eng.yaml").write_text(department("10"))
    (directory / "extra.yaml").write_text("")
    untracked = load_policy(directory).version

    assert clean.startswith(f"git:{commit[:12]}/sha256:")
    assert dirty.startswith(f"git:{commit[:12]}-dirty/sha256:")
    assert untracked.startswith(f"git:{commit[:12]}-dirty/sha256:")


def test_version_without_git_is_hash(tmp_path: Path) -> None:
    directory = write_tree(tmp_path / f"plain-{uuid.uuid4().hex}", "10")

    version = load_policy(directory).version

    assert version.startswith("sha256:")
    assert len(version) == len("sha256:") + 12


def test_serve_rejects_invalid_policy_at_start(tmp_path: Path, sqlite_url: str) -> None:
    directory = write_tree(tmp_path / "policies", "10")
    (directory / "eng.yaml").write_text(department('"ten"'))
    (directory / "catalog.yaml").write_text(CATALOG.replace("tokenizer:", "tokeniser:"))

    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "spendgate",
            "serve",
            "--address",
            f"127.0.0.1:{free_port()}",
            "--policies",
            str(directory),
            "--database",
            sqlite_url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert completed.returncode == 3
    assert "eng.yaml:5:" in completed.stderr
    assert "limit_usd" in completed.stderr
    assert "catalog.yaml:" in completed.stderr
    assert 'did you mean "tokenizer"' in completed.stderr


def test_half_written_file_not_loaded(
    tmp_path: Path, reloading: Callable[..., tuple]
) -> None:
    directory = write_tree(tmp_path / "policies", "10")
    holder, reloader = reloading(directory, watch=True, poll_seconds=0.05)
    seen_without_budget = []
    stop = threading.Event()

    def watch_holder() -> None:
        while not stop.is_set():
            if not holder.current.departments["eng"].budgets:
                seen_without_budget.append(holder.current.version)
            time.sleep(0.005)

    watcher = threading.Thread(target=watch_holder, daemon=True)
    watcher.start()
    text = department("20")
    cut = text.index("budgets:")
    try:
        with (directory / "eng.yaml").open("w") as handle:
            # The first part alone is a valid department without any budget.
            handle.write(text[:cut])
            handle.flush()
            time.sleep(0.1)
            handle.write(text[cut:])
        wait_for(
            lambda: (
                bool(holder.current.departments["eng"].budgets)
                and budget_limit(holder) == 20_000_000
            ),
            "the complete file",
        )
    finally:
        stop.set()
        watcher.join(timeout=5)

    assert seen_without_budget == []
    assert reloader.status.rejections == 0
