"""Load a policy directory: read, validate and compile every file, all or nothing."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from spendgate.errors import PolicyError, Problem
from spendgate.money import usd_to_micros
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
from spendgate.policy._schema import NON_POLICY_KINDS, check_document, suggest
from spendgate.policy._version import version_of
from spendgate.policy._yaml import Document, PathKey, parse_documents
from spendgate.windows import Period

# Limits that shadow_rules can name. max_output_tokens clamps and never denies.
SHADOW_LIMITS = ("limits/max_input_tokens", "limits/max_request_usd")

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_GLOB_CHARACTERS = frozenset("*?[")
DEFAULT_RESERVATION_TTL = timedelta(minutes=15)
MAX_RESERVATION_TTL = timedelta(days=30)


@dataclass(slots=True)
class LoadResult:
    """Outcome of reading a directory: the policy when valid, and every problem."""

    policy: Policy | None
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


def policy_files(directory: Path) -> list[Path]:
    """List a policy directory's YAML files in a stable order, skipping dot folders."""
    found = []
    for path in directory.rglob("*"):
        relative = path.relative_to(directory)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.suffix in (".yaml", ".yml") and path.is_file():
            found.append(path)
    return sorted(found, key=lambda path: path.relative_to(directory).as_posix())


def read_policy(directory: Path) -> LoadResult:
    """Read, validate and compile `directory`, collecting every problem.

    Each file is read once; the version is computed from those same bytes.
    """
    result = LoadResult(policy=None)
    if not directory.is_dir():
        where = str(directory)
        result.errors.append(Problem(where, 1, 1, "", "policy directory not found"))
        return result

    files = policy_files(directory)
    result.files = [path.relative_to(directory).as_posix() for path in files]
    documents: list[Document] = []
    failed_kinds: set[str] = set()
    snapshot: dict[str, bytes] = {}
    test_files: set[str] = set()
    for path, name in zip(files, result.files, strict=True):
        try:
            snapshot[name] = path.read_bytes()
        except OSError as error:
            result.errors.append(Problem(name, 1, 1, "", f"cannot read file: {error}"))
            continue
        read, problems = parse_documents(snapshot[name], name)
        result.errors += problems
        kinds = [
            document.data.get("kind") if isinstance(document.data, dict) else None
            for document in read
        ]
        if read and not problems and all(kind in NON_POLICY_KINDS for kind in kinds):
            # A file of policy tests only does not change any decision, so it
            # is left out of the version.
            del snapshot[name]
            test_files.add(name)
        for document, kind in zip(read, kinds, strict=True):
            if kind in NON_POLICY_KINDS:
                continue
            problems = check_document(document)
            result.errors += problems
            documents.append(document)
            if problems:
                failed_kinds.add(str(kind))
                document.data = None  # The compiler skips documents that failed.

    compiler = _Compiler(directory.name or str(directory), failed_kinds)
    compiled = compiler.compile(documents)
    result.errors += compiler.errors
    result.warnings += compiler.warnings
    if result.errors or compiled is None:
        return result

    organization, models, names, departments = compiled
    version, digest = version_of(directory, snapshot, test_files)
    result.policy = Policy(
        organization=organization,
        models=MappingProxyType(models),
        model_names=MappingProxyType(names),
        departments=MappingProxyType(departments),
        version=version,
        content_hash=digest,
        loaded_at=datetime.now(UTC),
        files=tuple(result.files),
        warnings=tuple(result.warnings),
    )
    return result


def load_policy(directory: Path) -> Policy:
    """Load a policy directory, or raise PolicyError listing every error."""
    result = read_policy(directory)
    if result.policy is None:
        raise PolicyError(result.errors)
    return result.policy


Compiled = tuple[Organization, dict[str, Model], dict[str, str], dict[str, Department]]


