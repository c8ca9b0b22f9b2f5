"""The hostile-input suite's shared harness and its report.

Every module adds its counts to :data:`TOTALS`; at the end of the session the totals are
printed (whatever ``-s`` says) and written to ``hostile-summary.json`` in the session's
temporary folder.  Each test asserts its own zeros, so a count above zero fails a test.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hostile._harness import Harness

#: Counts of the whole session: tried, refused, escaped, traceback, defect, canaries, secret_hits.
TOTALS: Counter[str] = Counter()
_SUMMARY: dict[str, Path] = {}


@pytest.fixture(scope="session")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    """One harness (stub commands, baseline card) for the session; its tally joins the totals."""
    h = Harness(tmp_path_factory.mktemp("hostile"))
    _SUMMARY["path"] = tmp_path_factory.getbasetemp() / "hostile-summary.json"
    yield h
    TOTALS.update(h.tally)
    TOTALS["secret_hits"] += h.secret_hits


@pytest.fixture(scope="session")
def totals(tmp_path_factory: pytest.TempPathFactory) -> Counter[str]:
    """The session's counts, for modules that try cases without the harness."""
    _SUMMARY["path"] = tmp_path_factory.getbasetemp() / "hostile-summary.json"
    return TOTALS


def summary_line(counts: Counter[str]) -> str:
    """The one-line report."""
    refused = counts["refused"]
    return (
        f"hostile-input suite: {counts['tried']} cases tried, {refused} refused with a clear ConfigError, "
        f"{counts['escaped']} escaped (rendered safely), {counts['traceback']} tracebacks, "
        f"{counts['defect']} other defects, {counts['canaries']} canaries, "
        f"{counts['secret_hits']} secret values in files"
    )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not TOTALS["tried"]:
        return
    line = summary_line(TOTALS)
    terminalreporter.write_sep("=", "hostile-input suite")
    terminalreporter.write_line(line)
    path = _SUMMARY.get("path")
    if path is not None:
        path.write_text(json.dumps({**TOTALS, "line": line}, indent=2), encoding="utf-8")
        terminalreporter.write_line(f"(written to {path})")
