"""Logs that say who: every JSON line names the module that logged it (`logger`), the
agent's own (`structlog.get_logger("agent.x")`) and the libraries' (stdlib logging) alike; a
command's lines carry its verb, caller and request id (tests/test_hostile.py)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support import ROOT

SNIPPET = """
import logging, structlog
from agent.logging import configure
configure("info", "json")
structlog.get_logger("agent.publisher").warning("one", n=1)
logging.getLogger("nats.aio.client").warning("two")
structlog.get_logger().info("three")
"""


def test_every_line_names_its_logger() -> None:
    p = subprocess.run([sys.executable, "-c", SNIPPET], cwd=ROOT, capture_output=True,
                       text=True, timeout=60, check=True)  # fmt: skip
    lines = [json.loads(line) for line in p.stderr.splitlines()]
    assert [(x["event"], x.get("logger")) for x in lines] == [
        ("one", "agent.publisher"), ("two", "nats.aio.client"), ("three", None)]  # fmt: skip
