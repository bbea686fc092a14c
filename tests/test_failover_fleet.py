"""One VF, one VM in the two-host lab: what the destination's persistent definition lists
before its agent plugs anything, what the operation says when the primary cannot be plugged,
and two failover guests migrated into one destination at the same time. The lab's primary is
an emulated e1000e from a template (no machine here has VFs), so the allocator's proof is the
seeded test in tests/test_allocator.py; this is what libvirt and the guests show."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import libvirt
import pytest

from agent.devices import device_element, device_xml
from agent.failover import NS, PREFIX, Record, record_to_xml
from lab.lab import (
    QEMU_PAIRED,
    READY_LINE,
    guest_mac,
    primary_interface_xml,
    remove_domain,
    standby_interface_xml,
    wait_for_serial,
)
from tests.support.agents import RunningAgent
from tests.support.bus import Collector, call
from tests.support.guests import FINAL, PRIMARY, bond_now, final_of, template, where

pytestmark = [pytest.mark.lab, pytest.mark.timeout(600)]


def models(host: Any, uuid: str) -> tuple[str | None, str | None]:
    """Which primary the live and the persistent definition on `host` have: "B's" (ROM off),
    "A's", or None."""
    conn = host.connect()
    try:
        d = conn.lookupByUUIDString(uuid)
        out = []
        for flags in (0, libvirt.VIR_DOMAIN_XML_INACTIVE):
            el = device_element(d.XMLDesc(flags), PRIMARY)
            out.append(None if el is None else "B's" if el.find("rom") is not None else "A's")
        return out[0], out[1]
    finally:
        conn.close()


async def test_the_domain_arrives_defined_with_the_destinations_primary_and_an_unplugged_one_is_owed(
    lab: Any,
    host_a: Any,
    host_b: Any,
    guest: Callable[..., Any],
    start_agent: Callable[..., Awaitable[RunningAgent]],
    collect: Callable[[str], Awaitable[Collector]],
    nc: Any,
    tmp_path: Path,
) -> None:
    """B's agent reserves, then stops before the migration. libvirt's copy of A's persistent definition would list A's primary (with a VF, A's address: the next start on B would take whatever sits there); the domain must arrive defined with B's reserved device. No agent on B plugs it: the operation ends `succeeded` (the VM runs on B) with `primary_owed` - not `failed`, which says the VM stayed on A. B's agent, started again, plugs it and the guest's bond is whole."""
    tpl = template(tmp_path)
    b_settings = {"libvirt.uri": host_b.uri, "devices.templates": {"vf": str(tpl)},
                  "failover.pool_template": "vf"}  # fmt: skip
    agent_a = await start_agent(**{"libvirt.uri": host_a.uri, "failover.replug_timeout_s": 5})
    agent_b = await start_agent(**b_settings)
    dom = await asyncio.to_thread(guest, "a", "failover")
    u = dom.UUIDString()
    ops = await collect(f"virt.{agent_a.host}.op.>")
    reply = await call(nc, agent_a.host, "migrate_with_failover",
                       {"domain": dom.name(), "destination": agent_b.host})  # fmt: skip
    assert reply["ok"] is True, reply
    await ops.wait_for(lambda e: e["data"]["operation"]["step"] == "unplug", 60)
    await agent_b.stop()
    op = await final_of(ops)
    assert op["state"] == "succeeded", op
    assert op["result"]["primary_owed"] is True, op["result"]
    assert (await asyncio.to_thread(where, host_b, u))["record"] is True, "owed on B"
    live, config = await asyncio.to_thread(models, host_b, u)
    assert live is None, "nothing plugged it on B yet"
    assert config == "B's", "B's definition lists B's reserved device, not A's primary"
    await start_agent(**b_settings)
    for _ in range(150):
        state = await asyncio.to_thread(where, host_b, u)
        if state.get("primary") and not state.get("record"):
            break
        await asyncio.sleep(0.2)
    assert await asyncio.to_thread(where, host_b, u) == {
        "running": True, "primary": True, "record": False}  # fmt: skip
    assert await asyncio.to_thread(models, host_b, u) == ("B's", "B's")
    await bond_now(lab.serial_path(dom.name()), 2)


async def test_two_failover_guests_migrated_into_one_destination_at_once_get_two_primaries(
    lab: Any,
    host_a: Any,
    host_b: Any,
    guest: Callable[..., Any],
    start_agent: Callable[..., Awaitable[RunningAgent]],
    collect: Callable[[str], Awaitable[Collector]],
    nc: Any,
    tmp_path: Path,
) -> None:
    """Two migrate_with_failover into B at the same time: both succeed, each guest runs on B with a primary of its own (its own MAC and alias, each once in B's definitions), two reservations made and both consumed, and each guest's bond is whole."""
    agent_a = await start_agent(**{"libvirt.uri": host_a.uri})
    agent_b = await start_agent(**{"libvirt.uri": host_b.uri,
                                   "devices.templates": {"vf": str(template(tmp_path))},
                                   "failover.pool_template": "vf"})  # fmt: skip
    doms = await asyncio.gather(*(asyncio.to_thread(guest, "a", "failover") for _ in range(2)))
    ops = await collect(f"virt.{agent_a.host}.op.>")
    replies = await asyncio.gather(*(
        call(nc, agent_a.host, "migrate_with_failover",
             {"domain": d.name(), "destination": agent_b.host}) for d in doms))  # fmt: skip
    ids = {r["result"]["operation_id"] for r in replies}
    assert len(ids) == 2, replies
    finals: dict[str, dict[str, Any]] = {}
    for op_id in ids:
        ev = await ops.wait_for(lambda e, i=op_id: e["data"]["operation"]["id"] == i
                                and e["data"]["operation"]["state"] in FINAL, 240)  # fmt: skip
        finals[op_id] = ev["data"]["operation"]
    assert {o["state"] for o in finals.values()} == {"succeeded"}, finals
    resources = [next(s for s in o["steps"] if s["step"] == "reserve")["reservation"]
                 for o in finals.values()]  # fmt: skip
    assert len(set(resources)) == 2, "one reservation each"
    conn = host_b.connect()
    try:
        macs = []
        for d in doms:
            b = conn.lookupByUUIDString(d.UUIDString())
            for flags in (0, libvirt.VIR_DOMAIN_XML_INACTIVE):
                el = device_element(b.XMLDesc(flags), PRIMARY)
                assert el is not None, d.name()
                mac = el.find("mac")
                assert mac is not None
                macs.append(mac.get("address"))
                assert el.find("rom") is not None, "B's template, in each"
    finally:
        conn.close()
    assert len(set(macs)) == 2, f"two primaries, each in its own domain: {macs}"
    assert agent_b.agent.fleet is not None
    assert agent_b.agent.fleet.reconciler.pool.active() == [], "both reservations consumed"
    for d in doms:
        await bond_now(lab.serial_path(d.name()), 2)


async def test_in_mode_qemu_a_primary_libvirt_lists_but_qemu_lacks_stays_owed(
    lab: Any,
    host_a: Any,
    guest: Callable[..., Any],
    start_agent: Callable[..., Awaitable[RunningAgent]],
    nc: Any,
) -> None:
    """libvirt 9.0 keeps a QEMU-paired primary in its live XML whatever QEMU did with it. A guest whose virtio driver never bound (`nobond`) never gets its primary from QEMU: libvirt lists `ua-primary0`, QEMU has no such device. A domain arriving with a mode-qemu record in that state is not settled: the replug says not attached (QEMU was asked), and the record stays - the operation cannot report success."""
    agent = await start_agent(**{"libvirt.uri": host_a.uri, "failover.reconcile_interval_s": 0.5})
    dom = await asyncio.to_thread(guest, "a", "qemu-failover", "nobond")
    u = dom.UUIDString()
    assert f"<alias name='{PRIMARY}'/>" in dom.XMLDesc(0), "libvirt lists the primary"
    device = device_xml(dom.XMLDesc(0), PRIMARY)
    assert device is not None
    rec = Record(operation="ab" * 16, source="elsewhere", destination=agent.host, alias=PRIMARY,
                 mac=guest_mac(1), mode="qemu", state="owed", since=0.0, device=device)  # fmt: skip
    await asyncio.to_thread(dom.setMetadata, libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                            record_to_xml(rec), PREFIX, NS, libvirt.VIR_DOMAIN_AFFECT_LIVE)  # fmt: skip
    reply = await call(nc, agent.host, "failover.replug.elsewhere",
                       {"domain": u, "alias": PRIMARY, "operation_id": "ab" * 16})  # fmt: skip
    assert reply["ok"] is True, reply
    assert reply["result"]["attached"] is False, reply
    assert "QEMU" in reply["result"]["why"], reply
    await asyncio.sleep(2)  # a few reconcile passes
    assert (await asyncio.to_thread(where, host_a, u))["record"] is True, "still owed"


def two_pair_domain(lab: Any, name: str, index: int) -> str:
    """The lab's QEMU-paired guest with a second pair beside the first (its own MAC)."""
    xml = str(lab.domain_xml(name, "qemu-failover", index))
    mac2 = guest_mac(index + 1)
    second = (standby_interface_xml(mac2).replace("ua-backup0", "ua-backup1")
              + primary_interface_xml(mac2, rom=False).replace("ua-primary0", "ua-primary1"))  # fmt: skip
    override = QEMU_PAIRED.split("<qemu:override>")[1].split("</qemu:override>")[0]
    override2 = override.replace("ua-primary0", "ua-primary1").replace("ua-backup0", "ua-backup1")
    return xml.replace("<serial type='file'>", f"{second}\n    <serial type='file'>").replace(
        "</qemu:override>", f"{override2}</qemu:override>")  # fmt: skip


async def test_a_domain_with_two_failover_pairs_is_refused_and_keeps_both(
    lab: Any,
    host_a: Any,
    host_b: Any,
    start_agent: Callable[..., Awaitable[RunningAgent]],
    nc: Any,
) -> None:
    """A running guest with two QEMU-paired failover pairs: migrate-with-failover moves one pair, and libvirt would carry the other past every pool, so it is refused before anything happens, naming the other primary; the guest keeps running on A with both primaries, and no operation was started."""
    agent_a = await start_agent(**{"libvirt.uri": host_a.uri})
    agent_b = await start_agent(**{"libvirt.uri": host_b.uri})
    name = "gtwopair"
    conn = host_a.connect()
    dom = None
    try:
        dom = conn.defineXML(two_pair_domain(lab, name, 6))
        dom.create()
        await asyncio.to_thread(wait_for_serial, lab.serial_path(name), READY_LINE, 90)
        reply = await call(nc, agent_a.host, "migrate_with_failover",
                           {"domain": name, "destination": agent_b.host})  # fmt: skip
        assert reply["ok"] is False, reply
        assert reply["error"]["code"] == "unsupported", reply
        assert reply["error"]["details"]["others"] == ["ua-primary1"], reply
        live = dom.XMLDesc(0)
        assert dom.isActive()
        assert "<alias name='ua-primary0'/>" in live
        assert "<alias name='ua-primary1'/>" in live
        ops = await call(nc, agent_a.host, "operation.list")
        assert ops["result"] == [], "nothing was started"
    finally:
        if dom is not None:
            remove_domain(dom)
        conn.close()


async def test_a_transient_domain_stays_transient_and_is_defined_nowhere(
    lab: Any,
    host_a: Any,
    host_b: Any,
    start_agent: Callable[..., Awaitable[RunningAgent]],
    collect: Callable[[str], Awaitable[Collector]],
    nc: Any,
) -> None:
    """A transient guest (created, never defined) migrated with failover runs on B with its primary and is still transient there: no definition of it exists on either host, so no VF address is defined anywhere (it used to arrive persistent, its definition copied from the live one)."""
    agent_a = await start_agent(**{"libvirt.uri": host_a.uri})
    agent_b = await start_agent(**{"libvirt.uri": host_b.uri})
    name = "gtransient"
    conn = host_a.connect()
    try:
        dom = conn.createXML(lab.domain_xml(name, "failover", 7), 0)
        await asyncio.to_thread(wait_for_serial, lab.serial_path(name), READY_LINE, 90)
        ops = await collect(f"virt.{agent_a.host}.op.>")
        reply = await call(nc, agent_a.host, "migrate_with_failover",
                           {"domain": name, "destination": agent_b.host})  # fmt: skip
        assert reply["ok"] is True, reply
        op = await final_of(ops)
        assert op["state"] == "succeeded", op
        assert await asyncio.to_thread(where, host_b, dom.UUIDString()) == {
            "running": True, "primary": True, "record": False}  # fmt: skip
        b = host_b.connect()
        try:
            assert not b.lookupByName(name).isPersistent(), "still transient on B"
        finally:
            b.close()
        assert name not in conn.listDefinedDomains(), "nothing left defined on A"
    finally:
        for h in (host_a, host_b):
            c = h.connect()
            try:
                with contextlib.suppress(libvirt.libvirtError):
                    remove_domain(c.lookupByName(name))
            finally:
                c.close()
        conn.close()
