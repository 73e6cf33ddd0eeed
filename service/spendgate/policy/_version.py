"""Name a policy snapshot: its content hash and, in a git checkout, its commit.

The version is computed from the same bytes the policy is parsed from, so a
decision never names a version other than the one that made it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from pathlib import Path

import structlog

log = structlog.get_logger("spendgate.policy")

GIT_TIMEOUT_SECONDS = 5.0
SHORT = 12


def content_hash(files: Mapping[str, bytes]) -> str:
    """Hash relative file names and bytes in name order; any edit changes it."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode())
        digest.update(b"\0")
        digest.update(files[name])
        digest.update(b"\0")
    return digest.hexdigest()


def _git(directory: Path, *arguments: str) -> bytes | None:
    # GIT_OPTIONAL_LOCKS=0 keeps git from writing the index while we only read.
    environment = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}
    try:
        completed = subprocess.run(
            ["git", "-C", str(directory), *arguments],
            capture_output=True,
            timeout=GIT_TIMEOUT_SECONDS,
            env=environment,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        log.debug("git_unavailable", directory=str(directory), error=str(error))
        return None
    if completed.returncode != 0:
        return None
    return completed.stdout


def _blob_id(data: bytes) -> str:
    """Return the object id git gives a file with these bytes."""
    header = f"blob {len(data)}\0".encode()
    return hashlib.sha1(header + data, usedforsecurity=False).hexdigest()


def git_revision(
    directory: Path, files: Mapping[str, bytes], ignored: AbstractSet[str] = frozenset()
) -> str | None:
    """Return "git:<commit>" for the HEAD commit, with "-dirty" when `files` differ.

    `files` maps paths relative to `directory` to the bytes that were read;
    paths in `ignored` (policy test files) are left out of the comparison.
    They are compared with HEAD's tree by git blob id, so the marker describes
    exactly the snapshot, not whatever the work tree contains a moment later.
    Returns None outside a git checkout or when git is missing.
    """
    output = _git(directory, "rev-parse", "--show-toplevel", "--show-prefix", "HEAD")
    if output is None:
        return None
    lines = output.decode().splitlines()
    if len(lines) != 3:
        return None
    _toplevel, prefix, commit = lines
    listing = _git(directory, "ls-tree", "-r", "-z", "--full-name", commit, "--", ".")
    if listing is None:
        return None

    committed: dict[str, str] = {}
    for entry in listing.split(b"\0"):
        if not entry:
            continue
        meta, _, path = entry.decode().partition("\t")
        relative = path[len(prefix) :] if path.startswith(prefix) else path
        is_policy_file = relative.endswith((".yaml", ".yml")) and not any(
            part.startswith(".") for part in relative.split("/")
        )
        if (is_policy_file or relative in files) and relative not in ignored:
            committed[relative] = meta.split()[2]
    current = {name: _blob_id(data) for name, data in files.items()}
    dirty = "-dirty" if committed != current else ""
    return f"git:{commit[:SHORT]}{dirty}"


def version_of(
    directory: Path, files: Mapping[str, bytes], ignored: AbstractSet[str] = frozenset()
) -> tuple[str, str]:
    """Return (version, content hash) for a snapshot of a policy directory."""
    digest = content_hash(files)
    revision = git_revision(directory, files, ignored)
    version = f"sha256:{digest[:SHORT]}"
    if revision is not None:
        version = f"{revision}/{version}"
    return version, digest
