"""The alerting and recording rules (config/prometheus/) are valid (`promtool check rules`),
their unit tests pass (`promtool test rules`), and in a real Prometheus scraping a real agent
the NATS alert fires within its `for` window once nats-server is stopped, and resolves once it
is back."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.embedded import NatsServer, stop_process
from lab.daemon import free_port
from tests.campaign import restart
from tests.support import ROOT
from tests.support.agents import AgentProcess
from tests.support.bus import eventually

RULES = ROOT / "config" / "prometheus"

pytestmark = pytest.mark.skipif(
    shutil.which("promtool") is None or shutil.which("prometheus") is None,
    reason="Debian package prometheus missing (python -m lab.prereqs installs it)",
)


def test_the_rules_are_valid_and_their_unit_tests_pass() -> None:
    check = subprocess.run(["promtool", "check", "rules", "virt-agent.rules.yml"], cwd=RULES,
                           capture_output=True, text=True, check=False)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run(["promtool", "test", "rules", "virt-agent.rules.test.yml"], cwd=RULES,
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert unit.returncode == 0, unit.stdout + unit.stderr


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """A Prometheus of the test's own, evaluating the shipped rules every second; call it
    with the agent's host:port to start it; it returns Prometheus's base URL."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(target: str) -> str:
        port = free_port()
        conf = tmp_path / "prometheus.yml"
        conf.write_text(json.dumps({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES / "virt-agent.rules.yml")],
            "scrape_configs": [{"job_name": "virt-agent",
                                "static_configs": [{"targets": [target]}]}],
        }))  # fmt: skip
        with open(tmp_path / "prometheus.log", "wb") as out:
            procs.append(subprocess.Popen(
                ["prometheus", f"--config.file={conf}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port}"],
                stdout=out, stderr=subprocess.STDOUT,
            ))  # fmt: skip
        return f"http://127.0.0.1:{port}"

    yield start
    for p in procs:
        stop_process(p)  # type: ignore[arg-type]


def get(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return None


def alert_state(base: str, name: str) -> str | None:
    body = get(f"{base}/api/v1/alerts")
    if not body:
        return None
    states = [a["state"] for a in body["data"]["alerts"] if a["labels"]["alertname"] == name]
    return states[0] if states else "inactive"


async def test_the_nats_alert_fires_in_prometheus_and_resolves(
    nats_server: NatsServer,
    agent_process: Callable[..., AgentProcess],
    prometheus: Callable[[str], str],
    tmp_path: Path,
) -> None:
    http = f"127.0.0.1:{free_port()}"
    agent_process("--libvirt-uri", "test:///default", "--nats-url", nats_server.url,
                  "--host-id", "prom", "--http-addr", http, "--state-dir", str(tmp_path / "st"))  # fmt: skip
    base = prometheus(http)

    def scraped() -> bool:
        body = get(f"{base}/api/v1/query?query=virt_agent_nats_connected")
        return bool(body and body["data"]["result"]
                    and body["data"]["result"][0]["value"][1] == "1")  # fmt: skip

    await eventually(scraped, 60, "Prometheus scrapes the connected agent")
    assert alert_state(base, "VirtAgentNatsDisconnected") == "inactive"
    t0 = time.monotonic()
    await asyncio.to_thread(nats_server.stop)
    await eventually(lambda: alert_state(base, "VirtAgentNatsDisconnected") == "firing", 60,
                     "the NATS alert firing")  # fmt: skip
    fired_after = time.monotonic() - t0
    assert 30 <= fired_after < 30 + 15, f"fired after {fired_after:.1f} s; its for: is 30 s"
    await asyncio.to_thread(restart, nats_server)
    await eventually(lambda: alert_state(base, "VirtAgentNatsDisconnected") == "inactive", 60,
                     "the NATS alert resolved")  # fmt: skip
