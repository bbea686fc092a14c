"""migrate-with-failover on every form and failure path that needs no QEMU: a domain with two
pairs, the MAC a plain <hostdev> primary gets, a `not found` that is not the domain, an
incoming migration's job, definitions compared whatever their indentation, and the typed
journal its recovery reads."""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from typing import Any

import libvirt
import msgspec
import pytest
from nats.aio.client import Client as NATS

from agent.devices import interfaces
from agent.domain import Domain
from agent.errors import LibvirtFailure, NotFound, Unsupported
from agent.failover import NS, PREFIX, Record, _same_nic, record_to_xml, write_record
from handlers.failover import find_pair
from handlers.failover.steps import PlanStep, ReserveStep, RollbackStep, read_steps
from tests import nic_forms
from tests.support.agents import RunningAgent
from tests.support.bus import call
from tests.support.operations import ended, running_pair

Start = Callable[..., Awaitable[RunningAgent]]

SECOND_VF = (nic_forms.HOSTDEV_INTERFACE.replace("ua-vf0", "ua-vf1")
             .replace("slot='0x02'", "slot='0x03'").replace(nic_forms.MAC, "52:54:00:6e:69:64")
             .replace("persistent='ua-standby0'", "persistent='ua-standby1'"))  # fmt: skip
SECOND_STANDBY = (nic_forms.STANDBY.replace("ua-standby0", "ua-standby1")
                  .replace(nic_forms.MAC, "52:54:00:6e:69:64"))  # fmt: skip


def test_a_domain_with_two_failover_pairs_is_refused_naming_the_other() -> None:
    """libvirt would migrate the second pair's VF with this host's PCI address, past every pool: refused with the list of the other passthrough NICs, whichever primary is named."""
    xml = nic_forms.domain_xml(nic_forms.HOSTDEV_INTERFACE + SECOND_STANDBY + SECOND_VF)
    with pytest.raises(Unsupported, match="ua-vf1") as err:
        find_pair(interfaces(xml), None)
    assert err.value.details["others"] == ["ua-vf1"]
    with pytest.raises(Unsupported, match="ua-vf0"):
        find_pair(interfaces(xml), "ua-vf1")


def test_the_same_nic_is_the_same_however_it_is_indented() -> None:
    """The persistent definition is replaced only when the plugged NIC differs: not for a whitespace difference in libvirt's formatting (it was detached and attached again on every settle)."""
    # libvirt formats <source> over three lines; the agent's own definitions on one.
    libvirts = nic_forms.HOSTDEV_INTERFACE.replace("<source><address", "<source>\n        <address")
    libvirts = libvirts.replace("/></source>", "/>\n      </source>")
    assert libvirts != nic_forms.HOSTDEV_INTERFACE
    assert _same_nic(libvirts, nic_forms.HOSTDEV_INTERFACE)
    other = nic_forms.HOSTDEV_INTERFACE.replace("slot='0x02'", "slot='0x04'")
    assert not _same_nic(other, nic_forms.HOSTDEV_INTERFACE)


class IncomingMigration:
    """A running test-driver domain whose jobInfo answers as libvirt's qemu driver does on
    the destination of a migration (VIR_ERR_OPERATION_UNSUPPORTED, "migration statistics are
    available only on the source host"); the test driver has no jobs to show it."""

    def __init__(self, dom: Any) -> None:
        self.dom = dom

    def __getattr__(self, name: str) -> Any:
        return getattr(self.dom, name)

    def jobInfo(self) -> Any:  # noqa: N802 - libvirt's name
        err = libvirt.libvirtError("migration statistics are available only on the source host")
        err.err = (libvirt.VIR_ERR_OPERATION_UNSUPPORTED, 0, str(err), 2, "", None, None, 0, 0)
        raise err


