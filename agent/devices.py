"""Device definitions and hot-plug: the one place a device is unplugged (waiting for libvirt's
DEVICE_REMOVED) or plugged (waiting for DEVICE_ADDED). Used by the `device.*` verbs, by
migrate-with-failover and by the reconcile loop that plugs owed primaries."""

from __future__ import annotations

import asyncio
import json
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.domain import Domain
from agent.errors import AgentError, InvalidRequest, LibvirtFailure, NotFound, Timeout
from agent.events import DomainEvent
from agent.hypervisor import Hypervisor
from agent.nicxml import pci_address
from agent.settings import DeviceSettings


def device_element(domain_xml: str, alias: str) -> ET.Element | None:
    root = ET.fromstring(domain_xml)  # noqa: S314 - libvirt's own XML
    for dev in list(root.find("devices") or []):
        a = dev.find("alias")
        if a is not None and a.get("name") == alias:
            return dev
    return None


def device_xml(domain_xml: str, alias: str) -> str | None:
    """The definition of the device with this alias, without host-chosen parts (the tap
    name, the guest PCI address: the destination picks its own)."""
    dev = device_element(domain_xml, alias)
    if dev is None:
        return None
    for tag in ("target", "address"):
        for t in dev.findall(tag):
            dev.remove(t)
    return ET.tostring(dev, encoding="unicode")


async def defined_form(dom: Domain, live: str, alias: str) -> str:
    """A device's definition to record and to plug again: as the domain's definition has it
    (libvirt's inactive XML), so that a port of a hostdev network stays a port of the network
    of that name (its live form names this host's VF); the live form only for a device plugged
    live and never defined."""
    device = device_xml(await dom.xml(inactive=True), alias) or device_xml(live, alias)
    if device is None:
        raise NotFound(f"the domain has no device with alias {alias!r}", alias=alias)
    return device


def alias_of(xml: str) -> str:
    a = ET.fromstring(xml).find("alias")  # noqa: S314 - from the agent's own config or records
    if a is None or not a.get("name"):
        raise InvalidRequest(
            "the device definition has no <alias name='ua-...'/>; it cannot be tracked"
        )
    return str(a.get("name"))


def template_xml(settings: DeviceSettings, name: str) -> str:
    path = settings.templates.get(name)
    if path is None:
        raise NotFound(
            f"no device template {name!r} in the configuration",
            templates=sorted(settings.templates),
        )
    return Path(path).read_text()


# libvirt keeps only aliases with this prefix across define, attach and migration; any other is
# made by libvirt (`net1`, `hostdev0`) and may change when the device is plugged again.
USER_ALIAS_PREFIX = "ua-"


@dataclass(frozen=True)
class Nic:
    """One network device of a domain, as far as failover cares: an `<interface>`, or a PCI
    `<hostdev>` (a VF given as such, with `<teaming>` since libvirt 7.1; it has no MAC)."""

    alias: str
    mac: str
    type: str  # the interface type; "hostdev" for a plain <hostdev> too
    model: str
    teaming: str  # "", "persistent" or "transient"
    teaming_peer: str  # for a transient member: the alias of its persistent (standby) peer
    element: str = "interface"  # or "hostdev"
    # QEMU pairs it with this standby itself (failover_pair_id set through <qemu:override>):
    # an emulated NIC that QEMU unplugs and plugs back during a migration, like a VF would be.
    qemu_pair: str = ""

    @property
    def user_alias(self) -> bool:
        return self.alias.startswith(USER_ALIAS_PREFIX)


QEMU_NS = "{http://libvirt.org/schemas/domain/qemu/1.0}"


def qemu_failover_pairs(root: ET.Element) -> dict[str, str]:
    """Device alias -> failover_pair_id, from the domain's <qemu:override> (libvirt >= 8.2)."""
    out = {}
    for dev in root.iterfind(f"{QEMU_NS}override/{QEMU_NS}device"):
        for prop in dev.iterfind(f"{QEMU_NS}frontend/{QEMU_NS}property"):
            if prop.get("name") == "failover_pair_id" and dev.get("alias"):
                out[str(dev.get("alias"))] = prop.get("value", "")
    return out


def interfaces(domain_xml: str) -> list[Nic]:
    root = ET.fromstring(domain_xml)  # noqa: S314 - libvirt's own XML
    pairs = qemu_failover_pairs(root)
    out = []
    for dev in [*root.findall("devices/interface"), *root.findall("devices/hostdev[@type='pci']")]:
        plain = dev.tag == "hostdev"
        if plain and dev.find("teaming") is None:
            continue  # a passthrough device that is not a failover member: not a NIC we know
        alias = dev.find("alias")
        mac = dev.find("mac")
        model = dev.find("model")
        teaming = dev.find("teaming")
        name = alias.get("name", "") if alias is not None else ""
        out.append(
            Nic(
                alias=name,
                mac=(mac.get("address", "") if mac is not None else "").lower(),
                type="hostdev" if plain else dev.get("type", ""),
                model=model.get("type", "") if model is not None else "",
                teaming=teaming.get("type", "") if teaming is not None else "",
                teaming_peer=teaming.get("persistent", "") if teaming is not None else "",
                element=dev.tag,
                qemu_pair=pairs.get(name, ""),
            )
        )
    return out


