"""The parts of migrate-with-failover that need no hypervisor: finding the primary and its
standby in a domain definition, the destination pool's reservations (a real SQLite journal)
and the definitions it plugs, the failover record's round trip, the [failover] settings."""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from agent.devices import interfaces
from agent.errors import NotFound, Unavailable
from agent.failover import Record, record_from_xml, record_to_xml
from agent.operations import Journal
from agent.pool import Pool
from agent.settings import DeviceSettings, FailoverSettings, load
from handlers.failover import find_pair
from tests.conftest import RunningAgent, call

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


def pool(tmp_path: Path, **settings: object) -> Pool:
    tpl = tmp_path / "vf.xml"
    tpl.write_text("<interface type='bridge'><mac address='52:54:00:ff:ff:ff'/>"
                   "<source bridge='br1'/><model type='e1000e'/><alias name='ua-x'/></interface>")  # fmt: skip
    return Pool(
        FailoverSettings(**settings),  # type: ignore[arg-type]
        DeviceSettings(templates={"vf": str(tpl)}),
        Journal(tmp_path / "ops.db"),
    )


def test_a_pci_pool_hands_out_each_free_vf_once(tmp_path: Path) -> None:
    p = pool(tmp_path, pool_pci=["0000:3b:02.0", "0000:3b:02.1", "0000:3b:02.2"])
    first = p.reserve("op1", "dom1", pci_in_use={"0000:3b:02.0"})
    assert first.resource == "pci:0000:3b:02.1"
    assert p.reserve("op1", "dom1", set()) == first, "the same operation gets the same VF"
    assert p.reserve("op2", "dom2", set()).resource == "pci:0000:3b:02.0"
    assert p.reserve("op3", "dom3", set()).resource == "pci:0000:3b:02.2"
    with pytest.raises(Unavailable, match="no free VF"):
        p.reserve("op4", "dom4", set())
    assert p.release(first.id)
    assert p.reserve("op4", "dom4", set()).resource == "pci:0000:3b:02.1"
    # Reservations outlive the process: a new Pool on the same journal sees them.
    again = Pool(p.settings, p.devices, Journal(tmp_path / "ops.db"))
    assert {r.operation for r in again.active()} == {"op2", "op3", "op4"}


def test_an_expired_lease_frees_its_vf(tmp_path: Path) -> None:
    p = pool(tmp_path, pool_pci=["0000:3b:02.0"], lease_s=0.001)
    p.reserve("op1", "dom1", set())
    time.sleep(0.01)
    assert p.active() == []
    assert p.reserve("op2", "dom2", set()).resource == "pci:0000:3b:02.0"


def test_a_lease_covers_what_the_source_says_it_may_need(tmp_path: Path) -> None:
    p = pool(tmp_path, pool_pci=["0000:3b:02.0"], lease_s=300)
    r = p.reserve("op1", "dom1", set(), lease_s=900)
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
    assert agent.agent.reconciler is not None
    assert agent.agent.reconciler.pool.active() == []
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
    assert pool(tmp_path).definition("recorded", HOSTDEV) == HOSTDEV


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
