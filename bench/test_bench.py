"""Tests of the bench's own arithmetic: percentiles, profile groups, docs sections.

Run them with `.venv/bin/pytest bench/test_bench.py`, because `make test`
covers tests/ only.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import _profile
import _report
from _results import percentile


@pytest.mark.parametrize(
    ("values", "percent", "expected"),
    [
        pytest.param([5.0], 99, 5.0, id="single"),
        pytest.param([1.0, 2.0, 3.0, 4.0], 50, 2.5, id="median-between"),
        pytest.param([1.0, 2.0, 3.0], 50, 2.0, id="median-exact"),
        pytest.param([float(v) for v in range(101)], 99, 99.0, id="p99-of-101"),
        pytest.param([1.0, 2.0], 100, 2.0, id="maximum"),
    ],
)
def test_percentile_interpolates(
    values: list[float], percent: float, expected: float
) -> None:
    assert percentile(values, percent) == pytest.approx(expected)


def test_percentile_empty_is_nan() -> None:
    assert math.isnan(percentile([], 50))


def test_write_section_appends_then_replaces(tmp_path: Path) -> None:
    path = tmp_path / "benchmarks.md"
    path.write_text("# Benchmarks\n\nIntro.\n", encoding="utf-8")

    _report.write_section(path, "baseline", "## baseline\n\nfirst\n")
    _report.write_section(path, "latest", "## latest\n\nsecond\n")
    _report.write_section(path, "latest", "## latest\n\nthird\n")
    text = path.read_text(encoding="utf-8")

    assert text.startswith("# Benchmarks\n\nIntro.\n")
    assert "first" in text
    assert "second" not in text
    assert text.count("## latest") == 1
    assert text.index("## baseline") < text.index("## latest")
    assert text.endswith("third\n<!-- /bench-run: latest -->\n")


def test_write_section_creates_file(tmp_path: Path) -> None:
    path = tmp_path / "new.md"

    _report.write_section(path, "latest", "## latest\n")

    assert path.read_text(encoding="utf-8").startswith("# Benchmarks\n")


@pytest.mark.parametrize(
    ("function", "category"),
    [
        pytest.param(
            ("/x/site-packages/tiktoken/core.py", 1, "encode"),
            _profile.TOKENS,
            id="tiktoken",
        ),
        pytest.param(
            ("/x/service/spendgate/evaluator.py", 1, "plan"),
            _profile.EVALUATION,
            id="evaluator",
        ),
        pytest.param(
            ("/x/site-packages/sqlalchemy/engine/base.py", 1, "execute"),
            _profile.SQL,
            id="sqlalchemy",
        ),
        pytest.param(
            ("/x/service/spendgate/server.py", 1, "_check_response"),
            _profile.PROTOBUF,
            id="response-builder",
        ),
        pytest.param(
            ("/x/service/spendgate/server.py", 1, "Check"),
            _profile.SERVER,
            id="servicer",
        ),
        pytest.param(
            ("~", 0, "<method 'SerializeToString' of 'Message' objects>"),
            _profile.PROTOBUF,
            id="c-serializer",
        ),
        pytest.param(
            ("/x/site-packages/other/mod.py", 1, "f"), _profile.OTHER, id="other"
        ),
    ],
)
def test_file_category_by_path(function: _profile.Function, category: str) -> None:
    assert _profile._file_category(function) == category


def test_c_function_takes_caller_categories() -> None:
    sqlalchemy = ("/x/site-packages/sqlalchemy/engine/default.py", 1, "do_execute")
    tokens = ("/x/service/spendgate/tokens.py", 1, "_count_exact")
    builtin = ("~", 0, "<built-in method builtins.len>")
    raw = {
        builtin: (
            4,
            4,
            1.0,
            1.0,
            {sqlalchemy: (3, 3, 0.75, 0.75), tokens: (1, 1, 0.25, 0.25)},
        ),
        sqlalchemy: (1, 1, 0.0, 0.75, {}),
        tokens: (1, 1, 0.0, 0.25, {}),
    }

    shares = _profile._shares(builtin, raw)

    assert shares[_profile.SQL] == pytest.approx(0.75)
    assert shares[_profile.TOKENS] == pytest.approx(0.25)
