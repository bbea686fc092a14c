"""Events caused by another process, through a libvirtd serving the test driver over TCP."""

from __future__ import annotations

import asyncio
import itertools
import signal
import sys
import threading
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import libvirt
import pytest
from nats.aio.client import Client as NATS

from agent.bus import subscribed
from agent.embedded import NatsServer
from agent.streams import EVENTS_STREAM
from lab.daemon import LibvirtDaemon
from tests.support import ROOT
from tests.support.agents import AgentProcess, RunningAgent
from tests.support.bus import Collector, stream_messages
from tests.support.domains import Flipper, define

pytestmark = pytest.mark.daemon


async def wait_for_subject(nc: NATS, subject: str, timeout: float = 20.0) -> dict[str, Any]:
    c = Collector()
    sub = await nc.subscribe(subject, cb=c.on_msg)
    await subscribed(nc)
    try:
        return await c.wait_for(lambda _e: True, timeout)
    finally:
        await sub.unsubscribe()


async def test_sigterm_during_a_burst_loses_no_delivered_event(
    test_daemon: LibvirtDaemon,
    nats_server: NatsServer,
    nc: NATS,
    agent_process: Callable[..., AgentProcess],
) -> None:
    """SIGTERM while another process floods events: every event the agent received is stored, no gaps."""
    host = f"p{uuid.uuid4().hex[:8]}"
    started = asyncio.create_task(wait_for_subject(nc, f"virt.{host}.host.resync"))
    await asyncio.sleep(0.05)
    p = agent_process(
        "--libvirt-uri", test_daemon.test_uri, "--nats-url", nats_server.url,
        "--host-id", host, "--http-addr", "", "--state-dir", str(nats_server.store_dir.parent / "st"),
    )  # fmt: skip
    await started
    flipper = await asyncio.to_thread(lambda: Flipper(test_daemon.test_uri).start())
    try:
        await asyncio.sleep(1.5)
        p.signal(signal.SIGTERM)
        # Generous against the agent's own bound: past shutdown_grace_s (15 s) it exits 1.
        code = await asyncio.to_thread(p.wait, 60)
    finally:
        await asyncio.to_thread(flipper.stop)
    assert code == 0, p.output()[-3000:]
    assert "stop requested" in p.output(), "the SIGTERM reached the agent"

    stored = await stream_messages(nc, EVENTS_STREAM, f"virt.{host}.>")
    last = stored[-1][1]
    assert last["type"] == "virt.host.agent_stopping"
    received = last["data"]["counters"]["events_received"]
    domain_events = [ev for _, ev, _ in stored if ev["type"] == "virt.domain.lifecycle"]
    assert received == len(domain_events)
    assert received > 500, "the burst was too small to mean anything"
    assert last["data"]["counters"]["events_dropped"] == 0
    seqs = [ev["sequence"] for _, ev, _ in stored]
    assert seqs == list(range(1, len(seqs) + 1)), "a gap or a reordering in sequence"
    flips = [
        ev["data"]["event"] for ev in domain_events if ev["subject"] == flipper.dom.UUIDString()
    ]
    assert all(a != b for a, b in itertools.pairwise(flips)), "suspend/resume must alternate"


async def test_events_keep_flowing_while_executor_threads_call_libvirt(
    test_daemon: LibvirtDaemon,
    start_agent: Callable[..., Awaitable[RunningAgent]],
    collect: Callable[[str], Awaitable[Collector]],
) -> None:
    """libvirt RPCs from executor threads while callbacks run on the loop: nothing lost or broken."""
    agent = await start_agent(**{"libvirt.uri": test_daemon.test_uri})
    c = await collect(f"virt.{agent.host}.event.>")
    flipper = await asyncio.to_thread(lambda: Flipper(test_daemon.test_uri).start())
    try:
        for _ in range(20):
            snaps = await asyncio.gather(*(agent.agent.hypervisor.snapshot() for _ in range(8)))
            assert all(any(d.uuid == flipper.dom.UUIDString() for d in s) for s in snaps)
    finally:
        await asyncio.to_thread(flipper.stop)
    u = flipper.dom.UUIDString()
    await c.wait_for(lambda e: e["subject"] == u and e["data"]["event"] == "undefined", 20)
    flips = [
        e
        for e in c.events()
        if e["subject"] == u and e["data"]["event"] in ("suspended", "resumed")
    ]
    assert len(flips) == flipper.count
    assert agent.agent.hypervisor.decode_errors == 0


async def test_events_command_tails_the_bus(
    test_daemon: LibvirtDaemon,
    nats_server: NatsServer,
    start_agent: Callable[..., Awaitable[RunningAgent]],
) -> None:
    """`virt-agent events` prints one readable line per event, filtered by host, domain and type."""
    agent = await start_agent(**{"libvirt.uri": test_daemon.test_uri})
    conn = libvirt.open(test_daemon.test_uri)
    dom = define(conn)
    name = dom.name()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "events", "--nats-url", nats_server.url,
        "--host", agent.host, "--domain", name, "--type", "lifecycle", "--count", "3",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        line = await asyncio.wait_for(proc.stderr.readline(), 30)
        assert line.startswith(b"# listening on "), line
        other = define(conn)
        for d in (other, dom):
            d.create()
            d.suspend()
            d.destroy()
        out, _ = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
        for d in (dom, other):
            d.undefine()
        conn.close()
    lines = out.decode().strip().splitlines()
    assert len(lines) == 3, lines
    assert [ln.split()[-1] for ln in lines] == [
        "started/booted",
        "suspended/paused",
        "stopped/destroyed",
    ]
    assert all(f" {agent.host} " in ln and name in ln for ln in lines)


async def test_a_failing_event_loop_change_does_not_stall_the_ones_behind_it() -> None:
    """libvirt's handle and timer changes from other threads are applied on the loop, one wake-up per batch: a change that fails (a descriptor closed meanwhile) is reported, and the changes queued behind it still apply."""
    from agent.libvirt_loop import LoopSafeEventImpl  # noqa: PLC0415

    loop = asyncio.get_running_loop()
    impl = LoopSafeEventImpl(loop, threading.get_ident())
    applied: list[int] = []
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx))

    def fail() -> None:
        raise OSError("descriptor closed meanwhile")

    def from_a_thread() -> None:
        impl._run(fail)
        impl._run(lambda: applied.append(1))
        impl._run(lambda: applied.append(2))

    try:
        await asyncio.to_thread(from_a_thread)
        for _ in range(100):
            if applied == [1, 2]:
                break
            await asyncio.sleep(0.01)
    finally:
        loop.set_exception_handler(previous)
    assert applied == [1, 2]
    assert [str(c["exception"]) for c in reported] == ["descriptor closed meanwhile"]
