"""The parts of migrate-with-failover that need no hypervisor: finding the primary and its
standby in a domain definition, the destination pool's reservations (a real SQLite journal)
and the definitions it plugs, the failover record's round trip, the [failover] settings."""

from __future__ import annotations

import asyncio
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import libvirt
import msgspec
import pytest
from nats.aio.client import Client as NATS

from agent.bus import subscribed
from agent.capabilities import Capabilities
from agent.context import HostContext, Probed
from agent.devices import interfaces
from agent.domain import Domain
from agent.envelope import Subjects
from agent.errors import Forbidden, InvalidRequest, NotFound, Unavailable, Unsupported
from agent.failover import NS, Record, record_from_xml, record_to_xml
from agent.hypervisor import Hypervisor
from agent.journal import Journal
from agent.metrics import Metrics
from agent.pool import Pool
from agent.registry import Registration
from agent.settings import DeviceSettings, FailoverSettings, LibvirtSettings
from agent.settings_load import load
from handlers.failover import find_pair
from handlers.failover.plan import FailoverRequest, make_plan
from tests import nic_forms
from tests.support.agents import RunningAgent
from tests.support.bus import call
from tests.support.domains import define
from tests.support.operations import ended, running_pair

TEST_DOMAIN_UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"  # libvirt's test:///default domain

MAC = "52:54:00:aa:bb:cc"
STANDBY = f"""<interface type='bridge'><mac address='{MAC}'/><source bridge='br0'/>
  <model type='virtio'/><teaming type='persistent'/><alias name='ua-standby'/></interface>"""
HOSTDEV = f"""<interface type='hostdev' managed='yes'><mac address='{MAC}'/>
  <source><address type='pci' domain='0x0000' bus='0x3b' slot='0x02' function='0x1'/></source>
  <teaming type='transient' persistent='ua-standby'/><alias name='ua-vf'/></interface>"""
E1000E = f"""<interface type='bridge'><mac address='{MAC}'/><source bridge='br0'/>
  <model type='e1000e'/><alias name='ua-primary'/></interface>"""
OTHER = """<interface type='network'><mac address='52:54:00:00:00:09'/><source network='default'/>
  <model type='virtio'/><alias name='ua-mgmt'/></interface>"""


def domain(*nics: str) -> str:
    return f"<domain><devices>{''.join(nics)}</devices></domain>"


@pytest.mark.parametrize(
    ("nics", "primary", "standby"),
    [
        ((OTHER, STANDBY, HOSTDEV), "ua-vf", "ua-standby"),  # libvirt <teaming>
        ((OTHER, E1000E, STANDBY), "ua-primary", "ua-standby"),  # same-MAC pair
        ((OTHER, HOSTDEV.replace("<teaming type='transient' persistent='ua-standby'/>", "")),
         "ua-vf", None),  # a passthrough NIC with no standby
    ],
)  # fmt: skip
def test_the_primary_and_its_standby_are_found(
    nics: tuple[str, ...], primary: str, standby: str | None
) -> None:
    p, s = find_pair(interfaces(domain(*nics)), None)
    assert p.alias == primary
    assert (s.alias if s else None) == standby


def test_no_primary_or_an_unknown_alias_is_not_found() -> None:
    with pytest.raises(NotFound, match="no primary NIC found"):
        find_pair(interfaces(domain(OTHER, STANDBY)), None)
    with pytest.raises(NotFound, match="ua-nope"):
        find_pair(interfaces(domain(OTHER, STANDBY, E1000E)), "ua-nope")


def pool(tmp_path: Path, hv: Hypervisor | None = None, **settings: object) -> Pool:
    tpl = tmp_path / "vf.xml"
    tpl.write_text("<interface type='bridge'><mac address='52:54:00:ff:ff:ff'/>"
                   "<source bridge='br1'/><model type='e1000e'/><alias name='ua-x'/></interface>")  # fmt: skip
    return Pool(
        FailoverSettings(**settings),  # type: ignore[arg-type]
        DeviceSettings(templates={"vf": str(tpl)}),
        Journal(tmp_path / "ops.db"),
        hv,
    )


@pytest.fixture
async def testhv() -> AsyncIterator[Hypervisor]:
    """This process's test:///default through the agent's Hypervisor (what the pool scans)."""
    hv = Hypervisor(LibvirtSettings(), "test:///default", "dst", lambda _e: None, Metrics())
    await hv.connect()
    yield hv
    await hv.close()


