"""Events out: libvirt's test driver -> agent -> NATS JetStream, checked on the bus."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import aiohttp
import libvirt
import pytest
from nats.aio.client import Client as NATS

from agent.streams import EVENTS_STREAM
from tests.support.agents import RunningAgent
from tests.support.bus import Collector, stream_messages
from tests.support.domains import define

ENVELOPE_KEYS = {
    "specversion",
    "id",
    "source",
    "type",
    "time",
    "datacontenttype",
    "sequence",
    "data",
}
TIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def lifecycle_of(events: list[dict[str, Any]], dom_uuid: str) -> list[tuple[str, str]]:
    return [
        (e["data"]["event"], e["data"]["detail"])
        for e in events
        if e["type"] == "virt.domain.lifecycle" and e["subject"] == dom_uuid
    ]


async def test_test_driver_events_arrive_with_contract_subject_and_envelope(
    start_agent: Callable[..., Awaitable[RunningAgent]],
    collect: Callable[[str], Awaitable[Collector]],
    testdrv: Any,
) -> None:
    """Every event the test driver raises arrives on its contract subject in a CloudEvents envelope."""
    agent = await start_agent()
    c = await collect(f"virt.{agent.host}.event.>")
    dom = define(testdrv)
    u = dom.UUIDString()
    dom.create()
    dom.suspend()
    dom.resume()
    dom.setMetadata(
        libvirt.VIR_DOMAIN_METADATA_ELEMENT,
        "<x/>",
        "x",
        "urn:virt-agent:test",
        libvirt.VIR_DOMAIN_AFFECT_LIVE,
    )
    save = f"/tmp/virt-agent-test-{u}.save"
    dom.save(save)
    testdrv.restore(save)
    dom = testdrv.lookupByUUIDString(u)
    dom.shutdown()
    dom.create()
    dom.destroy()
    dom.undefine()
    await c.wait_for(lambda e: e["data"].get("event") == "undefined" and e["subject"] == u)

    assert lifecycle_of(c.events(), u) == [
        ("defined", "added"),
        ("started", "booted"),
        ("suspended", "paused"),
        ("resumed", "unpaused"),
        ("stopped", "saved"),
        ("started", "restored"),
        ("stopped", "shutdown"),
        ("started", "booted"),
        ("stopped", "destroyed"),
        ("undefined", "removed"),
    ]
    meta = [e for e in c.events() if e["type"] == "virt.domain.metadata_change"]
    assert [(m["data"]["metadata_type"], m["data"]["nsuri"]) for m in meta] == [
        ("element", "urn:virt-agent:test")
    ]
    for subject, ev, headers in c.messages:
        etype = ev["type"].removeprefix("virt.domain.")
        assert subject == f"virt.{agent.host}.event.{u}.{etype}"
        assert set(ev) == ENVELOPE_KEYS | {"subject"}
        assert ev["specversion"] == "1.0"
        assert ev["source"] == f"/virt/{agent.host}"
        assert ev["datacontenttype"] == "application/json"
        assert ev["id"] == f"{agent.host}:{agent.agent.boot_id}:{ev['sequence']}"
        # The header's id is the envelope's, then a secret of the boot (contract v1.2).
        assert headers["Nats-Msg-Id"].startswith(ev["id"] + ":")
        assert TIME_RE.match(ev["time"]), ev["time"]
        assert datetime.fromisoformat(ev["time"].replace("Z", "+00:00"))
        assert ev["data"]["host"] == agent.host
        assert ev["data"]["domain"]["uuid"] == u
        assert ev["data"]["domain"]["name"].startswith("t-")


async def test_events_stored_in_stream_with_strictly_increasing_sequence(
    start_agent: Callable[..., Awaitable[RunningAgent]],
    collect: Callable[[str], Awaitable[Collector]],
    nc: NATS,
    testdrv: Any,
) -> None:
    """VIRT_EVENTS holds host and domain events; sequence strictly increases; host events have no subject."""
    agent = await start_agent()
    c = await collect(f"virt.{agent.host}.event.>")
    dom = define(testdrv)
    for _ in range(25):
        dom.create()
        dom.destroy()
    dom.undefine()
    await c.wait_for(lambda e: e["data"].get("event") == "undefined")
    await agent.settled()
    stored = await stream_messages(nc, EVENTS_STREAM, f"virt.{agent.host}.>")
    seqs = [ev["sequence"] for _, ev, _ in stored]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == len(seqs)
    assert seqs[0] == 1
    types = [ev["type"] for _, ev, _ in stored]
    assert types[:3] == [
        "virt.host.agent_started",
        "virt.host.libvirt_connected",
        "virt.host.resync",
    ]
    assert types.count("virt.domain.lifecycle") == 52
    for subject, ev, _ in stored:
        if ev["type"].startswith("virt.host."):
            assert "subject" not in ev
            assert subject == f"virt.{agent.host}.host.{ev['type'].removeprefix('virt.host.')}"


async def test_republished_message_id_is_stored_once(
    start_agent: Callable[..., Awaitable[RunningAgent]],
    collect: Callable[[str], Awaitable[Collector]],
    nc: NATS,
    testdrv: Any,
) -> None:
    """A message sent again with the same Nats-Msg-Id (the agent's retry) is stored once."""
    agent = await start_agent()
    c = await collect(f"virt.{agent.host}.event.>")
    dom = define(testdrv)
    await c.wait_for(lambda e: e["data"].get("event") == "defined")
    dom.undefine()
    # The test driver delivers events from a timer: wait for it, then for the publisher.
    await c.wait_for(lambda e: e["data"].get("event") == "undefined")
    await agent.settled()
    js = nc.jetstream()
    before = (await js.stream_info(EVENTS_STREAM)).state.messages
    subject, _, headers = c.messages[0]
    raw = (await js.get_last_msg(EVENTS_STREAM, subject)).data
    ack = await js.publish(subject, raw, headers={"Nats-Msg-Id": headers["Nats-Msg-Id"]})
    assert ack.duplicate
    assert (await js.stream_info(EVENTS_STREAM)).state.messages == before


async def test_resync_snapshot_matches_libvirt(
    start_agent: Callable[..., Awaitable[RunningAgent]],
    nc: NATS,
    testdrv: Any,
) -> None:
    """The startup resync lists every domain with the state and reason libvirt reports."""
    running = define(testdrv)
    running.create()
    paused = define(testdrv)
    paused.create()
    paused.suspend()
    off = define(testdrv)
    agent = await start_agent()
    await agent.settled()
    stored = await stream_messages(nc, EVENTS_STREAM, f"virt.{agent.host}.host.resync")
    assert len(stored) == 1
    snap = {d["uuid"]: d for d in stored[0][1]["data"]["domains"]}
    expected = {}
    for d in testdrv.listAllDomains(0):
        st, rs = d.state()
        expected[d.UUIDString()] = (d.name(), st, rs)
    assert set(snap) == set(expected)
    names = {
        libvirt.VIR_DOMAIN_RUNNING: "running",
        libvirt.VIR_DOMAIN_PAUSED: "paused",
        libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    }
    for u, (name, st, _) in expected.items():
        assert snap[u]["name"] == name
        assert snap[u]["state"] == names[st]
    assert (snap[running.UUIDString()]["state"], snap[running.UUIDString()]["reason"]) == (
        "running",
        "booted",
    )
    assert (snap[paused.UUIDString()]["state"], snap[paused.UUIDString()]["reason"]) == (
        "paused",
        "user",
    )
    assert snap[off.UUIDString()]["state"] == "shutoff"
    assert snap[off.UUIDString()]["id"] is None
    assert stored[0][1]["data"]["reason"] == "startup"


async def test_queue_overflow_is_counted_and_followed_by_a_resync(
    start_agent: Callable[..., Awaitable[RunningAgent]],
    nc: NATS,
    testdrv: Any,
) -> None:
    """Events dropped by a full queue leave a sequence gap that the next resync names exactly."""
    # Without the spool (which would take the overflow instead: tests/test_faults.py).
    agent = await start_agent(**{"publisher.queue_size": 10, "publisher.spool_max_bytes": 0})
    dom = define(testdrv)
    dom.create()
    # Callbacks are dispatched on this loop: 400 events arrive in one burst, before the
    # publisher can run, so most cannot fit in a queue of 10.
    for _ in range(200):
        dom.suspend()
        dom.resume()
    for _ in range(100):
        await asyncio.sleep(0.05)
        if agent.agent.metrics.resyncs.labels("overflow")._value.get() >= 1:
            break
    dom.destroy()
    dom.undefine()
    await agent.settled()
    stored = await stream_messages(nc, EVENTS_STREAM, f"virt.{agent.host}.>")
    resyncs = [
        ev
        for _, ev, _ in stored
        if ev["type"] == "virt.host.resync" and ev["data"]["reason"] == "overflow"
    ]
    assert len(resyncs) == 1
    missed = resyncs[0]["data"]["missed"]
    dropped = agent.agent.publisher.dropped
    assert missed["count"] == dropped > 0
    assert agent.agent.metrics.events_dropped._value.get() == dropped
    seqs = {ev["sequence"] for _, ev, _ in stored}
    lost = set(range(missed["first_sequence"], missed["last_sequence"] + 1)) - seqs
    assert len(lost) == dropped
    flips = [
        ev for _, ev, _ in stored
        if ev["type"] == "virt.domain.lifecycle" and ev["data"]["event"] in ("suspended", "resumed")
    ]  # fmt: skip
    assert len(flips) + dropped == 400
    # The snapshot after the overflow shows the state libvirt ended in: running.
    state = {d["uuid"]: d["state"] for d in resyncs[0]["data"]["domains"]}
    assert state[dom.UUIDString()] == "running"


async def test_streams_are_created_once_shared_and_an_existing_one_left_as_it_is(
    start_agent: Callable[..., Awaitable[RunningAgent]],
    nc: NATS,
) -> None:
    """An existing VIRT_EVENTS with another configuration is left as it is (and reported);
    a missing VIRT_OPS is created; two agents share the streams."""
    js = nc.jetstream()
    await js.add_stream(
        name="VIRT_EVENTS", subjects=["virt.*.event.>", "virt.*.host.>"], max_age=60
    )
    a = await start_agent()
    b = await start_agent()
    info = await js.stream_info("VIRT_EVENTS")
    assert info.config.max_age == 60
    metric = a.agent.metrics.registry.get_sample_value
    assert metric("virt_agent_stream_config_mismatch", {"stream": "VIRT_EVENTS"}) == 1
    ops = await js.stream_info("VIRT_OPS")
    assert ops.config.subjects == ["virt.*.op.>"]
    assert ops.config.max_age == a.agent.settings.nats.events_max_age_s
    assert metric("virt_agent_stream_config_mismatch", {"stream": "VIRT_OPS"}) == 0
    for agent in (a, b):
        await agent.settled()
        stored = await stream_messages(nc, EVENTS_STREAM, f"virt.{agent.host}.host.agent_started")
        assert len(stored) == 1


async def test_health_readiness_and_metrics_over_http(
    start_agent: Callable[..., Awaitable[RunningAgent]],
    testdrv: Any,
) -> None:
    """/healthz, /readyz and /metrics answer, and metrics count real events."""
    agent = await start_agent()
    dom = define(testdrv)
    dom.undefine()
    assert agent.agent.http is not None
    base = f"http://{agent.agent.http.bound[0]}"
    await agent.settled()
    async with aiohttp.ClientSession() as s:
        async with s.get(base + "/healthz") as r:
            assert r.status == 200
            assert (await r.json())["state"] == "running"
        async with s.get(base + "/readyz") as r:
            assert r.status == 200
            assert (await r.json())["checks"]["libvirt"] is True
        async with s.get(base + "/metrics") as r:
            text = await r.text()
    assert 'virt_agent_events_received_total{type="lifecycle"} 2.0' in text
    assert "virt_agent_queue_capacity 20000.0" in text
    assert "virt_agent_inflight_acks_capacity" in text


@pytest.mark.parametrize("stop_first", [True])
async def test_stop_publishes_agent_stopping_last(
    start_agent: Callable[..., Awaitable[RunningAgent]],
    nc: NATS,
    stop_first: bool,
    testdrv: Any,
) -> None:
    """An orderly stop publishes agent_stopping after every event, with the agent's counters."""
    agent = await start_agent()
    dom = define(testdrv)
    for _ in range(30):
        dom.create()
        dom.destroy()
    dom.undefine()
    await agent.stop()
    stored = await stream_messages(nc, EVENTS_STREAM, f"virt.{agent.host}.>")
    last = stored[-1][1]
    assert last["type"] == "virt.host.agent_stopping"
    domain_events = [ev for _, ev, _ in stored if ev["type"].startswith("virt.domain.")]
    assert last["data"]["counters"]["events_received"] == len(domain_events) == 62
    assert last["data"]["counters"]["events_dropped"] == 0
