"""Reload policies without a restart, keeping the last good version on errors.

Three things trigger a reload: a file event under the policy directory
(watchfiles), SIGHUP, and a slow poll of the directory's fingerprint. The poll
catches what inotify cannot see, such as the policy directory itself being a
symlink that is swapped to a new target. A new version is read and validated
in full before it replaces the old one in a single assignment.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import structlog
import watchfiles

from spendgate.errors import Problem
from spendgate.policy import LoadResult, Policy, policy_files, read_policy
from spendgate.policy._version import content_hash

log = structlog.get_logger("spendgate.reload")

DEFAULT_POLL_SECONDS = 2.0
DEFAULT_SETTLE_SECONDS = 0.3
MAX_LOGGED_ERRORS = 50


class PolicyHolderLike(Protocol):
    """The part of the server's policy holder the reloader uses."""

    @property
    def current(self) -> Policy: ...

    def replace(self, policy: Policy) -> None: ...


@dataclass(frozen=True, slots=True)
class Rejection:
    """A policy version that failed to load, with its errors."""

    content_hash: str
    at: datetime
    errors: tuple[Problem, ...]


@dataclass(slots=True)
class ReloadStatus:
    """Reload counters and the last rejection, as GetPolicyStatus returns them."""

    directory: str
    reloads: int = 0
    rejections: int = 0
    last_rejection: Rejection | None = None
    last_checked_at: datetime | None = None


def fingerprint(directory: Path) -> tuple[object, ...]:
    """Return a cheap signature of the directory: its target, names, sizes, mtimes."""
    entries: list[object] = [str(directory.resolve())]
    for path in policy_files(directory):
        try:
            stat = path.stat()
        except OSError:
            continue
        entries.append((path.as_posix(), stat.st_size, stat.st_mtime_ns))
    return tuple(entries)


class PolicyReloader:
    """Watch a policy directory and swap in each valid new version."""

    def __init__(
        self,
        directory: Path,
        holder: PolicyHolderLike,
        *,
        poll_seconds: float = DEFAULT_POLL_SECONDS,
        watch: bool = True,
        settle_seconds: float = DEFAULT_SETTLE_SECONDS,
    ) -> None:
        self.directory = directory
        self.holder = holder
        self.poll_seconds = poll_seconds
        self.watch = watch
        self.settle_seconds = settle_seconds
        self.status = ReloadStatus(directory=str(directory))
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []
        self._fingerprint = fingerprint(directory)

    def reload(self, trigger: str) -> bool:
        """Read the directory now; swap the policy in if valid and changed.

        Returns True when a new version took effect.
        """
        with self._lock:
            before = fingerprint(self.directory)
            self._fingerprint = before
            # A writer still busy with a file changes its size or mtime within
            # this pause, so the directory is read only once nothing changes.
            time.sleep(self.settle_seconds)
            if fingerprint(self.directory) != before:
                self._fingerprint = ()
                self._wake.set()
                return False
            try:
                result = read_policy(self.directory)
            except Exception as error:
                # A loader bug must not end reloads or hide the failure.
                log.error("policy_reload_failed", exc_info=error)
                problem = Problem(
                    str(self.directory), 1, 1, "", f"loading failed: {error}"
                )
                result = LoadResult(policy=None, errors=[problem])
            now = datetime.now(UTC)
            if fingerprint(self.directory) != before:
                # A file changed while it was read, perhaps half written: the
                # next poll or event reads the directory again.
                log.info("policy_changed_while_reading", trigger=trigger)
                self._fingerprint = ()
                self._wake.set()
                return False
            self.status.last_checked_at = now
            current = self.holder.current
            if result.policy is None:
                return self._reject(result.errors, trigger, now, current)
            if result.policy.content_hash == current.content_hash:
                if result.policy.version != current.version:
                    # Same bytes, new commit: adopt the version that names it.
                    self.holder.replace(result.policy)
                return False
            self.holder.replace(result.policy)
            self.status.reloads += 1
            log.info(
                "policy_loaded",
                trigger=trigger,
                policy_version=result.policy.version,
                previous_version=current.version,
                files=len(result.policy.files),
                warnings=len(result.policy.warnings),
            )
            return True

    def _reject(
        self, errors: Sequence[Problem], trigger: str, now: datetime, current: Policy
    ) -> bool:
        names = self._snapshot_hash()
        last = self.status.last_rejection
        repeated = last is not None and last.content_hash == names
        self.status.last_rejection = Rejection(names, now, tuple(errors))
        self.status.rejections += 1
        if not repeated:
            log.error(
                "policy_rejected",
                trigger=trigger,
                kept_version=current.version,
                error_count=len(errors),
                errors=[str(error) for error in errors[:MAX_LOGGED_ERRORS]],
            )
        return False

    def _snapshot_hash(self) -> str:
        files: dict[str, bytes] = {}
        for path in policy_files(self.directory):
            try:
                files[path.relative_to(self.directory).as_posix()] = path.read_bytes()
            except OSError:
                continue
        return content_hash(files)

    def request(self) -> None:
        """Ask the background thread to reload soon; safe from a signal handler."""
        self._wake.set()

    def start(self) -> None:
        """Start the poll thread and, when enabled, the file watcher."""
        poller = threading.Thread(
            target=self._poll, name="spendgate-reload", daemon=True
        )
        self._threads.append(poller)
        if self.watch:
            watcher = threading.Thread(
                target=self._watch, name="spendgate-watch", daemon=True
            )
            self._threads.append(watcher)
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop the threads and wait for them."""
        self._stopped.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout=5)

    def _poll(self) -> None:
        # A poll interval of 0 turns polling off: only events and SIGHUP reload.
        timeout = self.poll_seconds if self.poll_seconds > 0 else None
        while not self._stopped.is_set():
            woken = self._wake.wait(timeout)
            if self._stopped.is_set():
                return
            self._wake.clear()
            try:
                if woken:
                    self.reload("watch_or_sighup")
                elif fingerprint(self.directory) != self._fingerprint:
                    self.reload("poll")
            except Exception as error:
                # The server must keep deciding on the last good version.
                log.error("policy_reload_failed", exc_info=error)

    def _watch(self) -> None:
        try:
            for _changes in watchfiles.watch(
                self.directory,
                stop_event=self._stopped,
                debounce=200,
                rust_timeout=1000,
                yield_on_timeout=False,
                raise_interrupt=False,
            ):
                self._wake.set()
        except Exception as error:
            # The poll still notices changes; log why events stopped.
            log.error(
                "policy_watch_failed", exc_info=error, directory=str(self.directory)
            )


def install_sighup(reloader: PolicyReloader) -> None:
    """Make SIGHUP request a reload; call from the main thread."""
    signal.signal(signal.SIGHUP, lambda _signum, _frame: reloader.request())
