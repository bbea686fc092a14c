"""JetStream fast-ingest batch publishing (agent/batching.py): a burst of events goes out in
batches - the server acknowledges a batch every `publisher.batch_flow` messages, not every
message - and every event is stored exactly once, in order; a message lost inside a batch is
sent again and stored once; a stream without `allow_batched` gets one acknowledgement per
message, as an older server does. The acknowledgements are counted by nats-server itself
(its monitoring endpoint: the messages it sent to the agent's connection).

The suite runs these against the pinned nats-server; .ci/run runs them again against an older
one (NATS_SERVER_BINARY): no batches there, everything stored once all the same."""

from __future__ import annotations

import asyncio
import json
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.api import StreamConfig

from agent import batching
from agent.batching import Batch
from agent.embedded import NatsServer
from lab.daemon import free_port
from tests.support.agents import RunningAgent
from tests.support.bus import stream_messages
from tests.support.cli import check

Start = Callable[..., Awaitable[RunningAgent]]
FLIPS = 400  # suspend + resume: 800 lifecycle events


@pytest.fixture
def monitored(tmp_path: Path) -> Iterator[tuple[NatsServer, int]]:
    """A nats-server with its monitoring endpoint (connections' message counts)."""
    port = free_port()
    server = NatsServer(tmp_path / "nats-m", extra_args=["-m", str(port)]).start()
    yield server, port
    server.stop()


def sent_to(port: int, name_part: str) -> int:
    """Messages nats-server sent to the connection whose name contains `name_part`."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/connz?limit=1024", timeout=5) as r:
        conns = json.load(r)["connections"]
    return sum(c["out_msgs"] for c in conns if name_part in c.get("name", ""))


async def burst(testdrv: Any, flips: int) -> None:
    dom = testdrv.lookupByName("test")

    def go() -> None:
        for _ in range(flips):
            dom.suspend()
            dom.resume()

    await asyncio.to_thread(go)


async def stored_once_in_order(nc: Any, host: str, want: int, timeout: float = 60) -> None:
    """Every sequence number 1..last of `host`'s domain events stored exactly once; `want`
    lifecycle events among them; stream order the sequence order."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        stored = await stream_messages(nc, "VIRT_EVENTS", f"virt.{host}.>")
        life = [e for _, e, _ in stored if e["type"] == "virt.domain.lifecycle"]
        if len(life) >= want or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.2)
    ids = [e["id"] for _, e, _ in stored]
    assert len(ids) == len(set(ids)), "a message stored twice"
    seqs = sorted(e["sequence"] for _, e, _ in stored)
    assert seqs == list(range(seqs[0], seqs[-1] + 1)), "a sequence never stored"
    assert len(life) == want, (len(life), want)


async def test_a_burst_is_stored_once_with_an_acknowledgement_per_batch(
    monitored: tuple[NatsServer, int], start_agent: Start, testdrv: Any
) -> None:
    server, port = monitored
    agent = await start_agent(host_id="fi1", **{"nats.urls": [server.url]})
    nc = await nats.connect(server.url)
    try:
        await agent.settled()
        before = sent_to(port, "fi1")
        await burst(testdrv, FLIPS)
        await stored_once_in_order(nc, "fi1", 2 * FLIPS)
        await agent.settled()
        replies = sent_to(port, "fi1") - before
        if batching.server_supports(nc):
            # One acknowledgement per batch_flow (100) messages, plus each batch's first and
            # final replies - and the virt_domains writes' own: far fewer than the events.
            assert replies < 2 * FLIPS / 4, replies
            batches = agent.agent.metrics.publish_batches._value.get()
            assert batches >= 1
        else:
            assert replies >= 2 * FLIPS, replies  # an older server: one per message
    finally:
        await nc.close()


