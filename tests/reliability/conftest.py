"""The reliability and fault suite: bad inputs, injected faults, security checks; one summary line.

Reuses the flow fixtures (Prefect's test server, the tiny model, scene images) of tests/flows.
Each test carries one marker (`bad_input`, `fault` or `security`); the session's last line of
output counts them: "bad inputs 43/43 clear, faults 14/14 survived, lost 0, duplicated 0, ...".
Tests that compare outputs before and after a fault add what they found to `tally`.
"""

from __future__ import annotations

import logging

import pytest

from tests.flows.conftest import env_clean, flow_model, prefect_server  # noqa: F401 - fixtures reused

_KINDS = {"bad_input": "bad inputs", "fault": "faults", "security": "security checks"}
_VERBS = {"bad_input": "clear", "fault": "survived", "security": "held"}
_COUNTS: dict[str, list[int]] = {k: [0, 0] for k in _KINDS}  # kind -> [passed, run]
_TALLY = {"lost": 0, "duplicated": 0, "rewritten": 0}


def pytest_configure(config: pytest.Config) -> None:
    for kind, what in _KINDS.items():
        config.addinivalue_line(
            "markers", f"{kind}: reliability suite, counted as one of the {what}"
        )


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "tests/reliability/" not in report.nodeid.replace("\\", "/"):
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        kind = next((k for k in _KINDS if k in report.keywords), None)
        if kind is not None:
            _COUNTS[kind][1] += 1
            _COUNTS[kind][0] += report.outcome == "passed"


class Tally:
    """What fault tests found: edits lost, duplicated, or rewritten (by digest / ETag / inode)."""

    def add(self, *, lost: int = 0, duplicated: int = 0, rewritten: int = 0) -> None:
        _TALLY["lost"] += lost
        _TALLY["duplicated"] += duplicated
        _TALLY["rewritten"] += rewritten


@pytest.fixture
def tally() -> Tally:
    return Tally()


def summary_line() -> str:
    parts = [f"{_KINDS[k]} {p}/{n} {_VERBS[k]}" for k, (p, n) in _COUNTS.items() if n]
    parts += [f"{k} {v}" for k, v in _TALLY.items()]
    return ", ".join(parts)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ARG001
    if any(n for _, n in _COUNTS.values()):
        terminalreporter.write_line("reliability: " + summary_line())


class _Collect:
    """Log records of editflow's own loggers (Prefect's logging setup replaces root handlers,
    so caplog misses records emitted inside flow runs)."""

    def __init__(self) -> None:
        self.records: list[logging.LogRecord] = []

    @property
    def text(self) -> str:
        return "\n".join(f"{r.levelname} {r.name}: {r.getMessage()}" for r in self.records)


@pytest.fixture
def editflow_log():
    collect = _Collect()

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            collect.records.append(record)

    handler = Handler(level=logging.INFO)
    names = ("tasks", "storage", "flows", "manifests", "editing")
    saved = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).addHandler(handler)
        logging.getLogger(n).setLevel(logging.INFO)
    try:
        yield collect
    finally:
        for n in names:
            logging.getLogger(n).removeHandler(handler)
            logging.getLogger(n).setLevel(saved[n])
