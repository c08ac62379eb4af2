"""Options and fixtures shared by the unit tests; keep each small and say which tests read it."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    """`--update-goldens` lets a reviewer regenerate the golden files (`testdata/out/*`, the chart's
    `testdata/chart/*`) and read the change as a git diff."""
    parser.addoption(
        "--update-goldens",
        action="store_true",
        default=False,
        help="rewrite the golden files of tests/test_render.py and tests/test_chart.py from the current output",
    )
