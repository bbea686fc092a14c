"""Agents for tests: in-process (`RunningAgent`, started by the `start_agent` fixture) or as
`virt-agent run` processes (`AgentProcess`), on test settings."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from agent.settings import Settings
from agent.settings_load import load
from agent.supervisor import Agent
from tests.support import ROOT

# An agent that notices a libvirtd going away within seconds and reconnects at once.
FAST_RECONNECT = {
    "libvirt.keepalive_interval_s": 1,
    "libvirt.keepalive_count": 2,
    "libvirt.reconnect_min_s": 0.2,
    "libvirt.reconnect_max_s": 1.0,
}


def agent_settings(tmp_path: Path, nats_url: str, **overrides: Any) -> Settings:
    base = {
        "host_id": f"h{uuid.uuid4().hex[:8]}",
        "state_dir": str(tmp_path / "state"),
        "nats.urls": [nats_url],
        "libvirt.uri": "test:///default",
        "http.listen": "127.0.0.1:0",
        "agent.heartbeat_interval_s": 3600.0,
        # test:///default's host has 3 GiB and its `test` domain 8: admission (failover.admit)
        # would refuse every migration there for memory (tests/test_admission.py sets its own).
        "failover.memory_overcommit": 16.0,
    }
    base.update(overrides)
    return load(None, env={}, overrides=base).settings


class RunningAgent:
    def __init__(self, agent: Agent, task: asyncio.Task[None]) -> None:
        self.agent = agent
        self.task = task

    @property
    def host(self) -> str:
        return self.agent.host

    async def stop(self) -> None:
        self.agent.request_stop("test")
        await asyncio.wait_for(self.task, 30)

    async def settled(self, timeout: float = 60.0) -> None:
        """Wait until libvirt has gone quiet and JetStream acknowledged everything queued."""
        deadline = time.monotonic() + timeout
        pub = self.agent.publisher
        while True:
            received = pub.received
            await asyncio.sleep(0.05)
            if pub.received == received and pub.idle():
                return
            if time.monotonic() > deadline:
                spool = pub.spool
                raise AssertionError(
                    f"agent not settled: depth {pub.depth}, in flight {len(pub._inflight)}, "
                    f"spool {'-' if spool is None else (spool.depth, spool.bytes, spool.empty())}"
                )


class AgentProcess:
    """`virt-agent run` as a real process (for signals and exit statuses)."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path, crash_at: str = "") -> None:
        self.log = log
        # With a crash point: the test harness's entry, which arms it (agent/crashpoints.py).
        entry = ["tests.crashing_agent", crash_at] if crash_at else ["agent"]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", *entry, "run", *args],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
