"""Fail when a test of the quick tier takes longer than its budget.

Reads the JUnit XML file that ``python -m pytest --junitxml=FILE`` wrote, with each test's
phases recorded as properties (``setup_seconds``, ``call_seconds``, ``teardown_seconds``; see
``tests/conftest.py``). A test's own time is its call; its setup holds the fixtures it is the
first to need, such as a run trained once per session and read by several tests, and gets the
larger budget. The budgets are about order of magnitude, not noise: a test over them is to be
shrunk, made to share a fixture, or marked ``slow``.

    python .ci/check_durations.py quick.xml --call-budget 15 --setup-budget 45
"""

from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET


def phase_seconds(path: str) -> dict[str, dict[str, float]]:
    """``{"setup": {test: seconds}, "call": {...}, "teardown": {...}}`` from a JUnit XML file."""
    phases: dict[str, dict[str, float]] = {"setup": {}, "call": {}, "teardown": {}}
    for case in ET.parse(path).iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        for prop in case.iter("property"):
            phase = prop.get("name", "").removesuffix("_seconds")
            if phase in phases:
                phases[phase][name] = float(prop.get("value", "0"))
    if not phases["call"] and not phases["setup"]:
        raise SystemExit(f"{path}: no test records its phases' seconds (is tests/conftest.py's hook there?)")
    return phases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("junit_xml")
    parser.add_argument("--call-budget", type=float, default=15.0, help="seconds for a test's own run")
    parser.add_argument("--setup-budget", type=float, default=45.0, help="seconds for a test's fixtures")
    args = parser.parse_args(argv)
    phases = phase_seconds(args.junit_xml)
    over = []
    for phase, budget in (
        ("call", args.call_budget),
        ("setup", args.setup_budget),
        ("teardown", args.setup_budget),
    ):
        if not phases[phase]:
            continue
        name, seconds = max(phases[phase].items(), key=lambda item: item[1])
        print(f"slowest {phase}: {seconds:.1f} s (budget {budget:g} s) {name}")
        over += [(s, phase, n, budget) for n, s in phases[phase].items() if s > budget]
    for seconds, phase, name, budget in sorted(over, reverse=True):
        print(f"over budget: {name} {phase} {seconds:.1f} s > {budget:g} s", file=sys.stderr)
    if over:
        print(
            "Shrink these tests, let them share a fixture (tests/conftest.py), or mark them slow",
            file=sys.stderr,
        )
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
