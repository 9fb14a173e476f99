"""Shows what protocol tests recorded for people, e.g. the planner's request count per profile."""

from __future__ import annotations

import pytest


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the `planner` properties of passed and failed tests after the run."""
    lines = [
        str(value)
        for key in ("passed", "failed")
        for report in terminalreporter.stats.get(key, [])
        for name, value in getattr(report, "user_properties", [])
        if name == "planner" and getattr(report, "when", "call") == "call"
    ]
    if lines:
        terminalreporter.write_sep("-", "read plans per shipped profile")
        for line in lines:
            terminalreporter.write_line(line)