async def test_a_message_lost_inside_a_batch_is_sent_again_and_stored_once(
    start_agent: Start, testdrv: Any, nats_server: NatsServer
) -> None:
    agent = await start_agent(host_id="fi2")
    nc = await nats.connect(nats_server.url)
    try:
        if not batching.server_supports(nc):
            pytest.skip("the server has no fast-ingest batches")
        await agent.settled()
        agent.agent.publisher.batcher.lose = {5, 37}
        await burst(testdrv, FLIPS // 4)
        await stored_once_in_order(nc, "fi2", FLIPS // 2)
        gaps = agent.agent.metrics.registry.get_sample_value(
            "virt_agent_publish_errors_total", {"kind": "batch_gap"})  # fmt: skip
        assert gaps is not None
        assert gaps >= 1
        assert agent.agent.publisher.batcher.lose == set(), "both losses happened"
    finally:
        await nc.close()


async def test_a_stream_without_allow_batched_gets_an_acknowledgement_per_message(
    monitored: tuple[NatsServer, int], start_agent: Start, testdrv: Any, tmp_path: Path
) -> None:
    """An operator's VIRT_EVENTS made without allow_batched (hosts cannot change a stream):
    every message acknowledged on its own, the difference reported."""
    server, port = monitored
    nc = await nats.connect(server.url)
    try:
        await nc.jetstream().add_stream(StreamConfig(
            name="VIRT_EVENTS", subjects=["virt.*.event.>", "virt.*.host.>"],
            duplicate_window=120.0, max_age=7 * 86400.0))  # fmt: skip
        agent = await start_agent(host_id="fi3", **{"nats.urls": [server.url]})
        await agent.settled()
        before = sent_to(port, "fi3")
        await burst(testdrv, FLIPS // 4)
        await stored_once_in_order(nc, "fi3", FLIPS // 2)
        await agent.settled()
        assert sent_to(port, "fi3") - before >= FLIPS // 2
        if batching.server_supports(nc):
            mismatch = agent.agent.metrics.registry.get_sample_value(
                "virt_agent_stream_config_mismatch", {"stream": "VIRT_EVENTS"})  # fmt: skip
            assert mismatch == 1
            # check-config says so, as a warning (hosts cannot change the stream).
            code, out = await asyncio.to_thread(
                check, "--libvirt-uri", "test:///default", "--nats-url", server.url,
                "--state-dir", str(tmp_path / "cc"), "--http-addr", "")  # fmt: skip
            assert "warning: VIRT_EVENTS has no allow_batched" in out, out
            assert code == 0, out
    finally:
        await nc.close()


async def test_a_message_sent_twice_inside_a_batch_is_stored_once(nats_server: NatsServer) -> None:
    """The server's part the publisher relies on: Nats-Msg-Id de-duplication holds inside a
    fast-ingest batch (a re-send after a gap notice, or a batch message sent again)."""
    nc = await nats.connect(nats_server.url)
    try:
        if not batching.server_supports(nc):
            pytest.skip("the server has no fast-ingest batches")
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="FI", subjects=["fi.>"], allow_batched=True))
        replies: asyncio.Queue[Any] = asyncio.Queue()
        prefix = nc.new_inbox()

        async def got(msg: Any) -> None:
            await replies.put(batching.decode(msg.data))

        await nc.subscribe(prefix + ".>", cb=got)
        b = Batch(prefix, 10, 0)
        ids = ["a", "b", "b", "c", "a"]
        for i, msg_id in enumerate(ids):
            await nc.publish("fi.x", msg_id.encode(), reply=b.add(str(i)),
                             headers={"Nats-Msg-Id": msg_id})  # fmt: skip
        await nc.publish("fi.x", b"", reply=b.commit())
        while True:
            r = await asyncio.wait_for(replies.get(), 5)
            if r.type is None:
                break
        assert r.error is None, r
        assert r.count == len(ids)
        stored = [m.data.decode() for m in await stream_messages_raw(js, "FI")]
        assert stored == ["a", "b", "c"], stored
    finally:
        await nc.close()


async def stream_messages_raw(js: Any, stream: str) -> list[Any]:
    info = await js.stream_info(stream)
    return [await js.get_msg(stream, seq) for seq in
            range(info.state.first_seq, info.state.last_seq + 1)]  # fmt: skip


def test_batch_reply_subjects_name_the_batch_and_the_sequence() -> None:
    b = Batch("_INBOX_h.abc.fi", 100, 0)
    first, second = b.add("t1"), b.add("t2")
    assert first == f"_INBOX_h.abc.fi.{b.id}.100.ok.1.0.$FI"
    assert second.endswith(".ok.2.1.$FI")
    assert b.commit().endswith(".ok.3.3.$FI")
    assert batching.parse_subject(second) == (b.id, 2)
    assert batching.parse_subject(f"_INBOX.{uuid.uuid4().hex}") is None
    b.lost.add(1)
    assert b.covered(2) == ["t2"]