async def test_a_pci_pool_hands_out_each_free_vf_once(
    tmp_path: Path, testhv: Hypervisor, testdrv: Any
) -> None:
    testdrv.defineXML(domain_with_vf("t-holds0", "0x0"))
    p = pool(tmp_path, testhv, pool_pci=["0000:3b:02.0", "0000:3b:02.1", "0000:3b:02.2"])
    first = await p.reserve("op1", "dom1")
    assert first.resource == "pci:0000:3b:02.1"
    assert await p.reserve("op1", "dom1") == first, "the same operation gets the same VF"
    testdrv.lookupByName("t-holds0").undefine()
    assert (await p.reserve("op2", "dom2")).resource == "pci:0000:3b:02.0"
    assert (await p.reserve("op3", "dom3")).resource == "pci:0000:3b:02.2"
    with pytest.raises(Unavailable, match="no free VF"):
        await p.reserve("op4", "dom4")
    assert await p.release(first.id)
    assert (await p.reserve("op4", "dom4")).resource == "pci:0000:3b:02.1"
    # Reservations outlive the process: a new Pool on the same journal sees them.
    again = Pool(p.settings, p.devices, Journal(tmp_path / "ops.db"))
    assert {r.operation for r in again.active()} == {"op2", "op3", "op4"}


def domain_with_vf(name: str, function: str) -> str:
    vf = (f"<interface type='hostdev' managed='yes'><mac address='{MAC}'/><source><address "
          f"type='pci' domain='0x0000' bus='0x3b' slot='0x02' function='{function}'/></source>"
          "<alias name='ua-vf'/></interface>")  # fmt: skip
    return nic_forms.domain_xml(vf, name=name, kind="test")


async def test_an_expired_lease_frees_its_vf_but_never_while_it_is_plugged(
    tmp_path: Path, testhv: Hypervisor
) -> None:
    """A reserved VF whose lease ends is free again; one whose plug is under way (libvirt preparing it for the domain) does not expire, however long the plug takes."""
    p = pool(tmp_path, testhv, pool_pci=["0000:3b:02.0"], lease_s=0.05)
    await p.reserve("op1", "dom1")
    await asyncio.sleep(0.1)
    assert p.active() == []
    r = await p.reserve("op2", "dom2")
    assert r.resource == "pci:0000:3b:02.0"
    async with p.plugging(r):
        await asyncio.sleep(0.1)  # the lease ends meanwhile
        with pytest.raises(Unavailable, match="no free VF"):
            await p.reserve("op3", "dom3")
    assert p.active() == [], "consumed by its plug"


async def test_a_lease_covers_what_the_source_says_it_may_need(
    tmp_path: Path, testhv: Hypervisor
) -> None:
    p = pool(tmp_path, testhv, pool_pci=["0000:3b:02.0"], lease_s=300)
    r = await p.reserve("op1", "dom1", lease_s=900)
    assert 890 < r.expires - time.time() <= 900


async def test_a_reservation_is_released_by_its_operation_when_the_reply_was_lost(
    start_agent: Callable[..., Awaitable[RunningAgent]], nc: NATS
) -> None:
    """The source never got the reserve reply (it timed out): it releases by operation id."""
    agent = await start_agent(**{"failover.pool_pci": ["0000:3b:02.0"]})
    body = {"operation_id": "ab12", "domain": TEST_DOMAIN_UUID, "alias": "ua-primary0",
            "source": "hv-other", "lease_s": 600}  # fmt: skip
    reserved = await call(nc, agent.host, "failover.reserve", body)
    assert reserved["result"]["resource"] == "pci:0000:3b:02.0", reserved
    taken = await call(nc, agent.host, "failover.reserve", body | {"operation_id": "cd34"})
    assert taken["error"]["code"] == "unavailable", "the only VF is held"
    out = await call(nc, agent.host, "failover.release", {"operation_id": "ab12"})
    assert out == {"ok": True, "result": {"released": True}}
    assert agent.agent.fleet is not None
    assert agent.agent.fleet.reconciler.pool.active() == []
    again = await call(nc, agent.host, "failover.reserve", body | {"operation_id": "cd34"})
    assert again["ok"] is True, "the VF is free again"
    neither = await call(nc, agent.host, "failover.release", {})
    assert neither["error"]["code"] == "invalid_request"


