"""The peer: the Cerbos policy decision point, deciding a stateless model allowance.

Cerbos comes from its npm package, which carries the server binary. The
client is Python on the same grpcio stack as the spendgate client. Its
message classes are built from the descriptors that the Cerbos server
returns over gRPC server reflection, so no Cerbos SDK is needed.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import grpc
import yaml
from google.protobuf import message_factory
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

import _procs
from _workload import DEPARTMENT, MODEL, Method
from spendgate.policy import Policy

PACKAGE = "@cerbos/cerbos-linux-x64"
VERSION = "0.55.0"
NPM_TIMEOUT_SECONDS = 300
CHECK_RESOURCES_PATH = "/cerbos.svc.v1.CerbosService/CheckResources"
EFFECT_ALLOW = "EFFECT_ALLOW"


class CerbosUnavailableError(RuntimeError):
    """Cerbos could not be installed or started. The message gives the reason."""


def install(cache_dir: Path) -> Path:
    """Install the Cerbos binary with npm into `cache_dir` and return its path."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise CerbosUnavailableError(
            f"{PACKAGE} is built for Linux x86-64, not "
            f"{platform.system()} {platform.machine()}"
        )
    prefix = cache_dir / "cerbos"
    binary = prefix / "node_modules" / PACKAGE / "cerbos-linux-x64"
    if binary.exists() and _version(binary) == VERSION:
        return binary

    npm = shutil.which("npm")
    if npm is None:
        raise CerbosUnavailableError("npm is not installed")
    prefix.mkdir(parents=True, exist_ok=True)
    try:
        result = subprocess.run(
            [
                npm,
                "install",
                "--prefix",
                str(prefix),
                "--no-audit",
                "--no-fund",
                "--ignore-scripts",
                f"{PACKAGE}@{VERSION}",
            ],
            capture_output=True,
            text=True,
            timeout=NPM_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired as error:
        raise CerbosUnavailableError(
            f"npm install {PACKAGE}@{VERSION} timed out after {NPM_TIMEOUT_SECONDS} s"
        ) from error
    if result.returncode != 0 or not binary.exists():
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise CerbosUnavailableError(
            f"npm install {PACKAGE}@{VERSION} failed (exit {result.returncode}): {last}"
        )
    return binary


def _version(binary: Path) -> str:
    result = subprocess.run(
        [str(binary), "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    lines = result.stdout.split()
    return lines[0] if lines else ""


def write_policy(policy: Policy, directory: Path) -> None:
    """Write a Cerbos resource policy allowing what `policy`'s departments allow.

    Resource kind "model", action "invoke", one rule per department: the
    principal attribute `department` names the department, and the resource
    id is a model name that the department's compiled allow list contains.
    Teams, limits and budgets are left out, because Cerbos keeps no ledger.
    """
    rules = []
    for name, department in sorted(policy.departments.items()):
        models = json.dumps(sorted(department.allowed_models))
        rules.append(
            {
                "name": f"department-{name}",
                "actions": ["invoke"],
                "effect": EFFECT_ALLOW,
                "roles": ["*"],
                "condition": {
                    "match": {
                        "all": {
                            "of": [
                                {"expr": f"P.attr.department == {json.dumps(name)}"},
                                {"expr": f"R.id in {models}"},
                            ]
                        }
                    }
                },
            }
        )
    document = {
        "apiVersion": "api.cerbos.dev/v1",
        "resourcePolicy": {"version": "default", "resource": "model", "rules": rules},
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.yaml").write_text(
        yaml.safe_dump(document, sort_keys=False), encoding="utf-8"
    )


def start(binary: Path, policy: Policy, work_dir: Path) -> _procs.ServerProcess:
    """Write the policy and configuration, then start Cerbos on 127.0.0.1 only."""
    policy_dir = work_dir / "policies"
    write_policy(policy, policy_dir)
    grpc_port = _procs.free_port()
    config = {
        "server": {
            "httpListenAddr": f"{_procs.HOST}:{_procs.free_port()}",
            "grpcListenAddr": f"{_procs.HOST}:{grpc_port}",
        },
        "storage": {
            "driver": "disk",
            "disk": {"directory": str(policy_dir), "watchForChanges": False},
        },
        "audit": {"enabled": False},
        "telemetry": {"disabled": True},
    }
    config_path = work_dir / "cerbos.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    argv = [
        str(binary),
        "server",
        f"--config={config_path}",
        # The gops debug listener defaults to every interface on port 6666.
        f"--debug-listen-addr={_procs.HOST}:{_procs.free_port()}",
        "--log-level=warn",
    ]
    return _procs.start(
        "cerbos",
        argv,
        work_dir / "cerbos.log",
        port=grpc_port,
        env={"CERBOS_NO_TELEMETRY": "1"},
        cwd=work_dir,
    )


class CheckResources:
    """The peer workload: one CheckResources call for the bench's model request."""

    second: Method | None = None

    def __init__(self, address: str) -> None:
        with grpc.insecure_channel(address) as channel:
            pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
            service = pool.FindServiceByName("cerbos.svc.v1.CerbosService")
            method = service.FindMethodByName("CheckResources")
            self._request: Any = message_factory.GetMessageClass(method.input_type)
            response = message_factory.GetMessageClass(method.output_type)
            self._effects = pool.FindEnumTypeByName("cerbos.effect.v1.Effect")
        self.first = Method(
            CHECK_RESOURCES_PATH, self._request.SerializeToString, response.FromString
        )

    def request(self, department: str, model: str, user: str) -> Any:
        """Build a CheckResources request: may `department` invoke `model`?"""
        request = self._request(request_id=uuid.uuid4().hex)
        request.principal.id = user
        request.principal.roles.append("user")
        request.principal.attr["department"].string_value = department
        entry = request.resources.add()
        entry.actions.append("invoke")
        entry.resource.kind = "model"
        entry.resource.id = model
        return request

    def first_request(self, client: int, seq: int) -> Any:
        """Build the request of call `seq`: the bench's department and model."""
        return self.request(DEPARTMENT, MODEL, f"user-{client:02d}")

    def second_request(self, first_response: Any) -> Any:
        """Never called: the peer workload has one RPC."""
        raise NotImplementedError("CheckResources has no follow-up call")

    def outcome(self, first_response: Any) -> str:
        """Return the effect name of the invoke action, such as EFFECT_ALLOW."""
        effect = first_response.results[0].actions["invoke"]
        return str(self._effects.values_by_number[effect].name)


def verify_equivalence(
    workload: CheckResources, address: str, policy: Policy
) -> list[str]:
    """Ask Cerbos about every department and model and return the disagreements."""
    call = None
    problems = []
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(
            workload.first.path,
            request_serializer=workload.first.serializer,
            response_deserializer=workload.first.deserializer,
        )
        for name, department in sorted(policy.departments.items()):
            for model in sorted(policy.models):
                response = call(workload.request(name, model, "verify"), timeout=10)
                allowed = workload.outcome(response) == EFFECT_ALLOW
                if allowed != (model in department.allowed_models):
                    problems.append(f"{name}/{model}: Cerbos allowed={allowed}")
    return problems
