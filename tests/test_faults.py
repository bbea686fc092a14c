"""Faults of the bus: a real three-node NATS cluster with JetStream replicas 3, and the node
the agent is connected to killed in the middle of a stream of events from another process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
import structlog.testing
from nats.js.api import StreamConfig

from agent.embedded import NatsServer
from lab.agents import answering
from lab.daemon import LibvirtDaemon, free_port
from tests.campaign import restart, start_cluster
from tests.support.agents import AgentProcess, RunningAgent
from tests.support.bus import stream_messages
from tests.support.domains import Flipper

pytestmark = [pytest.mark.faults, pytest.mark.daemon, pytest.mark.timeout(300)]

EVENTS = 20_000
# `make bench` runs this suite with this variable set and draws the fault table from it.
REPORT = os.environ.get("VIRT_AGENT_FAULT_REPORT", "")
# What the publisher logs when it starts spooling and when it is back on the memory queue.
SPOOL_SWITCHES = ("spooling to disk", "spool drained; back to the memory queue")


def report(fault: str, generated: int, stored: int, duplicates: int, recover_s: float) -> None:
    """One row of the fault table (bench/README.md), when asked for."""
    if REPORT:
        row = {"fault": fault, "generated": generated, "stored": stored,
               "lost": generated - stored, "duplicates": duplicates,
               "recover_s": round(recover_s, 2)}  # fmt: skip
        with open(REPORT, "a") as f:
            f.write(json.dumps(row) + "\n")


async def first_ack_after(pub: Any, timeout: float = 60) -> float:
    """Seconds until the publisher has a new JetStream acknowledgement (it publishes again)."""
    t0 = time.monotonic()
    before = pub.published
    await asyncio.wait_for(until(lambda: pub.published > before), timeout)
    return time.monotonic() - t0


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[list[NatsServer]]:
    """Three nats-servers routed into one cluster, JetStream on each."""
    nodes = start_cluster(tmp_path)
    try:
        yield nodes
    finally:
        for n in nodes:
            n.stop()


async def jetstream_ready(urls: list[str], timeout: float = 60) -> None:
    """Until the cluster has a JetStream meta leader and can place an R3 stream."""
    nc = await nats.connect(servers=urls)
    try:
        js = nc.jetstream()
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                await js.add_stream(StreamConfig(name="PROBE", subjects=["probe"], num_replicas=3))
            except Exception:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.5)
            else:
                await js.delete_stream("PROBE")
                return
    finally:
        await nc.close()


async def until(condition: Callable[[], bool], poll: float = 0.02) -> None:
    """Poll a counter another thread advances (no event to wait on)."""
    while not condition():  # noqa: ASYNC110 - the flipper thread only counts
        await asyncio.sleep(poll)


async def test_killing_the_connected_node_of_a_three_node_cluster_loses_and_doubles_nothing(
    nats_cluster: list[NatsServer],
    test_daemon: LibvirtDaemon,
    start_agent: Callable[..., Awaitable[RunningAgent]],
) -> None:
    """20,000 events from another process; the node the agent is connected to is killed
    (SIGKILL) a third of the way through. VIRT_EVENTS (replicas 3) ends with every event
    exactly once, sequences without a gap."""
    urls = [n.url for n in nats_cluster]
    await jetstream_ready(urls)
    agent = await start_agent(**{
        "libvirt.uri": test_daemon.test_uri, "nats.urls": urls, "nats.stream_replicas": 3,
        "publisher.ack_timeout_s": 2.0,
    })  # fmt: skip
    bus = agent.agent.bus.nc
    assert bus is not None
    assert bus.connected_url is not None
    connected = next(n for n in nats_cluster if n.port == bus.connected_url.port)

    flipper = await asyncio.to_thread(lambda: Flipper(test_daemon.test_uri).start())
    try:
        await until(lambda: flipper.count >= EVENTS // 3)
        connected.signal(signal.SIGKILL)
        t0 = time.monotonic()
        reconnects = agent.agent.metrics.nats_reconnects
        await asyncio.wait_for(until(lambda: reconnects._value.get() >= 1), 60)
        await first_ack_after(agent.agent.publisher)
        recover_s = time.monotonic() - t0
        await until(lambda: flipper.count >= EVENTS)
    finally:
        await asyncio.to_thread(flipper.stop)
    generated = flipper.count
    await agent.settled(timeout=90)
    pub = agent.agent.publisher
    assert pub.dropped == 0

    survivor = next(n for n in nats_cluster if n is not connected)
    nc = await nats.connect(survivor.url)
    try:
        stored = await stream_messages(nc, "VIRT_EVENTS", f"virt.{agent.host}.>")
    finally:
        await nc.close()
    ids = Counter(headers.get("Nats-Msg-Id") for _, _, headers in stored)
    flips = [ev for _, ev, _ in stored if ev.get("subject") == flipper.dom.UUIDString()
             and ev["data"].get("event") in ("suspended", "resumed")]  # fmt: skip
    report("NATS cluster (3 nodes, R3): the connected node SIGKILLed mid-stream", generated,
           len(flips), sum(c - 1 for c in ids.values()), recover_s)  # fmt: skip
    assert [i for i, c in ids.items() if c > 1] == [], "an event is stored twice"
    assert len(flips) == generated, f"{generated} generated, {len(flips)} stored"
    # A re-sent publish may land after later ones; each sequence number is there once.
    seqs = sorted(ev["sequence"] for _, ev, _ in stored)
    assert seqs == list(range(1, len(seqs) + 1)), "a gap in the sequence"
    assert agent.agent.metrics.nats_reconnects._value.get() >= 1


# ---------------------------------------------------------------- NATS unreachable: the spool


async def flip(uri: str, events: int) -> Flipper:
    """Suspend/resume a test-driver domain from another connection until `events` happened."""
    flipper = await asyncio.to_thread(lambda: Flipper(uri).start())
    try:
        await until(lambda: flipper.count >= events)
    finally:
        await asyncio.to_thread(flipper.stop)
    return flipper


async def stored_flips(
    url: str, host: str, dom_uuid: str
) -> tuple[list[dict[str, Any]], Counter[str]]:
    nc = await nats.connect(url)
    try:
        stored = await stream_messages(nc, "VIRT_EVENTS", f"virt.{host}.>")
    finally:
        await nc.close()
    ids = Counter(headers.get("Nats-Msg-Id", "") for _, _, headers in stored)
    flips = [ev for _, ev, _ in stored if ev.get("subject") == dom_uuid
             and ev["data"].get("event") in ("suspended", "resumed")]  # fmt: skip
    return flips, ids


async def all_stored_once_in_order(
    server: NatsServer, agent: RunningAgent, flipper: Flipper, recover_s: float, fault: str
) -> None:
    """Every flip stored once, in the order of its sequence; one row of the fault table."""
    flips, ids = await stored_flips(server.url, agent.host, flipper.dom.UUIDString())
    report(fault, flipper.count, len(flips), sum(c - 1 for c in ids.values()), recover_s)
    assert len(flips) == flipper.count
    assert [i for i, c in ids.items() if c > 1] == []
    seqs = [ev["sequence"] for ev in flips]
    assert seqs == sorted(seqs), "events are stored in their order"


async def test_events_while_nats_is_down_are_spooled_and_published_in_order_once_it_is_back(
    nats_server: NatsServer,
    test_daemon: LibvirtDaemon,
    start_agent: Callable[..., Awaitable[RunningAgent]],
) -> None:
    """nats-server stopped; 3,000 events happen; it starts again: every event is stored once,
    in the order of its sequence, the spool is empty again, and the publisher switched to the
    spool and back once for the outage (not once per event)."""
    agent = await start_agent(**{"libvirt.uri": test_daemon.test_uri})
    with structlog.testing.capture_logs() as logs:
        await asyncio.to_thread(nats_server.stop)
        flipper = await flip(test_daemon.test_uri, 3000)
        pub = agent.agent.publisher
        await until(lambda: pub.received >= flipper.count)
        assert pub.spooled >= flipper.count - 10, "events went to the spool"
        assert agent.agent.spool is not None
        assert agent.agent.spool.depth > 0
        await asyncio.to_thread(restart, nats_server)
        recover_s = await first_ack_after(pub)
        await agent.settled(timeout=60)
    assert agent.agent.spool.empty()
    switches = [e["event"] for e in logs if e["event"] in SPOOL_SWITCHES]
    assert switches == list(SPOOL_SWITCHES), f"{len(switches)} switches: {switches[:6]}"
    assert list((Path(agent.agent.settings.state_dir) / "spool").glob("*.seg")) == []

    await all_stored_once_in_order(
        nats_server, agent, flipper, recover_s,
        "nats-server stopped, events happen, nats-server started again",
    )  # fmt: skip
    assert pub.dropped == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs: a disk that fills up."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], check=True)
    yield small
    subprocess.run(["umount", "-l", str(small)], check=True)


async def test_a_full_disk_keeps_events_in_memory_behind_the_spool_and_loses_none(
    small_disk: Path,
    nats_server: NatsServer,
    test_daemon: LibvirtDaemon,
    start_agent: Callable[..., Awaitable[RunningAgent]],
) -> None:
    """The state directory on a full-able disk, nats-server stopped, 3,000 events: the spool
    fills the disk, the rest wait in memory behind it; NATS back, every event is stored once,
    in order, and the write errors are counted."""
    agent = await start_agent(**{"libvirt.uri": test_daemon.test_uri,
                                 "state_dir": str(small_disk)})  # fmt: skip
    await asyncio.to_thread(nats_server.stop)
    flipper = await flip(test_daemon.test_uri, 3000)
    pub = agent.agent.publisher
    await until(lambda: pub.received >= flipper.count)
    errors = agent.agent.metrics.spool_write_errors._value.get()
    assert errors > 0, "the disk filled up"
    assert pub.depth > 2000, "what the disk refused waits in memory"
    assert pub.dropped == 0
    await asyncio.to_thread(restart, nats_server)
    recover_s = await first_ack_after(pub)
    await agent.settled(timeout=60)
    await all_stored_once_in_order(
        nats_server, agent, flipper, recover_s,
        "state directory's disk full (256 KiB) while NATS is down",
    )  # fmt: skip
    await agent.stop()


async def test_spooled_events_survive_sigkill_and_go_out_with_their_ids_after_restart(
    nats_server: NatsServer,
    test_daemon: LibvirtDaemon,
    agent_process: Callable[..., AgentProcess],
    tmp_path: Path,
) -> None:
    """NATS down, 2,000 events spooled, the agent killed with SIGKILL; NATS back, the agent
    started again: every event is stored once with the id the first process gave it, and the
    new process's boot_id differs (its sequence restarted)."""
    host = "spoolkill"
    http = f"127.0.0.1:{free_port()}"
    args = ("--libvirt-uri", test_daemon.test_uri, "--nats-url", nats_server.url,
            "--host-id", host, "--http-addr", http, "--state-dir", str(tmp_path / "st"))  # fmt: skip
    first = agent_process(*args)
    nc = await nats.connect(nats_server.url)
    try:
        await answering(nc, [host])
    finally:
        await nc.close()
    await asyncio.to_thread(nats_server.stop)
    flipper = await flip(test_daemon.test_uri, 2000)

    def metric(name: str) -> float:
        with urllib.request.urlopen(f"http://{http}/metrics", timeout=10) as r:
            text = r.read().decode()
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith((name + "{", name + " ")))  # fmt: skip

    def all_spooled() -> bool:
        """The agent received every flip and holds none in its memory queue."""
        received = metric("virt_agent_events_received_total")
        return received >= flipper.count and metric("virt_agent_queue_depth") == 0

    deadline = asyncio.get_running_loop().time() + 60
    while not await asyncio.to_thread(all_spooled):
        assert asyncio.get_running_loop().time() < deadline, "the flips were not all spooled"
        await asyncio.sleep(0.2)
    first.signal(signal.SIGKILL)
    await asyncio.to_thread(first.wait, 10)
    spooled = list((tmp_path / "st" / "spool").glob("*.seg"))
    assert spooled, "the events were spooled on disk"

    await asyncio.to_thread(restart, nats_server)
    t0 = time.monotonic()
    agent_process(*args)
    flips: list[dict[str, Any]] = []
    deadline = asyncio.get_running_loop().time() + 60
    while len(flips) < flipper.count and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.5)
        flips, ids = await stored_flips(nats_server.url, host, flipper.dom.UUIDString())
    report("NATS down, events spooled, agent SIGKILLed; NATS and agent started again",
           flipper.count, len(flips), sum(c - 1 for c in ids.values()), time.monotonic() - t0)  # fmt: skip
    assert len(flips) == flipper.count, f"{len(flips)} of {flipper.count} stored"
    assert [i for i, c in ids.items() if c > 1] == []
    boots = {ev["id"].split(":")[1] for ev in flips}
    assert len(boots) == 1, "stored with the ids of the process that received them"
    nc = await nats.connect(nats_server.url)
    try:
        stored = await stream_messages(nc, "VIRT_EVENTS", f"virt.{host}.host.agent_started")
    finally:
        await nc.close()
    started = [ev["data"]["boot_id"] for _, ev, _ in stored]
    assert len(started) == 2
    assert started[1] != started[0]
    assert boots == {started[0]}