class _Compiler:
    """Turn schema-valid documents into the frozen policy, checking cross-references."""

    def __init__(self, directory_name: str, failed_kinds: set[str]) -> None:
        self.directory_name = directory_name
        # Kinds with a document that failed its schema check: errors that only
        # follow from that document's absence are not reported again.
        self.failed_kinds = failed_kinds
        self.errors: list[Problem] = []
        self.warnings: list[Problem] = []
        self.models: dict[str, Model] = {}
        self.names: dict[str, str] = {}

    def compile(self, documents: list[Document]) -> Compiled | None:
        by_kind: dict[str, list[Document]] = {}
        for document in documents:
            if document.data is not None:
                by_kind.setdefault(document.data["kind"], []).append(document)

        for document in by_kind.get("ModelCatalog", []):
            self._add_models(document)
        # With a broken catalog, reference checks would report models that are only
        # missing because their document failed, so they are skipped.
        check_references = "ModelCatalog" not in self.failed_kinds
        if not self.models and check_references:
            self._directory_error("no ModelCatalog with at least one model found")

        organizations = by_kind.get("Organization", [])
        if len(organizations) > 1:
            for document in organizations[1:]:
                self.errors.append(
                    document.problem(
                        ("kind",), "only one Organization document is allowed"
                    )
                )
        if not organizations and "Organization" not in self.failed_kinds:
            self._directory_error("no Organization document found")

        departments: dict[str, Department] = {}
        for document in by_kind.get("Department", []):
            name = document.data["name"]
            if name in departments:
                self.errors.append(
                    document.problem(("name",), f"duplicate Department {name!r}")
                )
                continue
            departments[name] = self._department(document, check_references)

        if not departments and "Department" not in self.failed_kinds:
            self._directory_error("no Department document found")
        if not organizations:
            return None
        organization = self._organization(organizations[0], departments)
        if organization is None:
            return None
        return organization, self.models, self.names, departments

    def _directory_error(self, message: str) -> None:
        self.errors.append(Problem(self.directory_name, 1, 1, "", message))

    def _organization(
        self, document: Document, departments: Mapping[str, Department]
    ) -> Organization | None:
        data = document.data
        try:
            timezone = ZoneInfo(data["timezone"])
        except (ZoneInfoNotFoundError, ValueError):
            self.errors.append(
                document.problem(
                    ("timezone",),
                    f"unknown timezone {data['timezone']!r}; use an IANA name such as "
                    '"America/New_York" or "UTC"',
                )
            )
            return None

        ttl = DEFAULT_RESERVATION_TTL
        if "reservation_ttl" in data:
            text = data["reservation_ttl"]
            ttl = timedelta(seconds=int(text[:-1]) * _DURATION_UNITS[text[-1]])
            if ttl > MAX_RESERVATION_TTL:
                self.errors.append(
                    document.problem(
                        ("reservation_ttl",),
                        f"must be at most 30d, got {text}; a reservation holds "
                        "budget until it is settled or expires",
                    )
                )
                return None

        fallback = data.get("unknown_department", "deny")
        # A Department that failed its own checks is reported there already.
        department_failed = "Department" in self.failed_kinds
        if fallback != "deny" and fallback not in departments and not department_failed:
            hint = suggest(fallback, tuple(departments))
            self.errors.append(
                document.problem(
                    ("unknown_department",),
                    f'must be "deny" or a Department name, got "{fallback}"{hint}',
                )
            )
            return None
        return Organization(
            name=data["name"],
            timezone=timezone,
            reservation_ttl=ttl,
            on_reservation_expiry=ExpiryAction(
                data.get("on_reservation_expiry", "charge")
            ),
            unknown_department=None if fallback == "deny" else fallback,
            fail_mode=FailMode(data.get("fail_mode", "closed")),
        )

    def _add_models(self, document: Document) -> None:
        for index, entry in enumerate(document.data["models"]):
            path: PathKey = ("models", index)
            name = entry["name"]
            if name in self.names:
                self.errors.append(
                    document.problem(
                        (*path, "name"), f"duplicate model name or alias {name!r}"
                    )
                )
                continue
            tokenizer = entry["tokenizer"]
            chars = entry.get("chars_per_token")
            if chars is not None and tokenizer != "approximate":
                self.errors.append(
                    document.problem(
                        (*path, "chars_per_token"),
                        f"only applies with tokenizer: approximate, not {tokenizer}",
                    )
                )
            prices = entry["price_per_million_tokens"]
            input_price = usd_to_micros(Decimal(prices["input"]))
            self.models[name] = Model(
                name=name,
                provider=entry.get("provider", ""),
                aliases=tuple(entry.get("aliases", ())),
                tokenizer=tokenizer,
                chars_per_token=None if chars is None else Decimal(chars),
                input_price_micros=input_price,
                cached_input_price_micros=usd_to_micros(
                    Decimal(prices.get("cached_input", prices["input"]))
                ),
                output_price_micros=usd_to_micros(Decimal(prices["output"])),
                # int(): YAML may write a whole count as 16384.0.
                context_window=int(entry["context_window"]),
                max_output_tokens=int(entry["max_output_tokens"]),
            )
            self.names[name] = name
            for alias_index, alias in enumerate(entry.get("aliases", ())):
                if alias in self.names:
                    self.errors.append(
                        document.problem(
                            (*path, "aliases", alias_index),
                            f"duplicate model name or alias {alias!r}",
                        )
                    )
                else:
                    self.names[alias] = name

    def _resolve(
        self,
        document: Document,
        path: PathKey,
        name: str,
        check: bool,
        *,
        at_key: bool = False,
    ) -> str | None:
        canonical = self.names.get(name.lower())
        if canonical is None and check:
            hint = suggest(name, tuple(self.names))
            self.errors.append(
                document.problem(
                    path,
                    f"unknown model {name!r}; it is not in the catalog{hint}",
                    at_key=at_key,
                )
            )
        return canonical

    def _match(
        self, document: Document, path: PathKey, patterns: list[str], check: bool
    ) -> set[str]:
        matched: set[str] = set()
        for index, pattern in enumerate(patterns):
            where = (*path, index)
            if _GLOB_CHARACTERS.isdisjoint(pattern):
                canonical = self._resolve(document, where, pattern, check)
                if canonical is not None:
                    matched.add(canonical)
                continue
            hits = {
                name
                for name in self.models
                if fnmatch.fnmatchcase(name, pattern.lower())
            }
            if not hits and check:
                self.warnings.append(
                    document.problem(
                        where,
                        f"pattern {pattern!r} matches no model in the catalog",
                        severity="warning",
                    )
                )
            matched |= hits
        return matched

    def _allowed(
        self,
        document: Document,
        path: PathKey,
        rules: dict[str, Any] | None,
        check: bool,
    ) -> frozenset[str]:
        if rules is None:
            return frozenset(self.models)
        allowed = (
            self._match(document, (*path, "allow"), rules["allow"], check)
            if "allow" in rules
            else set(self.models)
        )
        denied = self._match(document, (*path, "deny"), rules.get("deny", []), check)
        return frozenset(allowed - denied)

    def _department(self, document: Document, check: bool) -> Department:
        data = document.data
        name = data["name"]
        prefix = f"departments/{name}"
        allowed = self._allowed(document, ("models",), data.get("models"), check)
        limits = _limits(data.get("limits", {}))
        budgets = self._budgets(
            document, ("budgets",), data.get("budgets", []), prefix, Scope.DEPARTMENT
        )

        teams: dict[str, Team] = {}
        for index, entry in enumerate(data.get("teams", [])):
            team_name = entry["name"]
            path: PathKey = ("teams", index)
            if team_name in teams:
                self.errors.append(
                    document.problem((*path, "name"), f"duplicate team {team_name!r}")
                )
                continue
            team_prefix = f"{prefix}/teams/{team_name}"
            team_allowed = allowed & self._allowed(
                document, (*path, "models"), entry.get("models"), check
            )
            teams[team_name] = Team(
                name=team_name,
                allowed_models=team_allowed,
                models_rule=f"{team_prefix}/models",
                limits=_narrow(limits, _limits(entry.get("limits", {}))),
                budgets=self._budgets(
                    document,
                    (*path, "budgets"),
                    entry.get("budgets", []),
                    team_prefix,
                    Scope.TEAM,
                ),
            )
        department = Department(
            name=name,
            shadow=data.get("mode", "enforce") == "shadow",
            allowed_models=allowed,
            models_rule=f"{prefix}/models",
            chains=MappingProxyType(
                self._chains(document, data.get("downgrades", {}), check)
            ),
            limits=limits,
            budgets=budgets,
            teams=MappingProxyType(teams),
            shadow_rules=self._shadow_rules(
                document, data.get("shadow_rules", []), prefix, teams
            ),
        )
        self._warn_department(document, department)
        return department

    def _shadow_rules(
        self,
        document: Document,
        entries: list[Any],
        prefix: str,
        teams: Mapping[str, Team],
    ) -> frozenset[str]:
        """Check shadow_rules against the department's rules; return their full ids."""
        known = (
            "models",
            *(f"teams/{name}/models" for name in teams),
            *SHADOW_LIMITS,
        )
        found = set()
        for index, entry in enumerate(entries):
            if not isinstance(entry, str) or entry not in known:
                self.errors.append(
                    document.problem(
                        ("shadow_rules", index),
                        f"unknown rule {entry!r}; expected one of "
                        f"{', '.join(known)}{suggest(str(entry), known)}",
                    )
                )
                continue
            found.add(f"{prefix}/{entry}")
        return frozenset(found)

    def _warn(self, document: Document, path: PathKey, message: str) -> None:
        self.warnings.append(document.problem(path, message, severity="warning"))

    def _warn_department(self, document: Document, department: Department) -> None:
        """Warn about valid policies that are likely mistakes."""
        team_budgets = [b for team in department.teams.values() for b in team.budgets]
        if not department.budgets and not team_budgets:
            self._warn(
                document,
                ("name",),
                f"department {department.name!r} has no budget, so its spend is "
                "unlimited",
            )
        for source, chain in department.chains.items():
            target = chain[0]
            cheaper = self.models[source]
            dearer = self.models[target]
            if (
                dearer.input_price_micros > cheaper.input_price_micros
                or dearer.output_price_micros > cheaper.output_price_micros
            ):
                self._warn(
                    document,
                    ("downgrades", source),
                    f"downgrade target {target!r} is more expensive than {source!r}",
                )
        for index, entry in enumerate(document.data.get("teams", [])):
            team = department.teams.get(entry["name"])
            if team is None:
                continue
            for position, budget in enumerate(team.budgets):
                wider = [
                    own
                    for own in department.budgets
                    if own.period is budget.period
                    and own.per is Scope.DEPARTMENT
                    and budget.per is Scope.TEAM
                    and budget.limit_micros > own.limit_micros
                ]
                if wider:
                    self._warn(
                        document,
                        ("teams", index, "budgets", position, "limit_usd"),
                        f"team budget {budget.name!r} is larger than the department's "
                        f"{budget.period.value} budget {wider[0].name!r}, which caps "
                        "it anyway",
                    )

    def _budgets(
        self,
        document: Document,
        path: PathKey,
        entries: list[dict[str, Any]],
        prefix: str,
        default_per: Scope,
    ) -> tuple[Budget, ...]:
        budgets: dict[str, Budget] = {}
        for index, entry in enumerate(entries):
            name = entry["name"]
            if name in budgets:
                self.errors.append(
                    document.problem(
                        (*path, index, "name"), f"duplicate budget {name!r}"
                    )
                )
                continue
            percent = entry.get("downgrade_at_percent")
            budgets[name] = Budget(
                rule=f"{prefix}/budgets/{name}",
                name=name,
                period=Period(entry["period"]),
                limit_micros=usd_to_micros(Decimal(entry["limit_usd"])),
                per=Scope(entry.get("per", default_per.value)),
                threshold_basis_points=None
                if percent is None
                else int(Decimal(percent) * 100),
                shadow=bool(entry.get("shadow", False)),
            )
        return tuple(budgets.values())

    def _chains(
        self, document: Document, downgrades: dict[str, str], check: bool
    ) -> dict[str, tuple[str, ...]]:
        edges: dict[str, str] = {}
        # The key as the file writes it, which may be an alias, for error paths.
        written: dict[str, str] = {}
        for source, target in downgrades.items():
            source_name = self._resolve(
                document, ("downgrades", source), source, check, at_key=True
            )
            target_name = self._resolve(document, ("downgrades", source), target, check)
            if source_name is None or target_name is None:
                continue
            if source_name in edges:
                self.errors.append(
                    document.problem(
                        ("downgrades", source),
                        f"{source!r} is {source_name!r}, which already has a downgrade",
                        at_key=True,
                    )
                )
                continue
            edges[source_name] = target_name
            written[source_name] = source

        chains: dict[str, tuple[str, ...]] = {}
        reported: set[frozenset[str]] = set()
        for start in edges:
            chain: list[str] = []
            current = start
            while current in edges:
                current = edges[current]
                if current == start or current in chain:
                    # Each cycle is reported once, from the first of its models.
                    members = frozenset([start, *chain])
                    if current == start and members not in reported:
                        reported.add(members)
                        cycle = " -> ".join([start, *chain, current])
                        self.errors.append(
                            document.problem(
                                ("downgrades", written[start]),
                                f"downgrade cycle: {cycle}",
                                at_key=True,
                            )
                        )
                    break
                chain.append(current)
            else:
                chains[start] = tuple(chain)
        return chains


def _limits(data: Mapping[str, Any]) -> Limits:
    cap = data.get("max_request_usd")
    max_input = data.get("max_input_tokens")
    max_output = data.get("max_output_tokens")
    return Limits(
        max_input_tokens=None if max_input is None else int(max_input),
        max_output_tokens=None if max_output is None else int(max_output),
        max_request_micros=None if cap is None else usd_to_micros(Decimal(cap)),
    )


def _narrow(department: Limits, team: Limits) -> Limits:
    """Combine limits so the smaller of department and team applies."""

    def smaller(first: int | None, second: int | None) -> int | None:
        if first is None:
            return second
        if second is None:
            return first
        return min(first, second)

    return Limits(
        max_input_tokens=smaller(department.max_input_tokens, team.max_input_tokens),
        max_output_tokens=smaller(department.max_output_tokens, team.max_output_tokens),
        max_request_micros=smaller(
            department.max_request_micros, team.max_request_micros
        ),
    )