def pci_sources(domain_xml: str) -> set[str]:
    """Host PCI addresses the domain's devices are given: `<interface type='hostdev'>` (source
    address with `type='pci'`) and PCI `<hostdev>` (source address without a type)."""
    root = ET.fromstring(domain_xml)  # noqa: S314 - libvirt's own XML
    found = [
        *root.iterfind("devices/interface[@type='hostdev']/source/address[@type='pci']"),
        *root.iterfind("devices/hostdev[@type='pci']/source/address"),
    ]
    return {pci_address(a) for a in found}


async def qemu_monitor(dom: Domain, execute: str, **arguments: Any
                       ) -> tuple[dict[str, Any] | None, str]:  # fmt: skip
    """One QMP command through libvirt's QEMU monitor passthrough (the domain is marked
    tainted `custom-monitor`): QEMU's reply, or None and why it could not be had."""
    try:
        reply = json.loads(
            await dom.qemu_monitor(json.dumps({"execute": execute, "arguments": arguments}))
        )
    except AgentError as exc:
        return None, exc.message
    except ValueError:
        return None, "QEMU's answer was not JSON"
    return (reply, "") if isinstance(reply, dict) else (None, "QEMU's answer was not an object")


async def failover_negotiated(dom: Domain, standby: str) -> tuple[bool | None, str]:
    """Whether the guest's virtio driver negotiated the failover feature (VIRTIO_NET_F_STANDBY)
    on the standby `standby`, and how that was found. Only a guest that did has a bond that
    carries its traffic while the primary is out; for any other, an unplug cuts it off.

    QEMU tells it (7.2+, `x-query-virtio-status` on the standby's virtio backend) through
    libvirt's QEMU monitor passthrough, which marks the domain tainted `custom-monitor`: hence
    the setting failover.guest_check. None when it cannot be told (another hypervisor, an older
    QEMU, the check off)."""

    backend = f"/machine/peripheral/{standby}/virtio-backend"
    reply, why = await qemu_monitor(dom, "x-query-virtio-status", path=backend)
    if reply is None:
        return None, f"QEMU's virtio status could not be read: {why}"
    status = reply.get("return") or {}
    features = json.dumps(status.get("guest-features") or {})
    if "VIRTIO_NET_F_STANDBY" in features:
        return True, "QEMU: the guest negotiated VIRTIO_NET_F_STANDBY on the standby"
    driver_ok = "DRIVER_OK" in json.dumps(status.get("status") or [])
    why = "its virtio driver runs without it" if driver_ok else "its virtio driver never bound"
    return False, f"QEMU: the guest did not negotiate VIRTIO_NET_F_STANDBY on {standby!r} ({why})"


async def qemu_has_device(dom: Domain, alias: str) -> tuple[bool | None, str]:
    """Whether QEMU itself has the device `alias` (libvirt's live XML keeps a failover
    primary whatever QEMU did with it: libvirt 9.0 handles neither UNPLUG_PRIMARY nor
    FAILOVER_NEGOTIATED). Asked through the QEMU monitor passthrough, as the guest check is
    (the domain is marked tainted `custom-monitor`); None when it cannot be told."""

    reply, why = await qemu_monitor(dom, "qom-list", path="/machine/peripheral")
    if reply is None:
        return None, f"QEMU could not be asked: {why}"
    names = {p.get("name") for p in reply.get("return") or [] if isinstance(p, dict)}
    if alias in names:
        return True, f"QEMU has {alias!r}"
    return False, f"QEMU has no device {alias!r} (libvirt still lists it)"


class RemovalFailed(LibvirtFailure):
    """DEVICE_REMOVAL_FAILED: the unplug is over and the device stays."""


async def unplug(
    hv: Hypervisor,
    dom: Domain,
    alias: str,
    timeout_s: float,
    in_flight: Callable[[bool], None] = lambda _now: None,
) -> DomainEvent:
    """Detach by alias from the live domain and wait for DEVICE_REMOVED.

    Raises RemovalFailed on DEVICE_REMOVAL_FAILED (the device stays) and Timeout when the guest
    has not released it in time - the unplug is then still in flight and is never re-sent: a
    second device_del would interrupt the guest's own removal. `in_flight(True)` is called
    before the detach may be sent, `in_flight(False)` once the unplug is over: the device left,
    or it stays (libvirt refused the detach, or the guest refused the removal). Returns the
    DEVICE_REMOVED event (its time is when the guest let the device go)."""
    done = hv.expect(dom.uuid, ("device_removed", "device_removal_failed"), alias)
    try:
        in_flight(True)
        try:
            await dom.detach_alias(alias)
        except AgentError:
            in_flight(False)  # refused at once: no DEVICE_REMOVED will ever come
            raise
        event = await asyncio.wait_for(asyncio.shield(done), timeout_s)
    except TimeoutError:
        raise Timeout(
            f"no DEVICE_REMOVED for {alias!r} within {timeout_s}s; the unplug is still in flight",
            alias=alias,
        ) from None
    finally:
        done.cancel()
    in_flight(False)
    if event.event_type == "device_removal_failed":
        raise RemovalFailed(f"the guest refused to release {alias!r}", alias=alias)
    return event


async def plug(hv: Hypervisor, dom: Domain, xml: str, alias: str, timeout_s: float
               ) -> DomainEvent:  # fmt: skip
    """Attach to the live domain and wait for DEVICE_ADDED (the event is returned)."""
    done = hv.expect(dom.uuid, ("device_added",), alias)
    try:
        await dom.attach(xml)
        return await asyncio.wait_for(asyncio.shield(done), timeout_s)
    except TimeoutError:
        raise Timeout(f"no DEVICE_ADDED for {alias!r} within {timeout_s}s", alias=alias) from None
    finally:
        done.cancel()