@pytest.mark.parametrize(
    ("resource", "kind", "source"),
    [
        ("pci:0000:3b:02.5", "hostdev", "./source/address[@slot='0x02'][@function='0x5']"),
        ("network:vfpool", "network", "./source[@network='vfpool']"),
        ("template:vf", "bridge", "./source[@bridge='br1']"),
    ],
)
def test_the_plugged_definition_keeps_mac_alias_and_teaming(
    tmp_path: Path, resource: str, kind: str, source: str
) -> None:
    xml = pool(tmp_path).definition(resource, HOSTDEV)
    el = ET.fromstring(xml)
    assert el.get("type") == kind
    assert el.find(source) is not None, xml
    assert [m.get("address") for m in el.findall("mac")] == [MAC]
    assert [a.get("name") for a in el.findall("alias")] == ["ua-vf"]
    teaming = el.find("teaming")
    assert teaming is not None
    assert teaming.get("persistent") == "ua-standby"
    assert pool(tmp_path).definition("recorded", E1000E) == E1000E
    with pytest.raises(Forbidden, match="VF of the source host"):
        pool(tmp_path).definition("recorded", HOSTDEV)


def test_the_failover_record_round_trips_through_its_xml() -> None:
    rec = Record(operation="ab12", source="hv1", destination="hv2", alias="ua-vf", mac=MAC,
                 mode="sequenced", state="owed", since=1234.5, device=HOSTDEV)  # fmt: skip
    assert record_from_xml(record_to_xml(rec)) == rec


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"failover.pool_network": "n", "failover.pool_pci": ["0000:3b:02.0"]},
         "failover.pool_pci"),
        ({"failover.pool_template": "missing"}, "failover.pool_template"),
        ({"failover.pool_pci": ["3b:02.0"]}, "failover.pool_pci"),
    ],
)  # fmt: skip
def test_bad_failover_settings_name_the_key(overrides: dict[str, object], key: str) -> None:
    from agent.errors import SettingsError  # noqa: PLC0415

    with pytest.raises(SettingsError) as err:
        load(None, env={}, overrides=overrides)
    assert err.value.key == key


# ---------------------------------------------------------------- the NIC forms libvirt produces


def caps(failover: bool) -> Capabilities:
    return Capabilities(libvirt_version="9.0.0", hypervisor="QEMU 7.2.0", domain_caps=None,
                        qemu_failover=failover, libvirt_teaming=failover,
                        virtio_net_failover=failover, event_types=[], notes=[])  # fmt: skip


def registration(host: str, pool: str = "recorded", failover: bool = True) -> Registration:
    return Registration(host=host, boot_id="b", version="0", libvirt_uri="test:///default",
                        migration_uri="", capabilities=caps(failover), updated=0.0,
                        failover_pool={"kind": pool})  # fmt: skip


class DefinedDomain:
    """What make_plan reads of a libvirt domain: its live and its inactive XML. A stand-in,
    because the live form of a hostdev network port needs a real VF, which no machine here has
    (tests/nic_forms.py says where each form comes from)."""

    def __init__(self, live: str, inactive: str) -> None:
        self.xml = {0: live, libvirt.VIR_DOMAIN_XML_INACTIVE: inactive}

    def XMLDesc(self, flags: int) -> str:  # noqa: N802 - libvirt's name
        return self.xml[flags]

    def UUIDString(self) -> str:  # noqa: N802 - libvirt's name
        return TEST_DOMAIN_UUID

    def name(self) -> str:
        return "d"


def defined(ctx: HostContext, live: str, inactive: str) -> Domain:
    return Domain(ctx.hypervisor.call, DefinedDomain(live, inactive))


@pytest.fixture
async def plan_ctx() -> AsyncIterator[HostContext]:
    """A source's host context whose libvirt calls run on its executor (closed after)."""
    hv = Hypervisor(LibvirtSettings(), "test:///default", "src", lambda _e: None, Metrics())
    yield HostContext(host="src", boot_id="b", version="0", subjects=Subjects("virt", "src"),
                      hypervisor=hv, metrics=hv.metrics, started_at=0.0,
                      failover=FailoverSettings(guest_check="off"),
                      probed=Probed(caps(True)))  # fmt: skip
    await hv.close()


