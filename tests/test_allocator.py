"""One VF, one VM: the destination's allocator (agent/pool.py) through real agents on libvirt's
test driver - `failover.reserve`/`release`/`replug` over a real nats-server, the VFs held by
real test-driver definitions (defined, started, or started transient with a VF, as a plug
leaves them). The test driver cannot hot-plug; where a test needs a plug's outcome, the
domain is started with the device in it, which is what libvirt's definitions show after one."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import libvirt
import pytest
from nats.aio.client import Client as NATS

from agent.devices import device_element, pci_sources
from agent.failover import Record, write_record
from tests import nic_forms
from tests.support.agents import RunningAgent
from tests.support.bus import call

VFS = ["0000:3b:02.0", "0000:3b:02.1", "0000:3b:02.2"]
Start = Callable[..., Awaitable[RunningAgent]]


def vf_xml(addr: str, alias: str = "ua-vf0", mac: str = nic_forms.MAC) -> str:
    dom_, bus, rest = addr.split(":")
    slot, fn = rest.split(".")
    return (f"<interface type='hostdev' managed='yes'><mac address='{mac}'/><source>"
            f"<address type='pci' domain='0x{dom_}' bus='0x{bus}' slot='0x{slot}' "
            f"function='0x{fn}'/></source><alias name='{alias}'/></interface>")  # fmt: skip


def holder(name: str, device: str) -> str:
    """A test-driver domain whose only primary is `device` (no standby: not migrated)."""
    return nic_forms.domain_xml(device, name=name, kind="test").replace(nic_forms.STANDBY, "")


def reserve_body(op: str, domain: str = "", source: str = "hv-src", **extra: Any) -> dict[str, Any]:
    return {"operation_id": op, "domain": domain or str(uuid.uuid4()), "alias": "ua-vf0",
            "source": source, "lease_s": 600, **extra}  # fmt: skip


async def reserve(nc: NATS, host: str, op: str, caller: str = "hv-src", **extra: Any) -> Any:
    return await call(nc, host, f"failover.reserve.{caller}",
                      reserve_body(op, source=caller, **extra))  # fmt: skip


def held_vfs(conn: Any) -> list[str]:
    """Every VF in every live and persistent definition, once per definition that holds it."""
    out = []
    for d in conn.listAllDomains(0):
        with contextlib.suppress(libvirt.libvirtError):
            seen: set[str] = set()
            if d.isActive():
                seen |= pci_sources(d.XMLDesc(0))
            if d.isPersistent():
                seen |= pci_sources(d.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            out += sorted(seen)
    return out


async def test_an_upper_case_pool_address_is_the_same_vf_and_never_handed_out_in_use(
    start_agent: Start, nc: NATS, testdrv: Any
) -> None:
    """`pool_pci` written in upper case names the VF a domain's definition holds in libvirt's lower case: it is not handed out, and the one free VF is."""
    testdrv.defineXML(holder("t-upper", vf_xml("0000:3b:02.1")))
    agent = await start_agent(**{"failover.pool_pci": ["0000:3B:02.1", "0000:3B:02.2"]})
    got = await reserve(nc, agent.host, "aa01")
    assert got["result"]["resource"] == "pci:0000:3b:02.2", got
    again = await reserve(nc, agent.host, "aa02")
    assert again["ok"] is False, again
    assert again["error"]["code"] == "unavailable", again


async def test_a_template_naming_a_vf_is_one_vf(
    start_agent: Start, nc: NATS, testdrv: Any, tmp_path: Path
) -> None:
    """A pool template that names a VF by address hands it to one reservation at a time, and never while a domain holds it."""
    tpl = tmp_path / "vf.xml"
    tpl.write_text(vf_xml("0000:5e:00.4", alias="ua-x"))
    agent = await start_agent(**{"devices.templates": {"vf": str(tpl)},
                                 "failover.pool_template": "vf"})  # fmt: skip
    first = await reserve(nc, agent.host, "bb01")
    assert first["ok"] is True, first
    second = await reserve(nc, agent.host, "bb02")
    assert second["ok"] is False, second
    assert second["error"]["code"] == "unavailable", second
    await call(nc, agent.host, "failover.release.hv-src", {"operation_id": "bb01"})
    testdrv.defineXML(holder("t-tplvf", vf_xml("0000:5e:00.4")))
    third = await reserve(nc, agent.host, "bb03")
    assert third["ok"] is False, "a domain holds it"
    assert third["error"]["code"] == "unavailable", third


@pytest.mark.parametrize(
    ("template", "why"),
    [
        ("<interface type='bridge'><source bridge='br0'/><model type='e1000e'/>"
         "<teaming type='transient' persistent='ua-s'/></interface>", "teaming"),
        ("<hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0x0000' "
         "bus='0x5e' slot='0x00' function='0x4'/></source></hostdev>", "MAC"),
    ],
)  # fmt: skip
def test_a_template_libvirt_would_refuse_is_refused_at_load(
    tmp_path: Path, template: str, why: str
) -> None:
    from agent.errors import SettingsError  # noqa: PLC0415
    from agent.settings_load import load  # noqa: PLC0415

    tpl = tmp_path / "t.xml"
    tpl.write_text(template)
    with pytest.raises(SettingsError, match=why) as err:
        load(None, env={}, overrides={"devices.templates": {"t": str(tpl)},
                                      "failover.pool_template": "t"})  # fmt: skip
    assert err.value.key == "failover.pool_template"


async def test_an_owed_primary_naming_the_sources_vf_is_never_plugged_on_a_host_without_a_pool(
    start_agent: Start, nc: NATS, testdrv: Any
) -> None:
    """A domain arrives (here: a plain migrate, the record travelling with it) owing a primary recorded with the source's VF address; this host has no pool. Plugging that address here would take whatever device sits at it: the replug is refused with the reason, and the record stays (owed)."""
    agent = await start_agent()
    dom = testdrv.createXML(nic_forms.domain_xml("", name="t-owed", kind="test"), 0)
    assert agent.agent.fleet is not None
    hv = agent.agent.fleet.reconciler.hv
    await write_record(await hv.domain(dom.UUIDString()), Record(
        operation="cc01", source="hv-src", destination=agent.host, alias=nic_forms.PRIMARY_ALIAS,
        mac=nic_forms.MAC, mode="sequenced", state="owed", since=time.time(),
        device=nic_forms.HOSTDEV_INTERFACE))  # fmt: skip
    reply = await call(nc, agent.host, "failover.replug.hv-src",
                       {"domain": dom.UUIDString(), "alias": nic_forms.PRIMARY_ALIAS})  # fmt: skip
    assert reply["ok"] is False, reply
    assert reply["error"]["code"] == "forbidden", reply
    assert reply["error"]["details"].get("reason") == "no_pool_for_vf", reply
    assert device_element(dom.XMLDesc(0), nic_forms.PRIMARY_ALIAS) is None


