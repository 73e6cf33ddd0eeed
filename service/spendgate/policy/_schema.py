"""The policy language's shape, declared once for validation and JSON Schema.

Every key, type and bound of the policy language is written here as data, so
`spendgate validate` and `spendgate schema` can never disagree.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from spendgate.errors import Problem
from spendgate.policy._yaml import Document, PathKey

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9._:/-]{0,127}$"
DURATION_PATTERN = r"^[1-9][0-9]{0,5}(s|m|h|d)$"
# Upper bounds keep every amount inside the ledger's 64-bit integers: a
# budget of 10^12 USD is 10^18 micro-USD, below 2^63 (about 9.2 x 10^18).
MAX_USD = Decimal(10) ** 12
MAX_PRICE_USD = Decimal(1_000_000)
MAX_TOKENS = Decimal(10) ** 9
# Budgets of one department or team. A Check writes all the budgets that
# apply to it in one statement, and this keeps its parameters far below
# SQLite's limit of 32,766.
MAX_BUDGETS = 100


class Shape:
    """Base of the schema nodes: checks a value and describes it as JSON Schema."""

    description: str = ""

    def check(self, value: Any, path: PathKey, report: Reporter) -> None:
        raise NotImplementedError

    def json_schema(self) -> dict[str, Any]:
        raise NotImplementedError

    def _describe(self, schema: dict[str, Any]) -> dict[str, Any]:
        if self.description:
            schema["description"] = self.description
        return schema


@dataclass(slots=True)
class Reporter:
    """Collects problems for one document."""

    document: Document
    problems: list[Problem] = field(default_factory=list)

    def error(self, path: PathKey, message: str, *, at_key: bool = False) -> None:
        self.problems.append(self.document.problem(path, message, at_key=at_key))


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | Decimal):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _show(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list | dict):
        return _type_name(value)
    return str(value)


@dataclass(slots=True)
class Text(Shape):
    """A string, optionally restricted by a regular expression or a set of choices."""

    pattern: str | None = None
    choices: tuple[str, ...] = ()
    description: str = ""
    pattern_hint: str = ""
    # Returns the problem with a value that passed the checks above, or None.
    validate: Callable[[str], str | None] | None = None

    def check(self, value: Any, path: PathKey, report: Reporter) -> None:
        if not isinstance(value, str):
            report.error(path, f"must be a string, got {_show(value)}")
            return
        if self.choices and value not in self.choices:
            options = ", ".join(self.choices)
            hint = _suggest(value, self.choices)
            report.error(path, f"must be one of {options}, got {_show(value)}{hint}")
        elif self.pattern and not re.match(self.pattern, value):
            report.error(path, f"{_show(value)} is invalid: {self.pattern_hint}")
        elif self.validate is not None and (problem := self.validate(value)):
            report.error(path, problem)

    def json_schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": "string"}
        if self.choices:
            schema["enum"] = list(self.choices)
        if self.pattern:
            schema["pattern"] = self.pattern
        return self._describe(schema)


@dataclass(slots=True)
class Number(Shape):
    """A number with bounds; `integer` rejects fractions, `places` caps decimals."""

    integer: bool = False
    minimum: Decimal | None = None
    exclusive_minimum: Decimal | None = None
    maximum: Decimal | None = None
    places: int | None = None
    description: str = ""

    def check(self, value: Any, path: PathKey, report: Reporter) -> None:
        if isinstance(value, bool) or not isinstance(value, int | Decimal):
            kind = "an integer" if self.integer else "a number"
            report.error(path, f"must be {kind}, got {_show(value)}")
            return
        number = Decimal(value)
        if self.integer and number != number.to_integral_value():
            report.error(path, f"must be an integer, got {value}")
        elif self.exclusive_minimum is not None and number <= self.exclusive_minimum:
            report.error(
                path, f"must be greater than {self.exclusive_minimum}, got {value}"
            )
        elif self.minimum is not None and number < self.minimum:
            report.error(path, f"must be at least {self.minimum}, got {value}")
        elif self.maximum is not None and number > self.maximum:
            report.error(path, f"must be at most {self.maximum}, got {value}")
        elif self.places is not None and -number.as_tuple().exponent > self.places:  # type: ignore[operator]
            report.error(
                path, f"must have at most {self.places} decimal places, got {value}"
            )

    def json_schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": "integer" if self.integer else "number"}
        if self.minimum is not None:
            schema["minimum"] = _json_number(self.minimum)
        if self.exclusive_minimum is not None:
            schema["exclusiveMinimum"] = _json_number(self.exclusive_minimum)
        if self.maximum is not None:
            schema["maximum"] = _json_number(self.maximum)
        return self._describe(schema)


def _json_number(value: Decimal) -> int | float:
    # JSON Schema output is for editors only; nothing reads money back from it.
    return int(value) if value == value.to_integral_value() else float(value)


@dataclass(slots=True)
class Flag(Shape):
    """A boolean."""

    description: str = ""

    def check(self, value: Any, path: PathKey, report: Reporter) -> None:
        if not isinstance(value, bool):
            report.error(path, f"must be true or false, got {_show(value)}")

    def json_schema(self) -> dict[str, Any]:
        return self._describe({"type": "boolean"})


@dataclass(slots=True)
class ListOf(Shape):
    """A list whose items share one shape."""

    item: Shape
    description: str = ""
    max_items: int | None = None

    def check(self, value: Any, path: PathKey, report: Reporter) -> None:
        if not isinstance(value, list):
            report.error(path, f"must be a list, got {_show(value)}")
            return
        if self.max_items is not None and len(value) > self.max_items:
            report.error(
                path, f"must have at most {self.max_items} items, got {len(value)}"
            )
        for index, item in enumerate(value):
            self.item.check(item, (*path, index), report)

    def json_schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": "array", "items": self.item.json_schema()}
        if self.max_items is not None:
            schema["maxItems"] = self.max_items
        return self._describe(schema)


@dataclass(slots=True)
class MapOf(Shape):
    """A mapping with free keys and values of one shape."""

    key: Text
    value: Shape
    description: str = ""

    def check(self, value: Any, path: PathKey, report: Reporter) -> None:
        if not isinstance(value, dict):
            report.error(path, f"must be a mapping, got {_show(value)}")
            return
        for key, item in value.items():
            self.key.check(key, (*path, key), report)
            self.value.check(item, (*path, key), report)

    def json_schema(self) -> dict[str, Any]:
        schema = {"type": "object", "additionalProperties": self.value.json_schema()}
        if self.key.pattern:
            schema["propertyNames"] = {"pattern": self.key.pattern}
        return self._describe(schema)


@dataclass(slots=True)
class Key:
    """One key of an Object: its shape and whether it must be present."""

    shape: Shape
    required: bool = False


@dataclass(slots=True)
class Object(Shape):
    """A mapping with a fixed set of keys; unknown keys are errors with a hint."""

    keys: Mapping[str, Key]
    description: str = ""
    # Keys that a newer apiVersion of the language defines, with that version.
    newer_keys: Mapping[str, str] = field(default_factory=dict)

    def check(self, value: Any, path: PathKey, report: Reporter) -> None:
        if not isinstance(value, dict):
            report.error(path, f"must be a mapping, got {_show(value)}")
            return
        for name, key in self.keys.items():
            if key.required and name not in value:
                report.error(path, f"missing required key {name!r}")
        for name, item in value.items():
            known = self.keys.get(name)
            if known is None:
                report.error((*path, name), self._unknown(name), at_key=True)
            else:
                known.shape.check(item, (*path, name), report)

    def _unknown(self, name: str) -> str:
        if name in self.newer_keys:
            return (
                f"unknown key {name!r}: it belongs to apiVersion "
                f"{self.newer_keys[name]}, which this spendgate does not support"
            )
        return f"unknown key {name!r}{_suggest(name, tuple(self.keys))}"

    def json_schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = {
            "type": "object",
            "properties": {
                name: key.shape.json_schema() for name, key in self.keys.items()
            },
            "additionalProperties": False,
        }
        required = [name for name, key in self.keys.items() if key.required]
        if required:
            schema["required"] = required
        return self._describe(schema)


def _suggest(word: str, options: Sequence[str]) -> str:
    """Return ", did you mean "x"?" for the closest option, or nothing."""
    lowered = {option.lower(): option for option in options}
    matches = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
    return f'; did you mean "{lowered[matches[0]]}"?' if matches else ""


suggest = _suggest


def _timezone_problem(name: str) -> str | None:
    """Return why `name` is not a timezone in the zoneinfo database, or None."""
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return (
            f"unknown timezone {name!r}; use an IANA name such as "
            '"America/New_York" or "UTC"'
        )
    return None


def _usd(description: str) -> Number:
    return Number(
        exclusive_minimum=Decimal(0),
        maximum=MAX_USD,
        places=6,
        description=description,
    )


def _tokens(description: str) -> Number:
    return Number(
        integer=True, minimum=Decimal(1), maximum=MAX_TOKENS, description=description
    )


def _price() -> Number:
    return Number(minimum=Decimal(0), maximum=MAX_PRICE_USD, places=6)


NAME = Text(
    pattern=NAME_PATTERN,
    pattern_hint="use 1-63 of a-z, 0-9, _ and -, starting with a letter or digit",
)
MODEL_NAME = Text(
    pattern=MODEL_NAME_PATTERN, pattern_hint="use lower-case a-z, 0-9 and . _ : / -"
)
GLOBS = ListOf(
    Text(description="glob on canonical model names: * ? [..], case-insensitive")
)

MODEL_RULES = Object(
    {
        "allow": Key(GLOBS),
        "deny": Key(GLOBS),
    },
    description="Model globs; deny wins over allow.",
)

LIMITS = Object(
    {
        "max_input_tokens": Key(_tokens("Requests with more input tokens are denied.")),
        "max_output_tokens": Key(
            _tokens("Larger output requests are clamped to this.")
        ),
        "max_request_usd": Key(_usd("Estimated cost cap of one request, in USD.")),
    }
)


def _budget(default_per: str) -> Object:
    return Object(
        {
            "name": Key(NAME, required=True),
            "period": Key(Text(choices=("day", "week", "month")), required=True),
            "limit_usd": Key(_usd("Budget limit per window, in USD."), required=True),
            "per": Key(
                Text(
                    choices=("department", "team", "user")
                    if default_per == "department"
                    else ("team", "user"),
                    description=f"Who shares one budget; default {default_per}.",
                )
            ),
            "downgrade_at_percent": Key(
                Number(
                    minimum=Decimal(1),
                    maximum=Decimal(100),
                    places=2,
                    description="Downgrade if possible from this percent of the limit.",
                )
            ),
            "shadow": Key(Flag(description="Evaluate and audit, never enforce.")),
        }
    )


TEAM = Object(
    {
        "name": Key(NAME, required=True),
        "budgets": Key(ListOf(_budget("team"), max_items=MAX_BUDGETS)),
        "models": Key(MODEL_RULES),
        "limits": Key(LIMITS),
    }
)

ORGANIZATION = Object(
    {
        "apiVersion": Key(Text(), required=True),
        "kind": Key(Text(), required=True),
        "name": Key(NAME, required=True),
        "timezone": Key(
            Text(
                description="IANA timezone name of the budget windows",
                validate=_timezone_problem,
            ),
            required=True,
        ),
        "reservation_ttl": Key(
            Text(
                pattern=DURATION_PATTERN,
                pattern_hint="use an integer and a unit s, m, h or d, such as 15m",
            )
        ),
        "on_reservation_expiry": Key(Text(choices=("charge", "release"))),
        "unknown_department": Key(
            Text(description="deny, or the name of a Department")
        ),
        "fail_mode": Key(
            Text(
                choices=("closed", "open"),
                description="When the ledger is unreachable: closed returns "
                "UNAVAILABLE, open allows unverified.",
            )
        ),
    }
)

PRICES = Object(
    {
        "input": Key(_price(), required=True),
        "cached_input": Key(_price()),
        "output": Key(_price(), required=True),
    },
    description="USD per million tokens.",
)

MODEL = Object(
    {
        "name": Key(MODEL_NAME, required=True),
        "provider": Key(Text()),
        "aliases": Key(ListOf(MODEL_NAME)),
        "tokenizer": Key(
            Text(choices=("o200k_base", "cl100k_base", "approximate")), required=True
        ),
        "chars_per_token": Key(
            Number(exclusive_minimum=Decimal(0), maximum=Decimal(100), places=3)
        ),
        "price_per_million_tokens": Key(PRICES, required=True),
        "context_window": Key(
            _tokens("Maximum input tokens the model accepts."), required=True
        ),
        "max_output_tokens": Key(
            _tokens("Maximum output tokens of one call."), required=True
        ),
    }
)

MODEL_CATALOG = Object(
    {
        "apiVersion": Key(Text(), required=True),
        "kind": Key(Text(), required=True),
        "models": Key(ListOf(MODEL), required=True),
    }
)

DEPARTMENT = Object(
    {
        "apiVersion": Key(Text(), required=True),
        "kind": Key(Text(), required=True),
        "name": Key(NAME, required=True),
        "mode": Key(Text(choices=("enforce", "shadow"))),
        "shadow_rules": Key(
            ListOf(
                Text(),
                description=(
                    "Rules that decide and audit but never enforce: models, "
                    "teams/<team>/models, limits/max_input_tokens or "
                    "limits/max_request_usd."
                ),
            )
        ),
        "models": Key(MODEL_RULES),
        "downgrades": Key(MapOf(MODEL_NAME, MODEL_NAME)),
        "limits": Key(LIMITS),
        "budgets": Key(ListOf(_budget("department"), max_items=MAX_BUDGETS)),
        "teams": Key(ListOf(TEAM)),
    }
)

API_VERSION = "spendgate/v1"

KINDS: dict[str, Object] = {
    "Organization": ORGANIZATION,
    "ModelCatalog": MODEL_CATALOG,
    "Department": DEPARTMENT,
}

# Kinds that live beside policies but are not policy: the loader skips them.
NON_POLICY_KINDS = ("PolicyTest",)


def check_document(document: Document) -> list[Problem]:
    """Check one document against its kind; return its problems."""
    report = Reporter(document)
    data = document.data
    if not isinstance(data, dict):
        report.error((), f"a policy document must be a mapping, got {_type_name(data)}")
        return report.problems

    version = data.get("apiVersion")
    if version is None:
        report.error((), "missing required key 'apiVersion'")
    elif version != API_VERSION:
        newer = re.fullmatch(r"spendgate/v(\d+)((alpha|beta)\d+)?", str(version))
        if newer and int(newer.group(1)) > 1:
            message = (
                f"apiVersion {_show(version)} is newer than this spendgate, which "
                f'reads "{API_VERSION}"; upgrade spendgate to load it'
            )
        else:
            message = (
                f'unsupported apiVersion {_show(version)}; expected "{API_VERSION}"'
            )
        report.error(("apiVersion",), message)
    kind = data.get("kind")
    shape = KINDS.get(kind) if isinstance(kind, str) else None
    if kind is None:
        report.error((), "missing required key 'kind'")
    elif shape is None:
        options = (*KINDS, *NON_POLICY_KINDS)
        report.error(
            ("kind",),
            f"unknown kind {_show(kind)}; expected one of {', '.join(options)}"
            f"{_suggest(str(kind), options)}",
        )
    else:
        shape.check(data, (), report)
    return report.problems


def json_schema(extra_kinds: Mapping[str, Object] | None = None) -> dict[str, Any]:
    """Return a JSON Schema (draft 2020-12) of one policy document.

    `extra_kinds` adds kinds that live beside the policies, such as PolicyTest,
    so an editor pointed at the whole policy directory accepts their files.
    """
    variants = []
    for kind, shape in {**KINDS, **(extra_kinds or {})}.items():
        schema = shape.json_schema()
        schema["properties"]["apiVersion"] = {"const": API_VERSION}
        schema["properties"]["kind"] = {"const": kind}
        variants.append(schema)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "spendgate policy document",
        "oneOf": variants,
    }


Checker = Callable[[Document], list[Problem]]