@pytest.mark.parametrize("form", nic_forms.FORMS, ids=lambda f: f.name)
async def test_each_nic_form_is_planned_from_its_definition(
    form: nic_forms.Form, plan_ctx: HostContext
) -> None:
    """Every failover NIC form libvirt produces: the primary and its standby are found in the live XML, the definition recorded is the inactive one (a hostdev network port stays a port of its network), and a destination without a pool is refused exactly when the form names a host's VF."""
    ctx = plan_ctx
    dom = defined(ctx, nic_forms.domain_xml(form.live), nic_forms.domain_xml(form.inactive))
    req = FailoverRequest(domain="d", destination="dst")
    p, standby = find_pair(interfaces(nic_forms.domain_xml(form.live)), None)
    assert (p.alias, standby and standby.alias) == (
        nic_forms.PRIMARY_ALIAS,
        nic_forms.STANDBY_ALIAS,
    )
    if form.needs_pool:
        with pytest.raises(InvalidRequest, match="no primary pool"):
            await make_plan(ctx, dom, req, registration("dst"))
        plan = await make_plan(ctx, dom, req, registration("dst", "pci"))
    else:
        plan = await make_plan(ctx, dom, req, registration("dst"))
    recorded = ET.fromstring(plan.device)
    expected = ET.fromstring(form.inactive)
    assert (recorded.tag, recorded.get("type")) == (expected.tag, expected.get("type"))
    if form.name == "hostdev-network":
        assert recorded.find("source").get("network") == nic_forms.NETWORK
        assert recorded.find("source/address") is None, "no VF of this host in the record"


async def test_a_plain_hostdev_primary_is_planned_with_the_standbys_mac(
    plan_ctx: HostContext,
) -> None:
    """A plain <hostdev> has no MAC; the destination's VF must get the standby's, or the guest never pairs it: the plan (and the record) carry the standby's MAC."""
    xml = nic_forms.domain_xml(nic_forms.PLAIN_HOSTDEV)
    plan = await make_plan(plan_ctx, defined(plan_ctx, xml, xml),
                           FailoverRequest(domain="d", destination="dst"),
                           registration("dst", "pci"))  # fmt: skip
    assert plan.mac == nic_forms.MAC


@pytest.mark.parametrize(
    ("form", "mode", "why"),
    [
        ("hostdev-interface", "sequenced", "PCI address"),
        ("hostdev-network", "qemu", "every condition"),
        ("plain-hostdev", "sequenced", "PCI address"),
    ],
)
async def test_auto_chooses_a_mode_that_can_work_and_says_why(
    form: str, mode: str, why: str, plan_ctx: HostContext
) -> None:
    """`auto` never picks mode qemu for a VF given by PCI address (the destination would start QEMU with the source's address); mode qemu asked for it is refused, naming the reason."""
    f = next(x for x in nic_forms.FORMS if x.name == form)
    ctx = plan_ctx
    dom = defined(ctx, nic_forms.domain_xml(f.live), nic_forms.domain_xml(f.inactive))
    plan = await make_plan(ctx, dom, FailoverRequest(domain="d", destination="dst"),
                           registration("dst", "pci"))  # fmt: skip
    assert plan.mode == mode
    assert why in plan.mode_reason
    if mode == "sequenced":
        with pytest.raises(Unsupported, match="PCI address"):
            await make_plan(ctx, dom, FailoverRequest(domain="d", destination="dst", mode="qemu"),
                            registration("dst", "pci"))  # fmt: skip


@pytest.mark.parametrize("alias", ["hostdev0", "net1", ""])
def test_a_primary_without_a_user_alias_is_refused_with_the_fix(alias: str) -> None:
    """libvirt keeps only `ua-` aliases: a primary with a libvirt-made alias (or none) is refused, and the message says how to fix the definition."""
    live = nic_forms.HOSTDEV_INTERFACE.replace(
        f"<alias name='{nic_forms.PRIMARY_ALIAS}'/>", f"<alias name='{alias}'/>" if alias else ""
    )
    with pytest.raises(InvalidRequest, match="user alias") as err:
        find_pair(interfaces(nic_forms.domain_xml(live)), None)
    assert "<alias name='ua-" in err.value.message


