"""Faults of the bus: a real three-node NATS cluster with JetStream replicas 3, and the node
the agent is connected to killed in the middle of a stream of events from another process."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import nats
import pytest
from nats.js.api import StreamConfig

from agent.embedded import NatsServer
from lab.daemon import LibvirtDaemon, free_port
from tests.conftest import RunningAgent, stream_messages
from tests.test_daemon_events import Flipper

pytestmark = [pytest.mark.faults, pytest.mark.daemon, pytest.mark.timeout(300)]

EVENTS = 20_000


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[list[NatsServer]]:
    """Three nats-servers routed into one cluster, JetStream on each."""
    cports = [free_port() for _ in range(3)]
    nodes = []
    for i, cport in enumerate(cports):
        routes = ",".join(f"nats://127.0.0.1:{p}" for j, p in enumerate(cports) if j != i)
        nodes.append(NatsServer(tmp_path / f"n{i}", extra_args=[
            "--server_name", f"n{i}", "--cluster_name", "virt-test",
            "--cluster", f"nats://127.0.0.1:{cport}", "--routes", routes,
        ]))  # fmt: skip
    try:
        for n in nodes:
            n.start()
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
    assert [i for i, c in ids.items() if c > 1] == [], "an event is stored twice"
    flips = [ev for _, ev, _ in stored if ev.get("subject") == flipper.dom.UUIDString()
             and ev["data"].get("event") in ("suspended", "resumed")]  # fmt: skip
    assert len(flips) == generated, f"{generated} generated, {len(flips)} stored"
    # A re-sent publish may land after later ones; each sequence number is there once.
    seqs = sorted(ev["sequence"] for _, ev, _ in stored)
    assert seqs == list(range(1, len(seqs) + 1)), "a gap in the sequence"
    assert agent.agent.metrics.nats_reconnects._value.get() >= 1
