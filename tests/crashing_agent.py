"""The agent with one crash point armed (agent/crashpoints.py), for the crash-safety tests:
`python -m tests.crashing_agent POINT run ARGS...` is `virt-agent run ARGS...` that exits
with status 86 at POINT."""

from __future__ import annotations

import sys

from agent import crashpoints
from agent.cli import main

if __name__ == "__main__":
    crashpoints.arm(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
