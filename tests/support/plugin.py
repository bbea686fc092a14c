"""The suite's fixtures (a pytest plugin, named in tests/conftest.py): a real nats-server
per test, agents in-process or as processes, a libvirtd serving the test driver over TCP (an
event source outside the agent's process), this process's test:///default, and the guard
that nothing a test starts outlives it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import psutil
import pytest
from nats.aio.client import Client as NATS

from agent.bus import subscribed
from agent.embedded import NatsServer
from agent.supervisor import Agent
from lab.agents import agent_env
from lab.daemon import LibvirtDaemon
from lab.lab import remove_domain
from lab.prereqs import LabUnavailable
from tests.support.agents import AgentProcess, RunningAgent, agent_settings
from tests.support.bus import SECURED_CONF, Collector

# How long a test's threads and processes may take to end after it, before they count as leaked.
LEAK_GRACE_S = 10.0


def descendants() -> dict[int, str]:
    """Live processes below this one (pid -> name); zombies are gone."""
    out = {}
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if child.status() != psutil.STATUS_ZOMBIE:
                out[child.pid] = child.name()
    return out


def _stray_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    # The session loop's default executor keeps its idle workers (asyncio_N) between tests.
    return [
        t
        for t in threading.enumerate()
        if t not in before and t.is_alive() and not t.name.startswith("asyncio_")
    ]


@pytest.fixture(autouse=True)
def nothing_outlives_the_test() -> Iterator[None]:
    """Threads and processes a test starts are gone at its end, also when it failed: a leak
    is an error of the test that leaked, and leaked processes are killed here, so that they
    cannot disturb the tests after it."""
    threads = set(threading.enumerate())
    procs = set(descendants())
    yield
    deadline = time.monotonic() + LEAK_GRACE_S
    while True:
        stray_threads = _stray_threads(threads)
        stray_procs = {p: n for p, n in descendants().items() if p not in procs}
        if (not stray_threads and not stray_procs) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for pid in stray_procs:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if stray_threads or stray_procs:
        pytest.fail(
            f"the test left running: threads {[t.name for t in stray_threads]}, "
            f"processes {sorted(stray_procs.items())} (processes killed)",
            pytrace=False,
        )


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A real nats-server with JetStream on a random port, its store in the test's tmp dir."""
    server = NatsServer(tmp_path / "nats").start()
    yield server
    server.stop()


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server with config/nats-server.conf.example: per-host users hv01..hv03, a
    controller and a monitor, each with the password `change-me-<user>`."""
    server = NatsServer(tmp_path / "nats", config_file=SECURED_CONF).start()
    yield server
    server.stop()


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NATS]:
    """A plain NATS client on the test's server."""
    client = await nats.connect(nats_server.url)
    yield client
    await client.close()


@pytest.fixture
async def start_agent(
    tmp_path: Path, nats_server: NatsServer
) -> AsyncIterator[Callable[..., Awaitable[RunningAgent]]]:
    """Start in-process agents on the test's nats-server; each is stopped at teardown."""
    running: list[RunningAgent] = []

    async def start(**overrides: Any) -> RunningAgent:
        settings = agent_settings(tmp_path / f"a{len(running)}", nats_server.url, **overrides)
        agent = Agent(settings)
        task = asyncio.create_task(agent.run())
        ready = asyncio.create_task(agent.ready.wait())
        done, _ = await asyncio.wait({task, ready}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        if ready not in done:
            ready.cancel()
            if task.done():
                task.result()
            raise AssertionError("agent did not become ready")
        r = RunningAgent(agent, task)
        running.append(r)
        return r

    yield start
    for r in running:
        if not r.task.done():
            await r.stop()


@pytest.fixture(scope="session")
def test_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LibvirtDaemon]:
    """A libvirtd (own mount namespace, own TCP port) serving the shared test driver."""
    daemon = LibvirtDaemon(tmp_path_factory.mktemp("lab"), "events")
    try:
        daemon.start()
    except LabUnavailable as exc:
        pytest.skip(str(exc))
    yield daemon
    daemon.stop()


@pytest.fixture
async def collect(nc: NATS) -> Callable[[str], Awaitable[Collector]]:
    """Subscribe a Collector to a subject pattern on the test's server."""

    async def sub(subject: str) -> Collector:
        c = Collector()
        await nc.subscribe(subject, cb=c.on_msg)
        await subscribed(nc)
        return c

    return sub


@pytest.fixture
def agent_process(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Start `virt-agent run` processes; any still running are killed at teardown."""
    procs: list[AgentProcess] = []

    def start(*args: str, env: dict[str, str] | None = None, crash_at: str = "") -> AgentProcess:
        full_env = agent_env(VIRT_AGENT_LOG_FORMAT="json", **(env or {}))
        p = AgentProcess(list(args), full_env, tmp_path / f"agent{len(procs)}.log", crash_at)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.kill()


@pytest.fixture
async def testdrv() -> AsyncIterator[Any]:
    """A connection of the test's own to test:///default; domains named t-* are removed after."""
    import libvirt  # noqa: PLC0415

    from agent import libvirt_loop  # noqa: PLC0415

    # The driver dispatches events through the event loop registered before it first opens.
    libvirt_loop.ensure_registered(asyncio.get_running_loop())
    conn = libvirt.open("test:///default")
    yield conn
    for dom in conn.listAllDomains(0):
        if dom.name().startswith("t-"):
            remove_domain(dom)
    conn.close()