async def test_a_reserve_racing_a_plug_never_hands_out_the_plugged_vf(
    start_agent: Start, nc: NATS, testdrv: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reserve's scan of the domains ends; before it decides, another domain's plug completes (its VF now in that domain's live definition) and consumes its reservation. The VF must not be called free: the scan and the decision are one step under the allocator's lock."""
    agent = await start_agent(**{"failover.pool_pci": VFS[:2]})
    assert agent.agent.fleet is not None
    pool = agent.agent.fleet.reconciler.pool
    first = await reserve(nc, agent.host, "dd01")
    vf = first["result"]["resource"].removeprefix("pci:")
    res = pool.get(first["result"]["reservation_id"])
    hv = agent.agent.fleet.reconciler.hv
    real_call = hv.call
    armed = [True]

    async def plug_lands() -> None:
        testdrv.createXML(holder("t-plugged", vf_xml(vf)), 0)  # the plug's outcome
        with contextlib.suppress(Exception):
            consumed = pool.release(res.id)  # the reconciler consumes the reservation
            if asyncio.iscoroutine(consumed):
                await consumed

    async def call_then_plug(fn: Any, *args: Any) -> Any:
        out = await real_call(fn, *args)
        if armed[0] and getattr(fn, "__name__", "") in ("scan", "look"):
            armed[0] = False
            task = asyncio.ensure_future(plug_lands())
            await asyncio.sleep(0.2)  # the plug completes now, if nothing holds it back
            out_of_order.append(task)
        return out

    out_of_order: list[asyncio.Task[None]] = []
    monkeypatch.setattr(hv, "call", call_then_plug)
    second = await reserve(nc, agent.host, "dd02")
    monkeypatch.setattr(hv, "call", real_call)
    await asyncio.gather(*out_of_order)
    assert second["ok"] is True, second
    assert second["result"]["resource"] != f"pci:{vf}", "the plugged VF was handed out again"


async def test_a_release_that_overtakes_its_reserve_leaks_nothing(
    start_agent: Start, nc: NATS
) -> None:
    """A source whose reserve timed out releases by operation; the release can arrive before the reserve is served. The late reserve must not hold a VF nobody will release."""
    agent = await start_agent(**{"failover.pool_pci": VFS[:1]})
    released = await call(nc, agent.host, "failover.release.hv-src", {"operation_id": "ee01"})
    assert released["ok"] is True, released
    late = await reserve(nc, agent.host, "ee01")
    assert late["ok"] is False, late
    other = await reserve(nc, agent.host, "ee02")
    assert other["ok"] is True, "the VF is still free for someone else"


async def test_a_reserve_before_libvirt_is_connected_is_unavailable(
    start_agent: Start, nc: NATS
) -> None:
    """While libvirt is not connected, `failover.reserve` answers `unavailable` (a source can tell it from a bug), not `internal`."""
    agent = await start_agent(**{"failover.pool_pci": VFS[:1]})
    assert agent.agent.fleet is not None
    hv = agent.agent.fleet.reconciler.hv
    conn = hv.conn
    hv.conn = None
    try:
        got = await reserve(nc, agent.host, "ff01")
    finally:
        hv.conn = conn
    assert got["ok"] is False, got
    assert got["error"]["code"] == "unavailable", got


async def test_a_vf_used_as_macvtap_passthrough_or_by_a_neighbour_in_its_iommu_group_is_not_free(
    start_agent: Start, nc: NATS, testdrv: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A domain using a VF's netdev as macvtap passthrough (`type='direct' mode='passthrough'`) holds that VF; a VF whose IOMMU group has a member held by a domain is not free either. sysfs is a tree made here (no machine here has VFs): the kernel's layout, /sys/class/net/<dev>/device and /sys/bus/pci/devices/<addr>/iommu_group/devices/."""
    sysfs = tmp_path / "sys"
    pci = sysfs / "bus" / "pci" / "devices"
    for addr in [*VFS, "0000:3b:03.0"]:
        (pci / addr).mkdir(parents=True)
    (sysfs / "class" / "net" / "enp59s2f0").mkdir(parents=True)
    (sysfs / "class" / "net" / "enp59s2f0" / "device").symlink_to(pci / VFS[0])
    group = sysfs / "kernel" / "iommu_groups" / "7" / "devices"
    group.mkdir(parents=True)
    for addr in (VFS[1], "0000:3b:03.0"):
        (group / addr).symlink_to(pci / addr)
        (pci / addr / "iommu_group").symlink_to(group.parent)
    monkeypatch.setattr("agent.pool.SYSFS", sysfs)
    direct = ("<interface type='direct'><mac address='52:54:00:00:00:01'/>"
              "<source dev='enp59s2f0' mode='passthrough'/><alias name='ua-d'/></interface>")  # fmt: skip
    testdrv.defineXML(holder("t-direct", direct))
    testdrv.defineXML(holder("t-neighbour", vf_xml("0000:3b:03.0")))
    agent = await start_agent(**{"failover.pool_pci": VFS})
    got = await reserve(nc, agent.host, "ab01")
    assert got["result"]["resource"] == f"pci:{VFS[2]}", got


async def test_a_hostdev_networks_vfs_and_its_capacity_are_respected(
    start_agent: Start, nc: NATS, testdrv: Any
) -> None:
    """A VF listed in a libvirt hostdev network is the network's to give: never handed out by `pool_pci`. A `network:` pool reserves no more ports than the network has VFs."""
    net = testdrv.networkCreateXML(
        "<network><name>t-sriov</name><forward mode='hostdev' managed='yes'>"
        "<address type='pci' domain='0x0000' bus='0x3b' slot='0x02' function='0x0'/>"
        "<address type='pci' domain='0x0000' bus='0x3b' slot='0x02' function='0x1'/>"
        "</forward></network>"
    )
    try:
        agent = await start_agent(**{"failover.pool_pci": VFS})
        got = await reserve(nc, agent.host, "ac01")
        assert got["result"]["resource"] == f"pci:{VFS[2]}", got
        netpool = await start_agent(**{"failover.pool_network": "t-sriov"})
        assert (await reserve(nc, netpool.host, "ac02"))["ok"] is True
        assert (await reserve(nc, netpool.host, "ac03"))["ok"] is True
        full = await reserve(nc, netpool.host, "ac04")
        assert full["ok"] is False, full
        assert full["error"]["code"] == "unavailable", full
    finally:
        net.destroy()


def test_managed_is_kept_and_a_plain_hostdev_becomes_an_interface_with_the_standbys_mac(
    tmp_path: Path,
) -> None:
    """libvirt's default for a hostdev is unmanaged; a fleet that binds VFs to vfio-pci itself must not have them rebound: `managed` is what was recorded. A plain `<hostdev>` primary has no MAC: it is plugged as an `<interface type='hostdev'>` with the standby's MAC, or the guest never pairs it."""
    from agent.journal import Journal  # noqa: PLC0415
    from agent.pool import Pool  # noqa: PLC0415
    from agent.settings import DeviceSettings, FailoverSettings  # noqa: PLC0415

    pool = Pool(FailoverSettings(pool_pci=VFS), DeviceSettings(), Journal(tmp_path / "j.db"))
    unmanaged = nic_forms.HOSTDEV_INTERFACE.replace(" managed='yes'", "")
    out = ET.fromstring(pool.definition(f"pci:{VFS[0]}", unmanaged))
    assert out.get("managed") is None, "libvirt's default (unmanaged) kept"
    out = ET.fromstring(pool.definition(f"pci:{VFS[0]}", nic_forms.PLAIN_HOSTDEV, nic_forms.MAC))
    assert (out.tag, out.get("type"), out.get("managed")) == ("interface", "hostdev", "yes")
    assert [m.get("address") for m in out.findall("mac")] == [nic_forms.MAC]


def test_a_network_port_becoming_a_vf_keeps_what_its_network_gave_it(tmp_path: Path) -> None:
    """A hostdev-network primary plugged on the destination as a VF by address (a `pci` pool) keeps the VLAN, port profile and `managed` its network gave it on the source (seen only in the live XML); `<mtu>`, legal on `type='network'`, is refused by libvirt on `type='hostdev'` and left out."""
    from agent.journal import Journal  # noqa: PLC0415
    from agent.pool import Pool  # noqa: PLC0415
    from agent.settings import DeviceSettings, FailoverSettings  # noqa: PLC0415
    from handlers.failover.plan import network_carry  # noqa: PLC0415

    pool = Pool(FailoverSettings(pool_pci=VFS), DeviceSettings(), Journal(tmp_path / "j.db"))
    recorded = nic_forms.NETWORK_INACTIVE.replace(
        "<vlan><tag id='42'/></vlan>", "<mtu size='9000'/>"
    )
    live = nic_forms.domain_xml(nic_forms.NETWORK_LIVE.replace(
        "<vlan><tag id='42'/></vlan>", "<vlan><tag id='77'/></vlan>"))  # fmt: skip
    carry = network_carry(live, recorded, nic_forms.PRIMARY_ALIAS)
    out = ET.fromstring(pool.definition(f"pci:{VFS[0]}", recorded, nic_forms.MAC, carry))
    assert (out.get("type"), out.get("managed")) == ("hostdev", "yes")
    vlan = out.find("vlan/tag")
    assert vlan is not None, ET.tostring(out)
    assert vlan.get("id") == "77", ET.tostring(out)
    assert out.find("mtu") is None


async def test_a_vf_whose_plug_failed_is_quarantined_until_cleared(
    start_agent: Start, nc: NATS, testdrv: Any
) -> None:
    """The plug of a reserved VF fails (the test driver refuses every attach): that VF is quarantined - not chosen again by the next migration, shown in the pool's state and metrics - until an operator clears it (`pool.unquarantine`)."""
    agent = await start_agent(**{"failover.pool_pci": VFS[:2]})
    dom = testdrv.createXML(nic_forms.domain_xml("", name="t-badvf", kind="test"), 0)
    assert agent.agent.fleet is not None
    hv = agent.agent.fleet.reconciler.hv
    got = await reserve(nc, agent.host, "ad01", domain=dom.UUIDString())
    bad = got["result"]["resource"].removeprefix("pci:")
    await write_record(await hv.domain(dom.UUIDString()), Record(
        operation="ad01", source="hv-src", destination=agent.host, alias=nic_forms.PRIMARY_ALIAS,
        mac=nic_forms.MAC, mode="sequenced", state="owed", since=time.time(),
        device=nic_forms.HOSTDEV_INTERFACE))  # fmt: skip
    failed = await call(nc, agent.host, "failover.replug.hv-src",
                        {"domain": dom.UUIDString(), "alias": nic_forms.PRIMARY_ALIAS,
                         "operation_id": "ad01"})  # fmt: skip
    assert failed["ok"] is False, failed
    nxt = await reserve(nc, agent.host, "ad02")
    assert nxt["result"]["resource"] != f"pci:{bad}", "the VF that failed is not chosen again"
    state = await call(nc, agent.host, "pool.get")
    assert state["result"]["vfs"][bad] == "quarantined", state
    metrics = agent.agent.metrics.render().decode()
    assert 'virt_agent_failover_vfs{state="quarantined"} 1.0' in metrics
    cleared = await call(nc, agent.host, "pool.unquarantine", {"vf": bad.upper()})
    assert cleared["result"] == {"cleared": True}, cleared
    state = await call(nc, agent.host, "pool.get")
    assert state["result"]["vfs"][bad] == "free", state


# ---------------------------------------------------------------- many callers at once


async def test_many_callers_at_once_never_share_a_vf(
    start_agent: Start, nc: NATS, testdrv: Any
) -> None:
    """Seeded: four calling hosts (three VFs) reserve, plug, release and let leases expire against one destination's allocator, all at once, for 240 sequences. After every step no VF is in two definitions (live or persistent), in two reservations, or in a reservation and another domain's definition; at the end every VF is free again."""
    seed = 20261204
    rng = random.Random(seed)
    agent = await start_agent(**{"failover.pool_pci": VFS, "failover.lease_s": 0.3})
    assert agent.agent.fleet is not None
    pool = agent.agent.fleet.reconciler.pool
    callers = ["hv-a", "hv-b", "hv-c", "hv-d"]
    violations: list[str] = []
    counts = {"reserved": 0, "plugged": 0, "released": 0, "expired": 0, "refused": 0}

    def check(where: str) -> None:
        held = held_vfs(testdrv)
        dup = {v for v in held if held.count(v) > 1}
        reserved = [r.vf for r in pool.active() if r.vf and r.state == "reserved"]
        if dup:
            violations.append(f"{where}: in two definitions {dup}")
        if len(reserved) != len(set(reserved)):
            violations.append(f"{where}: in two reservations {reserved}")
        if set(reserved) & set(held):
            violations.append(f"{where}: reserved and held {set(reserved) & set(held)}")

    async def one(caller: str, i: int) -> None:
        op = f"{rng.getrandbits(48):012x}{i:04x}"
        dom_uuid = str(uuid.UUID(int=rng.getrandbits(128)))
        got = await reserve(nc, agent.host, op, caller=caller, domain=dom_uuid, lease_s=0.3)
        if not got["ok"]:
            counts["refused"] += 1
            return
        counts["reserved"] += 1
        vf = got["result"]["resource"].removeprefix("pci:")
        check(f"{caller} reserved {vf}")
        await asyncio.sleep(rng.random() * 0.05)
        action = rng.choice(["plug", "release", "expire"])
        if action == "plug":
            res = pool.for_operation(op)
            if res is None:
                counts["expired"] += 1
                return
            name = f"t-c{op}"
            with contextlib.suppress(Exception):
                async with pool.plugging(res):
                    testdrv.createXML(nic_forms.domain_xml(
                        vf_xml(vf), name=name, uuid=dom_uuid, kind="test"), 0)  # fmt: skip
                counts["plugged"] += 1
                check(f"{caller} plugged {vf}")
                await asyncio.sleep(rng.random() * 0.05)
                testdrv.lookupByName(name).destroy()  # the VM leaves: its VF is free again
        elif action == "release":
            await call(nc, agent.host, f"failover.release.{caller}", {"operation_id": op})
            counts["released"] += 1
        else:
            await asyncio.sleep(0.4)
            counts["expired"] += 1
        check(f"{caller} {action} {vf}")

    async def caller_loop(caller: str) -> None:
        for i in range(60):
            await one(caller, i)

    await asyncio.gather(*(caller_loop(c) for c in callers))
    assert violations == [], f"seed {seed}: {violations[:5]}"
    await asyncio.sleep(0.5)
    assert pool.active() == [], "every lease ended"
    await pool.scan()
    assert set(pool.states().values()) == {"free"}, pool.states()
    assert counts["plugged"] > 20, counts
    assert counts["refused"] > 0, f"the pool was never exhausted: {counts}"