async def test_a_burst_while_nats_is_paused_loses_nothing_and_stays_in_its_memory_bound(
    nats_server: NatsServer,
    test_daemon: LibvirtDaemon,
    start_agent: Callable[..., Awaitable[RunningAgent]],
) -> None:
    """nats-server stopped with SIGSTOP for 5 s in the middle of a 100,000-event burst (the
    connection stays up but nothing moves), then SIGCONT: every event stored once; the memory
    queue never held more than spool_after; the rest waited on disk."""
    agent = await start_agent(**{"libvirt.uri": test_daemon.test_uri})
    pub = agent.agent.publisher
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, pub.depth)
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    flipper = await asyncio.to_thread(lambda: Flipper(test_daemon.test_uri).start())
    try:
        await until(lambda: flipper.count >= 20_000)
        nats_server.signal(signal.SIGSTOP)
        await asyncio.sleep(5)
        nats_server.signal(signal.SIGCONT)
        recover_s = await first_ack_after(pub)
        await until(lambda: flipper.count >= 100_000)
    finally:
        nats_server.signal(signal.SIGCONT)
        await asyncio.to_thread(flipper.stop)
    await agent.settled(timeout=120)
    watcher.cancel()
    flips, ids = await stored_flips(nats_server.url, agent.host, flipper.dom.UUIDString())
    report("nats-server SIGSTOPped for 5 s during a 100,000-event burst", flipper.count,
           len(flips), sum(c - 1 for c in ids.values()), recover_s)  # fmt: skip
    assert len(flips) == flipper.count
    assert [i for i, c in ids.items() if c > 1] == []
    assert pub.dropped == 0
    assert pub.spooled > 0, "the pause pushed events to the spool"
    assert peak <= agent.agent.settings.publisher.spool_after + 1
