"""Read YAML documents into plain values while remembering where each value sits.

Policy errors must name the file, line and column of the offending key, which
PyYAML's constructed values forget, so values are built here from the node
tree. Floats become Decimal so that prices and limits never pass through a
binary float.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import yaml

from spendgate.errors import Problem

PathKey = tuple[str | int, ...]

_FLOAT_TAG = "tag:yaml.org,2002:float"
_MAPPING_TAG = "tag:yaml.org,2002:map"


@dataclass(slots=True)
class Document:
    """One YAML document with the source position of every value and key."""

    file: str
    index: int
    data: Any
    line: int
    column: int
    value_marks: dict[PathKey, tuple[int, int]] = field(default_factory=dict)
    key_marks: dict[PathKey, tuple[int, int]] = field(default_factory=dict)

    def problem(
        self,
        path: PathKey,
        message: str,
        *,
        at_key: bool = False,
        severity: str = "error",
    ) -> Problem:
        """Build a Problem located at `path`, or at its nearest located parent."""
        marks = self.key_marks if at_key else self.value_marks
        probe = path
        while probe and probe not in marks and probe not in self.value_marks:
            probe = probe[:-1]
        line, column = (
            marks.get(probe)
            or self.value_marks.get(probe)
            or (
                self.line,
                self.column,
            )
        )
        return Problem(self.file, line, column, format_path(path), message, severity)


def format_path(path: PathKey) -> str:
    """Render a key path as budgets[1].limit_usd."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text


# Aliases let a few hundred bytes expand to billions of values ("billion
# laughs"), and nesting can exhaust the stack; both are stopped here.
MAX_VALUES = 200_000
MAX_DEPTH = 64


class _TooLarge(Exception):
    """A document expands past MAX_VALUES, nests past MAX_DEPTH, or loops."""

    def __init__(self, node: yaml.Node, message: str) -> None:
        super().__init__(message)
        self.node = node


class _Builder:
    """Turn a composed node tree into values, recording marks and problems."""

    def __init__(self, document: Document, problems: list[Problem]) -> None:
        self.document = document
        self.problems = problems
        self.constructor = yaml.SafeLoader("")
        self.values = 0
        self.open_nodes: set[int] = set()

    def build(self, node: yaml.Node, path: PathKey) -> Any:
        self.values += 1
        if self.values > MAX_VALUES:
            raise _TooLarge(node, f"document expands to more than {MAX_VALUES} values")
        if len(path) > MAX_DEPTH:
            raise _TooLarge(node, f"document nests deeper than {MAX_DEPTH} levels")
        if id(node) in self.open_nodes:
            raise _TooLarge(node, "an alias refers to a node that contains it")
        self.document.value_marks[path] = _mark(node)
        if isinstance(node, yaml.MappingNode | yaml.SequenceNode):
            self.open_nodes.add(id(node))
            try:
                if isinstance(node, yaml.MappingNode):
                    return self._mapping(node, path)
                return [
                    self.build(item, (*path, i)) for i, item in enumerate(node.value)
                ]
            finally:
                self.open_nodes.discard(id(node))
        return self._scalar(node, path)

    def _mapping(self, node: yaml.MappingNode, path: PathKey) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                self._error(key_node, path, "YAML merge keys (<<) are not supported")
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self._error(key_node, path, "mapping keys must be plain strings")
                continue
            key = str(key_node.value)
            child = (*path, key)
            if key in result:
                self._error(key_node, child, f"duplicate key {key!r}")
                continue
            self.document.key_marks[child] = _mark(key_node)
            result[key] = self.build(value_node, child)
        return result

    def _scalar(self, node: yaml.Node, path: PathKey) -> Any:
        if node.tag == _FLOAT_TAG:
            text = str(node.value).replace("_", "")
            try:
                number = Decimal(text)
            except InvalidOperation:
                number = None
            if number is None or not number.is_finite():
                self._error(node, path, f"{node.value!r} is not a finite number")
                return None
            return number
        if node.tag == "tag:yaml.org,2002:timestamp":
            # Kept as text: the reader parses it with datetime.fromisoformat.
            return str(node.value)
        try:
            return self.constructor.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, KeyError, TypeError) as error:
            # Explicit tags such as !!int abc, or integers of thousands of digits.
            self._error(node, path, f"invalid value {str(node.value)[:40]!r}: {error}")
            return None

    def _error(self, node: yaml.Node, path: PathKey, message: str) -> None:
        line, column = _mark(node)
        self.problems.append(
            Problem(self.document.file, line, column, format_path(path), message)
        )


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def read_documents(
    path: Path, display_name: str
) -> tuple[list[Document], list[Problem]]:
    """Read every document of one YAML file; syntax errors become Problems."""
    try:
        data = path.read_bytes()
    except OSError as error:
        return [], [Problem(display_name, 1, 1, "", f"cannot read file: {error}")]
    return parse_documents(data, display_name)


def parse_documents(
    data: bytes, display_name: str
) -> tuple[list[Document], list[Problem]]:
    """Parse the bytes of one YAML file; syntax errors become Problems."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        return [], [Problem(display_name, 1, 1, "", f"file is not UTF-8: {error}")]

    problems: list[Problem] = []
    documents: list[Document] = []
    try:
        for index, node in enumerate(yaml.compose_all(text, Loader=yaml.SafeLoader)):
            empty = isinstance(node, yaml.ScalarNode) and node.value == ""
            if node is None or empty:
                continue  # An empty document, such as a trailing "---".
            line, column = _mark(node)
            document = Document(display_name, index, None, line, column)
            try:
                document.data = _Builder(document, problems).build(node, ())
            except _TooLarge as error:
                line, column = _mark(error.node)
                problems.append(Problem(display_name, line, column, "", str(error)))
                continue
            documents.append(document)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        reason = error.problem or error.context or "invalid YAML"
        start = error.context_mark
        if error.problem and error.context and start is not None:
            # Such as "found unexpected end of stream while scanning a quoted
            # scalar": the construct's start is where the mistake usually is.
            where = f"at line {start.line + 1}, column {start.column + 1}"
            if "end of stream" in error.problem:
                mark, where = start, "here"
            reason = f"{error.problem} {error.context} that starts {where}"
        line = mark.line + 1 if mark else 1
        column = mark.column + 1 if mark else 1
        problems.append(
            Problem(display_name, line, column, "", f"invalid YAML: {reason}")
        )
    except yaml.YAMLError as error:
        problems.append(Problem(display_name, 1, 1, "", f"invalid YAML: {error}"))
    except RecursionError:
        # The composer recurses too; thousands of nested brackets exhaust it.
        problems.append(
            Problem(
                display_name, 1, 1, "", f"document nests deeper than {MAX_DEPTH} levels"
            )
        )
    return documents, problems