@pytest.mark.parametrize("form", nic_forms.FORMS, ids=lambda f: f.name)
@pytest.mark.parametrize("resource", ["pci:0000:5e:10.3", "network:sriov-b"])
def test_the_destination_definition_carries_everything_but_the_source_hosts_resource(
    form: nic_forms.Form, resource: str, tmp_path: Path
) -> None:
    """The primary plugged on the destination keeps every element of the recorded one that names no resource of the source host (VLAN, port profile, driver, ROM, link, MAC, alias, teaming), takes the reserved VF or network, and validates against libvirt's schema."""
    out = ET.fromstring(pool(tmp_path).definition(resource, form.inactive))
    rec = ET.fromstring(form.inactive)
    carried = sorted(el.tag for el in rec if el.tag not in ("source", "address", "target"))
    assert sorted(el.tag for el in out if el.tag != "source") == carried
    for tag in carried:
        assert ET.tostring(out.find(tag)) == ET.tostring(rec.find(tag)), tag
    if resource.startswith("pci:"):
        (addr,) = out.findall("source/address")
        assert (addr.get("bus"), addr.get("slot"), addr.get("function")) == ("0x5e", "0x10", "0x3")
        assert (out.tag, out.get("type")) == ("interface", "hostdev"), (
            "a plain hostdev becomes an interface (libvirt sets the MAC only of those)"
        )
    else:
        assert out.get("type") == "network"
        assert out.find("source").get("network") == "sriov-b"
    validate_domain(nic_forms.domain_xml(ET.tostring(out, encoding="unicode")), tmp_path)


def validate_domain(xml: str, tmp_path: Path) -> None:
    """libvirt's RNG schema (virt-xml-validate, Debian package libvirt-clients)."""
    path = tmp_path / "domain.xml"
    path.write_text(xml)
    out = subprocess.run(["virt-xml-validate", str(path), "domain"], capture_output=True,
                         text=True, check=False)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr + xml


@pytest.mark.parametrize("form", nic_forms.FORMS, ids=lambda f: f.name)
def test_every_form_and_its_fixture_domain_validate_against_libvirts_schema(
    form: nic_forms.Form, tmp_path: Path
) -> None:
    """The fixtures are libvirt-valid documents (the forms they stand for are libvirt's own)."""
    validate_domain(nic_forms.domain_xml(form.inactive), tmp_path)
    validate_domain(nic_forms.domain_xml(form.live), tmp_path)


async def test_a_vf_held_by_any_domain_is_not_handed_out(
    start_agent: Callable[..., Awaitable[RunningAgent]], nc: NATS, testdrv: Any
) -> None:
    """pci_in_use sees plain <hostdev> sources (no type='pci' on their address) and the definitions of stopped domains: failover.reserve skips the VFs they hold."""
    holders = [
        testdrv.defineXML(
            nic_forms.domain_xml(primary, name=f"t-vf{i}", kind="test").replace(
                nic_forms.STANDBY, ""
            )
        )
        for i, primary in enumerate([
            nic_forms.PLAIN_HOSTDEV,
            nic_forms.HOSTDEV_INTERFACE.replace("bus='0x3b'", "bus='0x3c'"),
        ])
    ]  # fmt: skip
    assert not any(d.isActive() for d in holders), "stopped: only their definitions hold them"
    agent = await start_agent(**{"failover.pool_pci": ["0000:3b:02.1", "0000:3c:02.1",
                                                       "0000:3d:02.1"]})  # fmt: skip
    body = {"operation_id": "ab12", "domain": TEST_DOMAIN_UUID, "alias": "ua-vf0",
            "source": "hv-other", "lease_s": 600}  # fmt: skip
    reserved = await call(nc, agent.host, "failover.reserve", body)
    assert reserved["result"]["resource"] == "pci:0000:3d:02.1", reserved


async def test_a_timeout_no_destination_can_lease_for_is_refused_before_anything_happens(
    start_agent: Callable[..., Awaitable[RunningAgent]], nc: NATS, testdrv: Any
) -> None:
    """timeout_s 86,300 plus the replug window exceeds the longest lease a destination grants: refused at the request (naming timeout_s and its limit), no operation started - not a reservation refused halfway."""
    source = await start_agent()
    destination = await start_agent()
    dom = running_pair(testdrv, "t-lease")
    req = {"domain": dom.name(), "destination": destination.host, "timeout_s": 86_300}
    reply = await call(nc, source.host, "migrate_with_failover", req)
    assert reply["ok"] is False, reply
    assert reply["error"]["code"] == "invalid_request", reply
    assert "timeout_s" in reply["error"]["message"]
    assert reply["error"]["details"]["max_timeout_s"] < 86_300
    ops = await call(nc, source.host, "operation.list")
    assert ops["result"] == [], "no operation was started"


