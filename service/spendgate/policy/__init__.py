"""Policies: the YAML language, its validation and the compiled form decisions use."""

from spendgate.policy._load import LoadResult, load_policy, policy_files, read_policy
from spendgate.policy._model import (
    Budget,
    Department,
    ExpiryAction,
    FailMode,
    Limits,
    Model,
    Organization,
    Policy,
    Scope,
    Team,
)
from spendgate.policy._schema import json_schema

__all__ = [
    "Budget",
    "Department",
    "ExpiryAction",
    "FailMode",
    "Limits",
    "LoadResult",
    "Model",
    "Organization",
    "Policy",
    "Scope",
    "Team",
    "json_schema",
    "load_policy",
    "policy_files",
    "read_policy",
]