async def test_an_incoming_migration_is_a_job_the_reconciler_waits_for(
    start_agent: Start, testdrv: Any
) -> None:
    agent = await start_agent()
    assert agent.agent.fleet is not None
    reconciler = agent.agent.fleet.reconciler
    dom = running_pair(testdrv, "t-incoming")
    await write_record(await reconciler.hv.domain(dom.UUIDString()), Record(
        operation="ab01", source="hv-src", destination=agent.host, alias="ua-primary0",
        mac=nic_forms.MAC, mode="sequenced", state="owed", since=time.time(),
        device=nic_forms.E1000E_PRIMARY))  # fmt: skip
    out = await reconciler.settle(Domain(reconciler.hv.call, IncomingMigration(dom)))
    assert out.settled.value == "waiting", out
    assert "incoming migration" in out.why


async def test_a_not_found_that_is_not_the_domain_keeps_the_primary_owed(
    start_agent: Start, testdrv: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plug that libvirt answers `not found` for a network (VIR_ERR_NO_NETWORK: the hostdev network is missing here) is a failure of the plug, not a domain that vanished: counted, backed off, and the domain still counts as owed a primary (the alert's gauge). The settle is made to fail so because the test driver refuses every attach before it looks for a network."""
    agent = await start_agent()
    assert agent.agent.fleet is not None
    reconciler = agent.agent.fleet.reconciler
    dom = running_pair(testdrv, "t-nonet")

    async def no_network(*_a: Any, **_k: Any) -> Any:
        raise NotFound("Network not found: no network with matching name 'sriov'",
                       libvirt_code=libvirt.VIR_ERR_NO_NETWORK)  # fmt: skip

    handle = await reconciler.hv.domain(dom.UUIDString())
    monkeypatch.setattr(reconciler, "settle", no_network)
    failed_before = reconciler.metrics.replugs.labels("failed")._value.get()
    owed = await reconciler._settle_counted(handle, time.monotonic())
    assert owed is True, "still owed a primary"
    assert reconciler.metrics.replugs.labels("failed")._value.get() == failed_before + 1
    assert dom.UUIDString() in reconciler._retry_at, "backed off"


async def test_the_failover_journal_is_typed_on_both_sides(
    start_agent: Start, nc: NATS, testdrv: Any
) -> None:
    """What the operation journals (plan, reserve, unplug, rollback here: the test driver refuses the detach) reads back as the typed steps its recovery uses; a step with a field the types do not know under a known name fails loudly instead of being read as absent."""
    source = await start_agent()
    destination = await start_agent()
    dom = running_pair(testdrv, "t-typed")
    started = await call(nc, source.host, "migrate_with_failover",
                         {"domain": dom.name(), "destination": destination.host})  # fmt: skip
    got = await ended(nc, source.host, started["result"]["operation_id"])
    steps = read_steps(got["steps"])
    assert isinstance(steps[0], PlanStep)
    assert steps[0].destination == destination.host
    reserve = next(s for s in steps if isinstance(s, ReserveStep))
    assert reserve.reservation
    assert reserve.resource == "recorded"
    assert isinstance(steps[-1], RollbackStep)
    broken = [dict(got["steps"][0], destination=42)]
    with pytest.raises(msgspec.ValidationError):
        read_steps(broken)
    assert ET.fromstring(nic_forms.E1000E_PRIMARY).tag == "interface"


async def test_device_detach_of_a_network_port_records_the_port_not_its_vf(
    start_agent: Start, nc: NATS, testdrv: Any
) -> None:
    """A port of a hostdev network runs as `<interface type='hostdev'>` with this host's VF; `device.detach` records what the definition says (the network's port), so `device.attach` asks the network again instead of plugging that VF by address behind its back. The running domain shows the VF and its definition the port, as libvirt shows a hostdev network's port (the test driver cannot detach: the record is written before the unplug)."""
    agent = await start_agent()
    xml = nic_forms.domain_xml(nic_forms.NETWORK_LIVE, name="t-port", kind="test",
                               uuid="0f0e0d0c-0b0a-4908-8706-050403020100")  # fmt: skip
    dom = testdrv.defineXML(xml)
    dom.create()
    testdrv.defineXML(xml.replace(nic_forms.NETWORK_LIVE, nic_forms.NETWORK_INACTIVE))
    await call(nc, agent.host, "device.detach",
               {"domain": "t-port", "alias": nic_forms.PRIMARY_ALIAS})  # fmt: skip
    assert agent.agent.fleet is not None
    recorded = agent.agent.fleet.journal.recorded_device(dom.UUIDString(), nic_forms.PRIMARY_ALIAS)
    assert recorded is not None
    el = ET.fromstring(recorded)
    assert el.get("type") == "network", recorded
    assert el.find("source/address") is None, "no VF address of this host recorded"


async def test_a_rollback_that_cannot_plug_the_primary_back_says_it_is_owed(
    start_agent: Start, nc: NATS, testdrv: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The unplug ends (here libvirt refuses the detach), the rollback asks the reconciler to settle the primary, and that fails: the domain stays on the source without its primary for now. The operation must say so - `rolled_back` with `primary_owed` and the reason - and not `failed`, which says the primary never left. The settle is made to fail by a stand-in, since on the test driver the primary never leaves."""
    source = await start_agent()
    destination = await start_agent()
    assert source.agent.fleet is not None
    reconciler = source.agent.fleet.reconciler

    async def cannot(*_a: Any, **_k: Any) -> Any:
        raise LibvirtFailure("internal error: No more available PCI slots")

    monkeypatch.setattr(reconciler, "settle", cannot)
    dom = running_pair(testdrv, "t-owedback")
    started = await call(nc, source.host, "migrate_with_failover",
                         {"domain": dom.name(), "destination": destination.host})  # fmt: skip
    got = await ended(nc, source.host, started["result"]["operation_id"])
    assert got["state"] == "rolled_back", got
    assert got["error"]["details"]["primary_owed"] is True, got
    assert "PCI slots" in got["error"]["details"]["primary_owed_reason"], got


async def test_recovery_does_not_give_up_while_libvirt_still_migrates_the_domain(
    start_agent: Start, nc: NATS, testdrv: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent died during `migrate`; after its restart libvirtd still runs the migration job (here for 3 s, past the 1 s replug window). Recovery must wait for the job's outcome, not give up and report a failure while the domain may still land on the destination; once the job ends with the domain here, the operation ends `rolled_back`. libvirt's test driver has no jobs: jobInfo is answered by a stand-in for this domain only."""
    from agent.envelope import Operation  # noqa: PLC0415
    from agent.journal import Journal  # noqa: PLC0415

    dom = running_pair(testdrv, "t-stilljob")
    u = dom.UUIDString()
    rec = Record(operation="cd" * 16, source="here", destination="hv-gone", alias="ua-primary0",
                 mac=nic_forms.MAC, mode="sequenced", state="owed", since=time.time(),
                 device=nic_forms.E1000E_PRIMARY)  # fmt: skip
    dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, record_to_xml(rec), PREFIX, NS,
                    libvirt.VIR_DOMAIN_AFFECT_LIVE)  # fmt: skip
    job_ends = time.monotonic() + 3.0
    real_job_info = libvirt.virDomain.jobInfo

    def job_info(self: Any) -> Any:
        if self.UUIDString() == u and time.monotonic() < job_ends:
            return [libvirt.VIR_DOMAIN_JOB_UNBOUNDED, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        return real_job_info(self)

    monkeypatch.setattr(libvirt.virDomain, "jobInfo", job_info)
    steps = [
        {"step": "plan", "mode": "sequenced", "mode_reason": "asked for", "primary": "ua-primary0",
         "standby": "ua-standby0", "mac": nic_forms.MAC, "destination": "hv-gone", "guest": ""},
        {"step": "reserve", "host": "hv-gone", "reservation": "ab01", "resource": "recorded"},
        {"step": "unplug", "alias": "ua-primary0", "mode": "sequenced", "reservation": "ab01"},
        {"step": "migrate", "destination": "hv-gone"},
    ]  # fmt: skip
    op = Operation(id="cd" * 16, verb="migrate_with_failover", domain=u, state="running",
                   step="migrate", created=time.time(), updated=time.time(), steps=steps)  # fmt: skip
    journal = Journal(tmp_path / "a0" / "state" / "operations.db")  # the first agent's
    journal.save(op)
    journal.close()
    agent = await start_agent(**{"failover.replug_timeout_s": 1.0})
    got = await ended(nc, agent.host, op.id, timeout=60)
    assert time.monotonic() >= job_ends, "it did not end while the job ran"
    assert got["state"] == "rolled_back", got
