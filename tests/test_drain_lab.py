"""host.drain in the three-host lab: host a runs two failover guests, a plain one and a guest
whose bond never formed (`nobond`); draining a with three migrations at once toward b and c,
each admitting one incoming migration at a time, moves the three movable guests and reports the
fourth unmovable. Checked from libvirt (where each runs, its primary attached there, no primary
twice), from the guests (the bond whole again) and from libvirt's own lifecycle events on b
and c as the bus carries them, and the guests' pings flowing after it (never two incoming migrations at once on one destination)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import libvirt
import pytest

from agent.devices import device_element
from tests.support.agents import RunningAgent
from tests.support.bus import Collector, call
from tests.support.guests import FINAL, PRIMARY, bond_now, pings_flow, template, where

pytestmark = [pytest.mark.lab, pytest.mark.timeout(900)]


def primary_macs(host: Any) -> list[tuple[str, str]]:
    """The MAC of the primary in every definition (live and persistent) of every domain on
    `host`, once per definition; a device in two domains shows twice."""
    conn = host.connect()
    try:
        out = []
        for d in conn.listAllDomains(0):
            flags = [libvirt.VIR_DOMAIN_XML_INACTIVE] + ([0] if d.isActive() else [])
            for f in flags:
                el = device_element(d.XMLDesc(f), PRIMARY)
                mac = el.find("mac") if el is not None else None
                if mac is not None:
                    out.append((d.name(), str(mac.get("address"))))
        return out
    finally:
        conn.close()


def most_at_once(events: list[dict[str, Any]]) -> int:
    """Incoming migrations running at once on one host, from its lifecycle events in order:
    one begins with started/migrated and ends with resumed/migrated or stopped."""
    running: set[str] = set()
    most = 0
    for ev in sorted(events, key=lambda e: e["sequence"]):
        d, uuid = ev["data"], ev["subject"]
        if (d["event"], d["detail"]) == ("started", "migrated"):
            running.add(uuid)
        elif d["event"] in ("resumed", "stopped") and uuid in running:
            running.discard(uuid)
        most = max(most, len(running))
    return most


async def test_a_drain_moves_the_movable_guests_one_incoming_migration_per_destination(
    lab: Any,
    guest: Callable[..., Any],
    start_agent: Callable[..., Awaitable[RunningAgent]],
    collect: Callable[[str], Awaitable[Collector]],
    nc: Any,
    tmp_path: Path,
) -> None:
    a, b, c = lab.host("a"), lab.host("b"), lab.host("c")
    one = {"failover.max_inbound_migrations": 1}
    pool = {"devices.templates": {"vf": str(template(tmp_path))}, "failover.pool_template": "vf"}
    agent_a = await start_agent(**{"libvirt.uri": a.uri, **one})
    agent_b = await start_agent(**{"libvirt.uri": b.uri, **one, **pool})
    agent_c = await start_agent(**{"libvirt.uri": c.uri, **one, **pool})
    doms = {
        kind: await asyncio.to_thread(guest, "a", k, variant=v)
        for kind, k, v in (("fo1", "failover", "stock"), ("fo2", "failover", "stock"),
                           ("plain", "virtio", "stock"), ("nobond", "failover", "nobond"))
    }  # fmt: skip
    lifecycle = {h.host: await collect(f"virt.{h.host}.event.*.lifecycle")
                 for h in (agent_b, agent_c)}  # fmt: skip
    ops = await collect(f"virt.{agent_a.host}.op.>")
    offsets = {kind: lab.serial_path(d.name()).stat().st_size for kind, d in doms.items()}
    started = await call(nc, agent_a.host, "host.drain", {"max_parallel": 3})
    assert started["ok"] is True, started
    drain_id = started["result"]["operation_id"]
    ev = await ops.wait_for(lambda e: e["data"]["operation"]["id"] == drain_id
                            and e["data"]["operation"]["state"] in FINAL, 600)  # fmt: skip
    op = ev["data"]["operation"]
    # The nobond guest cannot move (its guest never negotiated failover): the drain fails,
    # the host stays in maintenance; the three others moved.
    assert op["state"] == "failed", op
    entries = {e["domain"]["name"]: e for e in op["error"]["details"]["domains"]}
    assert entries[doms["nobond"].name()]["state"] == "unmovable", entries
    assert "negotiated" in entries[doms["nobond"].name()]["reason"], entries
    hosts = {agent_b.host: b, agent_c.host: c}
    for kind in ("fo1", "fo2", "plain"):
        e = entries[doms[kind].name()]
        assert e["state"] == "succeeded", e
        assert e["destination"] in hosts, e
        w = where(hosts[e["destination"]], doms[kind].UUIDString())
        assert w["running"] is True, (kind, w)
        assert where(a, doms[kind].UUIDString())["running"] is False, kind
        if kind != "plain":
            assert w["primary"] is True, (kind, w)
            assert w["record"] is False, "nothing owed"
            await bond_now(lab.serial_path(doms[kind].name()), 2)
    # Every guest's pings flow again (through the bond for the pairs), the one left on a too.
    for kind, d in doms.items():
        await pings_flow(lab.serial_path(d.name()), offsets[kind])
    assert where(a, doms["nobond"].UUIDString())["running"] is True
    # Each moved guest has a primary of its own in its definitions there (live and persistent):
    # no device listed by two domains.
    listed = [pair for h in (b, c) for pair in primary_macs(h)]
    assert len(listed) == 4, listed  # two failover guests, two definitions each
    owners: dict[str, set[str]] = {}
    for name, mac in listed:
        owners.setdefault(mac, set()).add(name)
    assert all(len(names) == 1 for names in owners.values()), owners
    # libvirt on b and c: never two incoming migrations at once; three migrations over two
    # destinations with room for one each, so admission made at least one wait.
    for host, seen in lifecycle.items():
        assert most_at_once(seen.events()) <= 1, (host, seen.events())
    refused = sum(
        x.agent.metrics.registry.get_sample_value(
            "virt_agent_admissions_refused_total", {"reason": "inbound_limit"}) or 0
        for x in (agent_b, agent_c)
    )  # fmt: skip
    assert refused >= 1
    assert (await call(nc, agent_a.host, "host.undrain", {}))["ok"] is True


async def test_two_hosts_drained_at_once_never_overload_their_destination(
    lab: Any,
    guest: Callable[..., Any],
    start_agent: Callable[..., Awaitable[RunningAgent]],
    collect: Callable[[str], Awaitable[Collector]],
    nc: Any,
    tmp_path: Path,
) -> None:
    """a and b drained at the same moment toward c, which admits one incoming migration at a
    time: both drains succeed, and c's libvirt never runs two incoming migrations at once -
    its own admission, not the sources' limits, keeps it so."""
    a, b, c = lab.host("a"), lab.host("b"), lab.host("c")
    one = {"failover.max_inbound_migrations": 1}
    pool = {"devices.templates": {"vf": str(template(tmp_path))}, "failover.pool_template": "vf"}
    agent_a = await start_agent(**{"libvirt.uri": a.uri, **one})
    agent_b = await start_agent(**{"libvirt.uri": b.uri, **one})
    agent_c = await start_agent(**{"libvirt.uri": c.uri, **one, **pool})
    on_a = [await asyncio.to_thread(guest, "a", "failover"),
            await asyncio.to_thread(guest, "a", "virtio")]  # fmt: skip
    on_b = [await asyncio.to_thread(guest, "b", "virtio")]
    seen = await collect(f"virt.{agent_c.host}.event.*.lifecycle")
    ops = await collect("virt.*.op.>")
    drains = {}
    for src in (agent_a, agent_b):
        out = await call(nc, src.host, "host.drain",
                         {"destinations": [agent_c.host], "max_parallel": 2})  # fmt: skip
        assert out["ok"] is True, out
        drains[src.host] = out["result"]["operation_id"]
    for host, op_id in drains.items():
        ev = await ops.wait_for(lambda e, i=op_id: e["data"]["operation"]["id"] == i
                                and e["data"]["operation"]["state"] in FINAL, 600)  # fmt: skip
        assert ev["data"]["operation"]["state"] == "succeeded", (host, ev["data"]["operation"])
    for d in on_a + on_b:
        assert where(c, d.UUIDString())["running"] is True, d.name()
    assert where(c, on_a[0].UUIDString())["primary"] is True
    assert most_at_once(seen.events()) <= 1, seen.events()
    assert (agent_c.agent.metrics.registry.get_sample_value(
        "virt_agent_admissions_refused_total", {"reason": "inbound_limit"}) or 0) >= 1  # fmt: skip
    for src in (agent_a, agent_b):
        assert (await call(nc, src.host, "host.undrain", {}))["ok"] is True


