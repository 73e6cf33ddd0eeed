"""Generate and import the echo service's Python code, so none is committed."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

from grpc_tools import protoc  # type: ignore[import-untyped]

BENCH_DIR = Path(__file__).resolve().parent
CACHE_DIR = BENCH_DIR / ".cache"
STUBS_DIR = CACHE_DIR / "stubs"
ECHO_PROTO = BENCH_DIR / "echo.proto"


class StubError(RuntimeError):
    """grpc_tools could not compile the echo service."""


def generate() -> None:
    """Compile echo.proto into bench/.cache/stubs unless the output is newer."""
    outputs = [STUBS_DIR / "echo_pb2.py", STUBS_DIR / "echo_pb2_grpc.py"]
    source_time = ECHO_PROTO.stat().st_mtime
    if all(p.exists() and p.stat().st_mtime >= source_time for p in outputs):
        return

    STUBS_DIR.mkdir(parents=True, exist_ok=True)
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"--proto_path={BENCH_DIR}",
            f"--python_out={STUBS_DIR}",
            f"--grpc_python_out={STUBS_DIR}",
            str(ECHO_PROTO),
        ]
    )
    if status != 0:
        raise StubError(f"grpc_tools.protoc failed on {ECHO_PROTO} (exit {status})")


def load() -> tuple[ModuleType, ModuleType]:
    """Return the echo_pb2 and echo_pb2_grpc modules, generating them first."""
    generate()
    if str(STUBS_DIR) not in sys.path:
        sys.path.insert(0, str(STUBS_DIR))
    return (
        importlib.import_module("echo_pb2"),
        importlib.import_module("echo_pb2_grpc"),
    )
