"""Where the suite's time goes: each test's setup, call and teardown, summed per module, written
to tests/artifacts/timings.json after every test, so a session that is killed or crashes still
tells where its time went (docs/architecture.md, Tests).

    python -m pytest ... && python tests/timings.py     # the per-module table, slowest first
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

OUT = Path(__file__).resolve().parent / "artifacts" / "timings.json"
_phases: dict[str, dict[str, float]] = defaultdict(dict)
_outcomes: dict[str, str] = {}
_failures: dict[str, str] = {}  # the end of each failure's report: why, where the output is lost
_started = time.monotonic()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _phases[report.nodeid][report.when] = round(report.duration, 2)
    if report.when == "call" or report.outcome != "passed":
        _outcomes[report.nodeid] = report.outcome
    if report.failed:
        _failures[report.nodeid] = report.longreprtext[-3000:]
    if report.when == "teardown":
        write()


def write() -> None:
    modules: dict[str, dict[str, float]] = defaultdict(lambda: {"tests": 0, "seconds": 0.0})
    for nodeid, phases in _phases.items():
        module = modules[nodeid.split("::")[0]]
        module["tests"] += 1
        module["seconds"] = round(module["seconds"] + sum(phases.values()), 2)
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps({"wall_s": round(time.monotonic() - _started, 1),
                               "modules": dict(sorted(modules.items(), key=lambda m: -m[1]["seconds"])),
                               "tests": {n: {**p, "outcome": _outcomes.get(n)} for n, p in _phases.items()},
                               "failures": _failures},
                              indent=1))


def table(path: Path = OUT) -> str:
    timings = json.loads(path.read_text())
    rows = [f"| `{name}` | {m['tests']} | {m['seconds'] / 60:.1f} |" for name, m in timings["modules"].items()]
    return "\n".join([f"Wall time {timings['wall_s'] / 60:.1f} min.", "",
                      "| module | tests | minutes |", "|---|---:|---:|", *rows])


if __name__ == "__main__":
    print(table(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT))
