"""Crash points for the crash-safety tests: the agent dies (like kill -9) at a named point of
migrate-with-failover, so the tests can stop it at every step boundary.

Points on the source: the steps `plan`, `reserve`, `unplug`, `migrate`, `replug`, `verify`; on
the destination: `dest.reserve` (reservation recorded, not yet answered) and `dest.replug`
(asked to plug, not yet plugged); for `migrate`: `migrate.done` (the migration call returned,
its outcome not yet recorded). Only the test harness arms one (`python -m
tests.crashing_agent POINT run ...`, which calls `arm` before the agent starts); nothing in
`virt-agent` does, and the environment cannot: a production process never exits here.
"""

from __future__ import annotations

import os
import sys

EXIT_STATUS = 86

_armed: str | None = None


def arm(point: str) -> None:
    """Make this process exit with EXIT_STATUS when it reaches `point` (test harness only)."""
    global _armed
    _armed = point


def reached(point: str) -> None:
    if _armed == point:
        sys.stderr.write(f'{{"event": "test exit point reached", "point": "{point}"}}\n')
        sys.stderr.flush()
        os._exit(EXIT_STATUS)
