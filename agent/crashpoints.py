"""A test-only switch that makes the agent die (like kill -9) at a named point of
migrate-with-failover, so the crash-safety tests can stop it at every step boundary.

`VIRT_AGENT_TEST_EXIT_AT=<point>`: the process exits with status 86 when it reaches that
point, without cleanup. Points on the source: the steps `plan`, `reserve`, `unplug`,
`migrate`, `replug`, `verify`; on the destination: `dest.reserve` (reservation recorded, not
yet answered) and `dest.replug` (asked to plug, not yet plugged). Unset in production.
"""

from __future__ import annotations

import os
import sys

ENV = "VIRT_AGENT_TEST_EXIT_AT"
EXIT_STATUS = 86


def reached(point: str) -> None:
    if os.environ.get(ENV) == point:
        sys.stderr.write(f'{{"event": "test exit point reached", "point": "{point}"}}\n')
        sys.stderr.flush()
        os._exit(EXIT_STATUS)