async def test_a_drain_whose_agent_is_killed_goes_on_and_moves_nothing_twice(
    lab: Any,
    guest: Callable[..., Any],
    start_agent: Callable[..., Awaitable[RunningAgent]],
    agent_process: Callable[..., Any],
    collect: Callable[[str], Awaitable[Collector]],
    nats_server: Any,
    nc: Any,
    tmp_path: Path,
) -> None:
    """The source's agent (a process) is killed with SIGKILL once the drain's first migration
    has succeeded, and started again: the same drain goes on from its journal and ends
    `succeeded`; each guest arrived on b exactly once (libvirt's started/migrated events)."""
    import signal  # noqa: PLC0415

    from lab.agents import answering  # noqa: PLC0415

    a, b = lab.host("a"), lab.host("b")
    agent_b = await start_agent(**{"libvirt.uri": b.uri, "failover.max_inbound_migrations": 1})
    args = ("--libvirt-uri", a.uri, "--nats-url", nats_server.url, "--host-id", "drained",
            "--http-addr", "", "--state-dir", str(tmp_path / "a-state"))  # fmt: skip
    first = agent_process(*args)
    await answering(nc, ["drained"])
    doms = [await asyncio.to_thread(guest, "a", "virtio") for _ in range(3)]
    arrivals = await collect(f"virt.{agent_b.host}.event.*.lifecycle")
    ops = await collect("virt.drained.op.>")
    out = await call(nc, "drained", "host.drain", {"destinations": [agent_b.host]})
    assert out["ok"] is True, out
    drain_id = out["result"]["operation_id"]
    await ops.wait_for(lambda e: e["data"]["operation"]["verb"] == "migrate"
                       and e["data"]["operation"]["state"] == "succeeded", 300)  # fmt: skip
    first.signal(signal.SIGKILL)
    assert await asyncio.to_thread(first.wait, 10) == -signal.SIGKILL
    agent_process(*args)
    ev = await ops.wait_for(lambda e: e["data"]["operation"]["id"] == drain_id
                            and e["data"]["operation"]["state"] in FINAL, 600)  # fmt: skip
    op = ev["data"]["operation"]
    assert op["state"] == "succeeded", op
    assert "recover" in [s["step"] for s in op["steps"]], op
    for d in doms:
        assert where(b, d.UUIDString())["running"] is True, d.name()
        assert where(a, d.UUIDString())["running"] is False, d.name()
        came = [e for e in arrivals.events() if e["subject"] == d.UUIDString()
                and (e["data"]["event"], e["data"]["detail"]) == ("started", "migrated")]  # fmt: skip
        assert len(came) == 1, (d.name(), came)
    assert (await call(nc, "drained", "host.undrain", {}))["ok"] is True
