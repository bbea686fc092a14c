"""libvirtd goes away and comes back: the agent says so on the bus and keeps publishing."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import libvirt
import pytest

from agent.errors import LibvirtFailure
from lab.daemon import LibvirtDaemon
from tests.support.agents import FAST_RECONNECT, RunningAgent
from tests.support.bus import Collector
from tests.support.domains import define

pytestmark = pytest.mark.daemon


async def test_libvirtd_restart_is_announced_and_callbacks_come_back(
    tmp_path: Path,
    start_agent: Callable[..., Awaitable[RunningAgent]],
    collect: Callable[[str], Awaitable[Collector]],
) -> None:
    """libvirtd stops and restarts: libvirt_disconnected, then libvirt_connected and a resync, then events again."""
    daemon = await asyncio.to_thread(LibvirtDaemon(tmp_path, "restart").start)
    try:
        agent = await start_agent(**{"libvirt.uri": daemon.test_uri, **FAST_RECONNECT})
        hosts = await collect(f"virt.{agent.host}.host.>")
        events = await collect(f"virt.{agent.host}.event.>")

        await asyncio.to_thread(daemon.stop)
        down = await hosts.wait_for(lambda e: e["type"] == "virt.host.libvirt_disconnected", 20)
        assert down["data"]["uri"] == daemon.test_uri
        assert agent.agent.metrics.libvirt_connected._value.get() == 0

        await asyncio.to_thread(daemon.start)
        await hosts.wait_for(lambda e: e["type"] == "virt.host.libvirt_connected", 30)
        resync = await hosts.wait_for(
            lambda e: e["type"] == "virt.host.resync" and e["data"]["reason"] == "reconnect", 10
        )
        assert [d["name"] for d in resync["data"]["domains"]] == ["test"]

        conn = await asyncio.to_thread(libvirt.open, daemon.test_uri)
        try:
            dom = await asyncio.to_thread(define, conn)
            ev = await events.wait_for(lambda e: e["subject"] == dom.UUIDString())
            assert (ev["data"]["event"], ev["data"]["detail"]) == ("defined", "added")
            await asyncio.to_thread(dom.undefine)
        finally:
            conn.close()
        assert agent.agent.metrics.libvirt_reconnects._value.get() == 1
    finally:
        await asyncio.to_thread(daemon.stop)


async def test_what_changed_while_libvirt_was_away_is_published_as_inferred_events(
    tmp_path: Path,
    start_agent: Callable[..., Awaitable[RunningAgent]],
    collect: Callable[[str], Awaitable[Collector]],
) -> None:
    """The test driver forgets everything when its libvirtd restarts: a paused domain is
    running again and a defined, started one is gone. The agent publishes exactly those
    changes, marked inferred, before the reconnect resync - and nothing for what did not change."""
    daemon = await asyncio.to_thread(LibvirtDaemon(tmp_path, "infer").start)
    try:
        agent = await start_agent(**{"libvirt.uri": daemon.test_uri, **FAST_RECONNECT})
        everything = await collect(f"virt.{agent.host}.>")
        conn = await asyncio.to_thread(libvirt.open, daemon.test_uri)
        try:
            test = conn.lookupByName("test")
            await asyncio.to_thread(test.suspend)
            extra = await asyncio.to_thread(define, conn)
            await asyncio.to_thread(extra.create)
            gone = extra.UUIDString()
        finally:
            conn.close()
        await everything.wait_for(
            lambda e: e.get("subject") == gone and e["data"].get("event") == "started", 10
        )
        await agent.settled()

        await asyncio.to_thread(daemon.stop)
        await asyncio.to_thread(daemon.start)
        resync = await everything.wait_for(
            lambda e: e["type"] == "virt.host.resync" and e["data"]["reason"] == "reconnect", 30
        )
        inferred = [
            (e["data"]["domain"]["name"], e["data"]["event"], e["sequence"])
            for e in everything.events()
            if e["type"] == "virt.domain.lifecycle" and e["data"]["inferred"]
        ]
        assert [(n, ev) for n, ev, _ in inferred] == [
            (extra.name(), "stopped"), (extra.name(), "undefined"), ("test", "resumed"),
        ]  # fmt: skip
        assert all(seq < resync["sequence"] for _, _, seq in inferred)
        assert agent.agent.metrics.events_inferred._value.get() == 3
    finally:
        await asyncio.to_thread(daemon.stop)


def test_events_during_the_reconnect_snapshot_win_over_it() -> None:
    """A domain whose real event arrives while the snapshot is taken: no inferred event for it
    (the snapshot may be older than the event), and the tracker keeps what the event says."""
    from agent.events import DomainEvent, DomainRef, DomainSnapshot, Lifecycle  # noqa: PLC0415
    from agent.inference import StateTracker  # noqa: PLC0415

    a, b = "a" * 8 + "-0000-0000-0000-" + "0" * 12, "b" * 8 + "-0000-0000-0000-" + "0" * 12
    tracker = StateTracker()
    tracker.reset([DomainSnapshot(a, "va", "shutoff", "unknown"),
                   DomainSnapshot(b, "vb", "shutoff", "unknown")])  # fmt: skip
    touching = tracker.begin()
    # The snapshot (read first) says both run; then A's real "stopped" event arrives.
    snapshot = [DomainSnapshot(a, "va", "running", "booted", 1),
                DomainSnapshot(b, "vb", "running", "booted", 2)]  # fmt: skip
    tracker.observe(DomainEvent("lifecycle", Lifecycle(
        host="h", domain=DomainRef(a, "va", None), event="stopped", detail="shutdown"), 0))  # fmt: skip
    touched = tracker.end(touching)
    inferred = tracker.infer("h", snapshot, skip=touched)
    assert [(e.data.domain.uuid, e.data.event) for e in inferred] == [(b, "started")]
    tracker.reset(snapshot, keep=touched)
    assert tracker.known[a].state == "shutoff"
    assert tracker.known[b].state == "running"


async def test_a_reconnect_resync_that_fails_is_tried_again_while_libvirt_stays_connected(
    tmp_path: Path,
    start_agent: Callable[..., Awaitable[RunningAgent]],
    collect: Callable[[str], Awaitable[Collector]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """libvirtd restarts and the first snapshot after it fails (a libvirt call error while the
    connection stays up - injected here on `snapshot` alone, the one fault a real libvirtd
    cannot be made to give on demand): the agent tries again and the reconnect resync is
    published."""
    daemon = await asyncio.to_thread(LibvirtDaemon(tmp_path, "retry").start)
    try:
        agent = await start_agent(**{"libvirt.uri": daemon.test_uri, **FAST_RECONNECT})
        hosts = await collect(f"virt.{agent.host}.host.>")
        hv = agent.agent.hypervisor
        real = hv.snapshot
        failures = 2

        async def flaky() -> Any:
            nonlocal failures
            if failures:
                failures -= 1
                raise LibvirtFailure("internal error: injected snapshot failure")
            return await real()

        await asyncio.to_thread(daemon.stop)
        await hosts.wait_for(lambda e: e["type"] == "virt.host.libvirt_disconnected", 20)
        monkeypatch.setattr(hv, "snapshot", flaky)
        await asyncio.to_thread(daemon.start)
        resync = await hosts.wait_for(
            lambda e: e["type"] == "virt.host.resync" and e["data"]["reason"] == "reconnect", 30
        )
        assert [d["name"] for d in resync["data"]["domains"]] == ["test"]
        assert failures == 0
        assert hv.connected
    finally:
        await asyncio.to_thread(daemon.stop)
