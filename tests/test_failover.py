"""migrate-with-failover in the two-host lab: the guest's primary NIC is unplugged, the guest
migrates on its virtio standby, and a primary comes back on the destination - or on the
source when anything fails. Asserted on libvirt's state on both hosts, on the bus and on what
the guest's own kernel reports (its failover bond and its pings)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import libvirt
import msgspec
import pytest

from agent.bus import subscribed
from agent.devices import device_xml
from agent.embedded import NatsServer
from agent.errors import LibvirtFailure
from agent.failover import NS, PREFIX, Record, record_to_xml
from handlers.migration import Convergence
from lab.lab import bond_members, guest_mac, primary_interface_xml, probes, wait_for_serial
from tests.support.agents import RunningAgent
from tests.support.bus import Collector, call, connect_as, eventually, secured_url
from tests.support.guests import PRIMARY, bond_now, final_of, pings_flow, serial_text, where

pytestmark = pytest.mark.lab

STEPS = ["plan", "reserve", "unplug", "migrate", "replug", "verify"]


def seconds_between(earlier: str, later: str) -> float:
    """Between two CloudEvents `time` values (RFC 3339, UTC)."""
    parse = datetime.fromisoformat
    return (
        parse(later.replace("Z", "+00:00")) - parse(earlier.replace("Z", "+00:00"))
    ).total_seconds()


async def test_migrate_with_failover_moves_the_guest_and_plugs_its_primary_on_the_destination(
    lab: Any,
    host_a: Any,
    host_b: Any,
    guest: Callable[..., Any],
    start_agent: Callable[..., Awaitable[RunningAgent]],
    collect: Callable[[str], Awaitable[Collector]],
    nc: Any,
) -> None:
    """A→B: every step timed on VIRT_OPS; libvirt on B shows the domain with its primary, A
    does not run it; device_removed on A and device_added on B on the bus; the guest's bond
    lost its primary and has it again; the standby carried the pings meanwhile."""
    agent_a = await start_agent(**{"libvirt.uri": host_a.uri})
    agent_b = await start_agent(**{"libvirt.uri": host_b.uri})
    dom = await asyncio.to_thread(guest, "a", "failover")
    u = dom.UUIDString()
    serial = lab.serial_path(dom.name())
    await asyncio.to_thread(wait_for_serial, serial, " ok", 30)
    ops = await collect(f"virt.{agent_a.host}.op.>")
    removed = await collect(f"virt.{agent_a.host}.event.{u}.device_removed")
    added = await collect(f"virt.{agent_b.host}.event.{u}.device_added")
    offset = serial.stat().st_size

    t0 = asyncio.get_running_loop().time()
    reply = await call(
        nc, agent_a.host, "migrate_with_failover",
        {"domain": dom.name(), "destination": agent_b.host},
    )  # fmt: skip
    assert reply["ok"] is True, reply
    assert reply["result"]["mode"] == "sequenced"
    op = await final_of(ops)
    wall = asyncio.get_running_loop().time() - t0
    assert op["state"] == "succeeded", op
    assert [s["step"] for s in op["steps"]] == STEPS
    durations = {s["step"]: s["duration_s"] for s in op["steps"]}
    assert durations["migrate"] > 0, "a live migration takes time"
    assert sum(durations.values()) <= wall, (durations, wall)
    # The primary was out from DEVICE_REMOVED on A to DEVICE_ADDED on B, as the two events on
    # the bus say (B plugs it as soon as the domain resumes there, which can be well before
    # A's migration call has returned).
    outage = op["result"]["primary_outage_s"]
    gone = (await removed.wait_for(lambda e: True))["time"]
    back = (await added.wait_for(lambda e: True))["time"]
    assert outage == pytest.approx(seconds_between(gone, back), abs=0.002)
    assert 0 < outage < wall
    observed = agent_a.agent.metrics.registry.get_sample_value(
        "virt_agent_failover_primary_outage_seconds_sum"
    )
    assert observed == pytest.approx(outage)
    plan = op["steps"][0]
    assert (plan["primary"], plan["standby"]) == (PRIMARY, "ua-backup0")
    assert "negotiated VIRTIO_NET_F_STANDBY" in plan["guest"], plan
    on_b = (await call(nc, agent_b.host, "domain.get", {"domain": u}))["result"]
    assert on_b["failover"]["negotiated"] is True, on_b

    assert await asyncio.to_thread(where, host_b, u) == {
        "running": True, "primary": True, "record": False,
    }  # fmt: skip
    assert (await asyncio.to_thread(where, host_a, u))["running"] is False
    assert (await removed.wait_for(lambda e: True))["data"]["alias"] == PRIMARY
    assert (await added.wait_for(lambda e: True))["data"]["alias"] == PRIMARY

    text = serial_text(serial, offset)
    assert ["eth1"] in bond_members(text), "the guest saw its primary go"
    assert len(await bond_now(serial, 2)) == 2, "and come back"
    await pings_flow(serial, offset)


async def test_migrate_with_failover_works_under_per_host_credentials(
    lab: Any,
    host_a: Any,
    host_b: Any,
    guest: Callable[..., Any],
    start_agent: Callable[..., Awaitable[RunningAgent]],
    secured: NatsServer,
) -> None:
    """Both agents run with config/nats-server.conf.example's per-host permissions (hv01 and
    hv02), not as a superuser, and the request comes from its controller user: the whole
    sequence works - the reservation on the destination under the caller-id subject, each
    host's replies on its own inbox, the destination's replug - and the guest bonds again."""
    agent_a = await start_agent(**{"libvirt.uri": host_a.uri, "host_id": "hv01",
                                   "nats.urls": [secured_url(secured, "hv01")]})  # fmt: skip
    await start_agent(**{"libvirt.uri": host_b.uri, "host_id": "hv02",
                         "nats.urls": [secured_url(secured, "hv02")]})  # fmt: skip
    controller, errors = await connect_as(secured, "controller")
    try:
        dom = await asyncio.to_thread(guest, "a", "failover")
        u = dom.UUIDString()
        serial = lab.serial_path(dom.name())
        await asyncio.to_thread(wait_for_serial, serial, " ok", 30)
        ops = Collector()
        await controller.subscribe(f"virt.{agent_a.host}.op.>", cb=ops.on_msg)
        await subscribed(controller)
        reply = await call(controller, "hv01", "migrate_with_failover",
                           {"domain": dom.name(), "destination": "hv02"})  # fmt: skip
        assert reply["ok"] is True, reply
        op = await final_of(ops)
        assert op["state"] == "succeeded", op
        assert [s["step"] for s in op["steps"]] == STEPS
        assert await asyncio.to_thread(where, host_b, u) == {
            "running": True, "primary": True, "record": False,
        }  # fmt: skip
        assert (await asyncio.to_thread(where, host_a, u))["running"] is False
        assert len(await bond_now(serial, 2)) == 2, "the guest bonded its new primary"
        assert errors == [], "the controller met no permissions violation"
    finally:
        await controller.close()


@pytest.mark.timeout(600)
async def test_with_the_standby_rx_rule_in_the_guest_no_probe_is_lost(
    lab: Any,
    host_a: Any,
    host_b: Any,
    guest: Callable[..., Any],
    start_agent: Callable[..., Awaitable[RunningAgent]],
    collect: Callable[[str], Awaitable[Collector]],
    nc: Any,
) -> None:
    """The guest's net_failover accepts frames on the standby while the primary cannot carry
    traffic (lab/guest.py, variant standby-rx): A→B→A with migrate_with_failover loses no
    more than one 50 ms probe per migration - a stock guest loses 30-45 (bench/README.md)."""
    agent_a = await start_agent(**{"libvirt.uri": host_a.uri})
    agent_b = await start_agent(**{"libvirt.uri": host_b.uri})
    dom = await asyncio.to_thread(guest, "a", "failover", "standby-rx")
    serial = lab.serial_path(dom.name())
    await pings_flow(serial, 0)
    for src, dst in ((agent_a, agent_b), (agent_b, agent_a)):
        ops = await collect(f"virt.{src.host}.op.>")
        offset = serial.stat().st_size
        reply = await call(
            nc, src.host, "migrate_with_failover", {"domain": dom.name(), "destination": dst.host}
        )
        assert reply["ok"] is True, reply
        op = await final_of(ops)
        assert op["state"] == "succeeded", op
        await bond_now(serial, 2)
        await eventually(
            lambda o=offset: len(probes(serial_text(serial, o))) > 40, 60, "40 probes since"
        )
        got = probes(await asyncio.to_thread(serial_text, serial, offset))
        lost = [p.seq for p in got if not p.ok]
        assert len(lost) <= 1, f"lost probes {lost} of {len(got)}"


async def test_a_primary_without_standby_is_refused_unless_forced(
    lab: Any,
    host_a: Any,
    host_b: Any,
    guest: Callable[..., Any],
    start_agent: Callable[..., Awaitable[RunningAgent]],
    collect: Callable[[str], Awaitable[Collector]],
    nc: Any,
) -> None:
    """Unplugging a NIC that no standby backs would cut the VM off: invalid_request, and the
    domain keeps its NIC on A; with force it is done all the same: the VM moves to B with its
    primary, and the guest loses its network meanwhile. A virtio-only guest has no primary at
    all: not_found."""
    agent_a = await start_agent(**{"libvirt.uri": host_a.uri})
    agent_b = await start_agent(**{"libvirt.uri": host_b.uri})
    lone = await asyncio.to_thread(guest, "a", "primary")
    u = lone.UUIDString()
    serial = lab.serial_path(lone.name())
    await asyncio.to_thread(wait_for_serial, serial, " ok", 60)
    req = {"domain": lone.name(), "destination": agent_b.host, "primary": PRIMARY}
    reply = await call(nc, agent_a.host, "migrate_with_failover", req)
    assert reply["error"]["code"] == "invalid_request", reply
    assert "cut the VM off" in reply["error"]["message"]
    assert await asyncio.to_thread(where, host_a, u) == {
        "running": True, "primary": True, "record": False,
    }  # fmt: skip
    await pings_flow(serial, serial.stat().st_size, run=10)

    ops = await collect(f"virt.{agent_a.host}.op.>")
    offset = serial.stat().st_size
    reply = await call(nc, agent_a.host, "migrate_with_failover", {**req, "force": True})
    assert reply["ok"] is True, reply
    op = await final_of(ops)
    assert op["state"] == "succeeded", op
    assert op["steps"][0]["standby"] is None
    assert await asyncio.to_thread(where, host_b, u) == {
        "running": True, "primary": True, "record": False,
    }  # fmt: skip
    assert (await asyncio.to_thread(where, host_a, u))["running"] is False
    lost = [p.seq for p in probes(serial_text(serial, offset)) if not p.ok]
    assert lost, "with its only NIC unplugged the guest was cut off"
    plain = await asyncio.to_thread(guest, "a", "virtio")
    reply = await call(
        nc, agent_a.host, "migrate_with_failover",
        {"domain": plain.name(), "destination": agent_b.host},
    )  # fmt: skip
    assert reply["error"]["code"] == "not_found", reply
    reply = await call(
        nc, agent_a.host, "migrate_with_failover",
        {"domain": plain.name(), "destination": agent_b.host, "mode": "qemu",
         "primary": "ua-backup0"},
    )  # fmt: skip
    assert reply["error"]["code"] in ("invalid_request", "unsupported"), reply


@pytest.mark.parametrize("how", ["timeout", "cancel"])
async def test_a_migration_that_does_not_complete_rolls_back_to_the_source(
    how: str,
    lab: Any,
    host_a: Any,
    host_b: Any,
    guest: Callable[..., Any],
    start_agent: Callable[..., Awaitable[RunningAgent]],
    collect: Callable[[str], Awaitable[Collector]],
    nc: Any,
) -> None:
    """The migration times out (or is cancelled) after the unplug: the job is aborted, the
    primary is plugged back on A, the operation ends rolled_back (cancelled), B has nothing."""
    agent_a = await start_agent(**{"libvirt.uri": host_a.uri})
    agent_b = await start_agent(**{"libvirt.uri": host_b.uri})
    dom = await asyncio.to_thread(guest, "a", "failover")
    u = dom.UUIDString()
    serial = lab.serial_path(dom.name())
    ops = await collect(f"virt.{agent_a.host}.op.>")
    offset = serial.stat().st_size
    req: dict[str, Any] = {"domain": dom.name(), "destination": agent_b.host, "bandwidth_mib_s": 1}
    if how == "timeout":
        req["timeout_s"] = 4
    reply = await call(nc, agent_a.host, "migrate_with_failover", req)
    assert reply["ok"] is True, reply
    op_id = reply["result"]["operation_id"]
    if how == "cancel":
        await ops.wait_for(lambda e: e["data"]["operation"]["step"] == "migrate", 60)
        await asyncio.sleep(1)
        out = await call(nc, agent_a.host, "operation.cancel", {"operation_id": op_id})
        assert out["ok"] is True, out
    op = await final_of(ops)
    assert op["state"] == ("rolled_back" if how == "timeout" else "cancelled"), op
    assert [s["step"] for s in op["steps"]] == ["plan", "reserve", "unplug", "migrate", "rollback"]
    assert await asyncio.to_thread(where, host_a, u) == {
        "running": True, "primary": True, "record": False,
    }  # fmt: skip
    assert (await asyncio.to_thread(where, host_b, u))["running"] is False
    await bond_now(serial, 2)
    await pings_flow(serial, offset)
    # The reservation on B was given back.
    assert agent_b.agent.fleet is not None
    assert agent_b.agent.fleet.reconciler.pool.active() == []


async def test_the_destination_plugs_a_reserved_template_primary(
    lab: Any,
    host_a: Any,
    host_b: Any,
    guest: Callable[..., Any],
    start_agent: Callable[..., Awaitable[RunningAgent]],
    collect: Callable[[str], Awaitable[Collector]],
    nc: Any,
    tmp_path: Path,
) -> None:
    """B's pool is a device template: B reserves it, plugs it with the domain's MAC and alias
    (not the template's), and the guest bonds it as its new primary."""
    tpl = tmp_path / "vf.xml"
    tpl.write_text(
        primary_interface_xml(guest_mac(0))
        .replace(guest_mac(0), "52:54:00:ff:ff:ff")
    )  # fmt: skip
    agent_a = await start_agent(**{"libvirt.uri": host_a.uri})
    agent_b = await start_agent(**{
        "libvirt.uri": host_b.uri, "devices.templates": {"vf": str(tpl)},
        "failover.pool_template": "vf",
    })  # fmt: skip
    dom = await asyncio.to_thread(guest, "a", "failover")
    u = dom.UUIDString()
    mac = guest_mac(0)
    serial = lab.serial_path(dom.name())
    offset = serial.stat().st_size
    ops = await collect(f"virt.{agent_a.host}.op.>")
    reply = await call(
        nc, agent_a.host, "migrate_with_failover",
        {"domain": dom.name(), "destination": agent_b.host},
    )  # fmt: skip
    assert reply["ok"] is True, reply
    op = await final_of(ops)
    assert op["state"] == "succeeded", op
    reserve = next(s for s in op["steps"] if s["step"] == "reserve")
    assert reserve["resource"] == "template:vf"
    conn = host_b.connect()
    try:
        d = conn.lookupByUUIDString(u)
        live, config = d.XMLDesc(0), d.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    finally:
        conn.close()
    for xml in (live, config):
        assert xml.count(f"<mac address='{mac}'/>") == 2, xml
        assert "52:54:00:ff:ff:ff" not in xml
    assert agent_b.agent.fleet is not None
    assert agent_b.agent.fleet.reconciler.pool.active() == [], "the reservation was consumed"
    await bond_now(serial, 2)
    await pings_flow(serial, offset)


async def test_an_agent_that_starts_plugs_a_primary_its_domain_is_owed(
    host_a: Any,
    guest: Callable[..., Any],
    start_agent: Callable[..., Awaitable[RunningAgent]],
) -> None:
    """A domain whose metadata says a primary is owed (as after a failover whose destination
    agent was down) gets it from the agent running it, within the reconcile interval."""
    dom = await asyncio.to_thread(guest, "a", "failover")
    u = dom.UUIDString()
    device = device_xml(dom.XMLDesc(0), PRIMARY)
    assert device is not None
    await asyncio.to_thread(dom.detachDeviceAlias, PRIMARY, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    for _ in range(100):
        if f"'{PRIMARY}'" not in dom.XMLDesc(0):
            break
        await asyncio.sleep(0.1)
    rec = Record(operation="0" * 32, source="elsewhere", destination="here", alias=PRIMARY,
                 mac=guest_mac(0), mode="sequenced", state="owed", since=0.0, device=device)  # fmt: skip
    dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, record_to_xml(rec), PREFIX, NS,
                    libvirt.VIR_DOMAIN_AFFECT_LIVE)  # fmt: skip
    assert (await asyncio.to_thread(where, host_a, u))["primary"] is False
    await start_agent(**{"libvirt.uri": host_a.uri})
    for _ in range(100):
        state = await asyncio.to_thread(where, host_a, u)
        if state["primary"] and not state["record"]:
            break
        await asyncio.sleep(0.2)
    assert await asyncio.to_thread(where, host_a, u) == {
        "running": True, "primary": True, "record": False,
    }  # fmt: skip


async def test_a_failing_migration_watch_aborts_the_job_and_waits_for_it(
    host_a: Any,
    host_b: Any,
    guest: Callable[..., Any],
    start_agent: Callable[..., Awaitable[RunningAgent]],
    collect: Callable[[str], Awaitable[Collector]],
    nc: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A libvirt call of the migration's watch fails (injected: the convergence step raises
    as a failing migrateSetMaxDowntime would): the job is aborted and waited for before the
    operation ends `failed`, so the domain stays on A and nothing lands on B afterwards."""
    calls = 0

    def failing(self: Convergence, remaining: int | None) -> str | None:
        nonlocal calls
        calls += 1
        raise LibvirtFailure("injected: migrateSetMaxDowntime failed")

    monkeypatch.setattr(Convergence, "observe", failing)
    agent_a = await start_agent(**{"libvirt.uri": host_a.uri})
    agent_b = await start_agent(**{"libvirt.uri": host_b.uri})
    dom = await asyncio.to_thread(guest, "a", "virtio")
    u = dom.UUIDString()
    ops = await collect(f"virt.{agent_a.host}.op.>")
    slow = {"domain": dom.name(), "destination": agent_b.host, "bandwidth_mib_s": 1}
    reply = await call(nc, agent_a.host, "migrate", slow)
    assert reply["ok"] is True, reply
    op = await final_of(ops)
    assert calls >= 1
    assert op["state"] == "failed", op
    assert "injected" in op["error"]["message"]
    job = await asyncio.to_thread(lambda: dom.jobInfo()[0])
    assert job == libvirt.VIR_DOMAIN_JOB_NONE, "the job was over when the failure was reported"
    await asyncio.sleep(2)
    assert (await asyncio.to_thread(where, host_a, u))["running"] is True
    assert (await asyncio.to_thread(where, host_b, u))["running"] is False


async def test_a_cancel_after_the_migration_ends_succeeded_with_the_primary_owed(
    host_a: Any,
    host_b: Any,
    guest: Callable[..., Any],
    start_agent: Callable[..., Awaitable[RunningAgent]],
    collect: Callable[[str], Awaitable[Collector]],
    nc: Any,
) -> None:
    """The VM has moved when the cancel comes (the destination, here a stand-in agent on B's
    libvirt, has not plugged the primary yet): the operation ends `succeeded` saying the
    primary is owed - not `cancelled` - and an agent on B then plugs it."""
    agent_a = await start_agent(**{"libvirt.uri": host_a.uri})
    kv = await nc.jetstream().key_value("virt_hosts")
    await kv.put("slowdst", msgspec.json.encode({
        "host": "slowdst", "boot_id": "b", "version": "0", "libvirt_uri": host_b.uri,
        "migration_uri": "", "capabilities": None, "updated": time.time(),
        "failover_pool": {"kind": "recorded"},
    }))  # fmt: skip
    replug_asked = asyncio.Event()

    async def destination(msg: Any) -> None:
        # virt.slowdst.cmd.<verb>.<caller> (contract v1.1)
        verb = msg.subject.removeprefix("virt.slowdst.cmd.").rpartition(".")[0]
        if verb == "failover.reserve":
            await msg.respond(msgspec.json.encode({"ok": True, "result": {
                "reservation_id": "ab", "resource": "recorded", "pool": "recorded",
                "expires_in_s": 600}}))  # fmt: skip
        elif verb == "failover.release":
            await msg.respond(b'{"ok": true, "result": {"released": true}}')
        elif verb == "failover.replug":
            replug_asked.set()  # not answered: the primary is not plugged yet

    sub = await nc.subscribe("virt.slowdst.cmd.>", cb=destination)
    await subscribed(nc)
    try:
        dom = await asyncio.to_thread(guest, "a", "failover")
        u = dom.UUIDString()
        ops = await collect(f"virt.{agent_a.host}.op.>")
        reply = await call(nc, agent_a.host, "migrate_with_failover",
                           {"domain": dom.name(), "destination": "slowdst"})  # fmt: skip
        assert reply["ok"] is True, reply
        await asyncio.wait_for(replug_asked.wait(), 120)
        op_id = reply["result"]["operation_id"]
        assert (await call(nc, agent_a.host, "operation.cancel", {"operation_id": op_id}))["ok"]
        op = await final_of(ops)
        assert op["state"] == "succeeded", op
        assert "primary_owed" in op["result"], op["result"]
        assert await asyncio.to_thread(where, host_b, u) == {
            "running": True, "primary": False, "record": True,
        }, "moved, the primary owed by the record it carries"  # fmt: skip
    finally:
        await sub.unsubscribe()
    await start_agent(**{"libvirt.uri": host_b.uri, "failover.reconcile_interval_s": 1})
    await eventually(
        lambda: where(host_b, u) == {"running": True, "primary": True, "record": False},
        60, "an agent on B plugs the owed primary",
    )  # fmt: skip


@pytest.mark.timeout(600)
async def test_a_guest_without_a_failover_bond_is_refused_unless_forced(
    lab: Any,
    host_a: Any,
    host_b: Any,
    guest: Callable[..., Any],
    start_agent: Callable[..., Awaitable[RunningAgent]],
    collect: Callable[[str], Awaitable[Collector]],
    nc: Any,
) -> None:
    """A guest whose virtio driver never bound (lab variant `nobond`: the primary carries its
    address alone) has a standby on paper only: migrate_with_failover is refused with
    `conflict` naming the reason, and the guest keeps its network; with force it is migrated,
    and the guest is cut off until the primary is back on B (the outage, measured)."""
    agent_a = await start_agent(**{"libvirt.uri": host_a.uri})
    agent_b = await start_agent(**{"libvirt.uri": host_b.uri})
    dom = await asyncio.to_thread(guest, "a", "failover", "nobond")
    u = dom.UUIDString()
    serial = lab.serial_path(dom.name())
    await pings_flow(serial, 0, run=10, timeout=60)
    req = {"domain": dom.name(), "destination": agent_b.host}
    reply = await call(nc, agent_a.host, "migrate_with_failover", req)
    assert reply["ok"] is False, reply
    assert reply["error"]["code"] == "conflict", reply
    assert reply["error"]["details"]["reason"] == "guest_not_negotiated"
    assert "never bound" in reply["error"]["message"]
    info = (await call(nc, agent_a.host, "domain.get", {"domain": u}))["result"]
    assert info["failover"]["standby"] == "ua-backup0"
    assert info["failover"]["negotiated"] is False, info
    assert await asyncio.to_thread(where, host_a, u) == {
        "running": True, "primary": True, "record": False,
    }  # fmt: skip
    await pings_flow(serial, serial.stat().st_size, run=10)

    ops = await collect(f"virt.{agent_a.host}.op.>")
    offset = serial.stat().st_size
    reply = await call(nc, agent_a.host, "migrate_with_failover", {**req, "force": True})
    assert reply["ok"] is True, reply
    op = await final_of(ops)
    assert op["state"] == "succeeded", op
    assert await asyncio.to_thread(where, host_b, u) == {
        "running": True, "primary": True, "record": False,
    }  # fmt: skip
    await eventually(lambda: "LAB-READDRESS" in serial_text(serial, offset), 60,
                     "the guest addressed its new primary")  # fmt: skip
    await pings_flow(serial, offset)
    got = probes(serial_text(serial, offset))
    lost = [p.seq for p in got if not p.ok]
    assert lost, "the guest was cut off while its only working NIC was out"


@pytest.mark.parametrize("how", ["succeeds", "cancelled"])
async def test_mode_qemu_lets_qemu_move_the_primary(
    how: str,
    lab: Any,
    host_a: Any,
    host_b: Any,
    guest: Callable[..., Any],
    start_agent: Callable[..., Awaitable[RunningAgent]],
    collect: Callable[[str], Awaitable[Collector]],
    nc: Any,
) -> None:
    """QEMU-managed failover (the primary paired by QEMU itself, ../shared/LAB.md): `auto`
    chooses mode qemu and says why; QEMU unplugs the primary as the migration starts and plugs
    it back on B by itself - libvirt raises no device events, the guest's bond shows it - and
    the agent records and verifies as in sequenced mode. Cancelled during the migration, the
    domain stays on A and QEMU plugs the primary back there."""
    agent_a = await start_agent(**{"libvirt.uri": host_a.uri})
    agent_b = await start_agent(**{"libvirt.uri": host_b.uri})
    dom = await asyncio.to_thread(guest, "a", "qemu-failover")
    u = dom.UUIDString()
    serial = lab.serial_path(dom.name())
    await bond_now(serial, 2, timeout=60)
    await pings_flow(serial, 0, run=10, timeout=60)
    ops = await collect(f"virt.{agent_a.host}.op.>")
    removed = await collect(f"virt.{agent_a.host}.event.{u}.device_removed")
    offset = serial.stat().st_size
    req: dict[str, Any] = {"domain": dom.name(), "destination": agent_b.host}
    if how == "cancelled":
        req["bandwidth_mib_s"] = 1
    reply = await call(nc, agent_a.host, "migrate_with_failover", req)
    assert reply["ok"] is True, reply
    assert reply["result"]["mode"] == "qemu"
    if how == "cancelled":
        await ops.wait_for(lambda e: e["data"]["operation"]["step"] == "migrate", 60)
        await asyncio.sleep(2)
        op_id = reply["result"]["operation_id"]
        assert (await call(nc, agent_a.host, "operation.cancel", {"operation_id": op_id}))["ok"]
    op = await final_of(ops)
    plan = op["steps"][0]
    assert plan["mode"] == "qemu"
    assert "every condition" in plan["mode_reason"]
    assert removed.events() == [], "QEMU moved the primary: libvirt saw no device event"
    text = serial_text(serial, offset)
    assert ["eth1"] in bond_members(text), "the guest saw its primary go"
    await bond_now(serial, 2, timeout=60)
    await pings_flow(serial, offset)
    if how == "succeeds":
        assert op["state"] == "succeeded", op
        assert await asyncio.to_thread(where, host_b, u) == {
            "running": True, "primary": True, "record": False,
        }  # fmt: skip
        assert (await asyncio.to_thread(where, host_a, u))["running"] is False
    else:
        assert op["state"] == "cancelled", op
        assert await asyncio.to_thread(where, host_a, u) == {
            "running": True, "primary": True, "record": False,
        }  # fmt: skip
        assert (await asyncio.to_thread(where, host_b, u))["running"] is False