async def test_one_change_at_a_time_on_a_domain_across_verbs(
    start_agent: Callable[..., Awaitable[RunningAgent]], nc: NATS, testdrv: Any
) -> None:
    """While migrate_with_failover runs on a domain (here held at its reserve step by a destination that does not answer yet), destroy, shutdown, suspend, device.detach and migrate on it answer `conflict` naming the operation and do not act; the operation's own cancel is taken; after it ends the verbs act again."""
    agent = await start_agent(**{"failover.peer_timeout_s": 60})
    kv = await nc.jetstream().key_value("virt_hosts")
    await kv.put("ghost", msgspec.json.encode(registration("ghost")))
    asked = asyncio.Event()

    async def hold(msg: Any) -> None:
        if ".failover.release." in msg.subject:  # virt.ghost.cmd.failover.release.<caller>
            await msg.respond(b'{"ok": true, "result": {"released": true}}')
        else:
            asked.set()  # a reserve this destination has not answered yet

    sub = await nc.subscribe("virt.ghost.cmd.>", cb=hold)
    await subscribed(nc)
    dom = running_pair(testdrv, "t-busy")
    try:
        started = await call(nc, agent.host, "migrate_with_failover",
                             {"domain": dom.name(), "destination": "ghost"})  # fmt: skip
        op_id = started["result"]["operation_id"]
        await asyncio.wait_for(asked.wait(), 30)
        for verb, body in [
            ("domain.destroy", {}), ("domain.shutdown", {}), ("domain.suspend", {}),
            ("device.detach", {"alias": "ua-primary0"}), ("migrate", {"destination": "ghost"}),
        ]:  # fmt: skip
            reply = await call(nc, agent.host, verb, {"domain": dom.name(), **body})
            assert reply["ok"] is False, (verb, reply)
            assert reply["error"]["code"] == "conflict", (verb, reply)
            assert op_id in reply["error"]["message"] + str(reply["error"]["details"]), reply
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING, "none of them acted"
        assert "ua-primary0" in dom.XMLDesc(0)
        cancel = await call(nc, agent.host, "operation.cancel", {"operation_id": op_id})
        assert cancel["ok"] is True, cancel
        assert (await ended(nc, agent.host, op_id))["state"] == "cancelled"
        suspended = await call(nc, agent.host, "domain.suspend", {"domain": dom.name()})
        assert suspended["ok"] is True, suspended
    finally:
        await sub.unsubscribe()


async def test_a_detach_libvirt_refuses_at_once_ends_the_unplug(
    start_agent: Callable[..., Awaitable[RunningAgent]], nc: NATS, testdrv: Any
) -> None:
    """libvirt refuses the detach outright (the test driver cannot hot-unplug): no DEVICE_REMOVED will ever come, so the operation ends `failed` at once (the primary never left), the record is cleared, the reservation given back, and the next request is not refused as `conflict`."""
    source = await start_agent()
    destination = await start_agent()
    dom = running_pair(testdrv, "t-refused")
    req = {"domain": dom.name(), "destination": destination.host}
    started = await call(nc, source.host, "migrate_with_failover", req)
    op_id = started["result"]["operation_id"]
    got = await ended(nc, source.host, op_id)
    assert got["state"] == "failed", got
    assert [s["step"] for s in got["steps"]][-2:] == ["unplug", "rollback"]
    with pytest.raises(libvirt.libvirtError):
        dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NS, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    assert destination.agent.fleet is not None
    assert destination.agent.fleet.reconciler.pool.active() == [], "the reservation was given back"
    again = await call(nc, source.host, "migrate_with_failover", req)
    assert again["ok"] is True, again


async def test_v1_agent_to_agent_calls_are_refused_once_the_transition_is_over(
    nc: NATS, start_agent: Callable[..., Awaitable[RunningAgent]]
) -> None:
    """Contract v1.1 names the caller in the subject (`failover.release.<host>`). During a
    rolling upgrade the v1 form is still served; with commands.accept_v1_peer_calls false it
    is refused, naming the form and the setting, and the v1.1 form still works."""
    strict = await start_agent(**{"commands.accept_v1_peer_calls": False})
    old = await call(nc, strict.host, "failover.release", {"reservation_id": "ab12"})
    assert old["error"]["code"] == "forbidden", old
    assert "commands.accept_v1_peer_calls" in old["error"]["message"]
    new = await call(nc, strict.host, "failover.release.hv09", {"reservation_id": "ab12"})
    assert new == {"ok": True, "result": {"released": False}}
    lenient = await start_agent()
    assert (await call(nc, lenient.host, "failover.release", {"reservation_id": "ab12"}))["ok"]


async def test_state_stays_bounded_under_many_short_operations_and_domains(tmp_path: Path) -> None:
    """A soak, on the real journal and the real lock table: 20,000 short operations and
    5,000 domains coming and going (`make bench` runs more). The journal keeps at most
    `commands.operations_max` finished operations and none past the retention; the per-domain
    locks are gone once released; the idempotency outcomes past their window are pruned."""
    from agent.envelope import Operation  # noqa: PLC0415
    from agent.operations import DomainLocks  # noqa: PLC0415

    journal = Journal(tmp_path / "operations.db")
    locks = DomainLocks()
    now = time.time()
    for i in range(20_000):
        op = Operation(id=f"{i:x}", verb="migrate", domain=f"d{i % 5000}", state="succeeded", step="verify",
                       created=now - 20_000 + i, updated=now - 20_000 + i)  # fmt: skip
        journal.save(op)
        if i % 4 == 0:
            async with locks.hold(op.domain):
                pass
        journal.record_outcome(("", "ping", f"r{i}"), "d", b"{}")
    journal.db.execute("UPDATE requests SET at = at - 7200 WHERE request_id < 'r5'")
    pruned = journal.prune(max_operations=1000, retention_s=10_000, outcomes_window_s=3600)
    count = journal.db.execute("SELECT count(*) FROM operations").fetchone()[0]
    assert count == 1000
    oldest = journal.db.execute("SELECT min(created) FROM operations").fetchone()[0]
    assert oldest >= now - 10_000
    assert pruned["requests"] > 0
    assert len(locks) == 0
    journal.close()


async def test_a_plain_suspend_and_resume_costs_the_reconciler_no_libvirt_call(
    start_agent: Callable[..., Awaitable[RunningAgent]], testdrv: Any
) -> None:
    """Only what can bring a domain an owed primary makes the reconciler look at it at once:
    a start, a resume after a migration, or a resume of a domain it found waiting because it
    was paused. A plain suspend/resume is not one of them - it used to cost two libvirt calls
    (lookup, metadata) on the event path for each resume. A paused domain with a record is
    still looked at as soon as it resumes."""
    agent = await start_agent(**{"failover.reconcile_interval_s": 3600.0})
    metric = agent.agent.metrics.registry.get_sample_value
    dom = define(testdrv)
    dom.create()
    await asyncio.sleep(0.5)  # the start is looked at
    before = metric("virt_agent_failover_reconcile_checks_total") or 0.0
    for _ in range(50):
        dom.suspend()
        dom.resume()
        await asyncio.sleep(0.25)  # past the reconciler's minimum gap: each resume could count
    await agent.settled()
    assert (metric("virt_agent_failover_reconcile_checks_total") or 0.0) == before


def test_the_lease_asked_for_covers_the_unplug_too(plan_ctx: HostContext) -> None:
    """The destination holds the primary from the reserve until the replug: the unplug (up to devices.detach_timeout_s, while the guest releases the device), the migration and the replug window - a lease without the unplug can end while the guest is still letting go."""
    from agent.settings import DeviceSettings  # noqa: PLC0415
    from handlers.failover.plan import LEASE_MARGIN_S, lease_needed  # noqa: PLC0415

    plan_ctx.devices = DeviceSettings(detach_timeout_s=240)
    req = FailoverRequest(domain="d", destination="dst", timeout_s=600)
    expected = 240 + 600 + plan_ctx.failover.replug_timeout_s + LEASE_MARGIN_S
    assert lease_needed(plan_ctx, req) == expected
